#!/usr/bin/env python3
"""hpcmove against its peers, measured in one run: medians of interleaved rounds.

  python bench/run.py [--groups floor,big,small,ssh,sshsmall,sshpull,bigpull,million]
                      [--size 2G]
                      [--files 20000]
                      [--entries 1000000] [--rounds 3] [--dir /var/tmp/hpcmove-bench]
                      [--slurm auto|yes|no] [--no-install] [--fresh-fs SIZE]

Groups (data sets are made once under --dir and reused):
  floor    a 1-byte file through hpcmove, locally and through Slurm: the fixed cost
           of the batch chain before any data moves.
  big      a random file of --size: hpcmove (local backend, verified), cp,
           rsync --whole-file, rsync then rsync -c (transfer + verify, as ffv does),
           the copy engine alone (two processes taking 256 MiB slices in turn, copy +
           verify, no batch chain);
           with Slurm (the testbed; --slurm auto uses it when slurm/testbed answers)
           the same hpcmove copy through Slurm.
  small    a tree of --files files of 1-64 KiB: hpcmove, cp -a, rsync -a, fpsync -n 2,
           and the floor of any all-or-nothing copy (create, write, rename each file;
           two processes, no verification).
  ssh      the --size file to the project's sshd fixture (ssh/testbed, loopback):
           hpcmove (local backend, through a control socket it opens once), scp,
           rsync -e ssh, one `ssh host 'cat > f' < f` stream.
  sshsmall the small tree to the sshd fixture: hpcmove (tar bundles), hpcmove
           --engine rsync (rsync bundles), rsync -a -e ssh.
  sshpull  the small tree from the sshd fixture: hpcmove (tar bundles), rsync -a -e ssh.
  bigpull  the --size file from the sshd fixture: hpcmove (slices), scp.
  million  --entries empty files planned and recorded (bench/million.py's measure):
           submit time and peak RSS, `status`, `status --summary`.

--fresh-fs 40G makes --dir a journaled ext4 file system of its own (root; see fresh_fs).

Every round runs each row of a group once, in turn (A B C A B C ...); round 0 warms
the page cache and is not counted. Before each row the destination is emptied and
the file systems are synced, so no row pays for the writeback of the one before.
Prints one table: medians of wall time and of the CPU time the whole machine used
meanwhile (both ends of the SSH rows run here), and each peer's time divided by
hpcmove's (above 1: hpcmove is faster), with the issue's targets. Missing tools are installed with
apt-get (fpart for fpsync) unless --no-install, in which case their rows are left out.
"""
import argparse
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import million  # noqa: E402  (bench/million.py, beside this file)

OURS = "hpcmove"


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units \
        else int(text)


# --- data sets -------------------------------------------------------------------

def make_file(path, size):
    if os.path.exists(path) and os.path.getsize(path) == size:
        return path
    with open(path + ".tmp", "wb") as f:
        left = size
        while left:
            n = min(left, 64 << 20)
            f.write(os.urandom(n))
            left -= n
    os.rename(path + ".tmp", path)
    return path


def make_tree(root, n, seed=6):
    """n files of 1-64 KiB (random sizes and bytes), 1,000 to a directory."""
    marker = os.path.join(root, f".complete-{n}")
    src = os.path.join(root, "src")
    if os.path.exists(marker):
        return src
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(seed)
    for i in range(n):
        sub = os.path.join(src, f"d{i // 1000:03d}")
        if i % 1000 == 0:
            os.makedirs(sub)
        with open(os.path.join(sub, f"f{i:06d}"), "wb") as f:
            f.write(os.urandom(rng.randint(1, 64) << 10))
    open(marker, "w").close()
    return src


def warm(path):
    """Read the source through the page cache so every row starts warm."""
    paths = [path] if os.path.isfile(path) else \
        (os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for p in paths:
        with open(p, "rb") as f:
            while f.read(16 << 20):
                pass


# --- running ---------------------------------------------------------------------

def timed(argv, env=None, stdin=None):
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, stdin=stdin, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"bench: {' '.join(argv)} exited {done.returncode}:\n"
                         f"{done.stderr.decode(errors='replace')}")
    return seconds


