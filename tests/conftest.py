"""Fixtures shared by the test tiers.

The behaviour tests drive the real `hpcmove` command in a subprocess, as an
unprivileged user when the suite runs as root (root reads every file, so
permission failures could not show), against the local backend, the real Slurm
testbed and the real Grid Engine (via DRMAA) that tests/run brings up
(slurm/testbed, gridengine/testbed).
"""
import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest

TEST_USER = "hpcmove-u1" if os.geteuid() == 0 else None
BASE = os.environ.get("HPCMOVE_TEST_BASE", "/var/tmp/hpcmove-tests")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_as_user(argv, env, cwd=None, timeout=900, check=False, input=None, user=None):
    """Run argv as the test user (or `user`; as ourselves when not root); bytes in and out."""
    user = user or TEST_USER
    full = ["runuser", "-u", user, "--", "env", "-i",
            *[f"{k}={v}" for k, v in env.items()], *argv] if user else list(argv)
    return subprocess.run(full, env=None if user else env, cwd=cwd, capture_output=True,
                          timeout=timeout, check=check, input=input)


def pids_running(module, word):
    """Processes of `python -m MODULE` (bytes) with `word` (bytes) in an argument or in
    the path of their stdout: a job's tasks or finalize, by its token or job directory
    (they run on this host; one the local runner started ahead has no job in its
    arguments, `--standby`, and writes to the job's log)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            out = os.readlink(f"/proc/{pid}/fd/1").encode() if module in argv else b""
        except OSError:
            continue
        if module in argv and (any(word in a for a in argv) or word in out):
            pids.append(int(pid))
    return pids


def already_there(kind, data):
    """What --skip-existing tests put at the destination for a source file `data`:
    None (missing), zeros of the same size (differs), the first MiB right and zeros after
    (partly), else the same bytes."""
    if kind == "missing":
        return None
    if kind == "differs":
        return bytes(len(data))
    if kind == "partly":
        return data[: 1 << 20] + bytes(len(data) - (1 << 20))
    return data


def chown_tree(path):
    if TEST_USER:
        shutil.chown(path, TEST_USER, TEST_USER)
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.lchown(os.path.join(root, name), *_ids())


def _ids():
    import pwd
    pw = pwd.getpwnam(TEST_USER)
    return pw.pw_uid, pw.pw_gid


@pytest.fixture(scope="session")
def base():
    path = os.path.join(BASE, uuid.uuid4().hex[:8])
    os.makedirs(path, mode=0o755)
    os.chmod(BASE, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Area:
    """A test's own directory: src/, dst/ and home/ (HPCMOVE_HOME), owned by the test user."""

    def __init__(self, root):
        self.root = root
        self.src, self.dst, self.home = (os.path.join(root, d) for d in ("src", "dst", "home"))
        for d in (self.src, self.dst, self.home):
            os.makedirs(d)

    def own(self):
        chown_tree(self.root)


def unreadable_set(area):
    """area.src/set with 'good-1', 'good-2' and a 'secret file' its owner cannot read."""
    if os.geteuid() != 0 and os.access("/etc/shadow", os.R_OK):
        pytest.fail("needs an unprivileged user for the transfer")
    src = os.path.join(area.src, "set")
    os.makedirs(src)
    for name in ("good-1", "secret file", "good-2"):
        with open(os.path.join(src, name), "wb") as f:
            f.write(os.urandom(100_000))
    area.own()
    os.chmod(os.path.join(src, "secret file"), 0)
    return src


@pytest.fixture
def area(base, request):
    root = os.path.join(base, request.node.name.replace("/", "_")[:80] + "-" + uuid.uuid4().hex[:4])
    os.makedirs(root)
    a = Area(root)
    a.own()
    return a


