"""The local backend's runner with real processes: the packaged final script starts
beside the tasks and waits for them; a runner that dies never lets it run early."""
import os
import signal
import time

import pytest
from click.testing import CliRunner

from conftest import pids_running

from hpcmove import cli, db, finalize
from hpcmove.backends import local_runner


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


def test_an_overridden_final_script_starts_only_after_the_tasks(home):
    """A site's or user's finalize.sh.j2 may run commands of its own before hpcmove's:
    those must not run beside the tasks, so such a script starts after them."""
    (home / "templates").mkdir()
    (home / "templates" / "finalize.sh.j2").write_text(
        '{% extends "packaged/finalize.sh.j2" %}\n'
        '{% block prologue %}echo "own step" >&2{% endblock %}\n')
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