def fresh(path):
    """An empty destination, and no dirty pages left by the previous row: without the
    sync, each row pays for the writeback of the one before it."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)
    os.sync()
    return path


def have(tool, package, args):
    """True when `tool` is on PATH, after installing `package` with apt if allowed."""
    if shutil.which(tool):
        return True
    if args.no_install or os.geteuid() != 0:
        print(f"bench: {tool} missing; its row is left out (apt-get install {package})",
              file=sys.stderr)
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-q", package], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return bool(shutil.which(tool))


def testbed_env(name):
    """The export lines of `<name>/testbed env` as a dict, after `up`; {} if unavailable."""
    script = os.path.join(REPO, name, "testbed")
    if not os.path.exists(script) or os.geteuid() != 0:
        return {}
    if subprocess.run([script, "up"], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).returncode:
        return {}
    out = subprocess.run([script, "env"], capture_output=True, text=True).stdout
    env = {}
    for line in out.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            env[key] = value
    return env


def hpcmove(args, *more):
    return [sys.executable, "-m", "hpcmove", "submit", "--wait", *more]


# The copy engine alone, as two array tasks run it (256 MiB slices, the default, taken
# in turn by two processes: mmap/pread -> xxh3 -> pwrite, then the read-back verify),
# without the batch chain around it: what the data path costs, apart from the
# processes that plan, record and place.
ENGINE_ALONE = """
import os, sys
from hpcmove_plugins.copy import CopyEngine, SliceWork
src, dst = sys.argv[1], os.path.join(sys.argv[2], "engine.out")
st = os.stat(src)
size = 256 << 20
slices = [(off, min(size, st.st_size - off)) for off in range(0, st.st_size, size)]
kids = []
for k in range(2):
    pid = os.fork()
    if pid == 0:
        engine = CopyEngine()
        for off, length in slices[k::2]:
            a, b = engine.copy_slice(SliceWork(src.encode(), dst.encode(), off, length,
                                               st.st_size, st.st_mtime_ns))
            if a != b:
                os._exit(1)
        os._exit(0)
    kids.append(pid)
sys.exit(max(os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) for k in kids))
"""


# --- the groups --------------------------------------------------------------------

def big_rows(args, env):
    src = make_file(os.path.join(args.dir, f"random-{args.size}.bin"), parse_size(args.size))
    rows = {
        OURS: lambda d: timed(hpcmove(args, "--backend", "local", src, d + "/"), env),
        "cp": lambda d: timed(["cp", src, d]),
        "rsync --whole-file": lambda d: timed(["rsync", "--whole-file", src, d]),
        "rsync + rsync -c": lambda d: timed(["rsync", "--whole-file", src, d])
        + timed(["rsync", "-c", src, d]),
        "copy engine alone": lambda d: timed([sys.executable, "-c", ENGINE_ALONE, src, d], env),
    }
    slurm = slurm_env(args)
    if slurm:
        senv = dict(env, **slurm)
        rows[f"{OURS} via Slurm"] = lambda d: timed(
            hpcmove(args, "--backend", "slurm", "-p", "dtn", src, d + "/"), senv)
    return src, parse_size(args.size), rows


# What any copy that puts files in place all or nothing must do per file at least:
# create and write a temporary file, then rename it (as rsync does; hpcmove's spool and
# placement do the same). Two processes (one per core, as hpcmove's tasks), data read
# from the page cache, no verification, no metadata, no record.
CREATE_RENAME = """
import os, sys
src, dst = sys.argv[1], sys.argv[2]
tmp = os.path.join(dst, ".tmp")
os.mkdir(tmp)
todo = []
for d, dirs, files in os.walk(src):
    out = os.path.join(dst, os.path.relpath(d, src))
    os.makedirs(out, exist_ok=True)
    todo += [(os.path.join(d, name), os.path.join(out, name)) for name in files]
