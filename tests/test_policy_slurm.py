"""Site policy on the real Slurm testbed: the array's throttle and a site prologue."""
import os
import subprocess

import pytest

from conftest import Hpcmove, run_as_user


@pytest.fixture
def site(area):
    """A site policy and template directory inside the test's area."""
    templates = os.path.join(area.root, "site-templates")
    os.makedirs(templates)
    marker = os.path.join(area.root, "prologue-ran")
    with open(os.path.join(templates, "transfer.sh.j2"), "w") as f:
        f.write('{% extends "packaged/transfer.sh.j2" %}\n'
                '{% block prologue %}echo "$SLURMD_NODENAME" >> ' + marker + '\n{% endblock %}\n')
    path = os.path.join(area.root, "policy.toml")
    with open(path, "w") as f:
        f.write('[defaults]\npartition = "dtn"\n'
                '[limits]\nmax_stripe_width = 2\n'
                f'[templates]\nsite_dir = "{templates}"\n')
    area.own()
    return path, marker


def scontrol_job(area, job_id):
    env = {"PATH": "/usr/bin:/bin", "SLURM_CONF": os.environ["SLURM_CONF"]}
    return run_as_user(["scontrol", "show", "job", "--oneliner", job_id], env).stdout.decode()


@pytest.mark.parametrize("backend", ["slurm"], indirect=True)
def test_stripe_width_clamped_to_site_limit_and_site_prologue_runs(backend, area, site, dataset):
    policy_path, marker = site
    hm = Hpcmove(backend, area)
    hm.env["HPCMOVE_POLICY"] = policy_path
    hm.backend_args = ["--backend", "slurm"]  # the partition comes from the site policy
    done = hm.run("submit", *hm.backend_args, "--stripe-width", "6", "--slice-size", "32M",
                  "--bwlimit", "100M", os.path.join(dataset, "big.bin"), area.dst)
    assert b"clamped to limits.max_stripe_width = 2" in done.stderr
    label = done.stdout.decode().split()[1].rstrip(":")
    s = hm.status(label)
    array = next(x["id"] for x in s["slurm_job_ids"] if x["role"] == "transfer")
    info = scontrol_job(area, array)
    assert "ArrayTaskThrottle=2" in info and "Partition=dtn" in info, info
    s = hm.wait(label)
    assert s["state"] == "Done", s["reason"]
    assert subprocess.run(["cmp", os.path.join(dataset, "big.bin"),
                           os.path.join(area.dst, "big.bin")]).returncode == 0
    with open(marker) as f:
        nodes = f.read().split()
    assert len(nodes) == 2 and set(nodes) <= {"dtn1", "dtn2", "dtn3"}


@pytest.mark.parametrize("backend", ["slurm"], indirect=True)
def test_stripe_width_over_limit_refused_when_site_says_so(backend, area, site):
    policy_path, _ = site
    text = open(policy_path).read().replace("[limits]\n", '[limits]\non_exceed = "refuse"\n')
    with open(policy_path, "w") as f:
        f.write(text)
    hm = Hpcmove(backend, area)
    hm.env["HPCMOVE_POLICY"] = policy_path
    with open(os.path.join(area.src, "f"), "wb") as f:
        f.write(b"x")
    area.own()
    done = hm.run("submit", "--backend", "slurm", "--stripe-width", "6",
                  os.path.join(area.src, "f"), area.dst, check=False)
    assert done.returncode == 1
    assert b"stripe_width 6 is over the site limit limits.max_stripe_width = 2" in done.stderr
    assert policy_path.encode() in done.stderr
    assert not os.path.exists(os.path.join(area.home, "jobs"))


def sacct_partition(area, job_id, timeout=60):
    import time
    env = {"PATH": "/usr/bin:/bin", "SLURM_CONF": os.environ["SLURM_CONF"]}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = run_as_user(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "Partition"],
                          env).stdout.decode().split()
        if out:
            return set(out)
        time.sleep(1)
    return set()


