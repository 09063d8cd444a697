#!/usr/bin/env python3
"""hpcmove against its peers, measured in one run: medians of interleaved rounds.

  python bench/run.py [--groups floor,big,small,ssh,sshsmall,sshpull,bigpull,million]
                      [--size 2G]
                      [--files 20000]
                      [--entries 1000000] [--rounds 3] [--dir /var/tmp/hpcmove-bench]
                      [--slurm auto|yes|no] [--no-install] [--fresh-fs SIZE]
                      [--home DIR | --home-fs SIZE]

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
           hpcmove (local backend, through a control socket it opens once; again
           through a socket of two connections, `socket open --connections 2`), scp,
           rsync -e ssh, one `ssh host 'cat > f' < f` stream.
  sshsmall the small tree to the sshd fixture: hpcmove (tar bundles), hpcmove
           --engine rsync (rsync bundles), rsync -a -e ssh.
  sshpull  the small tree from the sshd fixture: hpcmove (tar bundles), rsync -a -e ssh.
  bigpull  the --size file from the sshd fixture: hpcmove (slices; one connection and
           two), scp.
  million  --entries empty files planned and recorded (bench/million.py's measure):
           submit time and peak RSS, `status`, `status --summary`.

Every SSH row logs in as the testbed's unprivileged hpcmove-u2 (the local side runs as
root): the peers through an ssh config the bench writes in --dir (-F), hpcmove through
a control socket opened with -o User=... -o IdentityFile=...; --dir must be one
hpcmove-u2 can enter. Each peer runs twice: with ssh's default cipher (what a user
gets) and with -c aes128-gcm@openssh.com (the cipher hpcmove's control master prefers
on a CPU with AES instructions), the issue's targets shown against both.

--fresh-fs 40G makes --dir a journaled ext4 file system of its own (root; see fresh_fs).
--home-fs 2G puts hpcmove's home (HPCMOVE_HOME: its job database) on another one, at
--dir + "-home", as a site's home is not its scratch (--home DIR: at DIR); the SSH groups
then run hpcmove once more with it in --dir (the row "hpcmove, db in --dir"), where it
was before run 22.

Every round runs each row of a group once, in turn (A B C A B C ...); round 0 warms
the page cache and is not counted. Before each row the destination is emptied and
the file systems are synced, so no row pays for the writeback of the one before.
Prints one table: medians of wall time and of the CPU time the whole machine used
meanwhile (both ends of the SSH rows run here), and each peer's time divided by
hpcmove's (above 1: hpcmove is faster), with the issue's targets. Missing tools are installed with
apt-get (fpart for fpsync) unless --no-install, in which case their rows are left out.
"""
import argparse
import compileall
import functools
import json
import os
import pwd
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import million  # noqa: E402  (bench/million.py, beside this file)

OURS = "hpcmove"
DEFAULT_DIR = "/var/tmp/hpcmove-bench"


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


