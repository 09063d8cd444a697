"""The local backend's runner with real processes: the packaged final script starts
beside the tasks and waits for them; a runner that dies never lets it run early."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from conftest import pids_running

from hpcmove import cli, db, finalize
from hpcmove.backends import local_runner
from hpcmove.errors import PlanError


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCMOVE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HPCMOVE_USER_TEMPLATES", str(tmp_path / "templates"))
    monkeypatch.delenv("HPCMOVE_DB", raising=False)
    yield tmp_path
    db.close()


def _until(what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"not in {timeout} s: {what}")


def _slow_job(tmp_path):
    """A 3 MiB file at 1 MiB/s: a task that runs ~3 s. Returns (job, destination)."""
    (tmp_path / "src").write_bytes(os.urandom(3 << 20))
    (tmp_path / "d").mkdir()
    result = CliRunner().invoke(cli.cli, ["submit", "--backend", "local", "--bwlimit", "1M",
                                          str(tmp_path / "src"), str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    (job,) = db.Job.select()
    return job, tmp_path / "d" / "src"


def _task_running(job):
    return pids_running(b"hpcmove.worker", job.jobdir)


def _final_running(job):
    return pids_running(b"hpcmove.finalize", job.jobdir)


def _wait_state(job, states, timeout=60.0):
    return _until(lambda: db.Job.get_by_id(job.id).state in states and
                  db.Job.get_by_id(job.id), timeout)


def test_the_final_script_starts_beside_the_tasks_and_waits_for_them(home):
    job, dst = _slow_job(home)
    _until(lambda: _task_running(job))
    _until(lambda: _final_running(job), timeout=5)  # started with the task (bash exec'd it)
    time.sleep(0.5)
    assert _task_running(job) and not dst.exists()  # and waiting: nothing placed yet
    job = _wait_state(job, {"Done", "Failed"})
    assert job.state == "Done", job.reason
    assert dst.read_bytes() == (home / "src").read_bytes()


def _own_template(home, name):
    """A user's template `name` that runs a command of its own first."""
    (home / "templates").mkdir()
    (home / "templates" / name).write_text(
        f'{{% extends "packaged/{name}" %}}\n'
        '{% block prologue %}echo "own step" >&2{% endblock %}\n')


def test_an_overridden_final_script_starts_only_after_the_tasks(home):
    """A site's or user's finalize.sh.j2 may run commands of its own before hpcmove's:
    those must not run beside the tasks, so such a script starts after them."""
    _own_template(home, "finalize.sh.j2")
    job, dst = _slow_job(home)
    _until(lambda: _task_running(job))
    time.sleep(0.5)
    assert _task_running(job) and not _final_running(job)
    job = _wait_state(job, {"Done", "Failed"})
    assert job.state == "Done", job.reason
    assert dst.read_bytes() == (home / "src").read_bytes()
    with open(os.path.join(job.jobdir, b"logs", b"finalize.out"), "rb") as f:
        assert b"own step" in f.read()


def test_a_runner_killed_under_its_tasks_never_lets_the_final_script_run(home):
    """The runner's pipe closes without GO: the waiting finalize gives up, so nothing is
    verified or placed while a task may still be writing (the job is left to `status`,
    which finds its runner gone, as before the early start)."""
    job, dst = _slow_job(home)
    _until(lambda: _task_running(job) and _final_running(job))
    runner = local_runner.pid_of(job.final_id)
    try:
        os.kill(runner, signal.SIGKILL)
        _until(lambda: not _final_running(job), timeout=10)
        assert _task_running(job)  # the task outlived both
        with open(os.path.join(job.jobdir, b"logs", b"finalize.out"), "rb") as f:
            assert b"the local runner ended before the job's tasks did" in f.read()
        _until(lambda: not _task_running(job), timeout=60)
        time.sleep(0.3)
        assert not dst.exists()
        assert db.Job.get_by_id(job.id).state not in ("Done", "Failed")
    finally:
        try:
            os.killpg(runner, signal.SIGKILL)  # what is left of the group
        except ProcessLookupError:
            pass


def _gate(data, close=True):
    read_fd, write_fd = os.pipe()
    os.write(write_fd, data)
    if close:
        os.close(write_fd)
    return {local_runner.AFTER_TASKS: str(read_fd)}


def test_finalize_goes_only_on_the_runners_word():
    assert finalize.tasks_ended({})  # started after the tasks, as on Slurm
    assert finalize.tasks_ended(_gate(local_runner.GO))
    assert not finalize.tasks_ended(_gate(b""))  # the runner died
    assert not finalize.tasks_ended(_gate(b"g"))  # ... half-way through its word
    assert not finalize.tasks_ended({local_runner.AFTER_TASKS: "999"})  # no such pipe
    env = _gate(local_runner.GO)
    finalize.tasks_ended(env)
    assert local_runner.AFTER_TASKS not in env  # not passed on to what finalize starts


