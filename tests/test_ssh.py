"""Remote hosts over SSH, for real: the sshd of ssh/testbed on 127.0.0.1, a
passphrase-protected key in a real ssh-agent, control sockets opened by
`hpcmove socket open`, transfers through the Slurm testbed (and the local backend for
the name tests). The "remote" host is this machine, so both ends are checked here."""
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid

import pytest

from conftest import TEST_USER, Hpcmove, already_there, run_as_user, slurm_env

HOST = os.environ.get("HPCMOVE_TEST_SSH_HOST", "hpcmove-remote")
HOSTILE = [b"sp ace", b"qu'ote\"s", b"new\nline", b"$(touch PWNED)", b"`touch PWNED`",
           b"-rf", b"--help", b"caf\xe9", b"semi;colon&"]


@pytest.fixture(scope="session")
def sshd():
    if not os.environ.get("HPCMOVE_TEST_SSH_CONFIG"):
        pytest.fail("the ssh testbed is not up: run tests/run (or ssh/testbed up and "
                    "eval \"$(ssh/testbed env)\")")
    if not TEST_USER:
        pytest.fail("the SSH tests run as root, acting as the test user")
    # the user's own ~/.ssh/config names the testbed's host, as a user's would
    home = os.path.expanduser(f"~{TEST_USER}")
    line = f"Include {os.environ['HPCMOVE_TEST_SSH_CONFIG']}\n"
    subprocess.run(["runuser", "-u", TEST_USER, "--", "sh", "-c",
                    f"umask 077; mkdir -p {home}/.ssh; grep -qxF '{line.strip()}' "
                    f"{home}/.ssh/config 2>/dev/null || printf '%s' '{line}' >> "
                    f"{home}/.ssh/config"], check=True)
    return os.environ["HPCMOVE_TEST_SSH_KEYS"]


class Agent:
    """A real ssh-agent of the test user holding the passphrase-protected key."""

    def __init__(self, area, keys):
        self.sock = f"/tmp/hm-agent-{uuid.uuid4().hex[:8]}"  # sun_path holds 108 bytes
        self.askpass = os.path.join(area.root, "askpass")
        with open(self.askpass, "w") as f:
            f.write(f"#!/bin/sh\necho '{os.environ['HPCMOVE_TEST_SSH_PASSPHRASE']}'\n")
        os.chmod(self.askpass, 0o755)
        out = run_as_user(["ssh-agent", "-a", self.sock, "-s"], {"PATH": "/usr/bin:/bin"},
                          check=True).stdout.decode()
        self.pid = int(re.search(r"SSH_AGENT_PID=(\d+)", out).group(1))
        key = os.path.join(keys, TEST_USER, "id_ed25519")
        run_as_user(["ssh-add", key], {"PATH": "/usr/bin:/bin", "SSH_AUTH_SOCK": self.sock,
                                       "SSH_ASKPASS": self.askpass,
                                       "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"},
                    check=True, input=b"")

    def kill(self):
        if self.pid:
            os.kill(self.pid, signal.SIGTERM)
            self.pid = None


@pytest.fixture
def remote_env(sshd, area):
    """Hpcmove runner on Slurm with a private socket directory, the agent started."""
    sockets = f"/tmp/hm-{uuid.uuid4().hex[:8]}"
    os.mkdir(sockets, 0o700)
    subprocess.run(["chown", TEST_USER, sockets], check=True)
    hp = Hpcmove("slurm" if os.environ.get("SLURM_CONF") else "local", area)
    hp.env["HPCMOVE_SOCKET_DIR"] = sockets
    agent = Agent(area, sshd)
    hp.env["SSH_AUTH_SOCK"] = agent.sock
    far = os.path.join(area.root, "far")  # the remote host's side (same machine)
    os.mkdir(far)
    area.own()
    yield hp, agent, far
    agent.kill()
    hp.run("socket", "close", HOST, check=False)
    subprocess.run(["rm", "-rf", sockets])


def open_socket(hp, node="dtn1"):
    on = ["--on", node] if hp.backend == "slurm" else []
    hp.run("socket", "open", *on, "--ttl", "20m", HOST)
    rows = json.loads(hp.run("socket", "list", "--json").stdout)
    assert [r["state"] for r in rows] == ["live"]
    return rows[0]


def tree_of(root):
    """{relative path: (kind, bytes or link target, mode, mtime in ns)} of a tree, any
    names."""
    out = {}
    root = os.fsencode(root)
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("l", os.readlink(p), 0, st.st_mtime_ns)
            elif os.path.isdir(p):
                out[rel] = ("d", b"", st.st_mode & 0o777, st.st_mtime_ns)
            else:
                with open(p, "rb") as f:
                    out[rel] = ("f", f.read(), st.st_mode & 0o777, st.st_mtime_ns)
    return out


def make_data(area):
    big = os.path.join(area.src, "big.bin")
    with open(big, "wb") as f:
        for _ in range(32):
            f.write(os.urandom(16 << 20))  # 512 MiB
    tree = os.path.join(area.src, "tree")
    for i in range(1000):
        d = os.path.join(tree, f"d{i % 10}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:04d}"), "wb") as f:
            f.write(os.urandom(100 + (i * 53) % 9000))
        os.chmod(f.name, (0o644, 0o640, 0o755, 0o400)[i % 4])  # kept, read-only ones too
    area.own()
    return big, tree