def fresh(path, owner=None):
    """An empty destination (belonging to `owner` when given), and no dirty pages left
    by the previous row: without the sync, each row pays for the writeback of the one
    before it."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)
    if owner:
        shutil.chown(path, owner, owner)
    os.sync()
    return path


def written_as(path, owner, row):
    """', written as OWNER' when all that `row` left in `path` belongs to `owner` (its
    remote login); '' without an owner. Stops otherwise."""
    if not owner:
        return ""
    uids = {os.lstat(os.path.join(d, name)).st_uid
            for d, dirs, files in os.walk(path) for name in dirs + files}
    if uids != {pwd.getpwnam(owner).pw_uid}:
        raise SystemExit(f"bench: {row} left files of uids {sorted(uids)} in {path}, not "
                         f"{owner}'s alone: it did not log in as {owner}")
    return f", written as {owner}"


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


# The SSH rows log in as an unprivileged account of the testbed, which has Debian's
# startup files: root's ~/.bashrc here starts pyenv (~100 ms of CPU per remote command
# against ~10 ms), a cost hpcmove's many sessions would pay and the peers' one hardly.
REMOTE_USER = "hpcmove-u2"
# hpcmove's control master prefers AES-GCM on a CPU with AES instructions; every peer
# runs with ssh's default cipher (what a user gets) and again, under these names, on
# hpcmove's.
AES = "aes128-gcm@openssh.com"
SAME_CIPHER = {"scp": "scp -c aes128-gcm", "ssh 'cat > f' stream": "cat stream, aes128-gcm",
               "rsync -e ssh": "rsync, ssh aes128-gcm",
               "rsync -a -e ssh": "rsync -a, ssh aes128-gcm"}
PUSH_GROUPS = ("ssh", "sshsmall")  # their destinations must belong to REMOTE_USER


class Agent:
    """An ssh-agent of our own holding one testbed key (they are passphrase-protected)."""

    def __init__(self, ssh, key):
        out = subprocess.run(["ssh-agent", "-s"], capture_output=True, text=True,
                             check=True).stdout
        self.env = {}
        for part in out.replace("\n", ";").split(";"):
            if "=" in part:
                name, value = part.strip().split("=", 1)
                self.env[name] = value
        askpass = os.path.join(ssh["dir"], "askpass")
        with open(askpass, "w") as f:
            f.write("#!/bin/sh\necho \"$HPCMOVE_TEST_SSH_PASSPHRASE\"\n")
        os.chmod(askpass, 0o700)
        subprocess.run(["ssh-add", "-q", key], check=True, stdin=subprocess.DEVNULL,
                       env=dict(os.environ, **self.env, SSH_ASKPASS=askpass,
                                SSH_ASKPASS_REQUIRE="force", DISPLAY=":0",
                                HPCMOVE_TEST_SSH_PASSPHRASE=ssh["HPCMOVE_TEST_SSH_PASSPHRASE"]))

    def stop(self):
        os.kill(int(self.env["SSH_AGENT_PID"]), 15)


def remote_options(ssh):
    """How every SSH row reaches the testbed: its address and host key, as REMOTE_USER
    with that account's key."""
    known = os.path.join(os.path.dirname(ssh["HPCMOVE_TEST_SSH_CONFIG"]), "known_hosts")
    return [("HostName", "127.0.0.1"), ("Port", ssh["HPCMOVE_TEST_SSH_PORT"]),
            ("User", REMOTE_USER),
            ("IdentityFile", f"{ssh['HPCMOVE_TEST_SSH_KEYS']}/{REMOTE_USER}/id_ed25519"),
            ("IdentitiesOnly", "yes"), ("UserKnownHostsFile", known),
            ("StrictHostKeyChecking", "yes")]


def peer_config(args, host, options):
    """The peers' ssh config (for -F), in the bench dir: `host` with `options`."""
    path = os.path.join(args.dir, "ssh_config")
    with open(path, "w") as f:
        f.write(f"Host {host}\n" + "".join(f"    {k} {v}\n" for k, v in options))
    return path


def open_socket(host, options, henv, cleanup, connections=1):
    """Open hpcmove's control socket for `host` with `options` and `connections` masters
    (closed by cleanup); returns its path."""
    socket = [sys.executable, "-m", "hpcmove", "socket"]
    subprocess.run([*socket, "open", "--ttl", "2h", "--connections", str(connections),
                    *[x for k, v in options for x in ("-o", f"{k}={v}")], host], env=henv,
                   check=True, stdout=subprocess.DEVNULL)
    cleanup.append(lambda: subprocess.run([*socket, "close", host], env=henv,
                                          capture_output=True))
    listed = subprocess.run([*socket, "list", "--json"], env=henv, capture_output=True,
                            check=True, text=True).stdout
    return [row["path"] for row in json.loads(listed) if row["host"] == host][-1]


def check_logins(sshd, socket):
    """Stop unless the peers' config and hpcmove's socket both log in as REMOTE_USER."""
    for how, words in ((f"ssh -F {sshd.cfg}", ["-F", sshd.cfg]),
                       ("hpcmove's control socket", ["-S", socket])):
        who = subprocess.run(["ssh", *words, sshd.host, "id -un"], env=sshd.env,
                             capture_output=True, text=True).stdout.strip()
        if who != REMOTE_USER:
            raise SystemExit(f"bench: {how} logs in as {who or 'no one'}, not {REMOTE_USER}")
    print(f"bench: the SSH rows log in as {REMOTE_USER}", file=sys.stderr)


