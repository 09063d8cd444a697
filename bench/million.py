#!/usr/bin/env python3
"""Plan and record a job of many files; time `status` on it.

  python bench/million.py [--files 1000000] [--dir /var/tmp/hpcmove-million]

Creates a tree of empty files (once; reused), then measures with /usr/bin/time:
`hpcmove submit` (walk, plan, record every file and slice, write the manifest,
submit; the Slurm backend when SLURM_CONF is set, else local) for wall time and
peak RSS, then `hpcmove status` (one line) and `hpcmove status --summary` on it.
The job is cancelled afterwards; nothing is copied to completion.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys


def make_tree(root, n):
    marker = os.path.join(root, f".complete-{n}")
    if os.path.exists(marker):
        return
    shutil.rmtree(root, ignore_errors=True)
    per_dir = 1000
    for d in range(0, n, per_dir):
        sub = os.path.join(root, "src", f"d{d // per_dir:05d}")
        os.makedirs(sub)
        for i in range(d, min(n, d + per_dir)):
            os.close(os.open(os.path.join(sub, f"f{i:07d}"), os.O_CREAT | os.O_WRONLY, 0o644))
    open(marker, "w").close()


def timed(argv, env):
    done = subprocess.run(["/usr/bin/time", "-f", "%e %M", *argv], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stderr}")
    seconds, kib = done.stderr.strip().splitlines()[-1].split()
    return float(seconds), int(kib) * 1024, done.stdout


def measure(root, env):
    """Submit the tree under `root` (files made by make_tree), time status on the job,
    cancel it. Returns {files, backend, submit_s, submit_rss, status_s, summary_s, line}."""
    env = dict(env, HPCMOVE_HOME=os.path.join(root, "home"))
    shutil.rmtree(env["HPCMOVE_HOME"], ignore_errors=True)
    dst = os.path.join(root, "dst")
    shutil.rmtree(dst, ignore_errors=True)
    os.makedirs(dst)
    hm = [sys.executable, "-m", "hpcmove"]
    backend = ["--backend", "slurm", "-p", "dtn"] if env.get("SLURM_CONF") else \
        ["--backend", "local"]
    plan_s, plan_rss, out = timed(hm + ["submit", *backend, "--stripe-width", "1",
                                        "--bwlimit", "1", os.path.join(root, "src"), dst], env)
    job = re.search(r"(hm-\d+)", out).group(1)
    status_s, _, line = timed(hm + ["status", job], env)
    summary_s, _, _ = timed(hm + ["status", "--summary", job], env)
    subprocess.run(hm + ["cancel", job], env=env, capture_output=True)
    files = sum(len(names) for _, _, names in os.walk(os.path.join(root, "src")))
    return {"files": files, "backend": backend[1], "submit_s": plan_s, "submit_rss": plan_rss,
            "status_s": status_s, "summary_s": summary_s, "line": line.strip()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--dir", default="/var/tmp/hpcmove-million")
    args = ap.parse_args()
    make_tree(args.dir, args.files)
    r = measure(args.dir, os.environ)
    print(f"{r['files']} files ({r['backend']} backend)")
    print(f"submit (walk + plan + record + manifest + submit): {r['submit_s']:.1f} s, "
          f"peak RSS {r['submit_rss'] / 2**20:.0f} MiB")
    print(f"status (one line): {r['status_s']:.2f} s; status --summary: {r['summary_s']:.2f} s")
    print(r["line"])


if __name__ == "__main__":
    main()