def slow_push(hp, agent, area, far, mib, slice_size, bwlimit):
    """A file of `mib` MiB pushed slowly by one task, after the socket is open and the
    agent gone: (source path, socket row, job id)."""
    src = os.path.join(area.src, "big.bin")
    with open(src, "wb") as f:
        for _ in range(mib // 16):
            f.write(os.urandom(16 << 20))
    area.own()
    sock = open_socket(hp)
    agent.kill()
    job = hp.submit("--slice-size", slice_size, "--bwlimit", bwlimit, "--stripe-width", "1",
                    src, f"{HOST}:{far}/")
    return src, sock, job


def log(hp, job):
    return hp.run("log", job, check=False).stdout.decode(errors="replace")[-3000:]


def same_file(a, b):
    return subprocess.run(["cmp", a, b]).returncode == 0


def test_socket_lets_batch_jobs_push_and_pull_without_any_credential(remote_env, area):
    hp, agent, far = remote_env
    slurm_env()
    big, tree = make_data(area)
    sock = open_socket(hp)
    assert sock["node"] == "dtn1"
    st = os.stat(sock["path"])
    assert oct(st.st_mode & 0o777) == "0o600" and st.st_uid == os.stat(area.home).st_uid
    assert os.stat(os.path.dirname(sock["path"])).st_mode & 0o777 == 0o700
    agent.kill()  # from here on no credential exists anywhere
    push = hp.submit("--slice-size", "64M", big, tree, f"{HOST}:{far}/")
    s = hp.wait(push)
    assert s["state"] == "Done", (s["reason"], log(hp, s["id"]))
    assert {x["host"] for f in s["files"] for x in f["slices"]} == {"dtn1"}  # where the socket is
    assert same_file(big, os.path.join(far, "big.bin"))
    assert tree_of(tree) == tree_of(os.path.join(far, "tree"))
    back = os.path.join(area.dst, "back")
    os.mkdir(back)
    area.own()
    pull = hp.submit("--slice-size", "64M", f"{HOST}:{far}/big.bin", f"{HOST}:{far}/tree", back)
    s = hp.wait(pull)
    assert s["state"] == "Done", (s["reason"], log(hp, s["id"]))
    assert same_file(big, os.path.join(back, "big.bin"))
    assert tree_of(tree) == tree_of(os.path.join(back, "tree"))
    # the small files again, in rsync bundles (`--engine rsync`) through the same socket
    os.mkdir(os.path.join(far, "rs"))
    os.mkdir(os.path.join(back, "rs"))
    area.own()
    for args in ([tree, f"{HOST}:{far}/rs/"], [f"{HOST}:{far}/rs/tree", f"{back}/rs/"]):
        s = hp.wait(hp.submit("--engine", "rsync", *args))
        assert s["state"] == "Done", (s["reason"], log(hp, s["id"]))
    assert tree_of(tree) == tree_of(os.path.join(back, "rs", "tree"))
    assert not [n for n in os.listdir(far) if n.startswith(".hpcmove-")]  # no spool left
    assert not [n for n in os.listdir(back) if n.startswith(".hpcmove-")]


def _failed_logins():
    """Connections the testbed's sshd closed before they authenticated."""
    with open(os.environ["HPCMOVE_TEST_SSH_LOG"], "rb") as f:
        return f.read().count(b"Connection closed by authenticating user")


def test_master_killed_mid_transfer_waits_in_auth_required_then_resumes(remote_env, area):
    """... and the tasks' sessions after the master's end never try a connection of
    their own (the remote host logs no failed login for them)."""
    hp, agent, far = remote_env
    big, sock, job = slow_push(hp, agent, area, far, 512, "8M", "40M")
    hp.wait_for(job, lambda s: sum(x["state"] == "Done" for x in s["files"][0]["slices"]) >= 4)
    pid = re.search(rb"pid=(\d+)", subprocess.run(
        ["ssh", "-S", sock["path"], "-O", "check", HOST], capture_output=True).stderr).group(1)
    logins = _failed_logins()
    os.kill(int(pid), signal.SIGTERM)  # the master goes away mid-transfer
    s = hp.wait(job)
    assert s["state"] == "AuthRequired", (s["reason"], log(hp, job))
    assert _failed_logins() == logins
    assert "hpcmove auth" in s["reason"]
    slices = s["files"][0]["slices"]
    done_before = {x["offset"] for x in slices if x["state"] == "Done"}
    assert 4 <= len(done_before) < len(slices)
    assert {x["state"] for x in slices} <= {"Done", "AuthRequired"}
    assert not os.path.exists(os.path.join(far, "big.bin"))  # nothing partial in place
    agent2 = Agent(area, os.environ["HPCMOVE_TEST_SSH_KEYS"])
    hp.env["SSH_AUTH_SOCK"] = agent2.sock
    try:
        hp.run("auth", job)
    finally:
        agent2.kill()
    s = hp.wait(job)
    assert s["state"] == "Done", (s["reason"], log(hp, s["id"]))
    assert same_file(big, os.path.join(far, "big.bin"))
    db = sqlite3.connect(os.path.join(area.home, "hpcmove.db"))
    resent = [int(m.split()[0]) for (m,) in db.execute(
        "SELECT message FROM event WHERE kind = 'retry'")]
    assert resent == [len(slices) - len(done_before)]  # only the unfinished slices


@pytest.fixture
def local_remote(sshd, area):
    """Hpcmove on the local backend with a private socket directory and an agent."""
    sockets = f"/tmp/hm-{uuid.uuid4().hex[:8]}"
    os.mkdir(sockets, 0o700)
    subprocess.run(["chown", TEST_USER, sockets], check=True)
    hp = Hpcmove("local", area)
    hp.env["HPCMOVE_SOCKET_DIR"] = sockets
    agent = Agent(area, sshd)
    hp.env["SSH_AUTH_SOCK"] = agent.sock
    yield hp, agent
    agent.kill()
    hp.run("socket", "close", HOST, check=False)
    subprocess.run(["rm", "-rf", sockets])


def test_push_into_a_remote_directory_we_cannot_write_is_a_clear_error(local_remote, area):
    """The spool cannot be made on the remote host: submit says so (the remote mkdir's
    own words), records the job Failed with that reason, starts nothing and leaves
    nothing there."""
    hp, _agent = local_remote
    hp.run("socket", "open", "--ttl", "5m", HOST)
    src = os.path.join(area.src, "t")
    os.makedirs(os.path.join(src, "d"))
    for n in range(3):
        with open(os.path.join(src, "d", f"f{n}"), "wb") as f:
            f.write(os.urandom(1000))
    area.own()
    closed = os.path.join(area.root, "closed")
    os.mkdir(closed, 0o755)  # root's: the test user cannot write here
    done = hp.run("submit", *hp.backend_args, src, f"{HOST}:{closed}/", check=False)
    assert done.returncode != 0
    assert b"cannot make the spool directories" in done.stderr, done.stderr
    assert b"Permission denied" in done.stderr, done.stderr
    assert os.listdir(closed) == []
    jobs = json.loads(hp.run("list", "--json").stdout)
    assert [(j["state"], "cannot make the spool" in j["reason"]) for j in jobs] == \
        [("Failed", True)]


@pytest.mark.parametrize("engine", ["ssh", "rsync"])
def test_pull_of_a_remote_file_we_cannot_read_fails_at_once_and_places_nothing(
        local_remote, area, engine):
    """One remote source the user may not read, among readable small and large ones:
    the job fails at the first attempt naming that file and "Permission denied" (no
    retries till Hold), nothing is placed here, the remote sources are untouched."""
    hp, agent = local_remote
    far = big_and_small(os.path.join(area.root, "far"), 3 << 20, [2000] * 30)
    secret = os.path.join(far, "small", "f007")
    area.own()
    os.chown(secret, 0, 0)
    os.chmod(secret, 0o600)  # root's: the test user cannot read it
    before = tree_of(far)
    hp.run("socket", "open", "--ttl", "5m", HOST)
    agent.kill()
    s = hp.wait(hp.submit("--engine", engine, "--slice-size", "1M", f"{HOST}:{far}",
                          os.path.join(area.dst, "back")))
    assert s["state"] == "Failed", (s["reason"], log(hp, s["id"]))
    mine = [f for f in s["files"] if f["src"] == secret]
    assert mine and "Permission denied" in mine[0]["reason"], mine
    assert s["reason"].startswith(secret), s["reason"]
    assert [x["attempts"] for x in mine[0]["slices"]] == [1], mine
    assert os.listdir(area.dst) == []
    assert tree_of(far) == before
    # what the other files' tasks pulled was verified at rest, and that is recorded
    db = sqlite3.connect(os.path.join(area.home, "hpcmove.db"))
    sums = db.execute("SELECT s.src_digest, s.dst_digest FROM slice s JOIN file f "
                      "ON s.file_id = f.id WHERE f.src != ?", (os.fsencode(secret),)).fetchall()
    assert len(sums) > 30 and all(src == dst != "" for src, dst in sums), sums


def test_a_remote_source_changed_after_its_pull_and_before_finalize_fails_that_file(
        remote_env, area):
    """finalize asks the remote host for the sources' size and mtime while it checks the
    pulled data at rest (the tasks have read the sources for the last time): a source
    changed after its task read it, before the final job ran, fails its file; nothing is
    placed here, the remote sources are left as they are."""
    hp, agent, far = remote_env
    if hp.backend != "slurm":
        pytest.fail("needs the Slurm testbed: the final job is held while a source changes")
    far = big_and_small(os.path.join(far, "data"), 3 << 20, [2000] * 30)
    area.own()
    open_socket(hp)
    agent.kill()
    job = hp.submit("--slice-size", "1M", f"{HOST}:{far}", os.path.join(area.dst, "back"))
    env = {"PATH": "/usr/bin:/bin", "SLURM_CONF": os.environ["SLURM_CONF"]}
    assert run_as_user(["scontrol", "hold", job], env).returncode == 0  # the final job
    hp.wait_for(job, lambda s: all(x["state"] == "Done" for f in s["files"]
                                   for x in f.get("slices", [])))
    changed = os.path.join(far, "small", "f011")
    with open(changed, "ab") as f:
        f.write(b"late")
    before = tree_of(far)
    assert run_as_user(["scontrol", "release", job], env).returncode == 0
    s = hp.wait(job)
    assert s["state"] == "Failed", (s["reason"], log(hp, s["id"]))
    (mine,) = [f for f in s["files"] if f["src"] == changed]
    assert mine["state"] == "Failed" and "source changed" in mine["reason"], mine
    assert os.listdir(area.dst) == []
    assert tree_of(far) == before


def test_copyjobs_push_into_and_pull_from_many_remote_directories(local_remote, area):
    """A copyjob (`--from-file`) of 1,500 pairs into 1,500 remote directories, a spool in
    each (the names of all of them go on stdin: a remote command is one argument of the
    login shell, at most 128 KiB on Linux), hostile names among them; then another that
    pulls them back pair by pair. Both land where their pairs say, nothing ran."""
    hp, agent = local_remote
    far, back = os.path.join(area.root, "far"), os.path.join(area.dst, "back")
    names = [f"directory of a copyjob {i:04d}" for i in range(1500)]
    names[7] = "$(touch PWNED) `touch PWNED`"
    push, pull = [], []
    for i, name in enumerate(names):
        os.makedirs(os.path.join(far, name))
        os.makedirs(os.path.join(back, name))
        src = os.path.join(area.src, f"f{i:04d}")
        with open(src, "wb") as f:
            f.write(os.urandom(2000 + i))
        there, here = os.path.join(far, name, "f'1"), os.path.join(back, name, "f 2")
        push.append(f"{shlex.quote(src)} {shlex.quote(f'{HOST}:{there}')}\n")
        pull.append(f"{shlex.quote(f'{HOST}:{there}')} {shlex.quote(here)}\n")
    for name, lines in (("push", push), ("pull", pull)):
        with open(os.path.join(area.root, name), "w") as f:
            f.writelines(lines)
    area.own()
    hp.run("socket", "open", "--ttl", "5m", HOST)
    agent.kill()
    for name in ("push", "pull"):
        s = hp.wait(hp.submit("--from-file", os.path.join(area.root, name)))
        assert s["state"] == "Done", (name, s["reason"], log(hp, s["id"]))
    for i in (0, 7, len(names) - 1):
        with open(os.path.join(area.src, f"f{i:04d}"), "rb") as f:
            data = f.read()
        for path in (os.path.join(far, names[i], "f'1"), os.path.join(back, names[i], "f 2")):
            with open(path, "rb") as f:
                assert f.read() == data, path
    left = [n for d in (far, back) for name in names for n in os.listdir(os.path.join(d, name))
            if n.startswith(".hpcmove-")]
    assert left == []
    found = subprocess.run(["find", area.root, "-name", "PWNED"], capture_output=True).stdout
    assert found == b""


@contextlib.contextmanager
def remote_bashrc(first):
    """The test user's ~/.bashrc (which bash reads for commands sshd runs) begins with
    `first` for the test; as it was after."""
    rc = os.path.expanduser(f"~{TEST_USER}/.bashrc")
    kept = open(rc, "rb").read() if os.path.exists(rc) else None
    try:
        with open(rc, "wb") as f:
            f.write(first + (kept or b""))
        yield
    finally:
        if kept is None:
            os.unlink(rc)
        else:
            with open(rc, "wb") as f:
                f.write(kept)


def test_a_remote_shell_that_prints_at_startup_is_refused_with_the_cause(local_remote, area):
    """A ~/.bashrc on the remote host that prints in non-interactive shells would put its
    words into every remote command's output (a pulled slice, the listing, the digests):
    submit says so, quoting them, and starts nothing; quiet again, the same push works."""
    hp, _agent = local_remote
    hp.run("socket", "open", "--ttl", "5m", HOST)
    src = os.path.join(area.src, "f")
    with open(src, "wb") as f:
        f.write(os.urandom(5000))
    far = os.path.join(area.root, "far")
    os.mkdir(far)
    area.own()
    with remote_bashrc(b'echo "Welcome to the archive"\n'):
        for args in ([src, f"{HOST}:{far}/"], [f"{HOST}:{far}/f", area.dst]):
            done = hp.run("submit", *hp.backend_args, *args, check=False)
            assert done.returncode != 0
            assert b"'Welcome to the archive'" in done.stderr, done.stderr
            assert b"~/.bashrc" in done.stderr
        assert os.listdir(far) == [] and os.listdir(area.dst) == []
        assert json.loads(hp.run("list", "--json").stdout) == []
    s = hp.wait(hp.submit(src, f"{HOST}:{far}/"))
    assert s["state"] == "Done", (s["reason"], log(hp, s["id"]))
    assert same_file(src, os.path.join(far, "f"))


@pytest.fixture(params=["/usr/bin/tcsh", "/usr/bin/fish"], ids=["tcsh", "fish"])
def login_shell(sshd, request):
    """The test user's login shell is one that is not POSIX for the test (sshd runs every
    remote command with it); bash again after."""
    subprocess.run(["usermod", "-s", request.param, TEST_USER], check=True)
    yield
    subprocess.run(["usermod", "-s", "/bin/bash", TEST_USER], check=True)


def test_a_login_shell_that_is_not_posix_moves_hostile_names_too(local_remote, area,
                                                                 login_shell):
    """With tcsh as the remote login shell (some sites' default), a quoted newline is an
    error and `!` is expanded in quotes; fish has a syntax of its own: every remote
    command reaches /bin/sh untouched all the same (remote.for_any_shell); push and pull
    of hostile names are identical."""
    hp, agent = local_remote
    src = os.path.join(os.fsencode(area.src), b"-$(touch PWNED) dir!1\n")
    os.makedirs(os.path.join(src, b"sub `touch PWNED`"))
    for n in HOSTILE + [b"bang!$", b"!!"]:
        with open(os.path.join(src, n), "wb") as f:
            f.write(n * 1000)
        with open(os.path.join(src, b"sub `touch PWNED`", n), "wb") as f:
            f.write(os.urandom(5000))
    far = os.path.join(area.root, "far")
    os.mkdir(far)
    area.own()
    hp.run("socket", "open", "--ttl", "5m", HOST)
    agent.kill()
    out = os.path.join(os.fsencode(far), b"new\n'dst'!")
    s = hp.wait(hp.submit("--slice-size", "4K", src, os.fsencode(HOST) + b":" + out))
    assert s["state"] == "Done", (s["reason"], log(hp, s["id"]))
    assert tree_of(src) == tree_of(out)
    back = os.path.join(os.fsencode(area.dst), b"back!")
    s = hp.wait(hp.submit("--slice-size", "4K", os.fsencode(HOST) + b":" + out, back))
    assert s["state"] == "Done", (s["reason"], log(hp, s["id"]))
    assert tree_of(src) == tree_of(back)
    found = subprocess.run(["find", area.root, "/tmp", os.path.expanduser(f"~{TEST_USER}"),
                            "-name", "PWNED"], capture_output=True).stdout
    assert found == b""


def test_tilde_paths_name_home_directories_as_with_scp(local_remote, area):
    """`host:~/x` pushes into the remote user's home, `host:~user/x` pulls from that
    user's: as scp and rsync read them (not a directory named '~')."""
    hp, agent = local_remote
    src = big_and_small(os.path.join(area.src, "t"), 3 << 20, [1000] * 5)
    area.own()
    hp.run("socket", "open", "--ttl", "5m", HOST)
    agent.kill()
    name = f"hm-tilde-{uuid.uuid4().hex[:8]}"
    home = os.path.expanduser(f"~{TEST_USER}")
    try:
        s = hp.wait(hp.submit("--slice-size", "1M", src, f"{HOST}:~/{name}"))
        assert s["state"] == "Done", (s["reason"], log(hp, s["id"]))
        assert tree_of(src) == tree_of(os.path.join(home, name))
        back = os.path.join(area.dst, "back")
        s = hp.wait(hp.submit(f"{HOST}:~{TEST_USER}/{name}", back))
        assert s["state"] == "Done", (s["reason"], log(hp, s["id"]))
        assert tree_of(src) == tree_of(back)
        assert s["files"][0]["src"] == f"{home}/{name}", s["files"][0]
        done = hp.run("submit", *hp.backend_args, f"{HOST}:~nosuchuser/x", area.dst,
                      check=False)
        assert done.returncode != 0 and b"no user 'nosuchuser'" in done.stderr, done.stderr
    finally:
        shutil.rmtree(os.path.join(home, name), ignore_errors=True)


def big_and_small(root, big, sizes):
    """`root`/big of `big` random bytes and `root`/small/fNNN of each of `sizes`."""
    os.makedirs(os.path.join(root, "small"))
    with open(os.path.join(root, "big"), "wb") as f:
        f.write(os.urandom(big))
    for i, size in enumerate(sizes):
        with open(os.path.join(root, "small", f"f{i:03d}"), "wb") as f:
            f.write(os.urandom(size))
    return root


# What the remote user's ~/.bashrc sets: nothing, or a language of their own for the
# messages of every program (GNU gettext's LANGUAGE; ssh also forwards LANG and LC_*).
GERMAN = b"export LANGUAGE=de LANG=C.UTF-8\n"


@pytest.mark.parametrize("engine,rc", [("ssh", b""), ("rsync", b""), ("ssh", GERMAN),
                                       ("rsync", GERMAN)], ids=["ssh", "rsync", "ssh-de",
                                                                "rsync-de"])
def test_a_full_remote_disk_fails_at_once_with_its_reason(local_remote, area, engine, rc):
    """A retry cannot make room: slices and bundles that the remote disk refuses ("No
    space left on device") fail at their first attempt, each file is not sent again
    alone, the job says why, and nothing is left at the destination or in its spool.
    So too when the remote user's programs speak German: the reason is told by its
    words, which the remote commands say in the C locale."""
    hp, agent = local_remote
    with remote_bashrc(rc):
        if rc:  # the remote shell does speak German to commands that do not ask for C
            said = run_as_user(["ssh", "-o", "BatchMode=yes", HOST, "ls /nonexistent"],
                               {"PATH": "/usr/bin:/bin", "SSH_AUTH_SOCK": agent.sock})
            assert b"Datei oder Verzeichnis nicht gefunden" in said.stderr, said.stderr
        _full_remote_disk(hp, agent, area, engine)


def _full_remote_disk(hp, agent, area, engine):
    src = big_and_small(os.path.join(area.src, "s"), 6 << 20, [40 << 10] * 50)
    far = os.path.join(area.root, "far")
    os.mkdir(far)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "hpcmove-full", far],
                   check=True)
    try:
        area.own()
        hp.run("socket", "open", "--ttl", "5m", HOST)
        agent.kill()
        s = hp.wait(hp.submit("--engine", engine, "--slice-size", "1M", src, f"{HOST}:{far}/"))
        assert s["state"] == "Failed", s["reason"]
        assert "No space left on device" in s["reason"], s["reason"]
        failed = [x for f in s["files"] for x in f.get("slices", []) if x["state"] == "Failed"]
        assert failed and {x["attempts"] for x in failed} == {1}, log(hp, s["id"])
        small = [f["reason"] for f in s["files"] if "/small/" in f["dst"]
                 and f["state"] == "Failed"]
        assert small and all("bundle" in r for r in small), small  # not sent one by one
        assert os.listdir(far) == []
    finally:
        subprocess.run(["umount", far], check=True)


