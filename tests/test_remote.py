"""The pure side of remote endpoints: parsing, quoting, the generated shell text (run
here by a real sh, on local directories), find output, and the cksum digest."""
import errno
import io
import os
import random
import shutil
import stat
import subprocess
import tempfile
import threading
import time

import pytest
import xxhash

from hpcmove import plan, remote, ssh, states
from hpcmove.errors import PlanError, TransferError
from hpcmove_plugins.ssh import (BadTar, Cksum, SshEngine, parallel_script, remote_error,
                                 tar_files)

HOSTILE = [b"sp ace", b"qu'ote\"s", b"new\nline", b"$(touch PWNED)", b"`touch PWNED`",
           b"-rf", b"--help", b"caf\xe9", b"semi;colon&"]


@pytest.mark.parametrize("arg, host, path", [
    ("archive:/store/x", "archive", b"/store/x"),
    ("alice@archive.example:run42/", "alice@archive.example", b"run42/"),
    ("archive:", "archive", b"."),
    ("[::1]:/tmp/x", "[::1]", b"/tmp/x"),
    ("/local/with:colon", "", b"/local/with:colon"),
    ("./a:b", "", b"./a:b"),
    ("plain", "", b"plain"),
    (":x", "", b":x"),
])
def test_parse(arg, host, path):
    e = remote.parse(arg)
    assert (e.host, e.path, e.remote) == (host, path, bool(host))


@pytest.mark.parametrize("stderr, transient", [
    # ssh's own words when the sshd refused a session of a live master (MaxSessions still
    # counting closing ones); its fallback connection then has no credential
    (b"mux_client_request_session: session request failed: Session open refused by peer\n"
     b"ControlSocket /tmp/s already exists, disabling multiplexing\n"
     b"user@host: Permission denied (publickey).\n", True),
    (b"channel 3: open failed: administratively prohibited: open failed\n"
     b"mux_client_request_session: read from master failed: Broken pipe\n"
     b"Permission denied (publickey).\n", True),
    # the remote tool's own permission error: no retry can mend it
    (b"dd: failed to open '/store/x': Permission denied\n", False),
    (b"tar: d/f: Cannot open: No space left on device\n", False),
    (b"dd: error reading '/store/x': Input/output error\n", True),
])
def test_a_session_the_sshd_refused_is_retried_a_remote_permission_error_is_not(stderr,
                                                                               transient):
    e = remote_error("host", "writing x", stderr, 255)
    assert e.transient is transient
    assert str(e).startswith("on host: writing x: ")


def _ssh_g(tmp_path, config, *options):
    """What real `ssh -G` says of the ciphers for a host under `config` and options."""
    cfg = tmp_path / "config"
    cfg.write_text(config)
    return ssh._ciphers(["-F", str(cfg), *options, "--", "archive.example"])


@pytest.mark.parametrize("config, options, prefer", [
    ("", [], True),                                     # ssh's built-in list
    ("Host *\n    Ciphers aes256-ctr\n", [], False),   # a user's or site's own choice
    ("", ["-o", "Ciphers=chacha20-poly1305@openssh.com"], False),
    ("Host other\n    Ciphers aes256-ctr\n", [], True),  # for another host only
])
def test_aes_gcm_is_preferred_only_over_sshs_own_cipher_list(tmp_path, config, options,
                                                              prefer):
    builtin = ssh._ciphers(["-F", "/dev/null", "--", "x"])
    assert "aes128-gcm@openssh.com" in builtin
    chosen = _ssh_g(tmp_path, config, *options)
    want = ["-o", f"Ciphers={ssh.CIPHERS}"] if prefer else []
    assert ssh.cipher_options(chosen, builtin, cpu_has_aes=True) == want
    assert ssh.cipher_options(chosen, builtin, cpu_has_aes=False) == []


def test_master_argv_puts_the_users_options_before_hpcmoves(monkeypatch):
    """ssh keeps the first value it gets for an option."""
    monkeypatch.setattr(ssh, "_ciphers", lambda argv: "same")
    monkeypatch.setattr(ssh, "_cpu_has_aes", lambda: True)
    argv = ssh.master_argv("/s/x.sock", "alice@h", 60, ["-o", "Compression=yes"])
    assert argv.index("Compression=yes") < argv.index("Compression=no")
    assert argv[argv.index("-S") + 1] == "/s/x.sock" and argv[-2:] == ["--", "alice@h"]
    assert f"Ciphers={ssh.CIPHERS}" in argv and "ControlPersist=60" in argv


def test_parse_refuses_a_host_that_could_be_an_option():
    with pytest.raises(PlanError, match="not a valid remote host"):
        remote.parse("-oProxyCommand=x:/tmp")
    with pytest.raises(PlanError, match="not a valid remote host"):
        remote.parse("-oProxyCommand=x@host:/tmp")  # a user part ssh would read as -o
    assert remote.parse("a-b.c_d+e@host:/tmp").host == "a-b.c_d+e@host"


HOMES = {"alice": "/home/alice"}


@pytest.mark.parametrize("path,expected", [
    (b"~", b"."), (b"~/", b"./"), (b"~/a/b/", b"a/b/"), (b"~//a", b"a"),
    (b"~alice", b"/home/alice"), (b"~alice/", b"/home/alice/"),
    (b"~alice/x y", b"/home/alice/x y"),
    (b"~~", b"~~"), (b"a/~/b", b"a/~/b"), (b"~$(touch PWNED)/x", b"~$(touch PWNED)/x"),
    (b"~-rf", b"~-rf"), (b"/~", b"/~")])
def test_a_leading_tilde_is_a_home_directory_as_scp_reads_it(path, expected):
    e = remote.untilde(remote.Endpoint("h", path), HOMES)
    assert (e.host, e.path) == ("h", expected)


def test_a_tilde_of_an_unknown_user_is_refused_and_local_paths_are_left_alone():
    with pytest.raises(PlanError, match="no user 'bob' on h"):
        remote.untilde(remote.Endpoint("h", b"~bob/x"), HOMES)
    assert remote.untilde(remote.Endpoint("", b"~/x"), {}).path == b"~/x"
    assert remote.tilde_users([remote.Endpoint("h", p) for p in (b"~bob/x", b"~", b"~al.ice",
                                                                 b"x/~carol")]
                              + [remote.Endpoint("", b"~dave")]) == ["al.ice", "bob"]