@pytest.mark.parametrize("backend", ["slurm"], indirect=True)
def test_site_job_submit_lua_routes_tagged_jobs_to_dtn(backend, area):
    """slurm/job_submit.lua is loaded by the testbed: hpcmove's jobs (comment
    'hpcmove:...') land in dtn without -p; other jobs keep the default partition."""
    hm = Hpcmove(backend, area)
    with open(os.path.join(area.src, "f"), "wb") as f:
        f.write(os.urandom(10000))
    area.own()
    job = hm.run("submit", "--parsable", "--backend", "slurm", os.path.join(area.src, "f"),
                 area.dst).stdout.decode().strip()
    s = hm.wait(job)
    assert s["state"] == "Done", s["reason"]
    for x in s["slurm_job_ids"]:
        assert sacct_partition(area, x["id"]) == {"dtn"}, x
    env = {"PATH": "/usr/bin:/bin", "SLURM_CONF": os.environ["SLURM_CONF"]}
    other = run_as_user(["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "true"], env,
                        cwd=area.root).stdout.decode().strip()
    assert sacct_partition(area, other) == {"compute"}


@pytest.mark.parametrize("backend", ["slurm"], indirect=True)
def test_job_with_more_tasks_than_max_array_size_is_fed_in_chunks(backend, area):
    env = {"PATH": "/usr/bin:/bin", "SLURM_CONF": os.environ["SLURM_CONF"]}
    config = run_as_user(["scontrol", "show", "config"], env).stdout.decode()
    max_array = int(next(l.split("=")[1] for l in config.splitlines()
                         if l.startswith("MaxArraySize")))
    assert max_array <= 64, "the testbed keeps MaxArraySize low to exercise feeding"
    # rate and time make each task's share 1 MiB (the floor): one task per MiB of data
    n_files = max_array * 2 + 5
    for i in range(n_files):
        with open(os.path.join(area.src, f"f{i:03d}"), "wb") as f:
            f.write(os.urandom((1 << 20) - 4096))
    policy_path = os.path.join(area.root, "policy.toml")
    with open(policy_path, "w") as f:
        f.write('[defaults]\npartition = "dtn"\nrate = "1K"\ntime = "5"\n')
    area.own()
    hm = Hpcmove(backend, area)
    hm.env["HPCMOVE_POLICY"] = policy_path
    final = hm.run("submit", "--parsable", "--backend", "slurm", "--stripe-width", "3",
                   area.src, area.dst).stdout.decode().strip()
    s = hm.wait(final)
    assert s["state"] == "Done", s["reason"]
    arrays = [x for x in s["slurm_job_ids"] if x["role"] == "transfer"]
    assert len(arrays) == 3, s["slurm_job_ids"]
    assert s["slurm_job_ids"][-1] == {"id": final, "role": "finalize", "final": True}
    for i in range(n_files):
        name = f"f{i:03d}"
        assert open(os.path.join(area.src, name), "rb").read() == \
            open(os.path.join(area.dst, "src", name), "rb").read()


@pytest.mark.parametrize("backend", ["slurm"], indirect=True)
@pytest.mark.parametrize("partition, width", [("dtn", "3"), ("compute", "2")])
def test_default_stripe_width_is_what_the_partition_can_run_at_once(backend, area, partition,
                                                                    width):
    """Four tasks by default, but no more than the partition's CPUs (the testbed's dtn has
    three one-CPU nodes, compute two): a task that waits for another doubles the time.
    A width the user chose is kept."""
    hm = Hpcmove(backend, area)
    with open(os.path.join(area.src, "f"), "wb") as f:
        f.truncate(64 << 20)
    area.own()
    for args, expected in (([], width), (["--stripe-width", "5"], "5")):
        done = hm.run("submit", "--dry-run", "--backend", "slurm", "-p", partition,
                      "--slice-size", "4M", *args, os.path.join(area.src, "f"), area.dst)
        arrays = [line for line in done.stdout.decode().splitlines()
                  if line.startswith("#SBATCH --array=")]
        assert arrays == [f"#SBATCH --array=0-{int(expected) - 1}%{expected}"]