def _refused():
    """Sessions the testbed's sshd has refused so far (MaxSessions 10, OpenSSH's default)."""
    with open(os.environ["HPCMOVE_TEST_SSH_LOG"], "rb") as f:
        return f.read().count(b"no more sessions")


@pytest.mark.parametrize("engine", ["ssh", "rsync"])
def test_more_streams_than_the_sshd_allows_sessions_wait_for_a_slot(local_remote, area,
                                                                    engine):
    """16 streams want 16 sessions through one socket (the local backend's tasks run as
    one task of all their streams, at most 16); the sshd allows 10 per connection and
    refuses the rest ("Session open refused by peer"). Sessions
    wait for one of the socket's 8 slots instead: push and pull (two sessions per slice
    or bundle, taken together) complete identical, every slice and bundled file at its
    first attempt, and the sshd refused nothing."""
    hp, agent = local_remote
    src = big_and_small(os.path.join(area.src, "s"), 40 << 20, [500 + 31 * i for i in range(300)])
    far = os.path.join(area.root, "far")
    back = os.path.join(area.dst, "back")
    os.mkdir(far)
    os.mkdir(back)
    area.own()
    hp.run("socket", "open", "--ttl", "5m", HOST)
    agent.kill()
    before = _refused()
    args = ["--engine", engine, "--streams", "16", "--slice-size", "1M"]
    for job in (lambda: hp.submit(*args, src, f"{HOST}:{far}/"),
                lambda: hp.submit(*args, f"{HOST}:{far}/s", back)):
        s = hp.wait(job())
        assert s["state"] == "Done", (s["reason"], log(hp, s["id"]))
        attempts = [x["attempts"] for f in s["files"] for x in f.get("slices", [])]
        assert len(attempts) == 340 and set(attempts) == {1}, log(hp, s["id"])
    assert tree_of(src) == tree_of(os.path.join(far, "s")) == tree_of(os.path.join(back, "s"))
    assert _refused() == before
    sockets = hp.env["HPCMOVE_SOCKET_DIR"]
    assert any(".slot" in n for n in os.listdir(sockets))
    hp.run("socket", "close", HOST)
    assert os.listdir(sockets) == []  # the slots go with the socket


