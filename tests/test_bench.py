"""bench/run.py (and bench/stream.py) on tiny data, so the benchmarks cannot rot.

The real run (2 GiB, 20,000 files, a million entries) is `python bench/run.py`; its
table is in bench/README.md. Here every local group runs one counted round; peers
that are not installed are left out (--no-install), as is Slurm; the SSH groups use
the ssh testbed that tests/run brings up, and log in there as hpcmove-u2, so the bench
runs in a directory under /var/tmp that account can enter (pytest's own is closed to it).
"""
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_USER = "hpcmove-u2"
SSHD_LOG = "/var/lib/hpcmove-sshd/sshd.log"
DB_IN_DIR = "hpcmove, db in --dir"  # the run's database is elsewhere (--home)
# the rows of each SSH group besides hpcmove's: the peers with ssh's default cipher and
# with hpcmove's
SSH_ROWS = {
    "ssh": ("hpcmove, 2 connections", "hpcmove, --slice-size 256M", DB_IN_DIR, "scp",
            "scp -c aes128-gcm", "rsync -e ssh", "rsync, ssh aes128-gcm",
            "ssh 'cat > f' stream", "cat stream, aes128-gcm"),
    "sshsmall": ("hpcmove --engine rsync", DB_IN_DIR, "rsync -a -e ssh",
                 "rsync -a, ssh aes128-gcm"),
    "sshpull": (DB_IN_DIR, "rsync -a -e ssh", "rsync -a, ssh aes128-gcm"),
    "bigpull": ("hpcmove, 2 connections", "hpcmove, --slice-size 256M", DB_IN_DIR, "scp",
                "scp -c aes128-gcm"),
}
PUSHES = ("ssh", "sshsmall")


def bench(where, groups, *more, timeout=300):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "run.py"), "--dir", where,
         "--groups", groups, "--size", "64K", "--files", "12", "--entries", "30",
         "--rounds", "1", "--slurm", "no", "--no-install", *more],
        capture_output=True, text=True, timeout=timeout)


def open_dir():
    """A new directory under /var/tmp that the SSH rows' account can enter."""
    top = tempfile.mkdtemp(prefix="hpcmove-bench-test-", dir="/var/tmp")
    os.chmod(top, 0o755)
    return top


