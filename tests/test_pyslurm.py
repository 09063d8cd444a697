"""The pyslurm backend.

pyslurm builds only against one Slurm release (PyPI: 25.11) and the testbed runs
Debian's Slurm 22.05, so the real pyslurm cannot run here. Its translation layer is
tested against a fake `pyslurm` module that implements only the documented pyslurm
25.11 surface the backend uses (JobSubmitDescription and its fields, submit,
load_sbatch_options; Job(id).cancel/hold/release; Jobs.load; db.Jobs.load with
db.JobFilter; RPCError; __version__), put into sys.modules by the tests. The fallback
to the command-line tools, and `hpcmove plugins`, run for real: pyslurm is not
installed in the test virtualenv, and the Slurm testbed answers `sinfo --version`.
"""
import importlib.util
import json
import logging
import os
import subprocess
import sys
import types

import pytest

from conftest import Hpcmove, slurm_env
from hpcmove import render
from hpcmove.backends import SubmitSpec, Submitted
from hpcmove.backends import pyslurm as backend
from hpcmove.errors import SchedulerError
# `fake` puts a FakeRun in place of the Slurm command-line tools (slurm.run)
from test_slurm_parse import CONFIG, fake  # noqa: F401  (a fixture)

# JobSubmitDescription attributes documented for pyslurm 25.11 that a fake accepts;
# any other name is an error, as it is on the real (Cython) class.
DOCUMENTED = {"name", "account", "array", "comment", "working_directory", "dependencies",
              "partitions", "qos", "is_requeueable", "script", "script_args", "environment",
              "time_limit", "standard_output", "standard_error", "kill_on_invalid_dependency",
              "priority", "mail_types", "mail_user", "memory_per_node", "nodes", "ntasks"}


class RPCError(Exception):
    def __init__(self, errno=-1, msg=None):
        self.errno, self.msg = errno, msg
        super().__init__(msg)


def record(**kw):
    """A job record as Jobs.load / db.Jobs.load give them (attributes only)."""
    base = dict(id=0, array_id=None, array_task_id=None, array_tasks_waiting=None,
                state="PENDING", batch_host=None, nodelist=None)
    return types.SimpleNamespace(**{**base, **kw})


def fake_pyslurm(version="25.11.0", live=(), ended=(), accounting=True, refuse=None,
                 fail_submit=()):
    """A module with pyslurm's documented names. It records what it was asked:
    m.submitted (fields of each submitted description), m.actions, m.loads."""
    m = types.ModuleType("pyslurm")
    m.__version__ = version
    m.RPCError = RPCError
    m.submitted, m.actions, m.loads = [], [], []
    next_id = iter(range(1000, 2000))

    class JobSubmitDescription:
        def __init__(self, **fields):
            for k, v in fields.items():
                setattr(self, k, v)

        def __setattr__(self, k, v):
            if k not in DOCUMENTED:
                raise AttributeError(f"'JobSubmitDescription' has no attribute {k!r}")
            object.__setattr__(self, k, v)

        def load_sbatch_options(self, overwrite=False):
            assert self.script and not overwrite
            object.__setattr__(self, "_loaded_sbatch_options", True)

        def submit(self):
            fields = {k: v for k, v in vars(self).items()}
            if len(m.submitted) in fail_submit:
                raise RPCError(2015, "Invalid partition name specified")
            m.submitted.append(fields)
            return next(next_id)

    class Job:
        def __init__(self, job_id):
            assert isinstance(job_id, int)
            self.id = job_id

        def _do(self, what):
            m.actions.append((what, self.id))
            if (refuse or {}).get(self.id):
                raise RPCError(2020, refuse[self.id])

        def cancel(self):
            self._do("cancel")

        def hold(self, mode=None):
            self._do(f"hold:{mode}")

        def release(self):
            self._do("release")

    class Jobs:
        @staticmethod
        def load(preload_passwd_info=False, frozen=False):
            m.loads.append("Jobs.load")
            return {r.id: r for r in live}

    class JobFilter:
        def __init__(self, **kw):
            self.ids = kw.pop("ids", None)
            assert not kw, kw

    class DbJobs:
        @staticmethod
        def load(db_filter=None, db_connection=None):
            m.loads.append(("db.Jobs.load", list(db_filter.ids)))
            if not accounting:
                raise RPCError(1, "Unable to connect to database")
            return {r.id: r for r in ended if r.id in db_filter.ids or r.array_id in db_filter.ids}

    m.JobSubmitDescription, m.Job, m.Jobs = JobSubmitDescription, Job, Jobs
    m.db = types.SimpleNamespace(Jobs=DbJobs, JobFilter=JobFilter)
    return m


