"""Faults and recovery, through the real CLI on the local backend and the real Slurm
testbed: killed tasks, flipped bits, full disks, changing sources, held files."""
import os
import signal
import subprocess
import time

import pytest

from conftest import REPO, pids_running, run_as_user
from test_behaviour import no_spool_left


def worker_pids(token):
    """Processes running this job's transfer tasks."""
    return pids_running(b"hpcmove.worker", token.encode())


def token_of(hpcmove):
    """The job's token: the name of its (only) job directory."""
    (token,) = os.listdir(os.path.join(hpcmove.area.home, "jobs"))
    return token


def big_file(area, name="big", size=96 << 20):
    path = os.path.join(area.src, name)
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    return path


def same(a, b):
    return subprocess.run(["cmp", a, b]).returncode == 0


def test_sigkill_of_a_task_mid_slice_is_recovered(hpcmove, area):
    src = big_file(area)
    area.own()
    job = hpcmove.submit("--bwlimit", "16M", "--stripe-width", "2", "--slice-size", "16M",
                         src, area.dst)
    hpcmove.wait_for(job, lambda s: any(x["state"] == "Done" for f in s["files"]
                                        for x in f["slices"]))
    token = token_of(hpcmove)
    pids = worker_pids(token)
    assert pids, "no running worker to kill"
    os.kill(pids[0], signal.SIGKILL)
    s = hpcmove.wait(job)
    assert s["state"] == "Done", s["reason"]
    assert same(src, os.path.join(area.dst, "big"))
    no_spool_left(area.dst)


def test_source_appended_during_transfer_fails_that_file(hpcmove, area):
    src = big_file(area, size=64 << 20)
    area.own()
    job = hpcmove.submit("--bwlimit", "16M", "--stripe-width", "1", "--slice-size", "8M",
                         src, area.dst)
    hpcmove.wait_for(job, lambda s: s["state"] == "Active")
    with open(src, "ab") as f:
        f.write(b"late data")
    s = hpcmove.wait(job)
    assert s["state"] == "Failed"
    (f,) = s["files"]
    assert f["state"] == "Failed" and "source changed" in f["reason"]
    assert not os.path.exists(os.path.join(area.dst, "big"))
    no_spool_left(area.dst)