def test_the_local_backend_moves_a_remote_job_as_one_task_of_all_the_streams(local_remote,
                                                                              area):
    """On the local backend every task of a remote job would go through this machine's
    one control master: the job runs as one task with the streams of the tasks it would
    have had (--stripe-width 2 of --streams 2: one task of 4 streams), and a large file's
    slices and a tree move identical; a local copy keeps its two tasks."""
    hp, _agent = local_remote
    src = big_and_small(os.path.join(area.src, "s"), 8 << 20, [100 + 7 * i for i in range(50)])
    far = os.path.join(area.root, "far")
    os.mkdir(far)
    area.own()
    hp.run("socket", "open", "--ttl", "5m", HOST)
    args = ["--stripe-width", "2", "--streams", "2", "--slice-size", "1M"]
    for dst in (f"{HOST}:{far}/", os.path.join(area.dst, "copy")):
        s = hp.wait(hp.submit(*args, src, dst))
        assert s["state"] == "Done", (s["reason"], log(hp, s["id"]))
    assert tree_of(src) == tree_of(os.path.join(far, "s")) == \
        tree_of(os.path.join(area.dst, "copy"))
    db = sqlite3.connect(os.path.join(area.home, "hpcmove.db"))
    jobs = db.execute("SELECT id, stripe_width, n_tasks, options FROM job ORDER BY id").fetchall()
    tasks = {job: {t for (t,) in db.execute("SELECT DISTINCT task FROM slice WHERE job_id = ?",
                                            (job,))} for job, *_ in jobs}
    (pushed, *pushed_layout, options), (copied, *copied_layout, _options) = jobs
    assert (pushed_layout, json.loads(options)["streams"], tasks[pushed]) == ([1, 1], 4, {0})
    assert (copied_layout, tasks[copied]) == ([2, 2], {0, 1})


