"""Stage-out from a running job, on the real Slurm testbed, as the unprivileged test user:
a compute job writes its results and calls `hpcmove submit --then next.sh`; next.sh
starts only after the final job succeeded, and sees every byte in place. A failing
stage-out never runs next.sh.

The compute job is an array task with --mem-per-cpu and --export=NONE on purpose: its
SLURM_ARRAY_*, SLURM_MEM_PER_CPU and SLURM_EXPORT_ENV must not reach the jobs it submits
(next.sh asks for --mem, and srun refuses SLURM_MEM_PER_CPU next to SLURM_MEM_PER_NODE).
"""
import json
import os
import subprocess
import sys
import time

from conftest import Hpcmove, run_as_user, slurm_env, unreadable_set

COMPUTE = """#!/bin/bash
set -eu
# submitted with --export=NONE: set up what a user's script would (module load ...)
export PATH={bindir}:$PATH HPCMOVE_HOME={home}
mkdir -p scratch/out dst/run
for i in 1 2 3; do head -c $((700000 + i * 12345)) /dev/urandom > scratch/out/part$i; done
(cd scratch/out && sha256sum part*) > expected.sha256
{extra}
env | grep '^SLURM_' | sort > compute.env
hpcmove submit --parsable -p dtn --slice-size 256K --then next.sh scratch/out/ dst/run/ \\
    > final.id
"""

NEXT = """#!/bin/bash
#SBATCH --mem=100
#SBATCH --output=next.out
echo "job $SLURM_JOB_ID started $(date +%s.%N)"
(cd dst/run && sha256sum -c ../../expected.sha256) > next.check 2>&1
echo "check exit $?" >> next.check
echo "array task: ${SLURM_ARRAY_TASK_ID-none}, export: ${SLURM_EXPORT_ENV-default}"
echo "HPCMOVE_HOME=${HPCMOVE_HOME-unset}"
srun true && echo "srun ok"
"""


def sacct(ids):
    """{job id: (state, start, end)} of allocations, from accounting (as root)."""
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(ids),
                          "-o", "JobID,State,Start,End"], capture_output=True, text=True,
                         check=True).stdout
    rows = {}
    for line in out.splitlines():
        job, state, start, end = line.split("|")
        rows[job] = (state.split()[0], start, end)
    return rows


def wait_ended(ids, timeout=600):
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = sacct(ids)
        if all(rows.get(i, ("",))[0] in final for i in ids):
            return rows
        time.sleep(1)
    raise AssertionError(f"jobs {ids} did not end: {sacct(ids)}; "
                         + subprocess.run(["squeue"], capture_output=True, text=True).stdout)


def start_compute(area, extra=""):
    slurm_env()
    hp = Hpcmove("slurm", area)
    compute = COMPUTE.format(extra=extra, bindir=os.path.dirname(sys.executable),
                             home=area.home)
    for name, text in (("compute.sh", compute), ("next.sh", NEXT)):
        with open(os.path.join(area.root, name), "w") as f:
            f.write(text)
        os.chmod(os.path.join(area.root, name), 0o755)
    area.own()
    done = run_as_user(["sbatch", "--parsable", "-p", "compute", "--array=0-0",
                        "--mem-per-cpu=50", "--export=NONE", "--output=compute.out",
                        "compute.sh"], hp.env, cwd=area.root, timeout=60)
    assert done.returncode == 0, done.stderr
    array = done.stdout.decode().strip()
    return hp, array


def read(area, name):
    with open(os.path.join(area.root, name)) as f:
        return f.read()


def test_compute_stages_out_and_the_next_step_sees_every_byte(area):
    hp, array = start_compute(area)
    compute = wait_ended([f"{array}_0"])
    assert compute[f"{array}_0"][0] == "COMPLETED", read(area, "compute.out")
    # the compute job's own variables, which next.sh must not inherit
    assert "SLURM_MEM_PER_CPU=50" in read(area, "compute.env")
    final = read(area, "final.id").strip()  # --parsable: the transfer's final id
    assert final.isdigit()
    listed = json.loads(hp.run("list", "--json").stdout)
    assert [j["final_slurm_id"] for j in listed] == [final]
    status = hp.status(final)
    then = status["then_slurm_id"]
    assert then and then != final and status["final_slurm_id"] == final
    rows = wait_ended([final, then])
    assert rows[final][0] == "COMPLETED" and rows[then][0] == "COMPLETED", rows
    assert rows[then][1] >= rows[final][2]  # started after the final job ended
    assert hp.status(final)["state"] == "Done"
    check = read(area, "next.check")
    assert check.count(": OK") == 3 and "check exit 0" in check, check
    out = read(area, "next.out")
    assert f"job {then} started" in out
    assert "array task: none, export: default" in out  # not the compute job's
    assert f"HPCMOVE_HOME={area.home}" in out  # what the user had, passed on
    assert "srun ok" in out, out
    for i in (1, 2, 3):
        with open(os.path.join(area.root, "scratch", "out", f"part{i}"), "rb") as a, \
                open(os.path.join(area.dst, "run", f"part{i}"), "rb") as b:
            assert a.read() == b.read()


