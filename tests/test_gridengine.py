"""What is particular to the drmaa backend on the real Grid Engine that `gridengine/testbed
up` started: a bulk job striping one file, the gate job that keeps dependants held when
a transfer fails, and why the backend cannot load. Submit, verify, fail, cancel and
chain run for Grid Engine in the shared suite (test_behaviour.py, backend `drmaa`).

The tests read the environment from `gridengine/testbed env`; when the testbed is not up
they fail (they never skip). They drive the real CLI (`python -m hpcmove ...`) in a
subprocess, as the unprivileged test user when run as root.
"""
import json
import os
import shlex
import subprocess
import sys
import time

import pytest

from conftest import Hpcmove, ge, ge_accounting, ge_state, qsub_after, run_as_user, \
    unreadable_set

# --- pure helpers (no Grid Engine needed) ---------------------------------------------

def test_ids_dependencies_environment_and_accounting_parse():
    from hpcmove.backends import drmaa as d
    assert d.parse_id("123") == ("123", None)
    assert d.parse_id("123.1-8:1") == ("123", range(1, 9))
    assert d.parse_id("123.1-8:1@64")[1] == range(1, 9)
    assert d.parse_id("feed:9") is None
    assert d.hold_list("afterok:12:13,afterany:14") == ["12", "13", "14"]
    for bad in ("afternotok:12", "afterok:12?afterok:13", "singleton", "afterok:x"):
        with pytest.raises(d.UsageError):
            d.hold_list(bad)
    env, exported = d.job_environment({"A": "1", "T": "x=y", "JOB_ID": "5", "SGE_TASK_ID": "2",
                                       "SGE_ROOT": "/r", "BASH_FUNC_m%%": "() { :; }",
                                       "NL": "a\nb"})
    assert env == {"A": "1", "SGE_ROOT": "/r"} and exported == ["T=x=y"]
    line = ("all.q:vm:root:root:my:job:42:sge:0:1795322738:1795322740:1795322740:0:7:0:"
            "0.007555:0.000000:4932.000000:0:0:0:0:207:1:0:56.000000:8:0:0:0:3:1:NONE:"
            "defaultdepartment:NONE:1:3:0.007555:0.000000:0.000000:NONE:0.000000:NONE:"
            "0.000000:0:0")
    assert d.parse_accounting_line(line) == ("42", 3, "vm", 0, 7)  # a ':' in the job name
    assert d.describe(("vm", 0, 7)) == "FAILED (exit 7)"
    assert d.describe(("vm", 100, 137)) == "FAILED (killed by signal 9, Grid Engine failure code 100)"
    assert d.overall(["COMPLETED", "PENDING"]) == "PENDING"
    assert d.overall(["COMPLETED", "FAILED"]) == "FAILED"
    assert d.overall(["HELD"]) == "HELD"  # a gate that will never be released: not active


# --- the real Grid Engine ---------------------------------------------------------------

@pytest.fixture
def gridengine(area):
    return Hpcmove("drmaa", area)


def saw_identical(src, dst, marker):
    """sh for a compute job: write whether, when it started, dst already equalled src."""
    return (f"if cmp -s {shlex.quote(src)} {shlex.quote(dst)}; then echo identical; "
            f"else echo differs; fi > {shlex.quote(marker)}")


def test_striped_file_arrives_identical_and_dependent_starts_after(gridengine, area):
    big = os.path.join(area.src, "big.bin")
    with open(big, "wb") as f:
        for _ in range(16):
            f.write(os.urandom(16 << 20))
    area.own()
    marker = os.path.join(area.root, "compute-saw")
    dst = os.path.join(area.dst, "big.bin")
    final = gridengine.submit("--slice-size", "32M", "--stripe-width", "3", big, area.dst + "/")
    assert final.isdigit(), final
    compute = qsub_after(gridengine, final, saw_identical(big, dst, marker))
    # the compute job waits while the transfer runs
    deadline = time.monotonic() + 300
    while True:
        s = gridengine.status(final)
        if s["state"] in ("Done", "Failed", "Cancelled"):
            break
        assert not os.path.exists(marker), "the dependent job started before the transfer ended"
        assert "h" in (ge_state(gridengine, compute) or "h")
        assert time.monotonic() < deadline, s
        time.sleep(0.5)
    waited = gridengine.run("wait", "--timeout", "300", final, check=False)
    assert waited.returncode == 0, waited.stderr
    s = gridengine.status(final)
    assert s["state"] == "Done", s["reason"]
    assert s["backend"] == "drmaa"
    assert subprocess.run(["cmp", big, dst]).returncode == 0
    (f,) = s["files"]
    assert len(f["slices"]) == 8 and all(x["state"] == "Done" for x in f["slices"])
    assert f["checksum"].startswith("xxh3_128-tree/")
    assert s["bytes_done"] == s["bytes_total"] == 256 << 20
    assert not [n for n in os.listdir(area.dst) if n.startswith(".hpcmove-")]
    ids = {x["role"]: x["id"] for x in s["slurm_job_ids"]}
    assert ids["finalize"] == final and ids["transfer"].endswith(".1-3:1"), ids
    array = ids["transfer"].split(".")[0]
    tasks = ge_accounting(array)
    assert sorted(t[0] for t in tasks) == [1, 2, 3] and all(t[1:3] == (0, 0) for t in tasks)
    # the compute job ran after the data was in place (it compared the files on start)
    deadline = time.monotonic() + 120
    while not os.path.exists(marker) or not open(marker).read():
        assert time.monotonic() < deadline, f"compute job {compute} never ran: " \
                                            f"{ge_state(gridengine, compute)}"
        time.sleep(0.5)
    assert open(marker).read() == "identical\n"
    while not ge_accounting(compute):  # written when the job has ended
        assert time.monotonic() < deadline, f"compute job {compute} did not end"
        time.sleep(0.5)
    gate_end = max(t[4] for t in ge_accounting(final))
    compute_start = min(t[3] for t in ge_accounting(compute))
    assert compute_start >= gate_end >= max(t[4] for t in tasks)
    # a transfer task's log carries the Slurm-style name (0-based index)
    logs = os.listdir(os.path.join(area.home, "jobs", os.listdir(os.path.join(area.home, "jobs"))[0], "logs"))
    assert {f"transfer-{array}_{i}.out" for i in range(3)} <= set(logs), logs