def test_a_large_file_is_cut_into_whole_waves_of_the_streams_unless_the_size_is_yours(
        local_remote, area):
    """A 2 GiB file pushed on one task of 6 streams: 12 slices of 171 MiB (two waves), not
    8 of 256 MiB (6, then 2 while 4 streams wait); --slice-size 256M keeps 8. A local copy
    (2 tasks of one slice at a time) keeps 8: whole waves already."""
    hp, _agent = local_remote
    big = os.path.join(area.src, "big")
    with open(big, "wb") as f:
        f.truncate(2 << 30)  # sparse: a dry run reads only its size
    area.own()
    hp.run("socket", "open", "--ttl", "5m", HOST)

    def planned(*args):
        out = hp.run("submit", *hp.backend_args, "--dry-run", "--stripe-width", "2",
                     "--streams", "3", *args).stdout.decode()
        return re.search(r"plan: 1 entries, 2\.0 GiB, (\d+) slices", out).group(1)

    assert planned(big, f"{HOST}:{area.root}/") == "12"
    assert planned("--slice-size", "256M", big, f"{HOST}:{area.root}/") == "8"
    assert planned(big, os.path.join(area.dst, "copy")) == "8"


@pytest.mark.parametrize("tools", ["xxhsum+python3", "rsync bundles", "coreutils only"])
@pytest.mark.parametrize("direction", ["push", "pull"])
def test_hostile_remote_names_arrive_intact_and_nothing_runs(local_remote, area, direction,
                                                             tools):
    hp, agent = local_remote
    engine = ["--engine", "rsync"] if tools == "rsync bundles" else []
    if tools == "coreutils only":  # cksum digests, placement by a generated shell script
        hp.env.update(HPCMOVE_REMOTE_SUM="cksum", HPCMOVE_REMOTE_NO_PYTHON="1")
    src = os.path.join(os.fsencode(area.src), b"-$(touch PWNED) dir\n")
    os.makedirs(os.path.join(src, b"sub `touch PWNED`"))
    for n in HOSTILE:
        with open(os.path.join(src, n), "wb") as f:
            f.write(n * 1000)
        with open(os.path.join(src, b"sub `touch PWNED`", n), "wb") as f:
            f.write(os.urandom(5000))
    small = os.path.join(src, b"small $(touch PWNED)\n")  # whole files: bundles
    os.makedirs(small)
    for i, n in enumerate(HOSTILE * 3):
        with open(os.path.join(small, n + b"%d" % i), "wb") as f:
            f.write(os.urandom(i * 97))
    os.symlink(b"$(touch PWNED)", os.path.join(src, b"link;ls"))
    far = os.path.join(area.root, "far")
    os.mkdir(far)
    area.own()
    hp.run("socket", "open", "--ttl", "5m", HOST)
    agent.kill()
    if direction == "push":
        out = os.path.join(os.fsencode(far), b"new\n'dst'")
        job = hp.submit(*engine, "--slice-size", "4K", src, os.fsencode(HOST) + b":" + out)
    else:
        out = os.path.join(os.fsencode(area.dst), b"new\n'dst'")
        job = hp.submit(*engine, "--slice-size", "4K", os.fsencode(HOST) + b":" + src, out)
    s = hp.wait(job)
    assert s["state"] == "Done", (s["reason"], log(hp, s["id"]))
    assert tree_of(src) == tree_of(out)
    # every file's slices moved at the first attempt: the bundles too (a bundle that
    # failed as a whole would be tried again file by file)
    assert {x["attempts"] for f in s["files"] for x in f.get("slices", [])} == {1}
    sums = {f["checksum"].split(":")[0].split("-")[0] for f in s["files"]
            if f["type"] == "file"}
    assert sums == ({"cksum"} if tools == "coreutils only" else {"xxh3_128"})
    db = sqlite3.connect(os.path.join(area.home, "hpcmove.db"))
    (options,), = db.execute("SELECT options FROM job")
    assert json.loads(options)["engine"] == ("rsync" if engine else "ssh")
    found = subprocess.run(["find", area.root, "/tmp", os.path.expanduser(f"~{TEST_USER}"),
                            "-name", "PWNED"], capture_output=True).stdout
    assert found == b""


@pytest.mark.parametrize("conflict", [False, True])
@pytest.mark.parametrize("direction", ["push", "pull"])
def test_move_removes_the_sources_only_once_the_copy_is_placed(local_remote, area, direction,
                                                               conflict):
    hp, agent = local_remote
    far = os.path.join(area.root, "far")
    os.mkdir(far)
    src = os.path.join(far if direction == "pull" else area.src, "tree")
    for i in range(30):
        os.makedirs(os.path.join(src, f"d{i % 3}"), exist_ok=True)
        with open(os.path.join(src, f"d{i % 3}", f"-f {i}'"), "wb") as f:
            f.write(os.urandom(1000 + i * 4000))
    with open(os.path.join(src, "big"), "wb") as f:
        f.write(os.urandom(3 << 20))
    area.own()
    before = tree_of(src)
    out = os.path.join(far if direction == "push" else area.dst, "tree")
    if conflict:  # a directory where a file must go: placement stops before it starts
        os.makedirs(os.path.join(out, "big", "x"))
        area.own()
    hp.run("socket", "open", "--ttl", "5m", HOST)
    agent.kill()
    if direction == "push":
        job = hp.submit("--move", "--slice-size", "1M", src, f"{HOST}:{far}/")
    else:
        job = hp.submit("--move", "--slice-size", "1M", f"{HOST}:{src}", area.dst + "/")
    s = hp.wait(job)
    if conflict:
        assert s["state"] == "Failed" and "is a directory" in s["reason"], s["reason"]
        assert tree_of(src) == before  # the source is untouched
        assert sorted(tree_of(out)) == [b"big", b"big/x"]  # nothing placed
        return
    assert s["state"] == "Done", (s["reason"], log(hp, s["id"]))
    assert tree_of(out) == before
    assert not os.path.exists(src)  # every file and directory of the source is gone


def test_socket_of_another_user_or_open_directory_is_refused(sshd, area, tmp_path):
    import socket as socketlib
    sockets = f"/tmp/hm-{uuid.uuid4().hex[:8]}"
    os.mkdir(sockets, 0o700)
    subprocess.run(["chown", TEST_USER, sockets], check=True)
    try:
        theirs = os.path.join(sockets, "theirs.sock")
        s = socketlib.socket(socketlib.AF_UNIX)
        s.bind(theirs)
        os.chmod(theirs, 0o600)
        os.chown(theirs, *_uid_gid("hpcmove-u2"))
        with open(os.path.join(area.src, "f"), "wb") as f:
            f.write(b"x" * 100)
        area.own()
        hp = Hpcmove("local", area)
        hp.env["HPCMOVE_SOCKET_DIR"] = sockets
        done = hp.run("submit", "--backend", "local", "-S", theirs,
                      os.path.join(area.src, "f"), f"{HOST}:{area.root}/", check=False)
        assert done.returncode != 0
        assert b"owned by uid" in done.stderr and b"refused" in done.stderr
        os.chmod(sockets, 0o755)  # a socket directory others can enter
        done = hp.run("socket", "open", HOST, check=False)
        assert done.returncode != 0 and b"open to others" in done.stderr
        assert os.listdir(area.root).count("far") == 0
    finally:
        subprocess.run(["rm", "-rf", sockets])