def test_a_failed_stage_out_never_runs_the_next_step(area):
    # the user cannot read one of the results: the transfer fails in its task
    hp, array = start_compute(area, extra="head -c 1000 /dev/urandom > scratch/out/secret; "
                                          "chmod 0 scratch/out/secret")
    compute = wait_ended([f"{array}_0"])
    assert compute[f"{array}_0"][0] == "COMPLETED", read(area, "compute.out")
    final = read(area, "final.id").strip()
    then = hp.status(final)["then_slurm_id"]
    rows = wait_ended([final, then])
    assert rows[final][0] == "FAILED"
    # cancelled without running: sacct shows no start, or (when slurmctld's backfill had
    # estimated one) start == end; next.out, its first output, never appears (below)
    assert rows[then][0] == "CANCELLED", rows
    assert rows[then][1] in ("None", "Unknown", rows[then][2]), rows
    status = hp.status(final)
    assert status["state"] == "Failed" and "secret" in status["reason"]
    assert not os.path.exists(os.path.join(area.root, "next.out"))
    assert not os.path.exists(os.path.join(area.dst, "run", "part1"))  # all or nothing


def test_submission_env_drops_only_the_calling_jobs_slurm_variables():
    from hpcmove.backends import submission_env
    env = {"PATH": "/bin", "SLURM_CONF": "/c", "SLURM_MEM_PER_CPU": "50", "SBATCH_QOS": "q",
           "SLURM_EXPORT_ENV": "NONE", "SLURMD_NODENAME": "cn1", "HPCMOVE_HOME": "/h"}
    assert submission_env(env) == env  # outside a job: as it is
    inside = submission_env({**env, "SLURM_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "0"})
    assert inside == {"PATH": "/bin", "SLURM_CONF": "/c", "SBATCH_QOS": "q",
                      "HPCMOVE_HOME": "/h"}


# --- Grid Engine: --then holds on the gate (-hold_jid) --------------------------------

GE_NEXT = """#!/bin/bash
cmp -s {src} {dst} && echo identical > {marker} || echo differs > {marker}
"""


def ge_then(area, src, dst):
    from conftest import gridengine_env
    gridengine_env()
    hp = Hpcmove("drmaa", area)
    marker = os.path.join(area.root, "next-saw")
    script = os.path.join(area.root, "next.sh")
    with open(script, "w") as f:
        f.write(GE_NEXT.format(src=src, dst=os.path.join(dst, os.path.basename(src)),
                               marker=marker))
    os.chmod(script, 0o755)
    area.own()
    final = hp.submit("--then", script, src, dst)
    then = hp.status(final)["then_slurm_id"]
    assert then and then.isdigit() and then != final
    return hp, final, then, marker


def test_then_on_grid_engine_runs_after_the_gate_released(area):
    from conftest import ge_accounting
    src = os.path.join(area.src, "data.bin")
    with open(src, "wb") as f:
        f.write(os.urandom(3 << 20))
    hp, final, then, marker = ge_then(area, src, area.dst)
    assert hp.wait(final)["state"] == "Done"
    deadline = time.monotonic() + 120
    while not ge_accounting(then):
        assert time.monotonic() < deadline, f"--then job {then} did not run"
        time.sleep(0.5)
    with open(marker) as f:
        assert f.read() == "identical\n"
    assert min(t[3] for t in ge_accounting(then)) >= max(t[4] for t in ge_accounting(final))


def test_then_on_grid_engine_never_runs_after_a_failure(area):
    from conftest import ge, ge_accounting, ge_state
    src = unreadable_set(area)
    hp, final, then, marker = ge_then(area, src, area.dst)
    try:
        assert hp.wait(final)["state"] == "Failed"
        time.sleep(3)  # several scheduler runs (1 s interval)
        assert ge_state(hp, then) == "hqw" and ge_accounting(then) == []
        assert not os.path.exists(marker)
    finally:
        ge(hp, "qdel", then, check=False)  # the dependant first: deleting the gate releases
        ge(hp, "qdel", final, check=False)