@pytest.fixture(autouse=True)
def fresh_probe():
    backend.probe.cache_clear()
    backend.usable.cache_clear()
    yield
    backend.probe.cache_clear()
    backend.usable.cache_clear()


def scripts(tmp_path, label="hm-5"):
    """The real templates, rendered as for a job on partition dtn."""
    settings = render.ScriptSettings(label=label, jobdir=os.fsencode(tmp_path),
                                     db_url="sqlite:////x.db", python="/usr/bin/python3",
                                     partition="dtn", account="proj_1", qos="normal",
                                     time="1:00:00", extra=["--mem=4G"])
    paths = {}
    for name, text in render.render(settings, 3, 2).items():
        paths[name] = os.path.join(os.fsencode(tmp_path), name.encode())
        with open(paths[name], "w") as f:
            f.write(text)
    return paths


def spec(tmp_path, dependency="", width=2):
    """A job of 3 tasks; its scripts were rendered for a stripe width of 2."""
    logs = os.path.join(os.fsencode(tmp_path), b"logs")
    return SubmitSpec(os.fsencode(tmp_path), scripts(tmp_path), 3, width, dependency,
                      logs={"transfer": logs + b"/transfer-%A_%a.out",
                            "finalize": logs + b"/finalize-%j.out",
                            "feed": logs + b"/feed-%j.out"}, label="hm-5")


# --- submit ----------------------------------------------------------------------------

def test_submit_passes_sbatch_options_and_script_directives_as_fields(tmp_path, fake,
                                                                      monkeypatch):
    monkeypatch.setenv("SOME_SETTING", "kept")
    run = fake(scontrol=[CONFIG])
    api = fake_pyslurm()
    assert backend.PyslurmBackend(api).submit(spec(tmp_path, "afterok:77", width=1)) == \
        Submitted("1000", "1001")
    assert [c[0] for c in run.calls] == ["scontrol"]  # MaxArraySize only: nothing submitted by sbatch
    array, final = api.submitted
    d = os.fsdecode(tmp_path)
    assert array["script"] == f"{d}/transfer.sh" and "script_args" not in array
    assert array["array"] == "0-2%1"  # the command line's, not the script's 0-2%2
    assert array["dependencies"] == "afterok:77" and array["kill_on_invalid_dependency"] is True
    assert array["partitions"] == "dtn" and array["account"] == "proj_1"
    assert array["qos"] == "normal" and array["time_limit"] == "1:00:00"
    assert array["name"] == "hpcmove-hm-5" and array["comment"] == "hpcmove:hm-5"
    assert array["is_requeueable"] is True
    assert array["standard_output"] == f"{d}/logs/transfer-%A_%a.out"
    assert array["working_directory"] == os.getcwd()
    # sbatch's --export=ALL,HPCMOVE_TASK_OFFSET=0: the whole environment and the offset
    assert array["environment"]["HPCMOVE_TASK_OFFSET"] == "0"
    assert array["environment"]["SOME_SETTING"] == "kept"
    # the remaining #SBATCH line (--mem) is left to pyslurm's own reader
    assert array["_loaded_sbatch_options"] is True and "memory_per_node" not in array
    # finalize runs after the array whatever its outcome, not after the user's dependency
    assert final["script"] == f"{d}/finalize.sh" and "array" not in final
    assert final["dependencies"] == "afterany:1000" and "kill_on_invalid_dependency" not in final
    assert final["name"] == "hpcmove-hm-5-final" and final["partitions"] == "dtn"
    assert final["standard_output"] == f"{d}/logs/finalize-%j.out"
    assert "priority" not in final  # not held
    assert "HPCMOVE_TASK_OFFSET" not in final["environment"]


