"""The drmaa backend against the real Grid Engine that `gridengine/testbed up` started.

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

from conftest import Hpcmove, run_as_user, unreadable_set

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTBED = os.path.join(REPO, "gridengine", "testbed")
GE_VARS = ("SGE_ROOT", "SGE_CELL", "DRMAA_LIBRARY_PATH", "GLIBC_TUNABLES", "PATH")

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

def _testbed_env():
    status = subprocess.run([TESTBED, "status"], capture_output=True, text=True)
    if status.returncode != 0:
        pytest.fail("the Grid Engine testbed is not up: run `gridengine/testbed up` as root "
                    f"(and eval \"$(gridengine/testbed env)\")\n{status.stdout}{status.stderr}")
    out = subprocess.run(
        ["bash", "-c", 'eval "$("$0" env)" && printf "%s\\0" ' +
         " ".join(f'"${v}"' for v in GE_VARS), TESTBED],
        capture_output=True, check=True).stdout.decode().split("\0")
    return dict(zip(GE_VARS, out))


@pytest.fixture(scope="module")
def ge(base):
    env = _testbed_env()
    probe = subprocess.run([sys.executable, "-c", "import drmaa; print(drmaa.Session)"],
                           env={**os.environ, **env}, capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail("the drmaa package cannot be imported in this virtualenv "
                    f"(pip install 'hpcmove[drmaa]'):\n{probe.stderr}")
    return {"env": env}


class GE(Hpcmove):
    """hpcmove with --backend drmaa and the Grid Engine clients, as the test user."""

    def __init__(self, ge, area):
        super().__init__("drmaa", area)
        self.ge_env = ge["env"]
        self.env.update(ge["env"])
        self.env["PATH"] = os.path.dirname(sys.executable) + ":" + ge["env"]["PATH"]

    def ge(self, *argv, check=True):
        done = run_as_user(list(argv), self.env, cwd=self.area.root, timeout=60)
        if check:
            assert done.returncode == 0, (argv, done.stdout, done.stderr)
        return done.stdout.decode()

    def qsub_after(self, final_id, marker, src, dst):
        """A compute job held on the final id that records whether, when it started, the
        destination already equalled the source."""
        # a script, not `qsub -b y`: qsub hands a binary job's words to a shell as one line
        script = marker + ".sh"
        with open(script, "w") as f:
            f.write(f"#!/bin/sh\nif cmp -s {shlex.quote(src)} {shlex.quote(dst)}; "
                    f"then echo identical; else echo differs; fi > {shlex.quote(marker)}\n")
        os.chmod(script, 0o755)
        out = self.ge("qsub", "-terse", "-hold_jid", final_id, "-o", "/dev/null", "-j", "y",
                      "-N", "compute", "-S", "/bin/sh", script)
        return out.strip()

    def state(self, job_id):
        """qstat's state letters of a job, or None when it has left."""
        for line in self.ge("qstat", "-u", "*").splitlines():
            words = line.split()
            if words and words[0] == job_id:
                return words[4]
        return None


@pytest.fixture
def gridengine(ge, area):
    return GE(ge, area)


def accounting(env, job):
    """[(task, failed, exit status, start, end)] of a job from the accounting file."""
    path = os.path.join(env["SGE_ROOT"], env["SGE_CELL"], "common", "accounting")
    rows = []
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                continue
            x = line.split(":")
            if len(x) >= 45 and x[5] == job:
                rows.append((int(x[35]), int(x[11]), int(x[12]), int(x[9]), int(x[10])))
    return rows


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
    compute = gridengine.qsub_after(final, marker, big, dst)
    # the compute job waits while the transfer runs
    deadline = time.monotonic() + 300
    while True:
        s = gridengine.status(final)
        if s["state"] in ("Done", "Failed", "Cancelled"):
            break
        assert not os.path.exists(marker), "the dependent job started before the transfer ended"
        assert "h" in (gridengine.state(compute) or "h")
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
    tasks = accounting(gridengine.ge_env, array)
    assert sorted(t[0] for t in tasks) == [1, 2, 3] and all(t[1:3] == (0, 0) for t in tasks)
    # the compute job ran after the data was in place (it compared the files on start)
    deadline = time.monotonic() + 120
    while not os.path.exists(marker) or not open(marker).read():
        assert time.monotonic() < deadline, f"compute job {compute} never ran: " \
                                            f"{gridengine.state(compute)}"
        time.sleep(0.5)
    assert open(marker).read() == "identical\n"
    while not accounting(gridengine.ge_env, compute):  # written when the job has ended
        assert time.monotonic() < deadline, f"compute job {compute} did not end"
        time.sleep(0.5)
    gate_end = max(t[4] for t in accounting(gridengine.ge_env, final))
    compute_start = min(t[3] for t in accounting(gridengine.ge_env, compute))
    assert compute_start >= gate_end >= max(t[4] for t in tasks)
    # a transfer task's log carries the Slurm-style name (0-based index)
    logs = os.listdir(os.path.join(area.home, "jobs", os.listdir(os.path.join(area.home, "jobs"))[0], "logs"))
    assert {f"transfer-{array}_{i}.out" for i in range(3)} <= set(logs), logs


