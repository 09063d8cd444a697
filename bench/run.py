#!/usr/bin/env python3
"""hpcmove against its peers, measured in one run: medians of interleaved rounds.

  python bench/run.py [--size 2G] [--rounds 3] [--dir /var/tmp/hpcmove-bench] [--slurm]

Rows: a verified hpcmove copy on the local backend, `cp`, `rsync --whole-file`;
with --slurm also the same copy through the Slurm testbed and the submit-to-Done
time of a 1-file job. The page cache is warm (a warm-up round runs first), as in
the figures the issues quote. Prints a table of medians and of each peer's time
relative to hpcmove's.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units \
        else int(text)


def make_file(path, size):
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 64 << 20)
            f.write(os.urandom(n))
            left -= n


def timed(argv, env=None):
    start = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def fresh(path):
    """An empty destination, and no dirty pages left by the previous row: without the
    sync, each row pays for the writeback of the one before it."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)
    os.sync()
    return path


def warm(path):
    """Read the source through the page cache so every row starts warm."""
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def rows(args, src, work):
    env = dict(os.environ, HPCMOVE_HOME=os.path.join(work, "home"))
    hpcmove = [sys.executable, "-m", "hpcmove", "submit", "--wait"]
    out = {
        "hpcmove (local, verified)": lambda d: timed(hpcmove + ["--backend", "local", src, d], env),
        "cp": lambda d: timed(["cp", src, d]),
        "rsync --whole-file": lambda d: timed(["rsync", "--whole-file", src, d]),
    }
    if args.slurm:
        out["hpcmove (slurm testbed, verified)"] = lambda d: timed(
            hpcmove + ["--backend", "slurm", "-p", "dtn", src, d], env)
        tiny = os.path.join(work, "tiny")
        with open(tiny, "wb") as f:
            f.write(b"x" * 4096)
        out["slurm submit-to-Done, 1 small file"] = lambda d: timed(
            hpcmove + ["--backend", "slurm", "-p", "dtn", tiny, d], env)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2G")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp/hpcmove-bench")
    ap.add_argument("--slurm", action="store_true", help="also measure through Slurm")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    size = parse_size(args.size)
    src = os.path.join(args.dir, f"random-{args.size}.bin")
    make_file(src, size)
    table = rows(args, src, args.dir)
    times = {name: [] for name in table}
    for round_ in range(args.rounds + 1):  # round 0 warms the cache and is not counted
        for name, fn in table.items():
            dst = fresh(os.path.join(args.dir, "dst"))
            warm(src)
            t = fn(dst)
            if round_:
                times[name].append(t)
            print(f"round {round_} {name}: {t:.2f} s", file=sys.stderr)
    shutil.rmtree(os.path.join(args.dir, "dst"), ignore_errors=True)
    ours = statistics.median(times["hpcmove (local, verified)"])
    print(f"\n{args.size} file, {args.rounds} rounds, medians (warm cache, {os.cpu_count()} cores)")
    print(f"{'row':40} {'median s':>9} {'MB/s':>8} {'time / hpcmove':>15}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:40} {m:9.2f} {size / m / 1e6:8.0f} {m / ours:15.2f}")


if __name__ == "__main__":
    main()