def test_a_socket_ends_at_its_ttl_even_while_a_session_keeps_it_busy(local_remote, area):
    """ssh's ControlPersist counts only idle time: a socket kept busy by a long transfer
    would outlive the lifetime its owner chose. The watcher `socket open` starts ends the
    master at the TTL, sessions and all, then leaves."""
    hp, agent = local_remote
    hp.run("socket", "open", "--ttl", "5s", HOST)
    agent.kill()
    path = json.loads(hp.run("socket", "list", "--json").stdout)[0]["path"]
    assert _master_pids(path)
    # a session that would last two minutes; without the watcher this times out
    done = run_as_user(["ssh", "-S", path, "-o", "BatchMode=yes", HOST, "sleep 120"],
                       hp.env, timeout=90)
    assert done.returncode == 255, done.stderr
    assert not os.path.exists(path)
    assert json.loads(hp.run("socket", "list", "--json").stdout)[0]["state"] == "gone"
    for _ in range(50):  # the watcher leaves with the master
        if subprocess.run(["pgrep", "-f", f"hpcmove-socket-ttl .* {re.escape(path)} "],
                          capture_output=True).returncode == 1:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the TTL watcher outlived its master")


def test_socket_open_keeps_the_users_cipher_choice(local_remote, area):
    """hpcmove prefers AES-GCM only where ssh would offer its built-in list: a cipher
    the user names with -o is the one the master negotiates with the sshd."""
    hp, _agent = local_remote
    opened = hp.run("socket", "open", "--ttl", "5m", "-o", "LogLevel=DEBUG1",
                    "-o", "Ciphers=aes256-ctr", HOST)
    negotiated = re.findall(rb"kex: client->server cipher: (\S+)", opened.stderr)
    assert negotiated == [b"aes256-ctr"], opened.stderr[-2000:]


def test_a_socket_of_two_connections_loses_only_the_slice_in_flight_on_the_one_that_dies(
        local_remote, area):
    """`socket open --connections 2`: the task's two streams go over two masters. The
    second is killed mid-transfer: its stream leaves with the one slice it had in flight
    (AuthRequired) and the other stream moves every slice left over the first master;
    `auth` needs no credential while the first answers, and sends that one slice."""
    hp, agent = local_remote
    far = os.path.join(area.root, "far")
    os.mkdir(far)
    src = os.path.join(area.src, "big.bin")
    with open(src, "wb") as f:
        f.write(os.urandom(64 << 20))
    area.own()
    assert b"2 connections" in hp.run("socket", "open", "--connections", "2", "--ttl", "5m",
                                      HOST).stdout
    (row,) = json.loads(hp.run("socket", "list", "--json").stdout)
    assert row["connections"] == 2 and _master_pids(row["path"] + ".2")
    agent.kill()
    job = hp.submit("--slice-size", "4M", "--bwlimit", "4M", "--streams", "2",
                    "--stripe-width", "1", src, f"{HOST}:{far}/")
    hp.wait_for(job, lambda s: sum(x["state"] == "Done" for x in s["files"][0]["slices"]) >= 2)
    os.kill(min(_master_pids(row["path"] + ".2")), signal.SIGTERM)
    s = hp.wait(job)
    assert s["state"] == "AuthRequired", (s["reason"], log(hp, job))
    states = sorted(x["state"] for x in s["files"][0]["slices"])
    assert states == ["AuthRequired"] + ["Done"] * 15, log(hp, job)
    assert not os.path.exists(os.path.join(far, "big.bin"))
    hp.run("auth", job)  # the agent is gone: the first connection serves
    s = hp.wait(job)
    assert s["state"] == "Done", (s["reason"], log(hp, job))
    assert same_file(src, os.path.join(far, "big.bin"))
    db = sqlite3.connect(os.path.join(area.home, "hpcmove.db"))
    assert [int(m.split()[0]) for (m,) in db.execute(
        "SELECT message FROM event WHERE kind = 'retry'")] == [1]  # that slice alone
    hp.run("socket", "close", HOST)
    assert os.listdir(hp.env["HPCMOVE_SOCKET_DIR"]) == []  # both masters, every slot


def _uid_gid(user):
    import pwd
    pw = pwd.getpwnam(user)
    return pw.pw_uid, pw.pw_gid


def test_cancel_of_an_auth_required_job_removes_the_remote_spool(remote_env, area):
    """The socket died mid-transfer: cancel says the remote spool is left while no
    socket reaches the host, and removes it once one is open again."""
    hp, agent, far = remote_env
    _src, sock, job = slow_push(hp, agent, area, far, 64, "4M", "8M")
    hp.wait_for(job, lambda s: any(x["state"] == "Done" for x in s["files"][0]["slices"]))
    spools = [n for n in os.listdir(far) if n.startswith(".hpcmove-")]
    assert len(spools) == 1  # partial data is there, in the spool only
    subprocess.run(["ssh", "-S", sock["path"], "-O", "exit", HOST], capture_output=True)
    assert hp.wait(job)["state"] == "AuthRequired"
    out = hp.run("cancel", job).stdout
    assert b"Cancelled" in out and b"remote spool" in out and b"left" in out
    assert os.listdir(far) == spools
    agent2 = Agent(area, os.environ["HPCMOVE_TEST_SSH_KEYS"])
    hp.env["SSH_AUTH_SOCK"] = agent2.sock
    try:
        on = ["--on", "dtn1"] if hp.backend == "slurm" else []
        hp.run("socket", "open", *on, "--ttl", "5m", HOST)
    finally:
        agent2.kill()
    hp.run("cancel", job)
    assert os.listdir(far) == []
    assert not os.path.exists(os.path.join(far, "big.bin"))


def test_socket_open_on_another_node_starts_the_master_there(local_remote, area):
    """`--on NODE` for a node that is not this machine runs `socket open` there over ssh
    (the testbed's `hpcmove-dtn`: the same sshd, agent forwarded as a user's DTN config
    would): the master lives in that ssh session and is recorded for NODE in the same
    database. `socket list` asks there whether it answers; the local backend, which
    would run the transfer here, refuses it and says why; `socket close` ends it there.
    When that node cannot be asked without a prompt, the socket is "unreachable"."""
    hp, agent = local_remote
    hp.run("socket", "open", "--on", "hpcmove-dtn", "--ttl", "5m", HOST)
    rows = json.loads(hp.run("socket", "list", "--json").stdout)
    assert [(r["node"], r["state"]) for r in rows] == [("hpcmove-dtn", "live")]
    pid = re.search(rb"pid=(\d+)", subprocess.run(
        ["ssh", "-S", rows[0]["path"], "-O", "check", HOST], capture_output=True).stderr).group(1)
    with open(f"/proc/{int(pid)}/environ", "rb") as f:
        env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    assert env[b"SSH_CONNECTION"].startswith(b"127.0.0.1 ")  # started inside the hop
    src = os.path.join(area.src, "f")
    with open(src, "wb") as f:
        f.write(os.urandom(1 << 20))
    far = os.path.join(area.root, "far")
    os.mkdir(far)
    area.own()
    refused = hp.run("submit", *hp.backend_args, src, f"{HOST}:{far}/", check=False)
    assert refused.returncode != 0
    assert b"is on hpcmove-dtn, and the local backend runs the transfer on this machine" \
        in refused.stderr, refused.stderr
    assert os.listdir(far) == []
    hp.run("socket", "close", HOST)
    assert subprocess.run(["ssh", "-S", rows[0]["path"], "-O", "check", HOST],
                          capture_output=True).returncode != 0  # the master is gone
    bad = hp.run("socket", "open", "--on", "-oProxyCommand=touch PWNED", HOST, check=False)
    assert bad.returncode == 2 and b"is not a node name" in bad.stderr
    # a live socket whose node cannot be asked from here (no agent: ssh to it would
    # prompt) is said to be unreachable, not gone, and submit says what to fix
    hp.run("socket", "open", "--on", "hpcmove-dtn", "--ttl", "5m", HOST)
    path = json.loads(hp.run("socket", "list", "--json").stdout)[0]["path"]
    agent.kill()
    try:
        assert [r["state"] for r in json.loads(hp.run("socket", "list", "--json").stdout)] \
            == ["unreachable"]
        check = hp.run("socket", "check", HOST, check=False)
        assert check.returncode == 1 and b"unreachable" in check.stdout
        refused = hp.run("submit", "--backend", "slurm", src, f"{HOST}:{far}/", check=False)
        assert b"cannot reach hpcmove-dtn over ssh without a prompt" in refused.stderr, \
            refused.stderr
        assert subprocess.run(["ssh", "-S", path, "-O", "check", HOST],
                              capture_output=True).returncode == 0  # it was live all along
    finally:
        subprocess.run(["ssh", "-S", path, "-O", "exit", HOST], capture_output=True)