def check_reachable(args, groups):
    """Stop before any row runs unless REMOTE_USER can enter --dir (each directory down
    to it): the remote side of the SSH rows reads and writes there as that account."""
    if not set(groups) & SSH_GROUPS.keys() or not testbed_env("ssh"):
        return
    path = "/"
    for part in args.dir.strip("/").split("/"):
        path = os.path.join(path, part)
        if subprocess.run(["runuser", "-u", REMOTE_USER, "--", "test", "-x", path]).returncode:
            raise SystemExit(f"bench: {REMOTE_USER}, the account the SSH rows log in as, "
                             f"cannot enter {path}: choose a --dir it can enter (e.g. "
                             f"{DEFAULT_DIR}), or let it in (chmod o+x {shlex.quote(path)})")


def share(args, src):
    """Let REMOTE_USER read the data set `src` (a file or a tree under --dir)."""
    top = os.path.join(args.dir, os.path.relpath(src, args.dir).split(os.sep)[0])
    subprocess.run(["chmod", "-R", "a+rX", top], check=True)


def _ssh_setup(args, env, cleanup):
    """The testbed as the rows reach it (host, cfg: the peers' ssh config, env: theirs
    with our agent, henv: hpcmove's with an open control socket), or None."""
    ssh = testbed_env("ssh")
    if not ssh:
        print("bench: ssh/testbed is not available; the ssh rows are left out", file=sys.stderr)
        return None
    ssh["dir"] = args.dir
    options = remote_options(ssh)
    agent = Agent(ssh, dict(options)["IdentityFile"])
    cleanup.append(agent.stop)
    host = ssh["HPCMOVE_TEST_SSH_HOST"]
    sshd = types.SimpleNamespace(host=host, cfg=peer_config(args, host, options),
                                 env=dict(os.environ, **agent.env), henv=dict(env, **agent.env))
    for _ in range(10):  # sockets for the host left by an earlier run that was killed
        if subprocess.run([sys.executable, "-m", "hpcmove", "socket", "close", host],
                          env=sshd.henv, capture_output=True).returncode:
            break
    # one socket of one connection and one of two, each in a directory of its own (the
    # path is per host); a row names its socket with -S
    sshd.sockets = {n: open_socket(host, options, dict(sshd.henv, HPCMOVE_SOCKET_DIR=_temp_dir(
        cleanup)), cleanup, connections=n) for n in (1, 2)}
    check_logins(sshd, sshd.sockets[1])
    return sshd


def _temp_dir(cleanup):
    path = tempfile.mkdtemp(prefix="hm-bench-", dir="/tmp")  # socket paths must be short
    cleanup.append(lambda: shutil.rmtree(path, ignore_errors=True))
    return path


def _with_sshd(args, env, cleanup, make_src):
    """_ssh_setup's namespace with src = make_src() (readable by REMOTE_USER), or None
    without the sshd."""
    sshd = _ssh_setup(args, env, cleanup)
    if sshd:
        sshd.src = make_src()
        share(args, sshd.src)
    return sshd


def _file_and_sshd(args, env, cleanup):
    return _with_sshd(args, env, cleanup, lambda: make_file(
        os.path.join(args.dir, f"random-{args.size}.bin"), parse_size(args.size)))


def _tree_and_sshd(args, env, cleanup):
    return _with_sshd(args, env, cleanup, lambda: make_tree(
        os.path.join(args.dir, f"tree-{args.files}"), args.files) + "/")


def _ends(sshd, d, push):
    """Source and destination words of a push from src into `d`, or a pull the other way."""
    return [sshd.src, f"{sshd.host}:{d}/"] if push else [f"{sshd.host}:{sshd.src}", f"{d}/"]


def _ours(args, sshd, push, *more, connections=1, home=None):
    env = dict(sshd.henv, HPCMOVE_HOME=home) if home else sshd.henv
    return lambda d: timed(hpcmove(args, "--backend", "local", "-S",
                                   sshd.sockets[connections], *more, *_ends(sshd, d, push)),
                           env)


def _db_in_dir(args, sshd, push):
    """With the job database elsewhere (--home, --home-fs), hpcmove again with it in
    --dir, on the data's file system (as runs before run 22): what sharing the
    loopback's journal with the "remote host" costs."""
    if sshd.henv["HPCMOVE_HOME"] == dir_home(args):
        return {}
    return {f"{OURS}, db in --dir": _ours(args, sshd, push, home=dir_home(args))}


