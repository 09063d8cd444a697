"""The Python API: submit, chain ids, status, wait, cancel, load; on the real backends."""
import os

import pytest

import hpcmove
from hpcmove import db
from hpcmove.errors import UsageError


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HPCMOVE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HPCMOVE_DB", raising=False)
    monkeypatch.setenv("HPCMOVE_POLICY", str(tmp_path / "no-policy.toml"))
    yield tmp_path
    db.close()


def test_submit_wait_status_load(home):
    (home / "in").mkdir()
    (home / "in" / "data").write_bytes(os.urandom(300_000))
    (home / "out").mkdir()
    job = hpcmove.submit(str(home / "in"), str(home / "out"), backend="local",
                         slice_size="64K", stripe_width=2)
    assert job.id.startswith("hm-") and job.final_slurm_id
    assert job.wait(timeout=120) == "Done"
    assert (home / "out" / "in" / "data").read_bytes() == (home / "in" / "data").read_bytes()
    status = job.status()
    assert status["state"] == "Done" and len(status["files"][1]["slices"]) == 5
    again = hpcmove.Job.load(job.id)
    assert again.final_slurm_id == job.final_slurm_id and again.state == "Done"
    assert "Done" in repr(again)


def test_cancel_and_unknown_options(home):
    (home / "big").write_bytes(os.urandom(8 << 20))
    (home / "out").mkdir()
    job = hpcmove.submit(str(home / "big"), str(home / "out"), backend="local", bwlimit="1M")
    assert job.cancel() == "Cancelled"
    assert not (home / "out" / "big").exists()
    with pytest.raises(UsageError, match="unknown option partiton"):
        hpcmove.submit(str(home / "big"), str(home / "out"), partiton="dtn")


@pytest.mark.parametrize("backend", ["slurm"], indirect=True)
def test_workflow_step_stages_data_then_chains_a_compute_job(backend, area):
    """The README's example, as the unprivileged user, on the Slurm testbed."""
    from conftest import run_as_user
    import sys
    with open(os.path.join(area.src, "input.dat"), "wb") as f:
        f.write(os.urandom(1 << 20))
    area.own()
    script = f"""
import subprocess, hpcmove
job = hpcmove.submit({area.src!r}, {area.dst!r}, partition="dtn", backend="slurm")
out = subprocess.run(["sbatch", "--parsable", "-p", "compute", "-o", "/dev/null",
                      f"--dependency=afterok:{{job.final_slurm_id}}", "--wrap",
                      "cmp {area.src}/input.dat {area.dst}/src/input.dat"],
                     capture_output=True, text=True, check=True).stdout.strip()
print(job.wait(), out)
"""
    env = {"PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin",
           "SLURM_CONF": os.environ["SLURM_CONF"], "HPCMOVE_HOME": area.home,
           "HOME": area.home}
    done = run_as_user([sys.executable, "-c", script], env, cwd=area.root)
    assert done.returncode == 0, done.stderr
    state, compute = done.stdout.decode().split()
    assert state == "Done"
    from test_behaviour import sacct_state
    assert sacct_state(area, compute) == "COMPLETED"