def test_fed_submission_holds_the_final_job_and_passes_the_feeder_arguments(tmp_path, fake):
    run = fake(scontrol=["MaxArraySize = 2\n", "", ""])
    api = fake_pyslurm()
    assert backend.PyslurmBackend(api).submit(spec(tmp_path)) == \
        Submitted("1001@0,feed:1002", "1000")
    final, array, feeder = api.submitted
    assert final["priority"] == 0  # sbatch --hold
    assert array["array"] == "0-1%2" and array["environment"]["HPCMOVE_TASK_OFFSET"] == "0"
    assert feeder["script"].endswith("/feed.sh")
    assert feeder["script_args"] == ["1", "2", "1000"]
    assert feeder["dependencies"] == "afterany:1001"
    # moving the final job's dependency and releasing it stay with scontrol
    assert run.calls[1:] == [["scontrol", "update", "JobId=1000", "Dependency=afterany:1001:1002"],
                             ["scontrol", "release", "1000"]]


def test_a_refused_submission_is_a_scheduler_error_and_cancels_the_array(tmp_path, fake):
    fake(scontrol=[CONFIG])
    api = fake_pyslurm(fail_submit={1})
    with pytest.raises(SchedulerError) as info:
        backend.PyslurmBackend(api).submit(spec(tmp_path))
    assert "Invalid partition name specified" in str(info.value)
    assert info.value.exit_code == 2015 and "finalize.sh" in " ".join(info.value.command)
    assert api.actions == [("cancel", 1000)]


def test_submit_fields_refuses_what_it_cannot_pass(tmp_path):
    script = tmp_path / "s.sh"
    script.write_text("#!/bin/bash\n#SBATCH --export=NONE\ntrue\n")
    with pytest.raises(ValueError, match="only ALL"):
        backend.submit_fields([str(script)])
    with pytest.raises(ValueError, match="no batch script"):
        backend.submit_fields(["--parsable"])


def test_directives_stop_at_the_first_command(tmp_path):
    script = tmp_path / "s.sh"
    script.write_text("#!/bin/bash\n# a comment\n#SBATCH --job-name=a\n\n#SBATCH --requeue\n"
                      "set -eu\n#SBATCH --qos=late\n")
    fields = backend.submit_fields(["--parsable", str(script), "x"], environ={}, cwd="/w")
    assert fields == {"script": str(script), "working_directory": "/w", "environment": {},
                      "script_args": ["x"], "name": "a", "is_requeueable": True}


# --- poll, task states ---------------------------------------------------------------

LIVE = [record(id=100, array_id=100, array_task_id=0, state="RUNNING", batch_host="dtn1"),
        record(id=105, array_id=100, array_tasks_waiting="1-3%2", state="PENDING"),
        record(id=101, state="PENDING"),
        record(id=99, state="RUNNING", batch_host="cn1")]  # somebody else's job
ENDED = [record(id=102, state="COMPLETED", nodelist="cn1"),
         record(id=103, array_id=103, array_task_id=0, state="FAILED", nodelist="cn2"),
         record(id=106, array_id=103, array_task_id=1, state="COMPLETED", nodelist="cn2")]


def test_poll_maps_states_with_one_live_query_and_one_accounting_query(fake):
    run = fake()
    api = fake_pyslurm(live=LIVE, ended=ENDED)
    polled = backend.PyslurmBackend(api).poll(["100", "101", 102, "103", "104", None])
    assert polled == {"100": "RUNNING", "101": "PENDING", "102": "COMPLETED",
                      "103": "FAILED", "104": "UNKNOWN"}
    assert api.loads == ["Jobs.load", ("db.Jobs.load", [102, 103, 104])]
    assert run.calls == []  # no squeue, no sacct


def test_poll_asks_accounting_only_for_jobs_slurm_forgot(fake):
    fake()
    api = fake_pyslurm(live=LIVE + [record(id=107, state="CANCELLED by 0")])
    assert backend.PyslurmBackend(api).poll(["101", "107"]) == \
        {"101": "PENDING", "107": "CANCELLED"}
    assert api.loads == ["Jobs.load"]


def test_poll_without_accounting_knows_what_slurm_holds(fake):
    fake()
    api = fake_pyslurm(live=LIVE, accounting=False)
    assert backend.PyslurmBackend(api).poll(["101", "102"]) == \
        {"101": "PENDING", "102": "UNKNOWN"}