def _both_ciphers(sshd, runs):
    """Each peer's row with ssh's default cipher, and under its SAME_CIPHER name with
    hpcmove's: `runs` maps a row name to run(d, ssh_options)."""
    rows = {}
    for name, run in runs.items():
        rows[name] = functools.partial(run, options=["-F", sshd.cfg])
        rows[SAME_CIPHER[name]] = functools.partial(run, options=["-F", sshd.cfg, "-c", AES])
    return rows


def _rsync(sshd, push, flag):
    return lambda d, options: timed(["rsync", flag, "-e", shlex.join(["ssh", *options]),
                                     *_ends(sshd, d, push)], sshd.env)


def _cat(sshd, d, options):
    """One `ssh host 'cat > f' < f` stream."""
    with open(sshd.src, "rb") as f:
        target = shlex.quote(f"{d}/{os.path.basename(sshd.src)}")
        return timed(["ssh", *options, sshd.host, "cat > " + target], sshd.env, stdin=f)


def file_peers(sshd, push):
    """The peers of a group moving the --size file: scp; on a push also rsync and one
    cat stream."""
    runs = {"scp": lambda d, options: timed(["scp", "-q", *options, *_ends(sshd, d, push)],
                                            sshd.env)}
    if push:
        runs["rsync -e ssh"] = _rsync(sshd, push, "--whole-file")
        runs["ssh 'cat > f' stream"] = functools.partial(_cat, sshd)
    return _both_ciphers(sshd, runs)


def tree_peers(sshd, push):
    """The peer of a group moving the small tree: rsync -a -e ssh."""
    return _both_ciphers(sshd, {"rsync -a -e ssh": _rsync(sshd, push, "-a")})


def _file_group(args, env, cleanup, push):
    sshd = _file_and_sshd(args, env, cleanup)
    if not sshd:
        return None, 0, {}
    return sshd.src, parse_size(args.size), {
        OURS: _ours(args, sshd, push),
        f"{OURS}, 2 connections": _ours(args, sshd, push, connections=2),
        # the size asked for is kept: 8 slices on 6 streams, not 12 in two whole waves
        f"{OURS}, --slice-size 256M": _ours(args, sshd, push, "--slice-size", "256M"),
        **_db_in_dir(args, sshd, push), **file_peers(sshd, push)}


def ssh_rows(args, env, cleanup):
    return _file_group(args, env, cleanup, push=True)


def bigpull_rows(args, env, cleanup):
    return _file_group(args, env, cleanup, push=False)


def _tree_group(args, env, cleanup, push, engines):
    """hpcmove with each of `engines` (extra submit words by row name), and the peers."""
    sshd = _tree_and_sshd(args, env, cleanup)
    if not sshd:
        return None, 0, {}
    ours = {name: _ours(args, sshd, push, *more) for name, more in engines.items()}
    return sshd.src, tree_bytes(sshd.src), {**ours, **_db_in_dir(args, sshd, push),
                                            **tree_peers(sshd, push)}


def sshsmall_rows(args, env, cleanup):
    return _tree_group(args, env, cleanup, True,
                       {OURS: (), f"{OURS} --engine rsync": ("--engine", "rsync")})


def sshpull_rows(args, env, cleanup):
    return _tree_group(args, env, cleanup, False, {OURS: ()})


SSH_GROUPS = {"ssh": ssh_rows, "sshsmall": sshsmall_rows, "sshpull": sshpull_rows,
              "bigpull": bigpull_rows}