def test_failing_transfer_never_releases_the_dependent(gridengine, area):
    src = unreadable_set(area)
    final = gridengine.submit(src, area.dst)
    marker = os.path.join(area.root, "compute-ran")
    compute = gridengine.qsub_after(final, marker, "/dev/null", "/dev/null")
    try:
        waited = gridengine.run("wait", "--timeout", "300", final, check=False)
        assert waited.returncode == 1  # wait exits 0 only for Done
        s = gridengine.status(final)
        assert s["state"] == "Failed"
        bad = next(f for f in s["files"] if f["src"].endswith("secret file"))
        assert bad["state"] == "Failed" and "ermission denied" in bad["reason"]
        assert not os.path.exists(os.path.join(area.dst, "set"))
        assert not [n for n in os.listdir(area.dst) if n.startswith(".hpcmove-")]
        assert sorted(os.listdir(src)) == ["good-1", "good-2", "secret file"]
        # finalize has left Grid Engine, failed; the final (gate) job stays held, and so
        # does what holds on it
        finalize_id = json.load(open(os.path.join(area.home, "drmaa", f"{final}.json")))["finalize"]
        deadline = time.monotonic() + 60
        while gridengine.state(finalize_id) is not None:
            assert time.monotonic() < deadline, f"finalize {finalize_id} did not end"
            time.sleep(0.5)
        time.sleep(3)  # several scheduler runs (1 s interval)
        assert gridengine.state(final) == "hqw"
        assert gridengine.state(compute) == "hqw"
        assert not os.path.exists(marker)
        (row,) = accounting(gridengine.ge_env, finalize_id)
        assert row[2] == 1  # finalize exited 1
        assert accounting(gridengine.ge_env, final) == []  # the gate never ran
        # hpcmove reports the held final job as not active (it will never run)
        polled = gridengine.run("status", "--json", final)
        assert json.loads(polled.stdout)["state"] == "Failed"
    finally:
        # the dependant first: deleting the gate would release it
        gridengine.ge("qdel", compute, check=False)
        gridengine.ge("qdel", final, check=False)


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


def test_cancel_stops_the_transfer_and_keeps_the_final_job_held(gridengine, area):
    big = os.path.join(area.src, "big.bin")
    with open(big, "wb") as f:
        for _ in range(4):
            f.write(os.urandom(16 << 20))
    area.own()
    final = gridengine.submit("--slice-size", "16M", "--stripe-width", "2", "--bwlimit", "8M",
                              big, area.dst + "/")
    marker = os.path.join(area.root, "compute-ran")
    compute = gridengine.qsub_after(final, marker, "/dev/null", "/dev/null")
    try:
        deadline = time.monotonic() + 120
        while gridengine.status(final)["state"] != "Active":
            assert time.monotonic() < deadline, "the transfer never became Active"
            time.sleep(0.3)
        gridengine.run("cancel", final)
        s = gridengine.status(final)
        assert s["state"] == "Cancelled", s
        assert not os.path.exists(os.path.join(area.dst, "big.bin"))
        assert not [n for n in os.listdir(area.dst) if n.startswith(".hpcmove-")]
        record = json.load(open(os.path.join(area.home, "drmaa", f"{final}.json")))
        assert gridengine.state(record["array"].split(".")[0]) is None
        assert gridengine.state(record["finalize"]) is None
        time.sleep(2)
        assert gridengine.state(final) == "hqw" and gridengine.state(compute) == "hqw"
        assert not os.path.exists(marker)
    finally:
        gridengine.ge("qdel", compute, check=False)
        gridengine.ge("qdel", final, check=False)