def test_task_states_expand_the_pending_remainder(fake):
    fake()
    api = fake_pyslurm(live=LIVE)
    assert backend.PyslurmBackend(api).task_states("100") == {
        0: ("RUNNING", "dtn1"), 1: ("PENDING", ""), 2: ("PENDING", ""), 3: ("PENDING", "")}


# --- cancel, hold, release -----------------------------------------------------------

def test_cancel_hold_release_go_through_job_objects(fake):
    run = fake()
    api = fake_pyslurm(refuse={7: "Job is no longer pending execution"})
    b = backend.PyslurmBackend(api)
    b.cancel(["5", None, 6])
    b.hold(["5", "7"])  # 7 has nothing left to hold: not an error
    b.release(["5"])
    assert api.actions == [("cancel", 5), ("cancel", 6), ("hold:user", 5), ("hold:user", 7),
                           ("release", 5)]
    assert run.calls == []


def test_a_refused_cancel_explains_itself(fake):
    fake()
    api = fake_pyslurm(refuse={8: "Access/permission denied"})
    with pytest.raises(SchedulerError, match="permission denied") as info:
        backend.PyslurmBackend(api).cancel(["8"])
    assert info.value.command == ["pyslurm", "cancel", "8"]
    with pytest.raises(SchedulerError, match="permission denied"):
        backend.PyslurmBackend(api).hold(["8"])


# --- when pyslurm cannot be used: the command-line tools, one log line ---------------

@pytest.mark.parametrize("built, running", [("25.11.0", "slurm 25.11.1\n"),
                                            ("24.5.1", "slurm 24.05.3\n")])
def test_pyslurm_of_the_running_release_is_used(fake, monkeypatch, caplog, built, running):
    api = fake_pyslurm(version=built)
    monkeypatch.setitem(sys.modules, "pyslurm", api)
    fake(sinfo=[running])
    assert backend.PyslurmBackend().api is api
    assert backend.PyslurmBackend.unavailable() == ""
    assert not caplog.records


def test_version_mismatch_falls_back_to_the_cli_with_one_log_line(tmp_path, fake, monkeypatch,
                                                                 caplog):
    api = fake_pyslurm(version="25.11.0")
    monkeypatch.setitem(sys.modules, "pyslurm", api)
    run = fake(sinfo=["slurm 22.05.8\n"], scontrol=[CONFIG], sbatch=["500\n", "501\n"],
              squeue=["500|0-2|PENDING|\n"])
    caplog.set_level(logging.WARNING, logger=backend.__name__)
    first, second = backend.PyslurmBackend(), backend.PyslurmBackend()
    assert first.api is None and second.api is None
    assert first.submit(spec(tmp_path)) == Submitted("500", "501")
    assert second.poll(["500"]) == {"500": "PENDING"}
    assert api.submitted == [] and api.loads == []
    assert [c[0] for c in run.calls] == ["sinfo", "scontrol", "sbatch", "sbatch", "squeue"]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == ("hpcmove: the pyslurm backend uses the Slurm command-line tools: "
                    "pyslurm 25.11.0 is built for Slurm 25.11, but the running Slurm "
                    "is 22.05.8")
    assert backend.PyslurmBackend.unavailable() in line