@pytest.fixture
def tiny_fs(area):
    mount = os.path.join(area.root, "tiny")
    os.makedirs(mount)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0777", "tmpfs", mount],
                   check=True)
    yield mount
    subprocess.run(["umount", "-l", mount], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_destination_full_fails_with_enospc_and_leaves_no_spool(hpcmove, area, tiny_fs):
    src = big_file(area, size=32 << 20)
    area.own()
    job = hpcmove.submit(src, tiny_fs)
    s = hpcmove.wait(job)
    assert s["state"] == "Failed"
    assert "ENOSPC" in s["files"][0]["reason"]
    assert os.listdir(tiny_fs) == []
    assert os.path.getsize(src) == 32 << 20


def test_held_file_then_retry_copies_only_what_was_not_done(hpcmove, area):
    good = big_file(area, "good", size=8 << 20)
    flaky = big_file(area, "flaky", size=1 << 20)
    marker = flaky + ".hpcmove-fault"
    open(marker, "w").close()
    area.own()
    job = hpcmove.submit("--engine", "faultinject", "--slice-size", "1M", "--stripe-width", "2",
                         good, flaky, area.dst)
    s = hpcmove.wait(job)
    assert s["state"] == "Hold", s
    assert "hpcmove retry" in s["reason"]
    files = {os.path.basename(f["src"]): f for f in s["files"]}
    assert files["flaky"]["state"] == "Hold" and "injected" in files["flaky"]["reason"]
    assert all(x["attempts"] == 3 for x in files["flaky"]["slices"])  # the policy's count
    before = [(x["host"], x["attempts"]) for x in files["good"]["slices"]]
    assert all(x["state"] == "Done" for x in files["good"]["slices"])
    assert not os.listdir(area.dst) or os.listdir(area.dst) == [
        n for n in os.listdir(area.dst) if n.startswith(".hpcmove-")]  # nothing placed
    os.unlink(marker)  # the fix
    hpcmove.run("retry", s["id"])
    s = hpcmove.wait(s["id"])
    assert s["state"] == "Done", s["reason"]
    files = {os.path.basename(f["src"]): f for f in s["files"]}
    assert [(x["host"], x["attempts"]) for x in files["good"]["slices"]] == before
    assert same(good, os.path.join(area.dst, "good"))
    assert same(flaky, os.path.join(area.dst, "flaky"))
    no_spool_left(area.dst)


# --- Slurm only ----------------------------------------------------------------------

def scontrol(area, *args):
    env = {"PATH": "/usr/bin:/bin", "SLURM_CONF": os.environ["SLURM_CONF"]}
    done = run_as_user(["scontrol", *args], env)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode()


@pytest.mark.parametrize("backend", ["slurm"], indirect=True)
def test_flipped_byte_before_finalize_is_detected_and_resent(hpcmove, area):
    src = big_file(area, size=32 << 20)
    area.own()
    job = hpcmove.submit("--slice-size", "8M", "--stripe-width", "2", src, area.dst)
    scontrol(area, "hold", job)  # keep the final job from starting
    s = hpcmove.wait_for(job, lambda s: all(x["state"] == "Done" for x in s["files"][0]["slices"]))
    (spool,) = [n for n in os.listdir(area.dst) if n.startswith(".hpcmove-")]
    path = os.path.join(area.dst, spool, "t", "big")  # the destination's layout
    with open(path, "r+b") as f:
        f.seek(20 << 20)
        byte = f.read(1)
        f.seek(20 << 20)
        f.write(bytes([byte[0] ^ 0x01]))
    scontrol(area, "release", job)
    s = hpcmove.wait(job)
    assert s["state"] == "Done", s["reason"]
    assert same(src, os.path.join(area.dst, "big"))
    resent = [x for x in s["files"][0]["slices"] if x["attempts"] > 1]
    assert [x["offset"] for x in resent] == [16 << 20]


def run_testbed(*args):
    subprocess.run([os.path.join(REPO, "slurm", "testbed"), *args], check=True,
                   capture_output=True)


def pid_from(name):
    state = os.environ.get("HPCMOVE_TESTBED_DIR", "/var/lib/hpcmove-testbed")
    with open(os.path.join(state, "run", name)) as f:
        return int(f.read().split()[0])


@pytest.mark.parametrize("backend", ["slurm"], indirect=True)
def test_slurmctld_restart_mid_transfer(hpcmove, area):
    src = big_file(area, size=64 << 20)
    area.own()
    job = hpcmove.submit("--bwlimit", "16M", "--slice-size", "8M", "--stripe-width", "2",
                         src, area.dst)
    hpcmove.wait_for(job, lambda s: s["state"] == "Active")
    os.kill(pid_from("slurmctld.pid"), signal.SIGTERM)
    time.sleep(2)
    run_testbed("up")
    s = hpcmove.wait(job)
    assert s["state"] == "Done", s["reason"]
    assert same(src, os.path.join(area.dst, "big"))


@pytest.mark.parametrize("backend", ["slurm"], indirect=True)
def test_dtn_slurmd_stopped_and_started_mid_transfer(hpcmove, area):
    src = big_file(area, size=64 << 20)
    area.own()
    job = hpcmove.submit("--bwlimit", "16M", "--slice-size", "8M", "--stripe-width", "3",
                         src, area.dst)
    s = hpcmove.wait_for(job, lambda s: any(x["host"] for x in s["files"][0]["slices"]))
    host = next(x["host"] for x in s["files"][0]["slices"] if x["host"])
    os.kill(pid_from(f"slurmd-{host}.pid"), signal.SIGTERM)
    time.sleep(5)
    run_testbed("up")
    s = hpcmove.wait(job)
    assert s["state"] == "Done", s["reason"]
    assert same(src, os.path.join(area.dst, "big"))


def test_pause_then_resume_keeps_the_final_id_and_finishes(hpcmove, area):
    src = big_file(area, size=48 << 20)
    area.own()
    job = hpcmove.submit("--bwlimit", "4M", "--slice-size", "8M", "--stripe-width", "2",
                         src, area.dst)
    compute = marker = None
    if hpcmove.backend == "slurm":
        from test_behaviour import sbatch
        marker = os.path.join(area.root, "compute-ran")
        compute = sbatch(area, "-p", "compute", f"--dependency=afterok:{job}", "--wrap",
                         f"cmp {src} {os.path.join(area.dst, 'big')} && touch {marker}")
    hpcmove.wait_for(job, lambda s: any(x["state"] == "Done" for x in s["files"][0]["slices"]))
    if hpcmove.backend == "drmaa":  # no hold/release of running work here: said clearly
        refused = hpcmove.run("pause", job, check=False)
        assert refused.returncode == 1
        assert b"pause is not available on the drmaa backend" in refused.stderr
        assert hpcmove.wait(job)["state"] == "Done"  # and the job carries on
        return
    hpcmove.run("pause", job)
    s = hpcmove.status(job)
    assert s["state"] == "Hold" and "paused" in s["reason"]
    time.sleep(6)  # running tasks finish their current slice (2 s at 4M/s) and stop
    before = hpcmove.status(job)
    time.sleep(4)
    after = hpcmove.status(job)
    done = [sum(x["state"] == "Done" for x in t["files"][0]["slices"]) for t in (before, after)]
    assert done[0] == done[1] < 6, done  # nothing moves while paused
    assert not os.path.exists(os.path.join(area.dst, "big"))
    hpcmove.run("resume", job)
    s = hpcmove.wait(job)
    assert s["state"] == "Done", s["reason"]
    assert s["slurm_job_ids"][-1]["id"] == job or hpcmove.backend == "local"
    assert same(src, os.path.join(area.dst, "big"))
    if compute:
        from test_behaviour import sacct_state
        assert sacct_state(area, compute) == "COMPLETED"
        assert os.path.exists(marker)