class Hpcmove:
    """Runs the hpcmove command for one backend, as the test user."""

    def __init__(self, backend, area, user=None):
        self.backend, self.area, self.user = backend, area, user
        self.env = {"PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin:/usr/sbin:/sbin",
                    "HPCMOVE_HOME": area.home, "LANG": "C.UTF-8", "HOME": area.home}
        if os.environ.get("SLURM_CONF"):
            self.env["SLURM_CONF"] = os.environ["SLURM_CONF"]
        if backend == "drmaa":  # libdrmaa and the qsub/qstat clients, as the testbed says
            self.env.update(gridengine_env())
            self.env["PATH"] = os.path.dirname(sys.executable) + ":" + gridengine_env()["PATH"]
        self.backend_args = ["--backend", backend] + (["-p", "dtn"] if backend == "slurm" else [])

    def run(self, *args, check=True, timeout=900):
        argv = [sys.executable, "-m", "hpcmove", *args]
        done = run_as_user(argv, self.env, cwd=self.area.root, timeout=timeout, user=self.user)
        if check and done.returncode != 0:
            raise AssertionError(f"hpcmove {shlex.join(map(os.fsdecode, args))} exited "
                                 f"{done.returncode}\nstdout: {done.stdout.decode(errors='replace')}"
                                 f"\nstderr: {done.stderr.decode(errors='replace')}")
        return done

    def submit(self, *args):
        """Submit with --parsable; returns the id it printed."""
        return self.run("submit", "--parsable", *self.backend_args, *args).stdout.decode().strip()

    def status(self, job):
        return json.loads(self.run("status", "--json", job).stdout)

    def wait(self, job, timeout=600):
        self.run("wait", "--timeout", str(timeout), job, check=False, timeout=timeout + 60)
        return self.status(job)

    def wait_for(self, job, predicate, timeout=300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status(job)
            if predicate(s):
                return s
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting on {job}: {s}")


def slurm_env():
    if not os.environ.get("SLURM_CONF"):
        pytest.fail("the Slurm testbed is not up: run tests/run (or slurm/testbed up and "
                    "eval \"$(slurm/testbed env)\")")
    return os.environ["SLURM_CONF"]


GE_TESTBED = os.path.join(REPO, "gridengine", "testbed")
GE_VARS = ("SGE_ROOT", "SGE_CELL", "DRMAA_LIBRARY_PATH", "GLIBC_TUNABLES", "PATH")


@functools.cache
def gridengine_env():
    """{SGE_ROOT, SGE_CELL, DRMAA_LIBRARY_PATH, GLIBC_TUNABLES, PATH} from
    `gridengine/testbed env`; fails (never skips) when the testbed is not up or the
    drmaa package cannot be imported with it."""
    status = subprocess.run([GE_TESTBED, "status"], capture_output=True, text=True)
    if status.returncode != 0:
        pytest.fail("the Grid Engine testbed is not up: run `gridengine/testbed up` as root "
                    f"(and eval \"$(gridengine/testbed env)\")\n{status.stdout}{status.stderr}")
    out = subprocess.run(
        ["bash", "-c", 'eval "$("$0" env)" && printf "%s\\0" ' +
         " ".join(f'"${v}"' for v in GE_VARS), GE_TESTBED],
        capture_output=True, check=True).stdout.decode().split("\0")
    env = dict(zip(GE_VARS, out))
    probe = subprocess.run([sys.executable, "-c", "import drmaa; print(drmaa.Session)"],
                           env={**os.environ, **env}, capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail("the drmaa package cannot be imported in this virtualenv "
                    f"(pip install 'hpcmove[drmaa]'):\n{probe.stderr}")
    return env


def ge(hpcmove, *argv, check=True):
    """A Grid Engine client command (qsub, qstat, qdel) as the test user; its stdout."""
    done = run_as_user(list(argv), hpcmove.env, cwd=hpcmove.area.root, timeout=60)
    if check:
        assert done.returncode == 0, (argv, done.stdout, done.stderr)
    return done.stdout.decode()


def qsub_after(hpcmove, final_id, command):
    """A compute job held on a final id (`qsub -hold_jid`) that runs the sh `command`."""
    # a script, not `qsub -b y`: qsub hands a binary job's words to a shell as one line
    script = os.path.join(hpcmove.area.root, f"compute-{uuid.uuid4().hex[:6]}.sh")
    with open(script, "w") as f:
        f.write(f"#!/bin/sh\n{command}\n")
    os.chmod(script, 0o755)
    return ge(hpcmove, "qsub", "-terse", "-hold_jid", final_id, "-o", "/dev/null", "-j", "y",
              "-N", "compute", "-S", "/bin/sh", script).strip()


def ge_state(hpcmove, job_id):
    """qstat's state letters of a job ('hqw', 'r', ...), or None when it has left."""
    for line in ge(hpcmove, "qstat", "-u", "*").splitlines():
        words = line.split()
        if words and words[0] == job_id:
            return words[4]
    return None


def ge_accounting(job):
    """[(task, failed, exit status, start, end)] of a job from Grid Engine's accounting."""
    env = gridengine_env()
    rows = []
    with open(os.path.join(env["SGE_ROOT"], env["SGE_CELL"], "common", "accounting")) as f:
        for line in f:
            x = line.split(":")
            if not line.startswith("#") and len(x) >= 45 and x[5] == job:
                rows.append((int(x[35]), int(x[11]), int(x[12]), int(x[9]), int(x[10])))
    return rows


@pytest.fixture(params=["local", "slurm", "drmaa"])
def backend(request):
    if request.param == "slurm":
        slurm_env()
    if request.param == "drmaa":
        gridengine_env()
    return request.param


@pytest.fixture
def hpcmove(backend, area):
    return Hpcmove(backend, area)


@pytest.fixture(scope="session")
def dataset(base):
    """Shared read-only data: a 1 GiB random file and a 2,000-file tree."""
    root = os.path.join(base, "dataset")
    os.makedirs(os.path.join(root, "tree"))
    big = os.path.join(root, "big.bin")
    with open(big, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(16 << 20))
    for i in range(2000):
        d = os.path.join(root, "tree", f"d{i % 20:02d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:04d}"), "wb") as f:
            f.write(os.urandom(1024 + (i * 37) % 7000))
    subprocess.run(["chmod", "-R", "a+rX", root], check=True)
    return root