def test_missing_pyslurm_falls_back_to_the_cli_with_one_log_line(fake, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pyslurm", None)  # import pyslurm: ImportError
    run = fake(scancel=[""])
    caplog.set_level(logging.WARNING, logger=backend.__name__)
    b = backend.PyslurmBackend()
    b.cancel(["9"])
    backend.PyslurmBackend().cancel([])
    assert run.calls == [["scancel", "9"]]  # no sinfo either: nothing to compare
    (line,) = [r.getMessage() for r in caplog.records]
    assert "the Python package 'pyslurm' cannot be imported" in line
    assert "pip install 'hpcmove[pyslurm]'" in line


def test_no_sinfo_is_a_reason_too(fake, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyslurm", fake_pyslurm())
    fake(sinfo=[SchedulerError(["sinfo", "--version"], 127, "", "sinfo: command not found")])
    assert backend.PyslurmBackend().api is None
    assert "sinfo: command not found" in backend.PyslurmBackend.unavailable()


def test_release_of():
    assert backend.release_of("25.11.0") == (25, 11)
    assert backend.release_of("slurm 22.05.8") == (22, 5)
    assert backend.release_of("24.5.1") == backend.release_of("slurm 24.05.3")
    assert backend.release_of("") is None


# --- for real: `hpcmove plugins` and a transfer on the Slurm testbed without pyslurm ----

def _without_pyslurm():
    if importlib.util.find_spec("pyslurm") is not None:
        pytest.fail("these tests expect pyslurm NOT to be installed in the test virtualenv "
                    "(it cannot match the testbed's Slurm 22.05)")


def _plugins(tmp_path, *args, pythonpath=None):
    env = dict(os.environ, HPCMOVE_HOME=str(tmp_path / "home"))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run([sys.executable, "-m", "hpcmove", "plugins", *args], env=env,
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_plugins_lists_pyslurm_unavailable_with_the_reason(tmp_path):
    _without_pyslurm()
    text = _plugins(tmp_path)
    (line,) = [x for x in text.splitlines() if x.startswith("backend\tpyslurm\t")]
    kind, name, status, reason = line.split("\t")
    assert status == "unavailable"
    assert "the Python package 'pyslurm' cannot be imported" in reason
    assert "No module named 'pyslurm'" in reason
    assert "backend\tslurm\tok" in text  # the one it falls back to
    rows = json.loads(_plugins(tmp_path, "--json"))
    (row,) = [r for r in rows if r["kind"] == "backend" and r["name"] == "pyslurm"]
    assert row["available"] is False and row["reason"] == reason


def test_plugins_says_which_releases_differ(tmp_path):
    slurm_env()
    site = tmp_path / "site"
    site.mkdir()
    (site / "pyslurm.py").write_text('__version__ = "25.11.0"\n')
    rows = json.loads(_plugins(tmp_path, "--json", pythonpath=str(site)))
    (row,) = [r for r in rows if r["name"] == "pyslurm"]
    running = subprocess.run(["sinfo", "--version"], capture_output=True, text=True).stdout
    assert not row["available"]
    assert row["reason"] == (f"pyslurm 25.11.0 is built for Slurm 25.11, but the running "
                             f"Slurm is {running.strip().removeprefix('slurm ')}")


def test_transfer_with_pyslurm_backend_falls_back_to_sbatch(area):
    slurm_env()
    _without_pyslurm()
    with open(os.path.join(area.src, "f"), "wb") as f:
        f.write(os.urandom(3 << 20))
    area.own()
    hm = Hpcmove("pyslurm", area)
    done = hm.run("submit", "--parsable", "--backend", "pyslurm", "-p", "dtn",
                  "--slice-size", "1M", os.path.join(area.src, "f"), area.dst)
    final = done.stdout.decode().strip()
    reasons = [x for x in done.stderr.decode().splitlines() if "pyslurm" in x]
    assert reasons == ["hpcmove: the pyslurm backend uses the Slurm command-line tools: the "
                       "Python package 'pyslurm' cannot be imported (pip install "
                       "'hpcmove[pyslurm]' on a Slurm of the same release): No module "
                       "named 'pyslurm'"], done.stderr
    s = hm.wait(final)
    assert s["state"] == "Done", s["reason"]
    assert s["backend"] == "pyslurm"
    assert {x["role"] for x in s["slurm_job_ids"]} == {"transfer", "finalize"}
    assert all(x["id"].isdigit() for x in s["slurm_job_ids"])  # Slurm's ids
    assert open(os.path.join(area.src, "f"), "rb").read() == \
        open(os.path.join(area.dst, "f"), "rb").read()


def test_submission_from_inside_a_job_leaves_that_jobs_slurm_variables_behind(tmp_path):
    """Stage-out: the jobs hpcmove submits from a running job must not inherit its
    SLURM_* (array index, memory, --export=NONE); SLURM_CONF is kept."""
    script = tmp_path / "s.sh"
    script.write_text("#!/bin/bash\ntrue\n")
    caller = {"SLURM_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "3", "SLURM_MEM_PER_CPU": "100",
              "SLURM_EXPORT_ENV": "NONE", "SLURM_CONF": "/etc/slurm/slurm.conf", "HOME": "/h"}
    fields = backend.submit_fields(["--parsable", "--export=ALL,X=1", str(script)],
                                   environ=caller, cwd="/w")
    assert fields["environment"] == {"SLURM_CONF": "/etc/slurm/slurm.conf", "HOME": "/h",
                                     "X": "1"}