def cpu_seconds():
    """CPU time used by the whole machine so far (user + system, every process: the
    remote end of the SSH rows runs here too)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def measure(group, src, rows, args, owner=None):
    """({row: [seconds per counted round]}, {row: [CPU seconds]}), rows interleaved,
    round 0 not counted. `owner`: the account a push logs in as, who must own the
    destination before each row and all it holds after."""
    times = {name: [] for name in rows}
    cpus = {name: [] for name in rows}
    dst = os.path.join(args.dir, "dst")
    for round_ in range(args.rounds + 1):
        for name, run in rows.items():
            fresh(dst, owner)
            warm(src)
            before = cpu_seconds()
            t = run(dst)
            used = cpu_seconds() - before
            note = written_as(dst, owner, f"{group} {name}")
            if round_:
                times[name].append(t)
                cpus[name].append(used)
            print(f"{group} round {round_} {name}: {t:.2f} s, {used:.1f} CPU s{note}",
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
# the same targets against each peer on hpcmove's cipher
TARGETS.update({(group, SAME_CIPHER[peer]): target for (group, peer), target in TARGETS.items()
                if group in SSH_GROUPS and peer in SAME_CIPHER})


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


def dir_home(args):
    """HPCMOVE_HOME in --dir: the default, and the 'db in --dir' rows'."""
    return os.path.join(args.dir, "home")


def bench_home(args):
    """HPCMOVE_HOME for the run: --home, else with --home-fs on a journaled ext4 of its
    own (at --dir + "-home"), else in --dir. hpcmove commits its job database (each
    commit an fsync), and on a data=ordered ext4 that fsync first writes back every block
    the data already took on the same file system: with the database in --dir, a push's
    commits wait for the writeback of what the sshd (this machine, on loopback) wrote for
    the "remote host", a cost no peer pays and no real remote host would cause."""
    if args.home:  # the bench's own directory in it: emptied at every run
        return os.path.join(os.path.abspath(args.home), "hpcmove-bench-home")
    if not args.home_fs:
        return dir_home(args)
    mount = args.dir.rstrip("/") + "-home"
    os.makedirs(mount, exist_ok=True)
    fresh_fs(mount, args.home_fs)
    return os.path.join(mount, "home")


def run_groups(args, env, groups, cleanup):
    """({group: (bytes, measure's medians)}, the million group's lines)."""
    results, extra = {}, []
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
            owner = REMOTE_USER if group in PUSH_GROUPS else None
            results[group] = (size, measure(group, src, rows, args, owner))
    return results, extra


def compiled():
    """Bytecode for hpcmove's modules, as `pip install` leaves it. Under
    PYTHONDONTWRITEBYTECODE (a shell or CI may set it) an editable checkout's changed
    modules would be compiled again by each of a job's processes, every round: 0.03-0.05
    CPU s a process with all of them changed."""
    import hpcmove
    import hpcmove_plugins
    for package in (hpcmove, hpcmove_plugins):
        compileall.compile_dir(os.path.dirname(package.__file__), quiet=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", default="floor,big,small,ssh,sshsmall,sshpull,bigpull,million")
    ap.add_argument("--size", default="2G", help="the big file (and the ssh one)")
    ap.add_argument("--files", type=int, default=20_000, help="files in the small tree")
    ap.add_argument("--entries", type=int, default=1_000_000, help="entries for 'million'")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=DEFAULT_DIR)
    ap.add_argument("--slurm", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--no-install", action="store_true", help="never apt-get install")
    ap.add_argument("--fresh-fs", metavar="SIZE",
                    help="run on a journaled ext4 file system of SIZE made for the bench "
                         "(a loop-mounted image at --dir; root only): see README.md")
    home = ap.add_mutually_exclusive_group()
    home.add_argument("--home", metavar="DIR",
                      help="hpcmove's home (its job database) in DIR, not in --dir")
    home.add_argument("--home-fs", metavar="SIZE",
                      help="hpcmove's home on a journaled ext4 of SIZE of its own, not in "
                           "--dir (root only): see bench_home")
    args = ap.parse_args()
    args.dir = os.path.abspath(args.dir)
    os.makedirs(args.dir, exist_ok=True)
    if args.fresh_fs:
        fresh_fs(args.dir, args.fresh_fs)
    os.chdir(args.dir)  # `python -m hpcmove` must find the installed package, not ./hpcmove
    compiled()
    # every run starts from an empty job database, so runs compare (it grows by the
    # rows of every job of the run, as a user's does)
    home = bench_home(args)
    for stale in {home, dir_home(args)}:
        shutil.rmtree(stale, ignore_errors=True)
    env = dict(os.environ, HPCMOVE_HOME=home)
    groups = args.groups.split(",")
    load = os.getloadavg()
    check_reachable(args, groups)
    cleanup = []
    try:
        results, extra = run_groups(args, env, groups, cleanup)
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
