"""slurm/burst_buffer.lua on the real Slurm testbed (BurstBufferType=burst_buffer/lua, the
script and burst_buffer.conf beside slurm.conf), as the unprivileged test user: root is
refused burst buffers. A job's `#BB_LUA stage_in` data is in place when it starts, a
failed stage-in keeps it from ever running, `#BB_LUA stage_out` lands after it ended, and
a malformed directive is refused at submission.
"""
import hashlib
import json
import os
import subprocess
import time

from conftest import Hpcmove, run_as_user, slurm_env, unreadable_set
from test_stageout import wait_ended


def sbatch(hp, text, check=True):
    """Submit the script `text` (in the area, as the test user); its id, or the result."""
    path = os.path.join(hp.area.root, "job.sh")
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    hp.area.own()
    done = run_as_user(["sbatch", "--parsable", "-p", "compute", "--output=job.out", path],
                       hp.env, cwd=hp.area.root, timeout=60)
    if not check:
        return done
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().strip()


def squeue(job):
    """(state, reason) of a job slurmctld still knows, else None."""
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T|%r"], capture_output=True,
                         text=True).stdout.strip()
    return tuple(out.split("|", 1)) if out else None


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read(hp, name):
    with open(os.path.join(hp.area.root, name)) as f:
        return f.read()


def hpcmove_jobs(hp):
    return {j["id"]: j for j in json.loads(hp.run("list", "--json").stdout)}


JOB = """#!/bin/bash
#BB_LUA stage_in -p dtn --slice-size 256K src/in/ 'dst/staged in/'
#BB_LUA stage_out -p dtn out dst/
date +%s.%N > started
(cd 'dst/staged in' && sha256sum -c ../../expected.sha256) > seen 2>&1
echo "check exit $?" >> seen
mkdir -p out
head -c 600000 /dev/urandom > out/result
[ -e dst/out/result ] && echo "stage-out came early" > early
date +%s.%N > ended
"""


def test_stage_in_before_the_job_and_stage_out_after_it(area):
    slurm_env()
    hp = Hpcmove("slurm", area)
    src = os.path.join(area.src, "in")
    os.makedirs(src)
    with open(os.path.join(area.root, "expected.sha256"), "w") as expected:
        for i in range(3):
            data = os.urandom(500_000 + i * 1000)
            with open(os.path.join(src, f"f{i}"), "wb") as f:
                f.write(data)
            expected.write(f"{hashlib.sha256(data).hexdigest()}  f{i}\n")
    os.makedirs(os.path.join(area.dst, "staged in"))
    job = sbatch(hp, JOB)
    # a job chained on it with afterburstbuffer starts only once the stage-out is in
    # place (Slurm 22.05 starts afterok dependents when the job ends, stage-out or not)
    done = run_as_user(["sbatch", "--parsable", "-p", "compute",
                        f"--dependency=afterburstbuffer:{job}",
                        "--output=/dev/null", "--wrap", "sha256sum dst/out/result > after"],
                       hp.env, cwd=area.root, timeout=60)
    assert done.returncode == 0, done.stderr
    after = done.stdout.decode().strip()
    rows = wait_ended([job, after])
    assert rows[job][0] == "COMPLETED", (rows, read(hp, "job.out"))
    assert rows[after][0] == "COMPLETED", rows
    seen = read(hp, "seen")
    assert seen.count(": OK") == 3 and "check exit 0" in seen, seen
    assert not os.path.exists(os.path.join(area.root, "early"))
    result = sha(os.path.join(area.root, "out", "result"))
    assert read(hp, "after").split()[0] == result
    assert sha(os.path.join(area.dst, "out", "result")) == result
    staged = hpcmove_jobs(hp)
    assert [j["state"] for j in staged.values()] == ["Done", "Done"]
    stage_in, stage_out = sorted(staged.values(), key=lambda j: j["created"])
    started, ended = float(read(hp, "started")), float(read(hp, "ended"))
    assert stage_in["finished"] <= started  # in place before the job's first command
    assert stage_out["created"] >= ended  # submitted after its last one
    assert all(x["id"] for x in stage_in["slurm_job_ids"])  # on Slurm (the DTN partition)


def test_a_failed_stage_in_keeps_the_job_from_running(area):
    slurm_env()
    hp = Hpcmove("slurm", area)
    unreadable_set(area)  # src/set with a file its owner cannot read
    job = sbatch(hp, "#!/bin/bash\n#BB_LUA stage_in -p dtn src/set dst/\ntouch ran\n")
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            state = squeue(job)
            if state and "slurm_bb_data_in" in state[1]:
                break
            assert state and state[0] == "PENDING", state
            time.sleep(1)
        else:
            raise AssertionError(f"no stage-in failure for {job}: {squeue(job)}")
        assert "hpcmove stage_in 1 of 1 failed (exit 1)" in state[1], state
        assert "secret file" in state[1]  # hpcmove's reason, as far as the field goes
        time.sleep(6)  # a few scheduling cycles: it stays held
        assert squeue(job)[0] == "PENDING"
        assert not os.path.exists(os.path.join(area.root, "ran"))
        (failed,) = hpcmove_jobs(hp).values()
        assert failed["state"] == "Failed" and "Permission denied" in failed["reason"]
        assert not os.path.exists(os.path.join(area.dst, "set"))
    finally:
        subprocess.run(["scancel", job], check=False)
    assert not os.path.exists(os.path.join(area.root, "ran"))


def test_a_failed_stage_out_keeps_the_job_in_stage_out(area):
    """Slurm 22.05 does not retry it: the job stays STAGE_OUT with the reason, and what
    waits with afterburstbuffer waits, until `scancel --hurry` lets it go."""
    slurm_env()
    hp = Hpcmove("slurm", area)
    job = sbatch(hp, "#!/bin/bash\n#BB_LUA stage_out -p dtn out dst/no/such/dir\n"
                     "mkdir -p out; echo result > out/r\n")
    try:
        deadline = time.monotonic() + 300
        while "slurm_bb_data_out" not in (squeue(job) or ("", ""))[1]:
            assert time.monotonic() < deadline, squeue(job)
            time.sleep(1)
        state, reason = squeue(job)
        assert state == "STAGE_OUT", state
        assert "hpcmove stage_out 1 of 1 failed (exit 1): Error: destination directory " \
               "does not exist" in reason, reason
        time.sleep(5)
        assert squeue(job)[0] == "STAGE_OUT"
    finally:
        subprocess.run(["scancel", "--hurry", job], check=False)


def test_a_malformed_directive_is_refused_at_submission(area):
    slurm_env()
    hp = Hpcmove("slurm", area)
    for text, why in (("#BB_LUA stage_inn a b", "unknown #BB_LUA directive stage_inn"),
                      ("#BB_LUA stage_out only-one", "stage_out needs SRC... DST"),
                      ("#BB_LUA stage_in 'a b", "unbalanced '")):
        done = sbatch(hp, f"#!/bin/bash\n{text}\ntrue\n", check=False)
        assert done.returncode != 0, text
        assert why in done.stderr.decode(), done.stderr