def on_login_node(hp, sockets, *args):
    """hpcmove as the test user where the DTN's socket directory cannot be seen, as on a
    login node: an empty tmpfs over it, in a mount namespace of the command's own."""
    uid = _uid()
    inner = ["runuser", "-u", TEST_USER, "--", "env", "-i",
             *[f"{k}={v}" for k, v in hp.env.items()], sys.executable, "-m", "hpcmove", *args]
    done = subprocess.run(["unshare", "-m", "--", "sh", "-c",
                           'mount -t tmpfs -o "mode=0700,uid=$1" tmpfs "$0" && '
                           'test -z "$(ls -A "$0")" && shift && exec "$@"',
                           sockets, str(uid), *inner], cwd=hp.area.root, capture_output=True)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout.decode().strip()


def _uid():
    import pwd
    return pwd.getpwnam(TEST_USER).pw_uid


def test_submit_on_a_login_node_goes_through_the_dtn_that_keeps_the_socket(remote_env, area):
    """Sockets are node-local. dtn3 is, to Slurm, another machine (NodeHostName
    hpcmove-dtn: the ssh testbed's alias for this one). `socket open --on dtn3` starts the
    master there; a submit that cannot see the socket directory (the login node) checks
    the socket, probes the remote host and makes the remote spool through
    `ssh hpcmove-dtn`, pins the tasks to dtn3, and returns; then the agent goes, and the
    tasks and finalize on dtn3 push and pull through the socket alone: identical data,
    hostile names included. `cancel` from the login node removes a push's remote spool
    the same way."""
    hp, agent, far = remote_env
    slurm_env()
    sockets = hp.env["HPCMOVE_SOCKET_DIR"]
    hp.run("socket", "open", "--on", "dtn3", "--ttl", "10m", HOST)
    rows = json.loads(hp.run("socket", "list", "--json").stdout)
    assert [(r["node"], r["state"]) for r in rows] == [("dtn3", "live")]
    assert on_login_node(hp, sockets, "socket", "check", HOST).startswith(f"{HOST}: live")
    big = os.path.join(area.src, "big.bin")
    with open(big, "wb") as f:
        f.write(os.urandom(24 << 20))
    tree = os.path.join(area.src, "tree")
    os.mkdir(tree)
    sub = os.path.join(os.fsencode(tree), b"d $(touch PWNED)\n-x")  # made remotely via the hop
    os.mkdir(sub)
    for i, name in enumerate(HOSTILE):
        for d in (os.fsencode(tree), sub):
            with open(os.path.join(d, name), "wb") as f:
                f.write(os.urandom(1000 + i))
    os.mkdir(os.path.join(far, "in"))
    back = os.path.join(area.dst, "back")
    os.mkdir(back)
    with open(os.path.join(far, "pulled.bin"), "wb") as f:
        f.write(os.urandom(20 << 20))
    area.own()
    push = on_login_node(hp, sockets, "submit", "--parsable", *hp.backend_args,
                         "--slice-size", "8M", big, tree, f"{HOST}:{far}/in/")
    pull = on_login_node(hp, sockets, "submit", "--parsable", *hp.backend_args,
                         "--slice-size", "8M", f"{HOST}:{far}/pulled.bin", f"{back}/")
    agent.kill()  # the batch side never needs a credential
    for job in (push, pull):
        s = hp.wait(job)
        assert s["state"] == "Done", (s["reason"], log(hp, s["id"]))
        assert {x["host"] for f in s["files"] for x in f["slices"]} == {"dtn3"}
    assert same_file(big, os.path.join(far, "in", "big.bin"))
    assert tree_of(tree) == tree_of(os.path.join(far, "in", "tree"))
    assert same_file(os.path.join(far, "pulled.bin"), os.path.join(back, "pulled.bin"))
    assert subprocess.run(["find", area.root, "/tmp", os.path.expanduser(f"~{TEST_USER}"),
                           "-name", "PWNED"], capture_output=True).stdout == b""
    # a push waiting for dtn3 (drained), cancelled on the login node: the remote spool
    # is removed through the hop too
    agent2 = Agent(area, os.environ["HPCMOVE_TEST_SSH_KEYS"])  # the login node's own ssh
    hp.env["SSH_AUTH_SOCK"] = agent2.sock
    subprocess.run(["scontrol", "update", "NodeName=dtn3", "State=DRAIN",
                    "Reason=hpcmove test: held"], check=True)
    try:
        os.mkdir(os.path.join(far, "held"))
        area.own()
        job = on_login_node(hp, sockets, "submit", "--parsable", *hp.backend_args,
                            big, f"{HOST}:{far}/held/")
        assert [n for n in os.listdir(os.path.join(far, "held")) if n.startswith(".hpcmove-")]
        on_login_node(hp, sockets, "cancel", job)
        assert os.listdir(os.path.join(far, "held")) == []
        on_login_node(hp, sockets, "socket", "close", HOST)
        assert json.loads(hp.run("socket", "list", "--json").stdout) == []
    finally:
        subprocess.run(["scontrol", "update", "NodeName=dtn3", "State=RESUME"])
        agent2.kill()


def test_auth_on_a_login_node_reopens_the_socket_on_the_dtn(remote_env, area):
    """The socket on dtn3 (another machine) dies mid-push: the job waits in AuthRequired;
    `hpcmove auth` on the login node opens a new master on dtn3 (over ssh, the agent
    forwarded) and resumes only the slices not done."""
    hp, agent, far = remote_env
    slurm_env()
    sockets = hp.env["HPCMOVE_SOCKET_DIR"]
    src = os.path.join(area.src, "big.bin")
    with open(src, "wb") as f:
        f.write(os.urandom(64 << 20))
    area.own()
    hp.run("socket", "open", "--on", "dtn3", "--ttl", "10m", HOST)
    path = json.loads(hp.run("socket", "list", "--json").stdout)[0]["path"]
    job = on_login_node(hp, sockets, "submit", "--parsable", *hp.backend_args, "--slice-size",
                        "4M", "--bwlimit", "8M", "--stripe-width", "1", src, f"{HOST}:{far}/")
    agent.kill()
    hp.wait_for(job, lambda s: sum(x["state"] == "Done" for x in s["files"][0]["slices"]) >= 2)
    pid = re.search(rb"pid=(\d+)", subprocess.run(
        ["ssh", "-S", path, "-O", "check", HOST], capture_output=True).stderr).group(1)
    os.kill(int(pid), signal.SIGTERM)
    s = hp.wait(job)
    assert s["state"] == "AuthRequired", (s["reason"], log(hp, job))
    slices = s["files"][0]["slices"]
    done_before = sum(x["state"] == "Done" for x in slices)
    assert 2 <= done_before < len(slices)
    agent2 = Agent(area, os.environ["HPCMOVE_TEST_SSH_KEYS"])  # the user is back
    hp.env["SSH_AUTH_SOCK"] = agent2.sock
    try:
        on_login_node(hp, sockets, "auth", job)
        rows = json.loads(on_login_node(hp, sockets, "socket", "list", "--json"))
    finally:
        agent2.kill()
    assert [(r["node"], r["state"]) for r in rows] == [("dtn3", "live")]
    masters = _master_pids(rows[0]["path"])
    assert masters and int(pid) not in masters  # a new master answers
    s = hp.wait(job)
    assert s["state"] == "Done", (s["reason"], log(hp, s["id"]))
    assert {x["host"] for x in s["files"][0]["slices"]} == {"dtn3"}
    assert same_file(src, os.path.join(far, "big.bin"))
    db = sqlite3.connect(os.path.join(area.home, "hpcmove.db"))
    resent = [int(m.split()[0]) for (m,) in db.execute(
        "SELECT message FROM event WHERE kind = 'retry'")]
    assert resent == [len(slices) - done_before]