def test_finalize_refuses_to_run_without_the_word(home, monkeypatch, capsys):
    """Started early, finalize reads the job's files, then waits; a pipe closed without
    GO and it ends there, without even connecting again."""
    read = []
    monkeypatch.setattr(finalize, "_files_early", lambda path: read.append(path) or [])
    monkeypatch.setattr(db, "connect", lambda *a, **k: pytest.fail("finalize went on"))
    for name, value in _gate(b"").items():
        monkeypatch.setenv(name, value)
    assert finalize.main(["/some/jobdir"]) == 1
    assert read == [b"/some/jobdir"]
    assert "nothing was checked or placed" in capsys.readouterr().err


def _standbys(home):
    """Processes started ahead by a runner of this test's (its HPCMOVE_HOME in their
    environment): {pid: argv}."""
    mark = b"HPCMOVE_HOME=" + os.fsencode(home / "home") + b"\0"
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if local_runner.STANDBY.encode() in argv and mark in env:
            found[int(pid)] = argv
    return found


def test_tasks_and_finalize_are_started_ahead_while_submit_plans(home):
    """With the packaged scripts, the runner is forked before planning and its worker
    and finalize processes import hpcmove meanwhile; each then takes its part (job,
    task, environment, log) as its script would have given it."""
    job, dst = _slow_job(home)
    task = _until(lambda: _task_running(job))
    final = _until(lambda: _final_running(job))
    ahead = _standbys(home)
    assert set(task) | set(final) <= set(ahead), (task, final, ahead)
    with open(f"/proc/{task[0]}/environ", "rb") as f:
        assert b"SLURM_ARRAY_TASK_ID=" not in f.read()  # not given at its start...
    job = _wait_state(job, {"Done", "Failed"})
    assert job.state == "Done", job.reason
    assert dst.read_bytes() == (home / "src").read_bytes()
    rows = db.Slice.select().where(db.Slice.job == job.id)
    assert {s.host for s in rows} == {os.uname().nodename}  # ...but when it took its part
    assert all(s.dst_digest == s.src_digest != "" for s in rows)  # verified at rest
    _until(lambda: not _standbys(home), timeout=10)  # the one with no task went too
    assert os.listdir(home / "home" / "local") == [f"{job.final_id}.json"]


def test_an_overridden_transfer_script_runs_and_nothing_starts_ahead(home):
    _own_template(home, "transfer.sh.j2")
    job, dst = _slow_job(home)
    _until(lambda: _task_running(job))
    assert not _standbys(home)
    job = _wait_state(job, {"Done", "Failed"})
    assert job.state == "Done", job.reason
    with open(os.path.join(job.jobdir, b"logs", b"transfer-0.out"), "rb") as f:
        assert b"own step" in f.read()


def test_a_submit_that_fails_after_the_runner_started_ahead_leaves_nothing(home, monkeypatch):
    """Planning fails once the runner and its processes are started: its pipe ends
    without a job, they all end and the runner's state file goes."""
    from hpcmove import jobs
    (home / "src").write_bytes(b"x")
    started = []

    def plan_fails(*args, **kwargs):
        started.append(_until(lambda: _standbys(home)))
        raise PlanError("the plan failed")
    monkeypatch.setattr(jobs, "plan_pairs", plan_fails)
    result = CliRunner().invoke(cli.cli, ["submit", "--backend", "local", str(home / "src"),
                                          str(home / "dst")])
    assert result.exit_code != 0 and "the plan failed" in result.output
    assert started and started[0]
    _until(lambda: not _standbys(home), timeout=10)
    assert not (home / "home" / "local").exists()  # no runner's state file, ever
    assert not (home / "dst").exists()


@pytest.mark.parametrize("part", [b"", b"  \n"])
def test_a_process_started_ahead_with_no_part_just_ends(tmp_path, part):
    done = subprocess.run([sys.executable, "-m", "hpcmove.worker", local_runner.STANDBY],
                          input=part, capture_output=True)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


def test_a_process_started_ahead_takes_its_scripts_environment_and_log(tmp_path):
    log = tmp_path / "logs \n$(x)" / "task.out"
    log.parent.mkdir()
    log.write_bytes(b"before\n")
    part = {"argv": [os.fsdecode(b"/jobs/caf\xe9 dir"), "3"], "env": {"HM_X": "1 2"},
            "log": str(log)}
    code = ("from hpcmove.backends.local_runner import standby_job; import os, sys; "
            "argv = standby_job(); print(argv, os.environ['HM_X']); "
            "print('err', file=sys.stderr); print(repr(sys.stdin.read()))")
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(part).encode(),
                          capture_output=True)
    assert done.returncode == 0 and done.stdout == b"" and done.stderr == b"", done
    assert log.read_bytes() == (b"before\n['/jobs/caf\\udce9 dir', '3'] 1 2\nerr\n''\n")