@pytest.fixture
def bench_dir():
    top = open_dir()
    yield top
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def run():
    """One run of every group, hpcmove's home outside the bench's dir (--home): (the
    bench's dir, its result, sshd's log meanwhile, that home)."""
    top, home = open_dir(), tempfile.mkdtemp(prefix="hpcmove-bench-home-")
    try:
        start = os.path.getsize(SSHD_LOG) if os.path.exists(SSHD_LOG) else 0
        done = bench(top, "floor,big,small,ssh,sshsmall,sshpull,bigpull,million",
                     "--home", home)
        with open(SSHD_LOG, errors="replace") as f:
            f.seek(start)
            log = f.read()
        assert done.returncode == 0, done.stderr
        yield top, done, log, home
    finally:
        shutil.rmtree(top, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def test_bench_every_group_on_tiny_data(run):
    top, done, _, _ = run
    out = done.stdout
    for row in ("hpcmove", "cp", "rsync + rsync -c", "copy engine alone", "cp -a", "rsync -a",
                "create+rename floor"):
        assert f" {row} " in out, out
    for group, rows in SSH_ROWS.items():
        for row in ("hpcmove", *rows):
            assert f"\n{group:8} {row} " in out, out
    assert "peer/hpcmove" in out and "CPU s" in out
    assert "\nfloor    hpcmove " in out
    assert "million  submit 30 files" in out
    assert "status --summary" in out
    assert not os.path.exists(os.path.join(top, "dst"))  # the bench cleans up its destination


def test_bench_targets_against_both_ciphers(run):
    _, done, _, _ = run
    targets = {"ssh": {"scp": ">= 1.5x faster", "scp -c aes128-gcm": ">= 1.5x faster",
                       "ssh 'cat > f' stream": "hpcmove <= 1.2x",
                       "cat stream, aes128-gcm": "hpcmove <= 1.2x"},
               "sshsmall": {"rsync -a -e ssh": ">= 1x", "rsync -a, ssh aes128-gcm": ">= 1x"},
               "sshpull": {"rsync -a -e ssh": ">= 1x", "rsync -a, ssh aes128-gcm": ">= 1x"}}
    lines = done.stdout.splitlines()
    for group, rows in targets.items():
        for row, target in rows.items():
            line = next(x for x in lines if x.startswith(f"{group:8} {row} "))
            assert f"  {target}" in line, line


def test_bench_ssh_rows_log_in_as_the_unprivileged_account(run):
    top, done, log, _ = run
    err = done.stderr
    # every SSH group asks `id -un` through the peers' config and hpcmove's socket ...
    assert err.count(f"bench: the SSH rows log in as {REMOTE_USER}\n") == len(SSH_ROWS), err
    # ... and what each push left at its destination belongs to that account
    for group in PUSHES:
        for row in ("hpcmove", *SSH_ROWS[group]):
            line = err.split(f"\n{group} round 1 {row}: ", 1)[1].split("\n", 1)[0]
            assert line.endswith(f", written as {REMOTE_USER}"), line
    assert f"Accepted publickey for {REMOTE_USER} from 127.0.0.1" in log  # sshd's word
    with open(os.path.join(top, "ssh_config")) as f:
        config = f.read()
    assert f"    User {REMOTE_USER}\n" in config
    assert f"/keys/{REMOTE_USER}/id_ed25519\n" in config


def _jobs(home):
    """{state: count} of the jobs in the job database of an hpcmove home."""
    db = sqlite3.connect(os.path.join(home, "hpcmove.db"))
    try:
        return dict(db.execute("SELECT state, count(*) FROM job GROUP BY state"))
    finally:
        db.close()


def test_bench_keeps_the_job_database_where_it_is_told(run):
    """--home: every hpcmove row's jobs are recorded there, but the "db in --dir" rows'
    (one per SSH group, run in the warm-up round and the counted one) in --dir."""
    top, done, _, home = run
    in_dir = _jobs(os.path.join(top, "home"))
    assert in_dir == {"Done": 2 * len(SSH_ROWS)}, in_dir
    elsewhere = _jobs(os.path.join(home, "hpcmove-bench-home"))
    assert set(elsewhere) == {"Done"} and elsewhere["Done"] > 2 * len(SSH_ROWS), elsewhere


def test_bench_stops_when_the_remote_account_cannot_enter_dir(bench_dir):
    closed = os.path.join(bench_dir, "closed")
    os.mkdir(closed, 0o700)
    done = bench(os.path.join(closed, "bench"), "ssh", timeout=120)
    assert done.returncode != 0
    assert f"{REMOTE_USER}, the account the SSH rows log in as, cannot enter {closed}:" \
        in done.stderr, done.stderr
    assert "choose a --dir" in done.stderr
    assert not os.listdir(os.path.join(closed, "bench"))  # stopped before any row


def test_stream_bench_sends_a_file_both_ways(tmp_path):
    """bench/stream.py: one stream's sending CPU with splice, with the copy, and with
    splice reading into memory 16 bytes past a page boundary."""
    done = subprocess.run([sys.executable, os.path.join(REPO, "bench", "stream.py"),
                           "--size", "3M", "--rounds", "1", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "one stream of 3M into cat, medians of 1 rounds"
    assert [line.split()[0] for line in lines[1:]] == ["splice", "copy", "offset16"]
    assert all("CPU s sending" in line for line in lines[1:])


def test_the_bench_runs_hpcmove_compiled_as_an_install_leaves_it(monkeypatch):
    """bench/run.py compiles hpcmove's modules before it measures: a source newer than
    its bytecode (an edited checkout, with PYTHONDONTWRITEBYTECODE set) would otherwise
    be compiled again by every process of every round."""
    import importlib.util

    import hpcmove
    source = os.path.join(os.path.dirname(hpcmove.__file__), "units.py")
    st = os.stat(source)

    def compiled_for():
        """The source mtime the bytecode was made for (0: none)."""
        try:
            with open(importlib.util.cache_from_source(source), "rb") as f:
                return int.from_bytes(f.read(16)[8:12], "little")
        except OSError:
            return 0

    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # PYTHONDONTWRITEBYTECODE
    newer = max(compiled_for(), int(st.st_mtime)) + 2
    os.utime(source, (st.st_atime, newer))
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_run", os.path.join(REPO, "bench", "run.py"))
        bench_run = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench_run)
        assert compiled_for() != newer
        bench_run.compiled()
        assert compiled_for() == newer
    finally:
        os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