kids = []
for k in range(2):
    pid = os.fork()
    if pid == 0:
        for n in range(k, len(todo), 2):
            with open(todo[n][0], "rb") as f:
                data = f.read()
            t = os.path.join(tmp, str(n))
            fd = os.open(t, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            os.close(fd)
            os.rename(t, todo[n][1])
        os._exit(0)
    kids.append(pid)
for pid in kids:
    os.waitpid(pid, 0)
os.rmdir(tmp)
"""


def floor_rows(args, env):
    """A 1-byte file: what the batch chain costs before any data moves (submit, plan,
    record, the runner or scheduler, a task, finalize, each a Python process)."""
    src = os.path.join(args.dir, "one-byte")
    with open(src, "wb") as f:
        f.write(b"x")
    rows = {OURS: lambda d: timed(hpcmove(args, "--backend", "local", src, d + "/"), env)}
    slurm = slurm_env(args)
    if slurm:
        senv = dict(env, **slurm)
        rows[f"{OURS} via Slurm"] = lambda d: timed(
            hpcmove(args, "--backend", "slurm", "-p", "dtn", src, d + "/"), senv)
    return src, 1, rows


def slurm_env(args):
    if args.slurm == "no":
        return {}
    if os.environ.get("SLURM_CONF"):
        return {"SLURM_CONF": os.environ["SLURM_CONF"]}
    found = testbed_env("slurm")
    if not found and args.slurm == "yes":
        raise SystemExit("bench: --slurm yes, but slurm/testbed does not come up")
    return found


def small_rows(args, env):
    src = make_tree(os.path.join(args.dir, f"tree-{args.files}"), args.files) + "/"
    rows = {
        OURS: lambda d: timed(hpcmove(args, "--backend", "local", src, d + "/"), env),
        "cp -a": lambda d: timed(["cp", "-a", src + ".", d]),
        "rsync -a": lambda d: timed(["rsync", "-a", src, d + "/"]),
        "create+rename floor": lambda d: timed([sys.executable, "-c", CREATE_RENAME, src, d]),
    }
    if have("fpsync", "fpart", args):
        work = os.path.join(args.dir, "fpsync-work")
        rows["fpsync -n 2"] = lambda d: timed(["fpsync", "-n", "2", "-t", work, src, d + "/"])
    return src, tree_bytes(src), rows


def tree_bytes(src):
    return sum(os.path.getsize(os.path.join(p, f)) for p, _, fs in os.walk(src) for f in fs)


class Agent:
    """An ssh-agent of our own holding the testbed key (it is passphrase-protected)."""

    def __init__(self, ssh):
        out = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True,
                             check=True).stdout
        self.env = {}
        for part in out.replace("\n", ";").split(";"):
            if "=" in part:
                key, value = part.strip().split("=", 1)
                self.env[key] = value
        askpass = os.path.join(ssh["dir"], "askpass")
        with open(askpass, "w") as f:
            f.write("#!/bin/sh\necho \"$HPCMOVE_TEST_SSH_PASSPHRASE\"\n")
        os.chmod(askpass, 0o700)
        key = os.path.join(ssh["HPCMOVE_TEST_SSH_KEYS"], "root", "id_ed25519")
        subprocess.run(["ssh-add", "-q", key], check=True, stdin=subprocess.DEVNULL,
                       env=dict(os.environ, **self.env, SSH_ASKPASS=askpass,
                                SSH_ASKPASS_REQUIRE="force", DISPLAY=":0",
                                HPCMOVE_TEST_SSH_PASSPHRASE=ssh["HPCMOVE_TEST_SSH_PASSPHRASE"]))

    def stop(self):
        os.kill(int(self.env["SSH_AGENT_PID"]), 15)


def _ssh_setup(args, env, cleanup):
    """(testbed settings, env with our agent, hpcmove env with an open control socket)."""
    ssh = testbed_env("ssh")
    if not ssh:
        print("bench: ssh/testbed is not available; the ssh rows are left out", file=sys.stderr)
        return None, None, None
    ssh["dir"] = args.dir
    agent = Agent(ssh)
    cleanup.append(agent.stop)
    senv = dict(os.environ, **agent.env)
    import tempfile
    sockets = tempfile.mkdtemp(prefix="hm-bench-", dir="/tmp")  # socket paths must be short
    cleanup.append(lambda: shutil.rmtree(sockets, ignore_errors=True))
    henv = dict(env, **agent.env, HPCMOVE_SOCKET_DIR=sockets)
    host = ssh["HPCMOVE_TEST_SSH_HOST"]
    # the testbed host by options, as root's own ssh config does not name it
    options = ["HostName=127.0.0.1", f"Port={ssh['HPCMOVE_TEST_SSH_PORT']}",
               f"UserKnownHostsFile={os.path.dirname(ssh['HPCMOVE_TEST_SSH_CONFIG'])}"
               "/known_hosts", "StrictHostKeyChecking=yes"]
    subprocess.run([sys.executable, "-m", "hpcmove", "socket", "close", host], env=henv,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "hpcmove", "socket", "open", "--ttl", "2h",
                    *[x for o in options for x in ("-o", o)], host], env=henv, check=True,
                   stdout=subprocess.DEVNULL)
    cleanup.append(lambda: subprocess.run([sys.executable, "-m", "hpcmove", "socket", "close",
                                           host], env=henv, capture_output=True))
    return ssh, senv, henv


def _with_sshd(args, env, cleanup, make_src):
    """(make_src(), the sshd's host alias, its ssh config, the peers' env, hpcmove's
    env), or None without the sshd."""
    ssh, senv, henv = _ssh_setup(args, env, cleanup)
    if not ssh:
        return None
    return make_src(), ssh["HPCMOVE_TEST_SSH_HOST"], ssh["HPCMOVE_TEST_SSH_CONFIG"], senv, henv


def _file_and_sshd(args, env, cleanup):
    return _with_sshd(args, env, cleanup, lambda: make_file(
        os.path.join(args.dir, f"random-{args.size}.bin"), parse_size(args.size)))


def ssh_rows(args, env, cleanup):
    found = _file_and_sshd(args, env, cleanup)
    if not found:
        return None, 0, {}
    src, host, cfg, senv, henv = found
    name = os.path.basename(src)

    def cat(d):
        with open(src, "rb") as f:
            return timed(["ssh", "-F", cfg, host, "cat > " + shlex.quote(f"{d}/{name}")], senv,
                         stdin=f)
    rows = {
        OURS: lambda d: timed(hpcmove(args, "--backend", "local", src, f"{host}:{d}/"), henv),
        "scp": lambda d: timed(["scp", "-q", "-F", cfg, src, f"{host}:{d}/"], senv),
        "rsync -e ssh": lambda d: timed(["rsync", "--whole-file", "-e", f"ssh -F {cfg}", src,
                                         f"{host}:{d}/"], senv),
        "ssh 'cat > f' stream": cat,
    }
    return src, parse_size(args.size), rows


def _tree_and_sshd(args, env, cleanup):
    return _with_sshd(args, env, cleanup, lambda: make_tree(
        os.path.join(args.dir, f"tree-{args.files}"), args.files) + "/")


def sshsmall_rows(args, env, cleanup):
    found = _tree_and_sshd(args, env, cleanup)
    if not found:
        return None, 0, {}
    src, host, cfg, senv, henv = found
    rows = {
        OURS: lambda d: timed(hpcmove(args, "--backend", "local", src, f"{host}:{d}/"), henv),
        f"{OURS} --engine rsync": lambda d: timed(hpcmove(args, "--backend", "local",
                                                          "--engine", "rsync", src,
                                                          f"{host}:{d}/"), henv),
        "rsync -a -e ssh": lambda d: timed(["rsync", "-a", "-e", f"ssh -F {cfg}", src,
                                            f"{host}:{d}/"], senv),
    }
    return src, tree_bytes(src), rows


def sshpull_rows(args, env, cleanup):
    found = _tree_and_sshd(args, env, cleanup)
    if not found:
        return None, 0, {}
    src, host, cfg, senv, henv = found
    rows = {
        OURS: lambda d: timed(hpcmove(args, "--backend", "local", f"{host}:{src}", f"{d}/"),
                              henv),
        "rsync -a -e ssh": lambda d: timed(["rsync", "-a", "-e", f"ssh -F {cfg}",
                                            f"{host}:{src}", f"{d}/"], senv),
    }
    return src, tree_bytes(src), rows


def bigpull_rows(args, env, cleanup):
    found = _file_and_sshd(args, env, cleanup)
    if not found:
        return None, 0, {}
    src, host, cfg, senv, henv = found
    rows = {
        OURS: lambda d: timed(hpcmove(args, "--backend", "local", f"{host}:{src}", f"{d}/"),
                              henv),
        "scp": lambda d: timed(["scp", "-q", "-F", cfg, f"{host}:{src}", f"{d}/"], senv),
    }
    return src, parse_size(args.size), rows


SSH_GROUPS = {"ssh": ssh_rows, "sshsmall": sshsmall_rows, "sshpull": sshpull_rows,
              "bigpull": bigpull_rows}


def cpu_seconds():
    """CPU time used by the whole machine so far (user + system, every process: the
    remote end of the SSH rows runs here too)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def measure(group, src, rows, args):
    """({row: [seconds per counted round]}, {row: [CPU seconds]}), rows interleaved,
    round 0 not counted."""
    times = {name: [] for name in rows}
    cpus = {name: [] for name in rows}
    dst = os.path.join(args.dir, "dst")
    for round_ in range(args.rounds + 1):
        for name, run in rows.items():
            fresh(dst)
            warm(src)
            before = cpu_seconds()
            t = run(dst)
            used = cpu_seconds() - before
            if round_:
                times[name].append(t)
                cpus[name].append(used)
            print(f"{group} round {round_} {name}: {t:.2f} s, {used:.1f} CPU s",
                  file=sys.stderr, flush=True)
    shutil.rmtree(dst, ignore_errors=True)
    return times, cpus


# --- targets (issue 6), as functions of the medians ----------------------------------

TARGETS = {
    ("big", "cp"): ("hpcmove <= 0.8x cp", lambda ours, m: ours <= 0.8 * m),
    ("big", "rsync + rsync -c"): (">= 3x faster", lambda ours, m: m >= 3 * ours),
    ("big", f"{OURS} via Slurm"): ("<= local + 3 s", lambda ours, m: m <= ours + 3),
    ("small", "rsync -a"): (">= 1.5x faster", lambda ours, m: m >= 1.5 * ours),
    ("small", "cp -a"): (">= 1x (as fast)", lambda ours, m: m >= ours),
    ("small", "fpsync -n 2"): (">= 5x faster", lambda ours, m: m >= 5 * ours),
    ("ssh", "scp"): (">= 1.5x faster", lambda ours, m: m >= 1.5 * ours),
    ("ssh", "ssh 'cat > f' stream"): ("hpcmove <= 1.2x", lambda ours, m: ours <= 1.2 * m),
    ("sshsmall", "rsync -a -e ssh"): (">= 1x (as fast)", lambda ours, m: m >= ours),
    ("sshpull", "rsync -a -e ssh"): (">= 1x (as fast)", lambda ours, m: m >= ours),
}


def table(results):
    lines = [f"{'group':8} {'row':24} {'median s':>9} {'CPU s':>6} {'MB/s':>7} "
             f"{'peer/hpcmove':>13}  target", "-" * 87]
    for group, (size, (times, cpus)) in results.items():
        ours = statistics.median(times[OURS]) if OURS in times else None
        for name, ts in times.items():
            m = statistics.median(ts)
            ratio = f"{m / ours:13.2f}" if ours and name != OURS else f"{'':13}"
            goal = ""
            if ours and (group, name) in TARGETS:
                text, ok = TARGETS[(group, name)]
                goal = f"{text}: {'met' if ok(ours, m) else 'NOT met'}"
            rate = f"{size / m / 1e6:7.0f}" if size > 1 else f"{'':7}"
            lines.append(f"{group:8} {name:24} {m:9.2f} {statistics.median(cpus[name]):6.1f} "
                         f"{rate} {ratio}  {goal}")
    return "\n".join(lines)


def run_million(args, env):
    root = os.path.join(args.dir, f"million-{args.entries}")
    million.make_tree(root, args.entries)
    return million.measure(root, env)


def million_lines(r):
    ok = {True: "met", False: "NOT met"}
    return [f"million  submit {r['files']} files: {r['submit_s']:.1f} s (<= 60 s: "
            f"{ok[r['submit_s'] <= 60]}), peak RSS {r['submit_rss'] / 2**20:.0f} MiB "
            f"(<= 1024 MiB: {ok[r['submit_rss'] <= 1 << 30]})",
            f"million  status {r['status_s']:.2f} s, status --summary {r['summary_s']:.2f} s "
            f"(<= 1 s: {ok[max(r['status_s'], r['summary_s']) <= 1]})"]


GROUPS = {"big": big_rows, "small": small_rows, "floor": floor_rows}


def fresh_fs(path, size):
    """Mount a new journaled ext4 file system (an image beside `path`) at `path`, unless
    one made so is mounted there. Without a journal (as some VM images' root file system),
    ext4 skips inodes freed in the last minutes when it allocates, probing each of them
    (`recently_deleted`): a row that creates 20,000 files right after the previous row
    deleted 20,000 pays seconds of kernel time for it, more or less depending on where
    its directory lands."""
    image = path.rstrip("/") + ".ext4"
    if subprocess.run(["mountpoint", "-q", path]).returncode == 0:
        return
    if not os.path.exists(image):
        with open(image, "wb") as f:
            f.truncate(parse_size(size))
        subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True)
    subprocess.run(["mount", "-o", "loop", image, path], check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", default="floor,big,small,ssh,sshsmall,sshpull,bigpull,million")
    ap.add_argument("--size", default="2G", help="the big file (and the ssh one)")
    ap.add_argument("--files", type=int, default=20_000, help="files in the small tree")
    ap.add_argument("--entries", type=int, default=1_000_000, help="entries for 'million'")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp/hpcmove-bench")
    ap.add_argument("--slurm", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--no-install", action="store_true", help="never apt-get install")
    ap.add_argument("--fresh-fs", metavar="SIZE",
                    help="run on a journaled ext4 file system of SIZE made for the bench "
                         "(a loop-mounted image at --dir; root only): see README.md")
    args = ap.parse_args()
    args.dir = os.path.abspath(args.dir)
    os.makedirs(args.dir, exist_ok=True)
    if args.fresh_fs:
        fresh_fs(args.dir, args.fresh_fs)
    os.chdir(args.dir)  # `python -m hpcmove` must find the installed package, not ./hpcmove
    # every run starts from an empty job database, so runs compare (it grows by the
    # rows of every job of the run, as a user's does)
    home = os.path.join(args.dir, "home")
    shutil.rmtree(home, ignore_errors=True)
    env = dict(os.environ, HPCMOVE_HOME=home)
    groups = args.groups.split(",")
    load = os.getloadavg()
    results, cleanup, extra = {}, [], []
    try:
        for group in groups:
            if group == "million":
                extra = million_lines(run_million(args, env))
                continue
            if group in SSH_GROUPS:
                src, size, rows = SSH_GROUPS[group](args, env, cleanup)
            elif group in GROUPS:
                src, size, rows = GROUPS[group](args, env)
            else:
                raise SystemExit(f"bench: unknown group {group!r}")
            if rows:
                results[group] = (size, measure(group, src, rows, args))
    finally:
        for stop in reversed(cleanup):  # last made, first undone: the control socket is
            stop()                      # closed before its directory is removed
    print(f"\nhpcmove bench: {args.rounds} rounds (medians, warm cache), {os.cpu_count()} cores, "
          f"load average {load[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
          f"big = {args.size}, small = {args.files} files")
    print(table(results))
    for line in extra:
        print(line)


if __name__ == "__main__":
    main()