@pytest.mark.parametrize("name", HOSTILE)
def test_quoted_word_reaches_the_shell_as_itself(tmp_path, name):
    out = subprocess.run(["sh", "-c", b"printf %s " + remote.q(name)], capture_output=True,
                         cwd=tmp_path, check=True).stdout
    assert out == name
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("name", HOSTILE)
def test_command_through_the_sockets_node_reaches_the_far_shell_as_itself(tmp_path, name):
    """A login node's command for a socket kept on a DTN goes `ssh NODE -- 'ssh -S ..
    HOST -- CMD'`: two shells, each given one line. Here each ssh is a stand-in that runs
    its last argument with sh, as sshd's shell would (the real hop: test_ssh.py)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text('#!/bin/sh\nfor a; do last=$a; done\nexec sh -c "$last"\n')
    (bindir / "ssh").chmod(0o755)
    far = remote.Remote("alice@archive", b"/run/user/1/hpcmove/s", via="dtn3")
    argv = far.argv(b"printf %s " + remote.q(name))
    assert argv[:6] == ["ssh", "-o", "BatchMode=yes", "-T", "-x", "dtn3"]
    out = subprocess.run(argv, capture_output=True, cwd=tmp_path, check=True,
                         env={"PATH": f"{bindir}:/usr/bin:/bin"}).stdout
    assert out == name
    assert not (tmp_path / "PWNED").exists()


def test_find_listing_of_hostile_names(tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    for n in HOSTILE:
        (root / os.fsdecode(n)).write_bytes(n * 3)
    os.symlink(b"new\nline", os.path.join(bytes(root), b"link"))
    os.link(os.path.join(bytes(root), b"sp ace"), os.path.join(bytes(root), b"hard"))
    out = subprocess.run(["sh", "-c", remote.FIND_CMD], input=bytes(root) + b"/\0",
                         capture_output=True, check=True, cwd=tmp_path).stdout
    tree = remote.RemoteTree(remote.parse_find(out))
    names = {n for n, _p, _s in tree.children(bytes(root))}
    assert names == set(HOSTILE) | {b"link", b"hard"}
    st = tree.lstat(os.path.join(bytes(root), b"new\nline"))
    local = os.lstat(os.path.join(bytes(root), b"new\nline"))
    assert (st.st_size, st.st_mtime_ns, st.st_mode) == (local.st_size, local.st_mtime_ns,
                                                        local.st_mode)
    assert tree.readlink(os.path.join(bytes(root), b"link")) == b"new\nline"
    assert not (tmp_path / "PWNED").exists()


def test_plan_from_a_remote_listing_matches_the_local_plan(tmp_path):
    root = tmp_path / "src"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(os.urandom(3000))
    (root / "g").write_bytes(b"")
    out = subprocess.run(["sh", "-c", remote.FIND_CMD], input=bytes(root) + b"\0",
                         capture_output=True, check=True).stdout
    tree = remote.RemoteTree(remote.parse_find(out))
    opts = plan.Options(slice_size=1024, stripe_width=2)
    pairs = [(bytes(root), bytes(tmp_path / "dst"))]
    local = plan.plan_pairs(pairs, opts, "t1")
    far = plan.plan_pairs(pairs, opts, "t1", tree=tree)
    key = lambda p: [(e.kind, e.src, e.dst, e.size, e.mode, e.mtime_ns) for e in p.entries]
    assert key(far) == key(local)
    assert [(s.entry, s.offset, s.length) for s in far.slices] == \
        [(s.entry, s.offset, s.length) for s in local.slices]


def _placer(kind, files, spool, cwd):
    """Run the remote placement as the remote host would: the generated shell script, or
    the python3 program with its input; either removes the spool once it has placed."""
    if kind == "sh":
        return subprocess.run(["sh", "-s"], input=remote.place_script(files, [spool]),
                              capture_output=True, cwd=cwd)
    return subprocess.run(["python3", "-c", remote.PLACE_PY],
                          input=remote.place_ops(files, [spool]), capture_output=True, cwd=cwd)


@pytest.mark.parametrize("existing", [False, True], ids=["new-dir", "existing-dir"])
@pytest.mark.parametrize("placer", ["sh", "python3"])
def test_remote_placement_places_every_name_and_metadata(tmp_path, placer, existing):
    """The remote placement, run here: all names arrive, modes and mtimes follow, links
    are links, and the spool is gone; into a new directory (moved in one rename) and into
    one that exists (what it held stays)."""
    spool = bytes(tmp_path / ".hpcmove-t.spool")
    dst = bytes(tmp_path / "out")
    if existing:
        os.mkdir(dst)
        open(os.path.join(dst, b"keep"), "wb").close()
    files = [_F(0, plan.DIR, dst, spool, mode=0o750, mtime_ns=1_600_000_000_123_456_789),
             _F(1, plan.DIR, os.path.join(dst, b"sub"), spool, mode=0o705)]
    for path in (spool, os.path.join(spool, plan.SPOOL_TREE), *(plan.spool_path(spool, f.dst)
                                                         for f in files)):
        os.makedirs(path, exist_ok=True)
    for i, n in enumerate(HOSTILE, 2):
        where = os.path.join(dst, b"sub" if i % 2 else b"", n)
        with open(plan.spool_path(spool, where), "wb") as f:
            f.write(n)
        files.append(_F(i, plan.FILE, where, spool, mode=0o640,
                        mtime_ns=1_500_000_000_000_000_001 + i))
    k = len(files)
    files.append(_F(k, plan.SYMLINK, os.path.join(dst, b"ln"), spool, link_target=b"$(x)",
                    mtime_ns=1_400_000_000_000_000_000))
    files.append(_F(k + 1, plan.HARDLINK, os.path.join(dst, b"hl"), spool, link_to=2))
    done = _placer(placer, files, spool, tmp_path)
    assert done.returncode == 0, done.stderr
    for f in files[2:k]:
        assert open(f.dst, "rb").read() == os.path.basename(f.dst)
        st = os.stat(f.dst)
        assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o640, f.mtime_ns)
    assert os.readlink(os.path.join(dst, b"ln")) == b"$(x)"
    assert os.lstat(os.path.join(dst, b"ln")).st_mtime_ns == 1_400_000_000_000_000_000
    assert os.stat(os.path.join(dst, b"hl")).st_ino == os.stat(files[2].dst).st_ino
    assert os.stat(dst).st_mode & 0o777 == 0o750
    assert os.stat(os.path.join(dst, b"sub")).st_mode & 0o777 == 0o705
    assert os.stat(dst).st_mtime_ns == 1_600_000_000_123_456_789
    assert os.path.exists(os.path.join(dst, b"keep")) == existing
    top = {os.path.basename(f.dst) for f in files if os.path.dirname(f.dst) == dst}
    assert set(os.listdir(dst)) == top | ({b"keep"} if existing else set())  # nothing else
    assert not os.path.exists(spool)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("nested", [False, True], ids=["top", "in-existing-dir"])
@pytest.mark.parametrize("placer", ["sh", "python3"])
def test_remote_placement_moves_nothing_on_a_conflict(tmp_path, placer, nested):
    """A directory where a file must go stops placement before anything moves: beside
    the destination's own entries, or inside a directory of the job that exists there
    (after one that does not: what lies under that one is not looked up)."""
    spool = bytes(tmp_path / ".hpcmove-t.spool")
    top = bytes(tmp_path / "d") if nested else bytes(tmp_path)
    files = [_F(0, plan.DIR, bytes(tmp_path / "new"), spool),
             _F(1, plan.FILE, bytes(tmp_path / "new" / "x"), spool)]
    if nested:
        files.append(_F(2, plan.DIR, top, spool))
        os.mkdir(top)
    files += [_F(len(files), plan.FILE, os.path.join(top, b"a"), spool),
              _F(len(files) + 1, plan.FILE, os.path.join(top, b"b"), spool)]
    for f in files:
        os.makedirs(os.path.dirname(plan.spool_path(spool, f.dst)), exist_ok=True)
        if f.kind == plan.DIR:
            os.makedirs(plan.spool_path(spool, f.dst), exist_ok=True)
        else:
            open(plan.spool_path(spool, f.dst), "wb").close()
    os.mkdir(os.path.join(top, b"b"))  # a directory where a file must go
    done = _placer(placer, files, spool, tmp_path)
    assert done.returncode == 3 and b"CONFLICT" in done.stdout
    assert not os.path.exists(os.path.join(top, b"a"))
    assert not (tmp_path / "new").exists()
    assert os.path.exists(plan.spool_path(spool, files[-2].dst))


@pytest.mark.parametrize("size", [0, 1, 3, 255, 256, 65536, 3 << 20])
def test_cksum_matches_coreutils(size):
    data = os.urandom(size)
    h = Cksum()
    h.update(data[:5])
    h.update(data[5:])
    crc, length = subprocess.run(["cksum"], input=data, capture_output=True,
                                 check=True).stdout.split()
    assert h.hexdigest() == f"cksum:{int(crc)}/{int(length)}"
    assert remote.parse_digest(crc + b" " + length + b"\n", "cksum") == h.hexdigest()


class _F:
    def __init__(self, index, kind, dst, spool, mode=0o644, mtime_ns=0, link_target=b"",
                 link_to=-1):
        self.index, self.kind, self.dst, self.spool = index, kind, dst, spool
        self.mode, self.mtime_ns, self.link_target, self.link_to = mode, mtime_ns, link_target, \
            link_to


@pytest.mark.parametrize("kind, program", [("xxh128", ["xxhsum", "-H2"]), ("cksum", ["cksum"])])
def test_parse_sums_matches_names_in_order_and_skips_unreadable(tmp_path, kind, program):
    names = [b"plain", b"new\nline", b"gone", b"sp ace", b"back\\slash"]
    for n in names:
        if n != b"gone":
            (tmp_path / os.fsdecode(n)).write_bytes(n * 7)
    out = subprocess.run(program + ["--", *names], capture_output=True, cwd=tmp_path).stdout
    found = remote.parse_sums(out, names, kind)
    assert set(found) == set(names) - {b"gone"}
    for n in found:
        h = remote.parse_digest(subprocess.run(program, input=n * 7, capture_output=True)
                                .stdout, kind)
        assert found[n] == h


@pytest.mark.parametrize("dest, message", [
    ("alice@elsewhere.example:/x/", "not in remote.allowed_hosts"),
    ("archive.example:/x/", "no live control socket for archive.example"),
])
def test_submit_checks_the_host_policy_then_wants_a_socket(tmp_path, monkeypatch, dest, message):
    from click.testing import CliRunner

    from hpcmove import cli
    site = tmp_path / "policy.toml"
    site.write_text('[remote]\nallowed_hosts = ["archive.example", "*.dtn.example"]\n')
    for k, v in {"HPCMOVE_POLICY": str(site), "HPCMOVE_HOME": str(tmp_path / "home"),
                 "HPCMOVE_CONFIG": str(tmp_path / "none.toml"),
                 "HPCMOVE_SOCKET_DIR": str(tmp_path / "s")}.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "f").write_bytes(b"x")
    result = CliRunner().invoke(cli.cli, ["submit", "--backend", "local", str(tmp_path / "f"),
                                          dest])
    assert result.exit_code == 1
    assert message in result.output
    assert not (tmp_path / "home" / "jobs").exists() or not os.listdir(tmp_path / "home" / "jobs")


def test_remote_to_remote_and_mixed_sources_are_refused(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from hpcmove import cli
    monkeypatch.setenv("HPCMOVE_HOME", str(tmp_path / "home"))
    for args, message in ((["a:/x", "b:/y"], "both remote"),
                          (["a:/x", str(tmp_path), str(tmp_path / "d")], "all on one remote")):
        result = CliRunner().invoke(cli.cli, ["submit", "--backend", "local", *args])
        assert result.exit_code == 1 and message in result.output, result.output
    copyjob = tmp_path / "copyjob"
    for lines, message in (("/l/a a:/x\nb:/y /l/b\n", "both remote"),
                           ("/l/a a:/x\n/l/b b:/y\n", "destinations must all be local, or all "
                                                       "on one remote host"),
                           ("/l/a a:/x\n/l/b /l/c\n", "destinations must all be local"),
                           ("a:/x /l/a\n/l/b /l/c\n", "sources must all be local"),
                           ("a:/x b:/y\n", "both remote")):
        copyjob.write_text(lines)
        result = CliRunner().invoke(cli.cli, ["submit", "--backend", "local", "--from-file",
                                              str(copyjob)])
        assert result.exit_code == 1 and message in result.output, (lines, result.output)


@pytest.mark.parametrize("backend, args, pairs, layout", [
    ("local", (["/l/a"], "h:/r/"), None, (1, 6, 200)),  # push: 2 tasks' streams in one
    ("local", (["h:/r/a", "h:/r/b"], "/l/"), None, (1, 6, 200)),  # pull
    ("local", ([], ""), [("/l/a", "u@h:/r/a")], (1, 6, 200)),  # a copyjob's pairs
    ("local", (["/l/a"], "/l/b"), None, (2, 3, 100)),  # a local copy: as asked
    ("slurm", (["/l/a"], "h:/r/"), None, (2, 3, 100)),  # batch tasks: as asked
    ("local", (["/l/a"], "-bad:/r/"), None, (2, 3, 100)),  # _endpoints refuses it later
])
def test_a_remote_job_on_the_local_backend_is_one_task_of_all_the_streams(
        backend, args, pairs, layout):
    from hpcmove import jobs
    asked = jobs.SubmitOptions(stripe_width=2, streams=3, bwlimit=100)
    got = jobs._one_task(backend, asked, *args, pairs)
    assert (got.stripe_width, got.streams, got.bwlimit) == layout
    assert jobs._stripe_width(backend, got) == layout[0]


def test_one_task_of_a_remote_job_has_at_most_16_streams(monkeypatch):
    from hpcmove import jobs
    monkeypatch.setattr(os, "cpu_count", lambda: 8)  # the local backend's default width
    got = jobs._one_task("local", jobs.SubmitOptions(streams=3), ["/l/a"], "h:/r/", None)
    assert (got.stripe_width, got.streams) == (1, 16)


def test_socket_path_that_cannot_be_bound_is_refused_with_the_way_out(tmp_path):
    from hpcmove import ssh
    assert len(ssh.socket_path("alice@archive.example", "/tmp/hpcmove-1001")) <= ssh.MAX_PATH
    with pytest.raises(ssh.SocketError, match="HPCMOVE_SOCKET_DIR"):
        ssh.socket_path("archive.example", "/tmp/" + "d" * 80)


@pytest.mark.parametrize("kind, program", [("xxh128", ["xxhsum", "-H2"]), ("cksum", ["cksum"])])
def test_digests_script_hashes_ranges_in_parallel_and_in_order(tmp_path, kind, program):
    data = os.urandom(300_000)
    (tmp_path / "new\nf").write_bytes(data)
    path = bytes(tmp_path / "new\nf")
    ranges = [(path, o, n) for o, n in ((0, 1000), (1000, 99_000), (100_000, 200_000),
                                         (5, 7), (299_999, 1), (0, 300_000))]
    ranges.append((bytes(tmp_path / "missing"), 0, 10))
    out = subprocess.run(["sh", "-s"], input=remote.digests_script(ranges, kind, parallel=3),
                         capture_output=True).stdout
    got = remote.parse_digests(out, len(ranges), kind)
    for (p, o, n), digest in zip(ranges[:-1], got):
        want = subprocess.run(program, input=data[o:o + n], capture_output=True).stdout
        assert digest == remote.parse_digest(want, kind)
    assert got[-1] in ("unreadable", remote.parse_digest(subprocess.run(
        program, input=b"", capture_output=True).stdout, kind))


def test_parallel_script_prints_each_commands_output_whole_and_in_order(tmp_path):
    """The at-rest check's xxhsum runs go 4 at a time; their outputs (one with a name
    holding a newline) come back in command order, and the temporary directory goes."""
    commands = [b"sleep 0.%d; printf 'line %d\\n'; printf 'two\\nlines %d\\n'" % (9 - n, n, n)
                for n in range(9)]
    out = subprocess.run(["sh", "-s"], input=parallel_script(commands), capture_output=True,
                         env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)},
                         check=True).stdout
    assert out == b"".join(b"line %d\ntwo\nlines %d\n" % (n, n) for n in range(9))
    assert list(tmp_path.iterdir()) == []
    assert parallel_script([b"true"]) == b"true\n"


def test_engine_rsync_without_rsync_on_the_remote_host_is_refused(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from hpcmove import cli, remote, ssh
    monkeypatch.setenv("HPCMOVE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(ssh, "choose", lambda host, explicit: ("/tmp/s.sock", "dtn1"))
    monkeypatch.setattr(remote.Remote, "probe", lambda self, dirs=(): {
        "sum": "cksum", "python": False, "rsync": False, "home": "/home/a",
        "dirs": {d: True for d in dirs}})
    (tmp_path / "f").write_bytes(b"x")
    result = CliRunner().invoke(cli.cli, ["submit", "--backend", "local", "--engine", "rsync",
                                          str(tmp_path / "f"), "archive.example:/x/"])
    assert result.exit_code == 1
    assert "rsync is not installed on archive.example" in result.output
    assert not (tmp_path / "home" / "jobs").exists() or not os.listdir(tmp_path / "home" / "jobs")


def test_rsync_remote_shell_words_survive_rsyncs_splitting():
    from hpcmove.errors import TransferError
    from hpcmove_plugins.rsync import rsh
    text = rsh(b"/run/user/1001/hpc move/a'b.sock")
    assert text.startswith("ssh -S \"/run/user/1001/hpc move/a'b.sock\" -o ControlMaster=no")
    with pytest.raises(TransferError, match="cannot be given"):
        rsh(b'/tmp/a"b.sock')


@pytest.mark.parametrize("sizes", [[], [0], [1, 511, 512, 513], [4 << 20, 0, 9000, 1023]])
def test_bundle_tar_stream_is_read_by_gnu_tar_from_a_pipe(tmp_path, sizes):
    """The ssh engine writes its own tar headers (one per small file, named by its path
    in the spool: any bytes, any length, with its mode and ns mtime): GNU tar, reading
    them from a pipe in odd-sized pieces, makes the same files with that mode (plus u+rw)
    and mtime, so that placement need not set them."""
    from hpcmove_plugins.ssh import tar_end, tar_header
    stream, files, meta = b"", {}, {}
    names = [b"t/d/" + n for n in HOSTILE] + [
        b"t/" + b"d" * 60 + b"/" + b"e" * 60 + b"/f",  # > 100: ustar's prefix field
        b"t/" + b"x" * 120,                             # no '/' to split at: GNU long name
        b"t/" + b"/".join([b"\xe9\n" * 30] * 6)]       # > 255 bytes
    modes = [0o644, 0o400, 0o755, 0o000, 0o4750, 0o600, 0o777]
    for i, size in enumerate(sizes):
        for j, n in enumerate(b"%d/" % i + n for n in names):
            data = os.urandom(size)
            mode, ns = modes[j % len(modes)], 1_700_000_000_123_456_789 + 1_000_001 * j
            files[n] = data
            meta[n] = ((mode & 0o777) | 0o600, ns)
            stream += tar_header(n, size, mode, ns) + data + bytes(-size % 512)
    stream += tar_end(len(stream))
    assert len(stream) % (20 * 512) == 0
    out = tmp_path / "spool"
    out.mkdir()
    proc = subprocess.Popen(["tar", "-x", "-B", "-f", "-", "-C", str(out), "--no-same-owner",
                             "--same-permissions"], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    for at in range(0, len(stream), 7777):  # pieces that never line up with blocks
        proc.stdin.write(stream[at:at + 7777])
        proc.stdin.flush()
    proc.stdin.close()
    assert proc.wait() == 0, proc.stderr.read()
    assert proc.stderr.read() == b""
    found = {os.path.relpath(os.path.join(d, f), bytes(out)): open(os.path.join(d, f), "rb").read()
             for d, _, fs in os.walk(bytes(out)) for f in fs}
    assert found == files
    got = {n: (stat.S_IMODE(st.st_mode), st.st_mtime_ns)
           for n in files for st in [os.lstat(os.path.join(bytes(out), n))]}
    assert got == meta
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("count, size, streams, expect", [
    (10_000, (1 << 10, 64 << 10), 3, 6),  # 5 bundles' worth -> 6: two full waves of 3
    (500, 10 << 10, 3, 1),       # fewer than 200 per stream: one bundle, one session
    (600, 10 << 10, 3, 3),       # enough for every stream
    (5_000, 0, 3, 3),            # empty files weigh their tar header
    (2, 1, 3, 1),
    (300, 4 << 20, 2, 10),       # 1.2 GB: the byte cap (128 MiB) makes 10, even for 2
])
def test_small_files_are_cut_into_even_bundles_that_keep_every_stream_busy(
        count, size, streams, expect):
    from hpcmove_plugins.ssh import BUNDLE_BYTES, BUNDLE_FILES, bundles
    rng = random.Random(count)
    items = [{"n": i, "size": rng.randint(*size) if isinstance(size, tuple) else size}
             for i in range(count)]
    out = bundles(items, streams)
    assert len(out) == expect
    assert [i["n"] for b in out for i in b] == list(range(count))  # all, once, in order
    assert all(len(b) <= BUNDLE_FILES and sum(i["size"] for i in b) <= BUNDLE_BYTES
               for b in out)
    weights = [sum(i["size"] + 512 for i in b) for b in out]
    biggest = max(size) if isinstance(size, tuple) else size
    assert max(weights) - min(weights) <= 2 * (biggest + 512)  # even, to a file or two


def _stub_ssh(tmp_path, monkeypatch):
    """An `ssh` that logs each start and runs its last argument with sh, as sshd's shell
    would, on this machine."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text(f'#!/bin/sh\necho start >> {tmp_path}/starts\n'
                                'for a; do last=$a; done\nexec sh -c "$last"\n')
    (bindir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return lambda: (tmp_path / "starts").read_text().count("start") \
        if (tmp_path / "starts").exists() else 0


@pytest.mark.parametrize("engine, side, expect", [
    ("ssh", "src", 1), ("ssh", "dst", 300), ("rsync", "src", 300), ("rsync", "dst", 300)])
def test_small_files_of_many_spools_are_bundled_when_pulled(engine, side, expect):
    """A copyjob of 300 pairs into 300 directories has a spool in each: pulled, their
    files come in one bundle (written here by each one's spool path); pushed outside an
    array task, one remote tar unpacks a bundle into one spool, so each directory has
    its own. One rsync run moves a bundle between two directories, both ways."""
    from hpcmove_plugins.rsync import RsyncEngine
    items = [{"slice": i, "root": b"/d%03d/.hpcmove-x.spool" % i, "offset": 0,
              "src": b"/r/f%03d" % i, "spool": b"/d%03d/.hpcmove-x.spool/t/f%03d" % (i, i),
              "length": 100, "size": 100} for i in range(300)]
    engine = {"ssh": SshEngine, "rsync": RsyncEngine}[engine](
        remote={"host": "h", "socket": "/nonexistent", "side": side})
    engine.defer_verify = True if engine.name == "rsync" else False
    units = engine.units(items)
    assert len(units) == expect
    assert sorted(i["slice"] for u in units for i in u) == list(range(300))


def test_sessions_started_ahead_and_never_taken_give_their_slots_to_one_wanted_now(
        tmp_path, monkeypatch):
    """Streams that each start the next unit's session ahead can lose the race for that
    unit (another stream takes it first, before the session is registered): sessions
    nobody takes then held every slot while every stream waited for one (a copyjob of
    1,500 single files stopped so). A session wanted now ends one of this process's
    unused ones for its slot; that one had nothing written (dd conv=notrunc)."""
    _stub_ssh(tmp_path, monkeypatch)
    r = remote.Remote("h", bytes(tmp_path / "sock"), sessions=remote.CLOSING + 2)
    target = tmp_path / "spool-file"
    target.write_bytes(b"kept")
    for n in range(2):  # both slots, for units another stream took meanwhile
        assert r.start(b"dd of=" + remote.q(bytes(target)) + b" bs=1M seek=%d "
                       b"oflag=seek_bytes conv=notrunc status=none" % n, wait=False)
    assert r.start(b"echo never", wait=False) is False  # no slot left
    taken = []
    t = threading.Thread(target=lambda: taken.append(r.run(b"echo now")), daemon=True)
    t.start()
    t.join(10)
    assert taken == [(0, b"now\n", b"")]
    assert target.read_bytes() == b"kept"
    remote._discard_started()


def test_an_rsync_bundle_of_2000_long_names_is_verified_by_one_remote_digest_call(
        tmp_path, monkeypatch):
    """The remote digests of a pushed rsync bundle: the 2,000 names went into one remote
    command, which is one argument of ssh here and of the login shell there (128 KiB at
    most, 4 bytes a byte as for_any_shell sends it): "Argument list too long", no digest
    came back, and every file of the bundle was sent again alone. A stand-in ssh runs
    the remote side here (a command after '--' as sshd's shell would; rsync's server as
    it is)."""
    from hpcmove_plugins.rsync import RsyncEngine
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text('#!/bin/sh\n'
                                'while [ $# -gt 0 ] && [ "$1" != h ]; do shift; done; shift\n'
                                'if [ "$1" = -- ]; then exec sh -c "$2"; fi\nexec "$@"\n')
    (bindir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    src, root = tmp_path / "src", bytes(tmp_path / "spool" / "t")
    src.mkdir()
    os.makedirs(root)
    items = []
    for i in range(2000):
        name = b"a-rather-long-name-of-a-small-file-in-a-bundle-%04d" % i
        (src / os.fsdecode(name)).write_bytes(b"%d" % i)
        st = (src / os.fsdecode(name)).stat()
        items.append({"slice": i, "src": bytes(src / os.fsdecode(name)),
                      "spool": root + b"/" + name, "root": root, "offset": 0,
                      "length": st.st_size, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    engine = RsyncEngine(remote={"host": "h", "socket": str(tmp_path / "sock"), "side": "dst",
                                 "sum": "xxh128"})
    got = engine._push_bundle(items)
    assert all(ours and ours == theirs for ours, theirs, _why in got.values()), \
        next(v for v in got.values() if v[0] != v[1])
    assert len(os.listdir(root)) == 2000


@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("tree", [False, True])
def test_a_pulled_bundle_of_long_names_comes_in_one_session_with_its_digests(
        tmp_path, monkeypatch, defer, tree):
    """A pulled bundle: the names go on stdin twice (tar's copy, then the digests'), the
    tar stream and the remote digests come back in one session. 2,000 names of ~2,300
    bytes are 4.6 MB of stdin; written before reading the stream, that filled every pipe
    while tar waited for its output to be read (it hung so with the list written first).
    In an array task (defer) the written files are left to finalize's at-rest check.
    Renamed on the way, Python reads the stream; a tree goes into this machine's tar,
    which reads the 4.6 MB of names too."""
    starts = _stub_ssh(tmp_path, monkeypatch)
    rel = "/".join([("d" * 200) + str(k) for k in range(11)])
    deep = tmp_path / "src" / rel
    deep.mkdir(parents=True)
    root = bytes(tmp_path / "spool")
    spools = os.path.join(root, b"t", rel.encode()) if tree else root + b"/t"
    os.makedirs(spools)
    items = []
    for i in range(2000):
        path = deep / ("f-%04d" % i)
        path.write_bytes(b"%d" % i * (i % 7))
        st = path.stat()
        items.append({"slice": i, "src": bytes(path), "root": root, "offset": 0,
                      "spool": spools + (b"/f-%04d" if tree else b"/%04d") % i,
                      "length": st.st_size, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    engine = SshEngine(remote={"host": "h", "socket": str(tmp_path / "sock"), "side": "src",
                               "sum": "xxh128"})
    engine.defer_verify = defer
    got = []
    t = threading.Thread(target=lambda: got.append(engine._pull_bundle(items)), daemon=True)
    t.start()
    t.join(60)
    assert got, "the pulled bundle did not finish"
    assert starts() == 1
    for item in items:
        theirs, ours, why = got[0][item["slice"]]
        data = open(item["src"], "rb").read()
        assert theirs == xxhash.xxh3_128(data).hexdigest(), why
        assert ours == (None if defer else theirs)
        assert open(item["spool"], "rb").read() == data


def test_a_pulled_bundle_leaves_each_file_with_its_planned_mode_and_mtime(
        tmp_path, monkeypatch):
    """A task writes each pulled file of a bundle with the mode (u+rw added) and mtime
    the plan holds, so placement has nothing left to change for it; an item of an older
    manifest (no mode) stays 0600, for placement to set."""
    _stub_ssh(tmp_path, monkeypatch)
    src, root = tmp_path / "src", bytes(tmp_path / "spool" / "t")
    src.mkdir()
    os.makedirs(root)
    modes = [0o644, 0o400, 0o755, None]
    items = []
    for i, mode in enumerate(modes):
        path = src / ("f%d" % i)
        path.write_bytes(b"x" * i)
        st = path.stat()
        item = {"slice": i, "src": bytes(path), "spool": root + b"/%d" % i, "root": root,
                "offset": 0, "length": st.st_size, "size": st.st_size,
                "mtime_ns": 1_600_000_000_123_456_789 + i}
        if mode is not None:
            item["mode"] = mode
        items.append(item)
    engine = SshEngine(remote={"host": "h", "socket": str(tmp_path / "sock"), "side": "src",
                               "sum": "xxh128"})
    engine.defer_verify = True
    engine._pull_bundle(items)
    for item, mode in zip(items, modes):
        st = os.stat(item["spool"])
        if mode is None:
            assert stat.S_IMODE(st.st_mode) == 0o600
        else:
            assert stat.S_IMODE(st.st_mode) == mode | 0o600
            assert st.st_mtime_ns == item["mtime_ns"]


def _tree_items(tmp_path, names, subdir=b"sub `touch PWNED`"):
    """Pulled items of a remote tree `src` (hostile directory names) whose spool paths
    keep its layout under the spool's tree, as a pull of `src/` into a directory plans."""
    src = os.path.join(bytes(tmp_path), b"-$(touch PWNED) src\n")
    root = os.path.join(bytes(tmp_path), b"dst", b".hpcmove-x.spool")
    items = []
    for i, name in enumerate(names):
        rel = os.path.join(subdir, name) if i % 2 else name
        path = os.path.join(src, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(os.urandom(i * 37 % 3000))
        os.chmod(path, (0o644, 0o400, 0o755)[i % 3])
        st = os.stat(path)
        items.append({"slice": i, "src": path, "root": root,
                      "spool": os.path.join(root, b"t", rel), "offset": 0,
                      "length": st.st_size, "size": st.st_size, "mode": st.st_mode & 0o7777,
                      "mtime_ns": 1_600_000_000_123_456_789 + i})
    for d in {os.path.dirname(i["spool"]) for i in items}:
        os.makedirs(d, exist_ok=True)
    return src, items


@pytest.mark.parametrize("gnu", [True, False])
def test_a_pulled_tree_goes_from_the_remote_tar_into_this_machines_tar(tmp_path, monkeypatch,
                                                                       gnu):
    """A pulled bundle whose files keep their names and layout (a tree) is unpacked by
    this machine's GNU tar in one session, never through Python's reader (which takes
    it where tar is another tar): hostile names arrive intact and nothing runs, each
    file has the remote digest of its data, its mode with u+rw and its planned ns
    mtime; the digests (length first) come ahead of the stream, so none of tar's bytes
    is lost."""
    import hpcmove_plugins.ssh as plugin
    starts = _stub_ssh(tmp_path, monkeypatch)
    read, tar_files = [], plugin.tar_files
    monkeypatch.setattr(plugin, "tar_files", lambda *a: read.append(1) or tar_files(*a))
    monkeypatch.setattr(plugin, "local_gnu_tar", lambda: gnu)
    names = HOSTILE + [b"-f %d\n$(touch PWNED)" % i for i in range(40)]
    _src, items = _tree_items(tmp_path, names)
    assert len({plugin.untar_parts(i)[:2] for i in items}) == 1
    engine = SshEngine(remote={"host": "h", "socket": str(tmp_path / "sock"), "side": "src",
                               "sum": "xxh128"})
    engine.defer_verify = True
    got = engine._pull_bundle(items)
    assert starts() == 1
    for item in items:
        theirs, ours, why = got[item["slice"]]
        data = open(item["src"], "rb").read()
        assert (theirs, ours, why) == (xxhash.xxh3_128(data).hexdigest(), None, "")
        assert open(item["spool"], "rb").read() == data
        st = os.lstat(item["spool"])
        assert stat.S_IMODE(st.st_mode) == item["mode"] | 0o600
        assert st.st_mtime_ns == item["mtime_ns"]
    assert not list(tmp_path.rglob("PWNED"))
    assert read == ([] if gnu else [1])
    engine.defer_verify = False  # outside an array task: read back here at once
    got = engine._pull_bundle(items)
    assert all(got[i["slice"]][0] == got[i["slice"]][1] != "" for i in items)


@pytest.mark.parametrize("kind", ["xxh128", "cksum"])
def test_a_pulled_tree_missing_or_changed_files_are_not_taken_for_received(
        tmp_path, monkeypatch, kind):
    """A source gone since planning (its spool file left by an earlier attempt) and one
    whose size changed are not received: each names why, with the remote tar's words;
    the others arrive with their digests. This machine's tar takes the members in the
    names' order, so it skips all after the one gone: those come in a second session
    (and only those: two files gone take two sessions too), not one by one later."""
    starts = _stub_ssh(tmp_path, monkeypatch)
    _src, items = _tree_items(tmp_path, [b"f%d" % i for i in range(12)])
    gone, grown, later = items[3], items[4], items[8]
    os.unlink(later["src"])
    with open(gone["spool"], "wb") as f:  # as an earlier attempt left it
        f.write(open(gone["src"], "rb").read())
    os.utime(gone["spool"], ns=(gone["mtime_ns"], gone["mtime_ns"]))
    time.sleep(0.1)
    os.unlink(gone["src"])
    with open(grown["src"], "ab") as f:
        f.write(b"more")
    engine = SshEngine(remote={"host": "h", "socket": str(tmp_path / "sock"), "side": "src",
                               "sum": kind})
    engine.defer_verify = True
    got = engine._pull_bundle(items)
    assert starts() == 2
    for item in (gone, later):
        assert got[item["slice"]][:2] == ("", "")
        assert "not received from h" in got[item["slice"]][2]
        assert "No such file" in got[item["slice"]][2]
    assert got[grown["slice"]][:2] == ("", "")
    assert "not received from h" in got[grown["slice"]][2]
    for item in items:
        if item not in (gone, grown, later):
            data = open(item["src"], "rb").read()
            want = xxhash.xxh3_128(data).hexdigest() if kind == "xxh128" else \
                "cksum:" + subprocess.run(["cksum"], input=data, capture_output=True,
                                          check=True).stdout.split()[0].decode() + \
                "/%d" % len(data)
            assert got[item["slice"]] == (want, None, "")


def test_a_pulled_tree_brings_nothing_but_its_regular_files_into_the_spool(tmp_path,
                                                                          monkeypatch):
    """What the stream holds beyond the names asked for (an extra file, a link out of the
    spool, a name below a link) stays out of the spool, and a file that became a link
    on the remote host since it was planned leaves no link at its spool path: nothing
    may write through one later, and what lies outside is untouched."""
    import hpcmove_plugins.ssh as plugin
    _stub_ssh(tmp_path, monkeypatch)
    src, items = _tree_items(tmp_path, [b"f%d" % i for i in range(6)], subdir=b"d")
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    became = items[2]
    os.unlink(became["src"])
    os.symlink(outside, became["src"])
    rdir, ldir, _ = plugin.untar_parts(items[0])
    extra = tmp_path / "extra"
    (extra / "d").mkdir(parents=True)
    (extra / "d" / "extra").write_bytes(b"not asked for")
    os.symlink(tmp_path, extra / "d" / "out")
    stream = tmp_path / "stream.tar"
    names = [plugin.untar_parts(i)[2] for i in items]
    subprocess.run(["tar", "-c", "-f", str(stream), "-C", rdir, *map(os.fsdecode, names),
                    "-C", str(extra), "d/extra", "d/out"], check=True)
    subprocess.run(["tar", "-r", "-f", str(stream), "-C", str(tmp_path), "--transform",
                    "s,^outside,d/out/planted,", "outside"], check=True)
    real = plugin.pull_untar_cmd

    def hostile(rdir, size, kind):  # the sums as asked for, then a stream of its own
        head = real(rdir, size, kind).split(b"head -c %d | tar -c" % size)[0]
        return head + b"cat " + remote.q(bytes(stream)) + b"\n"
    monkeypatch.setattr(plugin, "pull_untar_cmd", hostile)
    engine = SshEngine(remote={"host": "h", "socket": str(tmp_path / "sock"), "side": "src",
                               "sum": "xxh128"})
    engine.defer_verify = True
    got = engine._pull_bundle(items)
    assert got[became["slice"]][:2] == ("", "")
    assert not os.path.lexists(became["spool"])
    assert outside.read_bytes() == b"keep" and not list(tmp_path.rglob("planted"))
    left = sorted(os.path.join(d, n) for d, dirs, files in os.walk(ldir) for n in dirs + files)
    assert left == sorted([os.path.join(ldir, b"d")] +
                          [i["spool"] for i in items if i is not became])
    for item in items:
        if item is not became:
            assert got[item["slice"]][2] == ""
            assert open(item["spool"], "rb").read() == open(item["src"], "rb").read()


def test_a_link_at_a_spool_path_is_never_written_through(tmp_path, monkeypatch):
    """A pulled slice or bundled file whose spool path is a symbolic link (not one
    hpcmove makes) fails there; the file it points to is untouched."""
    from hpcmove.plugins import SliceWork
    _stub_ssh(tmp_path, monkeypatch)
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3000))
    st = src.stat()
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    spool = tmp_path / "spool"
    os.symlink(outside, spool)
    engine = SshEngine(remote={"host": "h", "socket": str(tmp_path / "sock"), "side": "src",
                               "sum": "xxh128"})
    with pytest.raises(TransferError, match="symbolic links|Too many levels"):
        engine.copy_slice(SliceWork(bytes(src), bytes(spool), 0, st.st_size, st.st_size,
                                    st.st_mtime_ns))
    item = {"slice": 1, "src": bytes(src), "spool": bytes(spool), "root": bytes(tmp_path),
            "offset": 0, "length": st.st_size, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    with pytest.raises(OSError):
        engine._write_whole(item, src.read_bytes())
    assert outside.read_bytes() == b"keep" and os.path.islink(spool)


def test_a_pulled_tree_cut_off_by_the_masters_end_waits_for_auth(tmp_path, monkeypatch):
    """The control master dies in the middle of a tree's stream (ssh ends 255, and
    `ssh -O check` finds no master): the bundle's files wait for `auth`, none is taken
    as received."""
    import hpcmove_plugins.ssh as plugin
    _stub_ssh(tmp_path, monkeypatch)
    _src, items = _tree_items(tmp_path, [b"f%d" % i for i in range(40)])
    real = plugin.pull_untar_cmd

    def cut(rdir, size, kind):
        return real(rdir, size, kind).replace(
            b"-T -\n", b"-T - | head -c 20000; exit 255\n")
    monkeypatch.setattr(plugin, "pull_untar_cmd", cut)
    engine = SshEngine(remote={"host": "h", "socket": str(tmp_path / "sock"), "side": "src",
                               "sum": "xxh128"})
    engine.defer_verify = True
    got = engine.copy_bundle(items)
    assert {r["state"] for _item, r in got} == {states.AUTH}
    assert engine.gone


@pytest.mark.parametrize("layout", ["tree", "tree and pairs", "renamed"])
def test_pulled_small_files_go_to_this_machines_tar_as_trees(tmp_path, monkeypatch, layout):
    """Units of a pull: the files of a remote and spool directory pair come in bundles
    for this machine's tar when it is GNU tar; files renamed on the way, another tar,
    or pairs of a few files each beside a tree (a copyjob's pairs into many directories:
    not a session per pair) go together to Python's reader."""
    import hpcmove_plugins.ssh as plugin
    monkeypatch.setattr(plugin, "local_gnu_tar", lambda: True)
    root = b"/d/.hpcmove-x.spool"
    items = [{"slice": i, "src": b"/r/s/f%d" % i, "root": root, "offset": 0, "length": 10,
              "size": 10, "spool": root + (b"/t/s/g%d" if layout == "renamed" else
                                           b"/t/s/f%d") % i} for i in range(600)]
    if layout == "tree and pairs":
        items += [{"slice": 600 + i, "src": b"/q/f%d" % i, "root": b"/e%d/.hpcmove-x.spool" % i,
                   "spool": b"/e%d/.hpcmove-x.spool/t/f%d" % (i, i), "offset": 0,
                   "length": 10, "size": 10} for i in range(30)]
    engine = SshEngine(remote={"host": "h", "socket": "/nonexistent", "side": "src"})
    units = engine.units(items)
    assert sorted(i["slice"] for u in units for i in u) == list(range(len(items)))
    keys = [{(plugin.untar_parts(i) or (None, None))[:2] for i in u} for u in units]
    tree = {(b"/r", root + b"/t")}
    if layout == "renamed":
        assert keys == [{(None, None)}] * 3
    elif layout == "tree":
        assert keys == [tree] * 3
    else:
        assert keys[:3] == [tree] * 3 and len(keys) == 4 and len(keys[3]) == 30


@pytest.mark.parametrize("src, spool, expect", [
    (b"/r/a/b", b"/x/.s/t/a/b", (b"/r", b"/x/.s/t", b"a/b")),
    (b"/a/b", b"/x/.s/t/a/b", (b"/", b"/x/.s/t", b"a/b")),
    (b"rel/b", b"/x/.s/t/rel/b", (b".", b"/x/.s/t", b"rel/b")),
    (b"/r/t/b", b"/x/.s/t/b", (b"/r", b"/x/.s", b"t/b")),
    (b"/r/.s/t/b", b"/x/.s/t/b", (b"/r/.s", b"/x/.s", b"t/b")),  # never above the spool
    (b"/r/a/b", b"/y/.s/t/a/b", None),  # not in the item's spool
    (b"/r/a/b", b"/x/.s/t/c", None)])
def test_untar_parts_share_the_last_names_and_stay_within_the_spool(src, spool, expect):
    from hpcmove_plugins.ssh import untar_parts
    assert untar_parts({"src": src, "spool": spool, "root": b"/x/.s"}) == expect


def test_a_pushed_bundle_whose_every_file_fails_there_ends_with_the_reason(
        tmp_path, monkeypatch):
    """The remote tar of a pushed bundle prints an error for each file it cannot write;
    for 2,000 long names that is more than the pipes (and over ssh the channel window)
    hold, and a tar that cannot write its errors stops reading the stream. Read
    meanwhile, the bundle ends with tar's reason instead of hanging."""
    _stub_ssh(tmp_path, monkeypatch)
    src, root = tmp_path / "src", bytes(tmp_path / "spool" / "t")
    src.mkdir()
    os.makedirs(root)
    open(root + b"/x", "wb").close()  # "x/NAME": Not a directory, even for root
    items = []
    for i in range(2000):
        path = src / ("f%04d" % i)
        path.write_bytes(b"%d" % i)
        st = path.stat()
        items.append({"slice": i, "src": bytes(path),
                      "spool": root + b"/x/" + b"n" * 250 + b"%04d" % i, "root": root,
                      "offset": 0, "length": st.st_size, "size": st.st_size,
                      "mtime_ns": st.st_mtime_ns})
    engine = SshEngine(remote={"host": "h", "socket": str(tmp_path / "sock"), "side": "dst",
                               "sum": "xxh128"})
    engine.defer_verify = True
    got = []

    def push():
        try:
            got.append(engine._push_bundle(items))
        except TransferError as e:
            got.append(e)
    t = threading.Thread(target=push, daemon=True)
    t.start()
    t.join(60)
    assert got, "the pushed bundle did not finish"
    assert isinstance(got[0], TransferError) and "Not a directory" in str(got[0]), got[0]


def _spool_items(base, dirs, files_each):
    """Items of a push into one spool per directory of `dirs` under `base` (made), with
    `files_each` small files each, the sources under base/src: (items, {spool: data})."""
    os.makedirs(base / "src")
    items, want = [], {}
    for d, name in enumerate(dirs):
        root = bytes(base) + b"/far/" + name + b"/.hpcmove-x.spool/t"
        os.makedirs(root)
        for k in range(files_each):
            src = bytes(base) + b"/src/%d-%d" % (d, k)
            with open(src, "wb") as f:
                f.write(os.urandom(100 + d + k))
            st = os.stat(src)
            spool = root + b"/" + name + b"%d" % k
            items.append({"slice": len(items), "src": src, "spool": spool, "root": root,
                          "offset": 0, "length": st.st_size, "size": st.st_size,
                          "mtime_ns": st.st_mtime_ns})
            want[spool] = open(src, "rb").read()
    return items, want


HOSTILE_DIRS = [b"sp ace", b"qu'ote\"s", b"new\nline", b"$(touch PWNED)", b"-rf", b"caf\xe9",
                b"semi;colon&"]


def test_a_pushed_bundle_fills_many_spools_in_one_session(tmp_path, monkeypatch):
    """300 spools of a few files each (a copyjob's pairs into 300 directories, hostile
    names among them) go as one bundle, a part per spool, in one session started ahead:
    each file lands in its own spool, nothing runs."""
    starts = _stub_ssh(tmp_path, monkeypatch)
    dirs = HOSTILE_DIRS + [b"dir %03d" % i for i in range(300 - len(HOSTILE_DIRS))]
    items, want = _spool_items(tmp_path, dirs, 2)
    engine = SshEngine(remote={"host": "h", "socket": str(tmp_path / "sock"), "side": "dst",
                               "sum": "xxh128"}, streams=1)
    engine.defer_verify = True
    (unit,) = engine.units(items)
    engine.prepare(unit)
    got = engine.copy_bundle(unit)
    assert [r["state"] for _i, r in got] == [states.DONE] * 600, got[0]
    assert starts() == 1
    for spool, data in want.items():
        assert open(spool, "rb").read() == data, spool
    assert not (tmp_path / "PWNED").exists() and not os.path.exists("PWNED")


def test_a_spool_removed_meanwhile_is_not_made_again_by_a_bundle_of_many(
        tmp_path, monkeypatch):
    """A part of a bundle whose spool is gone (`cancel` removed it) fails, and its tar
    does not make it again; the parts after it are still unpacked, and the bundle ends
    with the reason (its files are then tried alone)."""
    _stub_ssh(tmp_path, monkeypatch)
    items, want = _spool_items(tmp_path, [b"a", b"b", b"c"], 3)
    gone = items[3]["root"]
    shutil.rmtree(os.path.dirname(gone))
    engine = SshEngine(remote={"host": "h", "socket": str(tmp_path / "sock"), "side": "dst",
                               "sum": "xxh128"})
    engine.defer_verify = True
    (unit,) = engine.units(items)
    got = engine.copy_bundle(unit)
    assert {r["state"] for _i, r in got} <= {states.WAIT, states.FAILED}
    assert "No such file or directory" in got[0][1]["reason"], got[0][1]
    assert not os.path.exists(os.path.dirname(gone))
    for spool in (items[-1]["spool"], items[0]["spool"]):
        assert open(spool, "rb").read() == want[spool]


@pytest.mark.parametrize("defer, expect", [(True, 1), (False, 40)])
def test_small_spools_of_a_push_share_bundles_only_when_checked_at_rest(defer, expect):
    """In an array task (defer) a push's small spools share bundles; big ones keep their
    own; outside (the remote digests named in the tar's command) a bundle is one spool."""
    from hpcmove_plugins.ssh import PART_BYTES
    items = [{"slice": i, "root": b"/d%02d/.hpcmove-x.spool/t" % (i // 5), "offset": 0,
              "length": 1000, "size": 1000} for i in range(200)]
    big = [{"slice": 1000 + i, "root": b"/big/.hpcmove-x.spool/t", "offset": 0,
            "length": 4 << 20, "size": 4 << 20} for i in range(PART_BYTES // (4 << 20) + 1)]
    engine = SshEngine(remote={"host": "h", "socket": "/nonexistent", "side": "dst"})
    engine.defer_verify = defer
    units = engine.units(items + big)
    mixed = [u for u in units if u[0]["root"] != b"/big/.hpcmove-x.spool/t"]
    assert len(mixed) == expect
    assert [u for u in units if u not in mixed] == [big]
    assert sorted(i["slice"] for u in units for i in u) == \
        sorted(i["slice"] for i in items + big)


def test_a_pushed_rsync_bundle_makes_its_symlinks_in_memory_unless_tmpdir_is_set(
        tmp_path, monkeypatch):
    """The rsync engine's farm of symlinks (2,000 a bundle) goes where creating them
    is cheap: TMPDIR when set (a site's or the batch system's choice), else /dev/shm
    (on this machine's journaled root disk a symlink cost 0.9 ms: 15 CPU s of a
    20,000-file push); the farm is gone afterwards."""
    from hpcmove_plugins import rsync
    made = []
    real = tempfile.mkdtemp
    monkeypatch.setattr(rsync.tempfile, "mkdtemp",
                        lambda **kw: made.append(real(**kw)) or made[-1])
    monkeypatch.setattr(rsync.RsyncEngine, "_rsync", lambda self, *a, **kw: 0.0)
    src = tmp_path / "f"
    src.write_bytes(b"x")
    st = src.stat()
    item = {"slice": 0, "src": bytes(src), "spool": b"/spool/t/f", "root": b"/spool/t",
            "offset": 0, "length": 1, "size": 1, "mtime_ns": st.st_mtime_ns}
    engine = rsync.RsyncEngine(remote={"host": "h", "socket": "/s", "side": "dst"})
    engine.defer_verify = True
    monkeypatch.delenv("TMPDIR", raising=False)
    engine._push_bundle([item])
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # as read when a task starts
    engine._push_bundle([item])
    assert [os.path.dirname(m) for m in made] == ["/dev/shm", str(tmp_path)]
    assert not any(os.path.exists(m) for m in made)


def test_a_pulled_slice_comes_with_its_digest_and_lstat_in_one_session(tmp_path, monkeypatch):
    """A pulled slice's data on stdout, the file's size and mtime and the range's digest
    (read on its own meanwhile) on stderr: one session, not two. A source changed since
    it was planned, or gone, ends with that reason; nothing runs for a hostile name."""
    from hpcmove.plugins import SliceWork
    starts = _stub_ssh(tmp_path, monkeypatch)
    src = tmp_path / "$(touch PWNED) -x"
    src.write_bytes(os.urandom(3 << 20))
    st = src.stat()
    dst = tmp_path / "spool"
    engine = SshEngine(remote={"host": "h", "socket": str(tmp_path / "sock"), "side": "src",
                               "sum": "xxh128"})
    work = SliceWork(bytes(src), bytes(dst), 1 << 20, 1 << 20, st.st_size, st.st_mtime_ns)
    theirs, ours = engine.copy_slice(work)
    data = src.read_bytes()[1 << 20:2 << 20]
    assert theirs == ours == xxhash.xxh3_128(data).hexdigest()
    assert dst.read_bytes()[1 << 20:2 << 20] == data
    assert starts() == 1 and not (tmp_path / "PWNED").exists()
    os.utime(src, ns=(st.st_mtime_ns, st.st_mtime_ns + 1))
    with pytest.raises(TransferError, match="source changed since it was planned"):
        engine.copy_slice(work)
    src.unlink()
    with pytest.raises(TransferError, match="No such file"):
        engine.copy_slice(work)


@pytest.mark.parametrize("splice", ["kernel", "refused"])
@pytest.mark.parametrize("side", ["dst", "src"])
def test_slice_data_moves_by_splice_or_through_the_buffer_where_splice_is_refused(
        tmp_path, monkeypatch, side, splice):
    """A pushed and a pulled slice (3 MiB at an odd offset, several buffers) arrive
    whole through the stand-in ssh, moved by splice(2), or copied through the buffer
    where the kernel or file system refuses splice (EINVAL), which the engine then
    stops trying."""
    from hpcmove.plugins import SliceWork
    _stub_ssh(tmp_path, monkeypatch)
    calls = []
    real = os.splice

    def spy(*args, **kwargs):
        calls.append(1)
        if splice == "refused":
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(*args, **kwargs)

    monkeypatch.setattr(os, "splice", spy)
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(os.urandom(5 << 20))
    st = src.stat()
    engine = SshEngine(remote={"host": "h", "socket": str(tmp_path / "sock"), "side": side,
                               "sum": "xxh128"})
    work = SliceWork(bytes(src), bytes(dst), 12345, 3 << 20, st.st_size, st.st_mtime_ns)
    if side == "dst":
        dst.write_bytes(b"")
    theirs, ours = engine.copy_slice(work)
    data = src.read_bytes()[12345:12345 + (3 << 20)]
    assert theirs == ours == xxhash.xxh3_128(data).hexdigest()
    assert dst.read_bytes()[12345:12345 + (3 << 20)] == data
    assert len(calls) > (1 if splice == "kernel" else 0) and engine.splice is (
        splice == "kernel")
    if splice == "refused":
        assert len(calls) == 1  # tried once


def test_a_session_started_ahead_is_the_one_a_later_run_uses(tmp_path, monkeypatch):
    starts = _stub_ssh(tmp_path, monkeypatch)
    r = remote.Remote("h", bytes(tmp_path / "sock"))
    r.start(b"sh -s")
    other = remote.Remote("h", bytes(tmp_path / "sock"))  # any Remote of that host and socket
    assert other.script(b"echo one\n") == (0, b"one\n", b"")
    assert starts() == 1
    assert other.script(b"echo two\n")[1] == b"two\n"  # none waiting: a new one
    assert starts() == 2


def test_what_a_session_prints_comes_through_a_wide_pipe(tmp_path, monkeypatch):
    """A session's output pipe holds PIPE_BYTES (the control master writes into it); its
    input keeps the default. Where the system refuses the size, the session still runs
    with the pipe it has."""
    import fcntl
    _stub_ssh(tmp_path, monkeypatch)
    r = remote.Remote("h", bytes(tmp_path / "sock"))
    proc = r.session(b"cat")
    try:
        assert fcntl.fcntl(proc.stdout.fileno(), fcntl.F_GETPIPE_SZ) == remote.PIPE_BYTES
        assert fcntl.fcntl(proc.stdin.fileno(), fcntl.F_GETPIPE_SZ) < remote.PIPE_BYTES
        assert proc.communicate(b"x" * 3_000_000)[0] == b"x" * 3_000_000
    finally:
        proc.wait()
    monkeypatch.setattr(remote, "PIPE_BYTES", (1 << 31) - 1)  # refused, even to root
    assert r.script(b"echo one\n") == (0, b"one\n", b"")


def test_what_reads_a_push_on_the_remote_host_reads_a_wide_pipe(tmp_path, monkeypatch):
    """WIDE_STDIN, ahead of the remote tar that unpacks a pushed bundle (of one spool or
    of several), widens its stdin pipe; without Perl the command runs all the same."""
    from hpcmove_plugins.ssh import parts_cmd
    _stub_ssh(tmp_path, monkeypatch)
    r = remote.Remote("h", bytes(tmp_path / "sock"))
    size = b"python3 -c 'import fcntl; print(fcntl.fcntl(0, fcntl.F_GETPIPE_SZ))'"
    assert r.run(remote.WIDE_STDIN + size)[1] == b"%d\n" % remote.PIPE_BYTES
    assert r.run(size)[1] != b"%d\n" % remote.PIPE_BYTES
    assert SshEngine(remote={"host": "h", "socket": "s", "side": "dst"})._bundle_cmd(
        b"/s", [b"f"]).startswith(remote.WIDE_STDIN)
    assert parts_cmd(10).startswith(remote.WIDE_STDIN)
    bare = tmp_path / "bare"  # a PATH with a shell and no Perl
    bare.mkdir()
    os.symlink(shutil.which("sh"), bare / "sh")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{bare}")
    assert r.run(remote.WIDE_STDIN + b"echo ran")[1] == b"ran\n"


def test_a_placement_started_ahead_and_never_fed_places_nothing(tmp_path, monkeypatch):
    """finalize starts the placement program before it knows whether it will place; at
    exit an unused one gets no input: it must neither place nor remove the spool."""
    _stub_ssh(tmp_path, monkeypatch)
    spool = bytes(tmp_path / ".hpcmove-t.spool")
    os.makedirs(os.path.join(spool, plan.SPOOL_TREE, b"d"))
    open(os.path.join(spool, plan.SPOOL_TREE, b"d", b"f"), "wb").close()
    r = remote.Remote("h", bytes(tmp_path / "sock"))
    r.start(remote.PLACE_COMMAND)
    (proc,) = remote._started.pop(tuple(r.argv(remote.PLACE_COMMAND)))
    _out, err = proc.communicate(b"")
    assert proc.returncode == 4, err
    whole = remote.place_ops([_F(0, plan.DIR, bytes(tmp_path / "d"), spool)], [spool])
    # cut short, or the counts of an older placement program: nothing placed either
    for cut in (b"2 1\0file\0", whole[:-1], b"1\0" + whole.partition(b"\0")[2]):
        done = subprocess.run(["python3", "-c", remote.PLACE_PY], input=cut)
        assert done.returncode == 4
    assert os.path.exists(os.path.join(spool, plan.SPOOL_TREE, b"d", b"f"))
    assert not (tmp_path / "d").exists()


def test_slots_bound_sessions_across_threads_and_take_pairs_whole(tmp_path):
    slots = remote.Slots(bytes(tmp_path / "sock"), count=3)
    held = [slots.acquire() for _ in range(3)]
    got = []
    waiter = threading.Thread(target=lambda: got.append(slots.acquire(2)), daemon=True)
    waiter.start()
    time.sleep(0.3)
    assert not got  # all three taken
    slots.release(held.pop())
    time.sleep(0.3)
    assert not got  # one free is not two: the pair is not half taken meanwhile
    assert len(slots.acquire()) == 1  # ... so the free one can still be had
    slots.release(held.pop())
    waiter.join(5)
    assert not got  # the one just taken still holds
    slots.release(held.pop())
    waiter.join(5)
    assert len(got) == 1 and len(got[0]) == 2


def test_a_session_holds_its_slot_until_it_is_waited_for(tmp_path, monkeypatch):
    _stub_ssh(tmp_path, monkeypatch)
    r = remote.Remote("h", bytes(tmp_path / "sock"), sessions=1)
    proc = r.session(b"cat")
    taken = []
    t = threading.Thread(target=lambda: taken.append(r.run(b"echo next")), daemon=True)
    t.start()
    t.join(0.5)
    assert t.is_alive()  # waits for the one slot
    assert proc.communicate(b"x") == (b"x", b"")
    t.join(5)
    assert taken == [(0, b"next\n", b"")]


@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash", "/usr/bin/tcsh", "/bin/csh",
                                   "/usr/bin/fish"])
def test_a_command_reaches_sh_as_itself_whatever_the_login_shell(tmp_path, shell):
    """sshd runs a remote command with the user's login shell: every hostile name in a
    command comes out of /bin/sh as itself, and its exit code and stdin pass through."""
    names = HOSTILE + [b"bang!$", b"!!", b"50%s"]
    command = b"printf '%s\\0' " + b" ".join(remote.q(n) for n in names) + b"; cat; exit 3"
    done = subprocess.run([shell, "-c", remote.for_any_shell(command)], input=b"in",
                          capture_output=True, cwd=tmp_path)
    assert (done.returncode, done.stderr) == (3, b"")
    assert done.stdout == b"\0".join(names) + b"\0in"
    assert not (tmp_path / "PWNED").exists()


def test_a_session_dropped_without_a_wait_lets_its_slot_go(tmp_path, monkeypatch):
    """An error between starting a session and waiting for it must not keep its slot
    for the rest of the task."""
    _stub_ssh(tmp_path, monkeypatch)
    r = remote.Remote("h", bytes(tmp_path / "sock"), sessions=1)
    proc = r.session(b"true")
    proc.stdin.close()
    while proc.poll() is None:
        time.sleep(0.01)
    del proc  # reaped by poll(), never waited for
    got = []
    t = threading.Thread(target=lambda: got.append(r.run(b"echo free")), daemon=True)
    t.start()
    t.join(5)
    assert got == [(0, b"free\n", b"")]


@pytest.mark.parametrize("xxhsum, kind", [
    (None, "xxh128"),                                        # this machine's: XXH3-128
    ("echo 'Error: invalid hash selection -H2' >&2; exit 1", "cksum"),  # an old xxhsum
    ("cat >/dev/null; echo 'ef46db3751d8e999  stdin'", "cksum"),        # -H2 is XXH64 there
])
def test_the_probe_uses_xxhsum_only_when_it_gives_our_digests(tmp_path, monkeypatch, xxhsum,
                                                                kind):
    """An xxhsum whose -H2 is not XXH3-128 as hpcmove computes it would fail every
    verification: the probe then chooses cksum."""
    _stub_ssh(tmp_path, monkeypatch)
    if xxhsum:
        fake = tmp_path / "bin" / "xxhsum"
        fake.write_text(f"#!/bin/sh\n{xxhsum}\n")
        fake.chmod(0o755)
    found = remote.Remote("h", bytes(tmp_path / "sock")).probe([bytes(tmp_path)])
    assert found["sum"] == kind
    assert found["dirs"] == {bytes(tmp_path): True} and found["home"] == os.getcwd()
    assert not remote.xxhsum_works(b"")  # no xxhsum at all: XXH_CHECK's empty line


def test_remote_source_stats_of_hostile_names_in_one_command(tmp_path):
    """finalize's check of a pull's remote sources: size and ns mtime of every file in
    one command (names on stdin), hostile names matched as printed, a missing one absent."""
    names = HOSTILE + [b"tab\there"]
    for n in names:
        (tmp_path / os.fsdecode(n)).write_bytes(n)
    paths = [remote.word(n) for n in names] + [b"gone"]
    done = subprocess.run(["sh", "-c", remote.STAT_CMD], input=b"".join(p + b"\0" for p in paths),
                          capture_output=True, cwd=tmp_path, check=True)
    found = remote.parse_stats(done.stdout, paths)
    want = {remote.word(n): (len(n), os.lstat(tmp_path / os.fsdecode(n)).st_mtime_ns)
            for n in names}
    assert found == want
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_a_pulled_bundle_is_read_from_gnu_tar_with_every_name(tmp_path, fmt):
    """A pull's bundle: the remote `tar -c` (GNU long names, or pax path records) read
    back member by member: every hostile and long name with its bytes; a stream cut
    short or with a damaged header is an error, not a short bundle."""
    names = HOSTILE + [b"x" * 150, b"/".join([b"d" * 60] * 4) + b"/f", b"\xe9\n" * 90]
    paths = []
    for i, n in enumerate(names):
        p = os.path.join(bytes(tmp_path), b"%d" % i, n)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(os.urandom(i * 700))
        paths.append(p)
    out = subprocess.run(["tar", "-c", "-f", "-", "--format", fmt, "--no-recursion", "--null",
                          "--verbatim-files-from", "-T", "-"],
                         input=b"".join(p + b"\0" for p in paths), capture_output=True).stdout
    got = dict(tar_files(io.BytesIO(out)))
    assert got == {p.lstrip(b"/"): open(p, "rb").read() for p in paths}
    with pytest.raises(BadTar):
        dict(tar_files(io.BytesIO(out[:len(out) // 2])))
    damaged = bytearray(out)
    damaged[5] ^= 0x01
    with pytest.raises(BadTar):
        dict(tar_files(io.BytesIO(bytes(damaged))))
    assert not (tmp_path / "PWNED").exists()


def _refusing_ssh(tmp_path, monkeypatch, refusals):
    """An `ssh` whose master is alive (`-O check`) but whose first `refusals` sessions
    the sshd refuses, as ssh prints it (exit 255, nothing run); then as _stub_ssh."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "ssh").write_text(
        '#!/bin/sh\ncase " $* " in *" -O "*) exit 0;; esac\n'
        f'n=$(cat {tmp_path}/refused 2>/dev/null || echo 0)\n'
        f'if [ "$n" -lt {refusals} ]; then echo $((n + 1)) > {tmp_path}/refused\n'
        '  echo "mux_client_request_session: session request failed: Session open refused '
        'by peer" >&2\n  echo "Permission denied (publickey)." >&2; exit 255; fi\n'
        f'echo start >> {tmp_path}/starts\n'
        'for a; do last=$a; done\nexec sh -c "$last"\n')
    (bindir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    (tmp_path / "sock").write_bytes(b"")  # the master's socket is there
    return lambda: (tmp_path / "starts").read_text().count("start") \
        if (tmp_path / "starts").exists() else 0


@pytest.mark.parametrize("what", ["push slice", "pull slice", "push bundle", "pull tree",
                                  "command"])
def test_a_session_the_sshd_refused_is_asked_again_and_is_no_attempt(tmp_path, monkeypatch,
                                                                     what):
    """sshd refuses a session while its MaxSessions still counts closing ones; the
    command never ran. A slice, a bundle and finalize's commands ask for their session
    again instead of failing the attempt: two refusals, then one run, and the data and
    digests are right."""
    from hpcmove.plugins import SliceWork
    starts = _refusing_ssh(tmp_path, monkeypatch, 2)
    side = "dst" if what.startswith("push") else "src"
    engine = SshEngine(remote={"host": "h", "socket": str(tmp_path / "sock"), "side": side,
                               "sum": "xxh128"})
    engine.defer_verify = True
    if what == "command":
        assert engine.remote.run(b"echo ran; echo said >&2") == (0, b"ran\n", b"said\n")
    elif what.endswith("slice"):
        src, dst = tmp_path / "src", tmp_path / "dst"
        src.write_bytes(os.urandom(3 << 20))
        dst.write_bytes(b"")
        st = src.stat()
        theirs, _ours = engine.copy_slice(SliceWork(bytes(src), bytes(dst), 0, st.st_size,
                                                    st.st_size, st.st_mtime_ns))
        assert theirs == xxhash.xxh3_128(src.read_bytes()).hexdigest()
        assert dst.read_bytes() == src.read_bytes()
    elif what == "push bundle":
        items, want = _spool_items(tmp_path, [b"a"], 5)
        (unit,) = engine.units(items)
        got = engine.copy_bundle(unit)
        assert {r["state"] for _i, r in got} == {states.DONE}, got
        assert all(open(s, "rb").read() == data for s, data in want.items())
    else:
        (tmp_path / "r").mkdir()
        (tmp_path / "sp" / "t").mkdir(parents=True)
        items = []
        for k in range(5):
            path = tmp_path / "r" / f"f{k}"
            path.write_bytes(os.urandom(100 + k))
            st = path.stat()
            items.append({"slice": k, "src": bytes(path), "root": bytes(tmp_path / "sp"),
                          "spool": bytes(tmp_path / "sp" / "t" / f"f{k}"), "offset": 0,
                          "length": st.st_size, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        got = engine.copy_bundle(items)
        assert {r["state"] for _i, r in got} == {states.DONE}, got
        assert all(open(i["spool"], "rb").read() == open(i["src"], "rb").read() for i in items)
    assert starts() == 1 and (tmp_path / "refused").read_text().strip() == "2"


def test_a_session_refused_every_time_fails_the_attempt_with_the_reason(tmp_path,
                                                                        monkeypatch):
    """Asked remote.ASKS times and refused each time: the attempt fails as before,
    transient (the task's retry may find a session), with ssh's words."""
    from hpcmove.plugins import SliceWork
    monkeypatch.setattr(remote.time, "sleep", lambda s: None)
    starts = _refusing_ssh(tmp_path, monkeypatch, 100)
    src = tmp_path / "src"
    src.write_bytes(b"x" * 1000)
    st = src.stat()
    engine = SshEngine(remote={"host": "h", "socket": str(tmp_path / "sock"), "side": "dst",
                               "sum": "xxh128"})
    engine.defer_verify = True
    with pytest.raises(TransferError, match="Session open refused by peer") as failed:
        engine.copy_slice(SliceWork(bytes(src), bytes(tmp_path / "dst"), 0, 1000, 1000,
                                    st.st_mtime_ns))
    assert failed.value.transient
    assert starts() == 0 and (tmp_path / "refused").read_text().strip() == str(remote.ASKS)


def test_the_slot_of_a_session_that_ended_is_free_again_a_moment_later(tmp_path,
                                                                       monkeypatch):
    """sshd still counts a session for a moment after ssh here has exited: its slot
    comes free remote.CLOSE_GRACE later, not at once (for a session and for hold())."""
    _stub_ssh(tmp_path, monkeypatch)
    r = remote.Remote("h", bytes(tmp_path / "sock"), sessions=1 + remote.CLOSING)
    assert r.run(b"true")[0] == 0
    assert r.slots.acquire(wait=False) is None  # still closing
    time.sleep(remote.CLOSE_GRACE * 3)
    held = r.slots.acquire(wait=False)
    assert held is not None
    r.release(held)  # as the rsync engine gives back what it held for its ssh
    assert r.slots.acquire(wait=False) is None
    time.sleep(remote.CLOSE_GRACE * 3)
    assert r.slots.acquire(wait=False) is not None


def test_a_pushed_file_of_many_slices_is_checked_at_rest_whole(tmp_path, monkeypatch):
    """finalize's check of a push: a file whose slices are all asked for is hashed whole
    by the remote xxhsum (in the session of the single-slice files, no range read) while
    the local source is read once for each slice's digest and the whole's. Where the
    wholes differ (a slice changed at rest, a source changed since) or no source is
    given, the slices are read on the remote host one by one, so a bad one is named."""
    starts = _stub_ssh(tmp_path, monkeypatch)
    src, spool, small = (tmp_path / n for n in ("src $(touch PWNED)", "-spool\nx", "small"))
    data = os.urandom((5 << 20) + 7)
    src.write_bytes(data)
    spool.write_bytes(data)
    small.write_bytes(b"tiny")
    other = tmp_path / "other\\name"  # a second file of slices: read at the same time
    other.write_bytes(b"ab" * 3000)
    cuts = [(0, 2 << 20), (2 << 20, 2 << 20), (4 << 20, (1 << 20) + 7)]
    ranges = [(bytes(spool), o, n, len(data)) for o, n in cuts] + [(bytes(small), 0, 4, 4)] \
        + [(bytes(other), 0, 4000, 6000), (bytes(other), 4000, 2000, 6000)]
    sources = [bytes(src)] * 3 + [b"/nonexistent"] + [bytes(other)] * 2
    engine = SshEngine(remote={"host": "h", "socket": str(tmp_path / "sock"), "side": "dst",
                               "sum": "xxh128"})

    def xxh(b):
        return xxhash.xxh3_128(b).hexdigest()
    expect = [xxh(data[o:o + n]) for o, n in cuts] + [xxh(b"tiny")] \
        + [xxh(b"ab" * 2000), xxh(b"ab" * 1000)]

    def check(srcs, sessions, want):
        before = starts()
        assert engine.digests(ranges, sources=srcs) == want
        assert starts() - before == sessions

    check(sources, 1, expect)  # one session: the sums, no range read
    check(None, 2, expect)  # without sources: the sums, then each slice read there
    bad = bytearray(data)
    bad[(3 << 20) + 5] ^= 1
    spool.write_bytes(bad)
    check(sources, 2, [expect[0], xxh(bytes(bad[2 << 20:4 << 20])), *expect[2:]])
    spool.write_bytes(data)
    src.write_bytes(data + b"more")  # no longer as planned: the remote slices decide
    check(sources, 2, expect)
    assert not (tmp_path / "PWNED").exists()
    cksum = SshEngine(remote={"host": "h", "socket": str(tmp_path / "sock"), "side": "dst",
                              "sum": "cksum"})
    before = starts()
    cksum.digests(ranges, sources=sources)
    assert starts() - before == 2  # cksum's digests of slices do not add up to a whole


@pytest.mark.parametrize("ranges, sources, expect", [
    ([(b"f", 0, 4, 10), (b"f", 4, 6, 10)], [b"s", b"s"], {b"f": (b"s", 10, [(0, 4), (4, 6)])}),
    ([(b"f", 4, 6, 10), (b"f", 0, 4, 10)], [b"s", b"s"], {b"f": (b"s", 10, [(0, 4), (4, 6)])}),
    ([(b"f", 0, 4, 10), (b"f", 5, 5, 10)], [b"s", b"s"], {}),  # a gap
    ([(b"f", 0, 4, 10), (b"f", 4, 5, 10)], [b"s", b"s"], {}),  # short of the end
    ([(b"f", 0, 4, 10)], [b"s"], {}),  # one slice of two: the other is not asked for
    ([(b"f", 0, 4, 10), (b"f", 4, 6, 10)], [b"s", b"t"], {}),  # two sources
    ([(b"f", 0, 4, 10), (b"f", 4, 6, 10)], None, {}),
])
def test_whole_files_are_those_whose_slices_cover_them_exactly(ranges, sources, expect):
    from hpcmove_plugins.ssh import whole_files
    assert whole_files(ranges, sources, ranges) == expect
