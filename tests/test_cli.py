"""The CLI in-process: help everywhere, dry runs that touch nothing, clear errors."""
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from click.testing import CliRunner

from hpcmove import cli, db

COMMANDS = ["submit", "status", "list", "cancel", "wait", "retry", "pause", "resume",
            "plugins", "policy",
            "log", "metrics", "watch", "report", "db", "socket", "auth", "completion"]


def all_commands(group=cli.cli, prefix=()):
    """Every command path, groups included: ('policy',), ('policy', 'show'), ..."""
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name), command
        if hasattr(command, "commands"):
            yield from all_commands(command, (*prefix, name))


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCMOVE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HPCMOVE_DB", raising=False)
    yield CliRunner()
    db.close()


@pytest.mark.parametrize("path, command", list(all_commands()),
                         ids=[" ".join(p) for p, _ in all_commands()])
def test_every_command_has_help(runner, path, command):
    result = runner.invoke(cli.cli, [*path, "--help"])
    assert result.exit_code == 0
    doc = command.help
    assert doc and len(doc.strip()) > 20
    assert doc.strip().splitlines()[0] in result.output


def test_every_command_is_listed(runner):
    assert sorted(cli.cli.commands) == sorted(COMMANDS)


def test_dry_run_prints_plan_and_scripts_and_touches_nothing(runner, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"a" * 3000)
    (tmp_path / "dst").mkdir()
    result = runner.invoke(cli.cli, ["submit", "--dry-run", "--backend", "local", "-p", "dtn",
                                     "--slice-size", "1K", str(tmp_path / "src"),
                                     str(tmp_path / "dst")])
    assert result.exit_code == 0, result.output
    assert "3 slices" in result.output
    assert "#SBATCH --partition=dtn" in result.output
    assert "--- transfer.sh" in result.output and "--- finalize.sh" in result.output
    assert os.listdir(tmp_path / "dst") == []
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("args, message", [
    (["/no/such/source", "/tmp"], "cannot read source /no/such/source"),
    (["/etc/hostname", "/no/such/dir/target"], "destination directory does not exist"),
    (["/etc/hostname", "/etc/passwd", "/etc/hostname"], "not a directory"),
    (["--slice-size", "lots", "/etc/hostname", "/tmp/x"], "not a size"),
    (["-p", "dtn;rm -rf /", "--dry-run", "/etc/hostname", "/tmp/x"], "not allowed"),
])
def test_bad_input_is_a_clear_error(runner, args, message):
    result = runner.invoke(cli.cli, ["submit", "--backend", "local", *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_unknown_job_is_a_clear_error(runner):
    db.connect()  # a database exists, the job does not
    db.close()
    result = runner.invoke(cli.cli, ["status", "hm-99"])
    assert result.exit_code == 1 and "no job hm-99" in result.output


def test_plugins_lists_backends_and_engines(runner):
    result = runner.invoke(cli.cli, ["plugins"])
    assert result.exit_code == 0
    for row in ("backend\tlocal\tok", "backend\tslurm\tok", "engine\tcopy\tok",
                "engine\tfaultinject\tok", "engine\tssh\tok", "engine\trsync\tok"):
        assert row in result.output


def test_non_utf8_data_directory_is_refused_before_anything_is_submitted(tmp_path, monkeypatch):
    home = os.path.join(os.fsencode(tmp_path), b"home-\xff")
    monkeypatch.setenv("HPCMOVE_HOME", os.fsdecode(home))
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "d").mkdir()
    result = CliRunner().invoke(cli.cli, ["submit", "--backend", "local", str(tmp_path / "f"),
                                          str(tmp_path / "d")])
    db.close()
    assert result.exit_code == 1 and "must be a UTF-8 path" in result.output
    assert os.listdir(tmp_path / "d") == []  # the spool was removed again


def test_missing_database_is_said_not_shown_as_empty(runner, tmp_path):
    result = runner.invoke(cli.cli, ["list"])
    assert result.exit_code == 0 and "no job database at" in result.output
    result = runner.invoke(cli.cli, ["status", "hm-1"])
    assert result.exit_code == 1 and "no job database at" in result.output
    assert not (tmp_path / "home").exists()  # looking did not create one


# --------------------------------------------------------------------------- completion

def test_completion_prints_a_script_for_each_shell(runner):
    for shell, marker in (("bash", "complete -o nosort -F _hpcmove_completion hpcmove"),
                          ("zsh", "compdef _hpcmove_completion hpcmove"),
                          ("fish", "complete --no-files --command hpcmove")):
        result = runner.invoke(cli.cli, ["completion", shell])
        assert result.exit_code == 0 and marker in result.output, result.output
        assert "_HPCMOVE_COMPLETE=" in result.output
    result = runner.invoke(cli.cli, ["completion", "tcsh"])
    assert result.exit_code == 2 and "'tcsh' is not one of" in result.output


def test_bash_completes_commands_and_options_with_the_printed_script(tmp_path):
    """The real thing: bash loads `hpcmove completion bash` and completes through the
    installed hpcmove command."""
    bindir = os.path.dirname(sys.executable)
    if not os.access(os.path.join(bindir, "hpcmove"), os.X_OK):
        pytest.fail(f"no hpcmove command beside {sys.executable}: install the package")
    probe = ('eval "$(hpcmove completion bash)"; '
             'COMP_WORDS=(hpcmove "$1"); COMP_CWORD=1; _hpcmove_completion hpcmove; '
             'printf "%s\\n" "${COMPREPLY[@]}"; '
             'COMP_WORDS=(hpcmove submit --mail-t); COMP_CWORD=2; COMPREPLY=(); '
             '_hpcmove_completion hpcmove; printf "%s\\n" "${COMPREPLY[@]}"')
    done = subprocess.run(["bash", "-c", probe, "bash", "st"], capture_output=True, text=True,
                          env={"PATH": f"{bindir}:/usr/bin:/bin", "HPCMOVE_HOME": str(tmp_path)},
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["status", "--mail-type"]


def test_then_is_refused_on_the_local_backend_before_anything_happens(runner, tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "d").mkdir()
    (tmp_path / "next.sh").write_text("#!/bin/sh\necho next\n")
    result = runner.invoke(cli.cli, ["submit", "--backend", "local", "--then",
                                     str(tmp_path / "next.sh"), str(tmp_path / "f"),
                                     str(tmp_path / "d")])
    assert result.exit_code == 1
    assert "--then needs a batch system: the local backend" in result.output
    assert os.listdir(tmp_path / "d") == [] and not (tmp_path / "home").exists()


def test_a_manifest_that_cannot_be_written_fails_the_job_and_leaves_no_rows(runner, tmp_path,
                                                                          monkeypatch):
    """The plan's rows, the manifest and the job's move to Pending are one transaction:
    when the manifest cannot be written the job is Failed with the reason, no file or
    slice row is left, and nothing was started."""
    from hpcmove import jobdir
    from hpcmove.errors import HpcmoveError

    def full(*_args):
        raise HpcmoveError("no space left for the manifest")
    monkeypatch.setattr(jobdir, "write_manifest", full)
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "d").mkdir()
    result = runner.invoke(cli.cli, ["submit", "--backend", "local", str(tmp_path / "f"),
                                     str(tmp_path / "d")])
    assert result.exit_code != 0
    assert "no space left for the manifest" in result.output
    db.connect()
    (job,) = db.Job.select()
    assert job.state == "Failed" and "no space left for the manifest" in job.reason
    assert db.File.select().count() == 0 and db.Slice.select().count() == 0
    assert not job.array_id and os.listdir(tmp_path / "d") == []


def _spooled(dst):
    """Bytes the tasks have written into the job's spool under `dst` so far."""
    total = 0
    for spool in glob.glob(os.path.join(glob.escape(str(dst)), ".hpcmove-*.spool")):
        for root, _dirs, names in os.walk(spool):
            for name in names:
                try:
                    total += os.lstat(os.path.join(root, name)).st_size
                except FileNotFoundError:
                    pass
    return total


def _tree(root, n=40, size=64 << 10):
    root.mkdir()
    for i in range(n):
        (root / f"f{i:02d}").write_bytes(os.urandom(size))


def _after_data(dst, then):
    """An insert_plan that first waits (20 s at most) for the tasks to move data, then
    calls then(*args); records what it saw."""
    seen = []

    def insert(*args, **kwargs):
        deadline = time.monotonic() + 20
        while not _spooled(dst) and time.monotonic() < deadline:
            time.sleep(0.02)
        seen.append(_spooled(dst))
        return then(*args, **kwargs)
    return insert, seen


def test_tasks_move_data_while_submit_records_the_rows(runner, tmp_path, monkeypatch):
    """On SQLite the chain is submitted inside the transaction that records the plan (it
    holds the one write lock): the tasks copy while the rows go in, and what they record
    waits for that commit, so the job still goes Submitted -> Pending -> Active -> Done."""
    _tree(tmp_path / "src")
    (tmp_path / "d").mkdir()
    insert, seen = _after_data(tmp_path / "d", db.insert_plan)
    monkeypatch.setattr(db, "insert_plan", insert)
    result = runner.invoke(cli.cli, ["submit", "--backend", "local", "--wait",
                                     "--stripe-width", "2", str(tmp_path / "src"),
                                     str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert seen[0] > 0  # data moved before a row of the plan was written
    (job,) = db.Job.select()
    assert job.state == "Done"
    assert [e.message for e in job.events.where(db.Event.kind == "state")
            .order_by(db.Event.id)] == ["Submitted -> Pending", "Active -> Done"]
    assert {s.state for s in job.slices} == {"Done"} and {f.state for f in job.files} == {"Done"}
    for i in range(40):
        name = f"f{i:02d}"
        assert (tmp_path / "d" / "src" / name).read_bytes() == \
            (tmp_path / "src" / name).read_bytes()


def test_a_scheduler_is_asked_only_after_the_rows_are_committed(runner, tmp_path,
                                                                monkeypatch):
    """A backend that asks a scheduler (sbatch may wait minutes on a busy controller) is
    never called while the job database's write lock is held: the plan's rows are
    committed first, visible to any other connection, and the lock is free."""
    import sqlite3

    from hpcmove import plugins
    from hpcmove.backends.local import LocalBackend
    seen = []

    class Scheduler(LocalBackend):  # the local runner, but announced as a scheduler
        submits_at_once = False

        def submit(self, spec):
            other = sqlite3.connect(db.sqlite_path(db.default_url()), timeout=0.5)
            try:
                with other:  # BEGIN IMMEDIATE fails at once while submit holds the lock
                    other.execute("BEGIN IMMEDIATE")
                    seen.append(other.execute("SELECT count(*) FROM slice").fetchone()[0])
            finally:
                other.close()
            return super().submit(spec)
    monkeypatch.setattr(plugins, "backend", lambda name: Scheduler())
    _tree(tmp_path / "src", n=30)
    (tmp_path / "d").mkdir()
    result = runner.invoke(cli.cli, ["submit", "--backend", "local", "--wait",
                                     str(tmp_path / "src"), str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert seen == [30]
    assert len(os.listdir(tmp_path / "d" / "src")) == 30


def test_a_plan_not_recorded_after_its_tasks_started_stops_them(runner, tmp_path,
                                                                monkeypatch):
    """The rows cannot be written once the tasks run (the disk is full): the chain is
    cancelled, its spool removed, the job Failed with the reason and no rows left; nothing
    reaches the destination, later either."""
    from hpcmove.errors import HpcmoveError

    def full(*_args, **_kwargs):
        raise HpcmoveError("database or disk is full")
    _tree(tmp_path / "src", n=400)
    (tmp_path / "d").mkdir()
    insert, seen = _after_data(tmp_path / "d", full)
    monkeypatch.setattr(db, "insert_plan", insert)
    result = runner.invoke(cli.cli, ["submit", "--backend", "local", str(tmp_path / "src"),
                                     str(tmp_path / "d")])
    assert result.exit_code != 0 and "database or disk is full" in result.output
    assert seen[0] > 0
    (job,) = db.Job.select()
    assert job.state == "Failed" and "database or disk is full" in job.reason
    assert db.File.select().count() == 0 and db.Slice.select().count() == 0
    time.sleep(1.0)  # a task still running would write again into a new spool
    assert os.listdir(tmp_path / "d") == []
    assert os.listdir(tmp_path / "src") and len(os.listdir(tmp_path / "src")) == 400


KILLED_SUBMIT = r'''
import glob, os, signal, sys, time
from hpcmove import cli, db
dst = sys.argv[2]
def killed(*args, **kwargs):  # the tasks run, nothing of the plan is recorded: SIGKILL
    while not [p for p in glob.glob(os.path.join(dst, ".hpcmove-*.spool", "**"),
                                    recursive=True) if os.path.isfile(p) and os.path.getsize(p)]:
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGKILL)
db.insert_plan = killed
cli.cli(["submit", "--backend", "local", sys.argv[1], dst])
'''


def test_a_submit_killed_before_recording_its_plan_leaves_nothing(runner, tmp_path):
    """`submit` killed after the tasks started but before the plan's rows were committed:
    the finalize finds the job still Submitted, removes the spool the tasks filled and
    fails the job saying why; nothing is placed."""
    _tree(tmp_path / "src", n=200)
    (tmp_path / "d").mkdir()
    done = subprocess.run([sys.executable, "-c", KILLED_SUBMIT, str(tmp_path / "src"),
                           str(tmp_path / "d")], env=dict(os.environ), timeout=60,
                          cwd=tmp_path)  # not the checkout: the installed hpcmove
    assert done.returncode == -9
    db.connect()
    (job,) = db.Job.select()
    deadline = time.monotonic() + 60
    while job.state == "Submitted" and time.monotonic() < deadline:
        time.sleep(0.1)
        job = db.Job.get_by_id(job.id)
    assert job.state == "Failed" and "submission did not complete" in job.reason
    assert os.listdir(tmp_path / "d") == []


@pytest.mark.parametrize("host", ["-oProxyCommand=touch PWNED", "-oProxyCommand=x@host",
                                  "user@-host", "a b"])
def test_socket_open_refuses_a_host_ssh_could_read_as_an_option(runner, tmp_path, monkeypatch,
                                                                host):
    """Nothing is started for such a host: a fake ssh first on PATH would leave a mark."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(f"#!/bin/sh\ntouch {tmp_path}/ssh-ran\n")
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("HPCMOVE_SOCKET_DIR", str(tmp_path / "s"))
    result = runner.invoke(cli.cli, ["socket", "open", "--", host])
    assert result.exit_code == 2 and "is not [user@]host" in result.output
    assert not (tmp_path / "ssh-ran").exists() and not (tmp_path / "s").exists()


FAKE_SSH = r'''#!/usr/bin/env python3
"""A stand-in ssh: `-M` "opens" a master by binding a Unix socket at -S (and logs its
words), `-O check` answers while that socket is there, `-O exit` removes it."""
import os, socket, sys
args = sys.argv[1:]
path = args[args.index("-S") + 1] if "-S" in args else ""
if "-G" in args:
    sys.exit(0)
if "-O" in args:
    op = args[args.index("-O") + 1]
    if op == "exit" and os.path.exists(path):
        os.unlink(path)
    if op == "check" and os.path.exists(path):
        sys.stderr.write("Master running (pid=4194305)\n")  # above Linux's pid_max
        sys.exit(0)
    sys.exit(0 if op == "exit" else 255)
with open(os.environ["FAKE_SSH_LOG"], "a") as log:
    log.write(" ".join(args) + "\n")
socket.socket(socket.AF_UNIX).bind(path)
'''


@pytest.fixture
def fake_ssh(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(FAKE_SSH.replace("/usr/bin/env python3", sys.executable))
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SSH_LOG", str(tmp_path / "masters"))
    sockets = tempfile.mkdtemp(prefix="hm-", dir="/tmp")  # a socket's path is short
    monkeypatch.setenv("HPCMOVE_SOCKET_DIR", sockets)
    yield lambda: (tmp_path / "masters").read_text().splitlines() \
        if (tmp_path / "masters").exists() else []
    shutil.rmtree(sockets)


def test_socket_open_follows_the_site_policy(runner, tmp_path, monkeypatch, fake_ssh):
    """The site's [remote] socket_ttl and connections are the defaults; a longer --ttl
    than max_socket_ttl, or a host outside allowed_hosts, starts nothing."""
    (tmp_path / "policy.toml").write_text(
        "[remote]\nallowed_hosts = ['*.example.org']\nsocket_ttl = '30m'\n"
        "max_socket_ttl = '2h'\nconnections = 2\n")
    monkeypatch.setenv("HPCMOVE_POLICY", str(tmp_path / "policy.toml"))
    result = runner.invoke(cli.cli, ["socket", "open", "--ttl", "3h", "a.example.org"])
    assert result.exit_code == 1 and "remote.max_socket_ttl" in result.output
    result = runner.invoke(cli.cli, ["socket", "open", "evil.example.com"])
    assert result.exit_code == 1 and "remote.allowed_hosts" in result.output
    assert fake_ssh() == []
    result = runner.invoke(cli.cli, ["socket", "open", "alice@a.example.org"])
    assert result.exit_code == 0 and "2 connections" in result.output, result.output
    masters = fake_ssh()
    assert len(masters) == 2 and all("ControlPersist=1800" in m for m in masters)
    result = runner.invoke(cli.cli, ["socket", "list", "--json"])
    (row,) = json.loads(result.output)
    assert (row["state"], row["connections"]) == ("live", 2)
    assert 1700 < row["seconds_left"] <= 1800
    runner.invoke(cli.cli, ["socket", "close", "alice@a.example.org"])
    assert os.listdir(os.environ["HPCMOVE_SOCKET_DIR"]) == []


def test_a_command_does_not_import_what_only_slurm_needs():
    """Every command pays its imports before it does anything (`submit` before it lists
    a remote tree): `sh`, with asyncio behind it, is imported when a Slurm command runs."""
    out = subprocess.run([sys.executable, "-c", "import sys, hpcmove.cli; "
                          "print(sorted({'sh', 'asyncio'} & set(sys.modules)))"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