def test_failing_transfer_never_releases_the_dependent(gridengine, area):
    """How the dependant stays held (the shared suite checks that it does): finalize
    ends with exit 1, so it never releases the gate, which never runs."""
    src = unreadable_set(area)
    final = gridengine.submit(src, area.dst)
    marker = os.path.join(area.root, "compute-ran")
    compute = qsub_after(gridengine, final, f"touch {shlex.quote(marker)}")
    try:
        waited = gridengine.run("wait", "--timeout", "300", final, check=False)
        assert waited.returncode == 1  # wait exits 0 only for Done
        finalize_id = json.load(open(os.path.join(area.home, "drmaa", f"{final}.json")))["finalize"]
        deadline = time.monotonic() + 60
        while not ge_accounting(finalize_id):
            assert time.monotonic() < deadline, f"finalize {finalize_id} did not end"
            time.sleep(0.5)
        time.sleep(3)  # several scheduler runs (1 s interval)
        (row,) = ge_accounting(finalize_id)
        assert row[2] == 1  # finalize exited 1
        assert ge_state(gridengine, final) == "hqw" and ge_accounting(final) == []  # gate: held
        assert ge_state(gridengine, compute) == "hqw" and ge_accounting(compute) == []
        assert not os.path.exists(marker)
        # hpcmove reports the held final job as not active (it will never run)
        assert gridengine.status(final)["state"] == "Failed"
    finally:
        # the dependant first: deleting the gate would release it
        ge(gridengine, "qdel", compute, check=False)
        ge(gridengine, "qdel", final, check=False)


def test_a_path_grid_engine_would_cut_is_refused_clearly(gridengine, area):
    """Grid Engine keeps a job's arguments one per line and would cut a path at a
    newline. File names with newlines travel in the manifest and arrive intact (the
    shared suite's hostile names); a newline in a path the jobs get as an argument, here
    the working directory they start in, is refused before anything is submitted."""
    cwd = os.path.join(area.root, "run\nhere")
    os.makedirs(cwd)
    with open(os.path.join(cwd, "f"), "wb") as f:
        f.write(b"x" * 1000)
    area.own()
    done = run_as_user([sys.executable, "-m", "hpcmove", "submit", "--backend", "drmaa", "f",
                        area.dst], gridengine.env, cwd=cwd)
    assert done.returncode == 1, done.stdout
    assert b"Grid Engine cannot pass a path with a newline" in done.stderr, done.stderr
    assert os.listdir(area.dst) == []  # no data, no spool
    (job,) = json.loads(gridengine.run("list", "--json").stdout)
    assert job["state"] == "Failed" and not job["final_slurm_id"], job
    assert "cannot pass a path with a newline" in job["reason"]


def test_plugins_reports_drmaa_and_why_not(gridengine):
    rows = json.loads(gridengine.run("plugins", "--json").stdout)
    (row,) = [r for r in rows if r["kind"] == "backend" and r["name"] == "drmaa"]
    assert row["available"], row
    env = dict(gridengine.env)
    del env["GLIBC_TUNABLES"]
    done = run_as_user([sys.executable, "-m", "hpcmove", "plugins", "--json"], env,
                       cwd=gridengine.area.root)
    (row,) = [r for r in json.loads(done.stdout) if r["name"] == "drmaa"]
    assert not row["available"] and "GLIBC_TUNABLES" in row["reason"], row