def _master_pids(path):
    out = subprocess.run(["ssh", "-S", path, "-O", "check", HOST], capture_output=True).stderr
    return {int(p) for p in re.findall(rb"pid=(\d+)", out)}


def _skip_set(src_root, dst_root):
    """Data for --skip-existing: at src_root whole files (3 MiB, 1 MiB slices) and small
    ones (bundled), at dst_root some of them already, some differing; returns
    ({relative name: bytes}, {name: expected skipped flags})."""
    data = {b"same": os.urandom(3 << 20), b"differs": os.urandom(3 << 20),
            b"missing": os.urandom(3 << 20), b"partly": os.urandom(3 << 20)}
    for i, name in enumerate(HOSTILE + [b"s%d" % n for n in range(12)]):
        data[b"small/" + name] = os.urandom(500 + 37 * i)
    want = {b"same": [True] * 3, b"differs": [False] * 3, b"missing": [False] * 3,
            b"partly": [True, False, False]}
    os.makedirs(os.path.join(src_root, b"small"))
    os.makedirs(os.path.join(dst_root, b"small"))
    for i, (name, d) in enumerate(sorted(data.items())):
        with open(os.path.join(src_root, name), "wb") as f:
            f.write(d)
        if name.startswith(b"small/"):
            kind = ("same", "differs", "missing")[i % 3]
            want[name] = [kind == "same"]
        else:
            kind = name.decode()
        d = already_there(kind, d)
        if d is not None:
            with open(os.path.join(dst_root, name), "wb") as f:
                f.write(d)
    return data, want


def _check_skipped(hp, job, root, data, want):
    s = hp.wait(job)
    assert s["state"] == "Done", (s["reason"], log(hp, s["id"]))
    for name, d in data.items():
        with open(os.path.join(root, name), "rb") as f:
            assert f.read() == d, name
    got = {os.path.relpath(os.fsencode(f["src"]), os.fsencode(f["src"]).split(b"/set/")[0]
                           + b"/set"): [x["skipped"] for x in f["slices"]]
           for f in s["files"] if f["type"] == "file"}
    assert got == want
    assert not [n for n in os.listdir(os.path.dirname(root)) if n.startswith(b".hpcmove-")]


def test_skip_existing_with_a_remote_side_leaves_what_is_already_there(remote_env, area):
    """--skip-existing on a push and on a pull: a file (or slice, or bundled small file)
    already at the destination with the same bytes is not sent (hashed on the remote host
    and here), files wholly there keep their inode, a file partly there is completed
    from what it had; hostile names included."""
    hp, agent, far = remote_env
    slurm_env()
    open_socket(hp)
    src = os.path.join(os.fsencode(area.src), b"set")
    there = os.path.join(os.fsencode(far), b"set")
    data, want = _skip_set(src, there)
    area.own()
    inode = os.stat(os.path.join(there, b"same")).st_ino
    job = hp.submit("--skip-existing", "--slice-size", "1M", src, f"{HOST}:{far}/")
    _check_skipped(hp, job, there, data, want)
    assert os.stat(os.path.join(there, b"same")).st_ino == inode  # left where it was
    # and back: the remote copy is the source, a partial local copy the destination
    back = os.path.join(os.fsencode(area.dst), b"set")
    shutil.rmtree(there)
    data, want = _skip_set(there, back)
    area.own()
    inode = os.stat(os.path.join(back, b"same")).st_ino
    job = hp.submit("--skip-existing", "--slice-size", "1M", f"{HOST}:{far}/set", area.dst)
    _check_skipped(hp, job, back, data, want)
    assert os.stat(os.path.join(back, b"same")).st_ino == inode


def test_pushed_slice_corrupted_on_the_remote_host_before_finalize_is_sent_again(remote_env,
                                                                                 area):
    """Pushed slices are verified on the remote host once, by finalize's at-rest check
    before anything is placed: a byte flipped in the remote spool after the task wrote
    it is found there and only that slice is sent again."""
    hp, agent, far = remote_env
    slurm_env()
    src = os.path.join(area.src, "big")
    with open(src, "wb") as f:
        f.write(os.urandom(32 << 20))
    area.own()
    open_socket(hp)
    agent.kill()
    job = hp.submit("--slice-size", "8M", "--stripe-width", "2", src, f"{HOST}:{far}/")
    env = {"PATH": "/usr/bin:/bin", "SLURM_CONF": os.environ["SLURM_CONF"]}
    assert run_as_user(["scontrol", "hold", job], env).returncode == 0  # finalize waits
    hp.wait_for(job, lambda s: all(x["state"] == "Done" for x in s["files"][0]["slices"]))
    (spool,) = [n for n in os.listdir(far) if n.startswith(".hpcmove-")]
    with open(os.path.join(far, spool, "t", "big"), "r+b") as f:  # the destination's layout
        f.seek(20 << 20)
        byte = f.read(1)
        f.seek(20 << 20)
        f.write(bytes([byte[0] ^ 0x01]))
    assert run_as_user(["scontrol", "release", job], env).returncode == 0
    s = hp.wait(job)
    assert s["state"] == "Done", (s["reason"], log(hp, s["id"]))
    assert same_file(src, os.path.join(far, "big"))
    assert [x["offset"] for x in s["files"][0]["slices"] if x["attempts"] > 1] == [16 << 20]


def test_bundled_file_corrupted_on_the_remote_host_before_finalize_is_sent_again(remote_env,
                                                                                  area):
    """Small files pushed in a tar bundle are hashed on the remote host once, at rest, by
    finalize: a byte flipped in one of them in the remote spool is found there and only
    that file is sent again; the others are placed as the task left them."""
    hp, agent, far = remote_env
    slurm_env()
    tree = os.path.join(area.src, "small")
    os.mkdir(tree)
    for i in range(40):
        with open(os.path.join(tree, f"f{i:02d}"), "wb") as f:
            f.write(os.urandom(1000 + 37 * i))
    area.own()
    open_socket(hp)
    agent.kill()
    job = hp.submit("--stripe-width", "1", tree, f"{HOST}:{far}/")
    env = {"PATH": "/usr/bin:/bin", "SLURM_CONF": os.environ["SLURM_CONF"]}
    assert run_as_user(["scontrol", "hold", job], env).returncode == 0  # finalize waits
    hp.wait_for(job, lambda s: all(x["state"] == "Done" for f in s["files"]
                                   for x in f.get("slices", [])))
    (spool,) = [n for n in os.listdir(far) if n.startswith(".hpcmove-")]
    with open(os.path.join(far, spool, "t", "small", "f07"), "r+b") as f:  # as it will be
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 0x01]))
    assert run_as_user(["scontrol", "release", job], env).returncode == 0
    s = hp.wait(job)
    assert s["state"] == "Done", (s["reason"], log(hp, s["id"]))
    assert tree_of(tree) == tree_of(os.path.join(far, "small"))
    resent = [os.path.basename(f["dst"]) for f in s["files"]
              if any(x["attempts"] > 1 for x in f.get("slices", []))]
    assert resent == ["f07"]
