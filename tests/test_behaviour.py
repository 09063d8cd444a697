"""The shared behaviour suite: the same tests against every backend that runs here
(the local embedded default, the real Slurm testbed and the real Grid Engine through
DRMAA), through the real CLI. A compute job chains on a transfer with
`sbatch --dependency=afterok:ID` on Slurm and `qsub -hold_jid ID` on Grid Engine."""
import filecmp
import json
import os
import shlex
import stat
import subprocess
import time

import pytest

from conftest import already_there, chown_tree, ge, ge_accounting, ge_state, qsub_after, run_as_user, \
    unreadable_set

HOSTILE = [b"a b", b"single'quote", b'double"quote', b"new\nline", b"$(touch pwned)",
           b"`touch pwned`", b"-leading-dash", b"--help", b"\xff\xfe not utf-8",
           b"semi;colon & amp | pipe", b"star*?[x]", b" leading space"]


def tree_equal(a, b):
    """Recursive comparison of content, type, mode and mtime (rsync -a's fidelity)."""
    a, b = os.fsencode(a), os.fsencode(b)
    sa, sb = os.lstat(a), os.lstat(b)
    assert stat.S_IFMT(sa.st_mode) == stat.S_IFMT(sb.st_mode), (a, b)
    if stat.S_ISLNK(sa.st_mode):
        assert os.readlink(a) == os.readlink(b)
        return
    assert stat.S_IMODE(sa.st_mode) == stat.S_IMODE(sb.st_mode), (a, b)
    assert sa.st_mtime_ns == sb.st_mtime_ns, (a, b)
    if stat.S_ISDIR(sa.st_mode):
        names = sorted(os.listdir(a))
        assert names == sorted(os.listdir(b)), (a, b)
        for n in names:
            tree_equal(os.path.join(a, n), os.path.join(b, n))
    else:
        assert filecmp.cmp(a, b, shallow=False), (a, b)


def no_spool_left(directory):
    leftovers = [n for n in os.listdir(directory) if n.startswith(".hpcmove-")]
    assert not leftovers, leftovers


def test_big_file_and_tree(hpcmove, dataset, area):
    job = hpcmove.submit("--slice-size", "64M", "--stripe-width", "3",
                         os.path.join(dataset, "big.bin"), os.path.join(dataset, "tree"),
                         area.dst)
    s = hpcmove.wait(job)
    assert s["state"] == "Done", s["reason"]
    assert subprocess.run(["cmp", os.path.join(dataset, "big.bin"),
                           os.path.join(area.dst, "big.bin")]).returncode == 0
    tree_equal(os.path.join(dataset, "tree"), os.path.join(area.dst, "tree"))
    big = next(f for f in s["files"] if f["src"].endswith("big.bin"))
    assert len(big["slices"]) == 16 and all(x["state"] == "Done" for x in big["slices"])
    assert big["checksum"].startswith("xxh3_128-tree/")
    hosts = {x["host"] for x in big["slices"]}
    if hpcmove.backend == "slurm":
        assert len(hosts) >= 2 and hosts <= {"dtn1", "dtn2", "dtn3"}, hosts
    assert s["bytes_done"] == s["bytes_total"] == (1 << 30) + sum(
        f["size"] for f in s["files"] if f["type"] == "file" and "tree" in f["src"])
    no_spool_left(area.dst)


def test_tree_fidelity(hpcmove, area):
    src = os.path.join(area.src, "t")
    os.makedirs(os.path.join(src, "a", "deep", "er"))
    os.makedirs(os.path.join(src, "empty"))
    os.makedirs(os.path.join(src, "b"))
    with open(os.path.join(src, "a", "data"), "wb") as f:
        f.write(os.urandom(3 << 20))
    os.link(os.path.join(src, "a", "data"), os.path.join(src, "b", "data-hardlink"))
    os.symlink("../a/data", os.path.join(src, "b", "rel-link"))
    os.symlink("/nonexistent/target", os.path.join(src, "dangling"))
    sparse = os.path.join(src, "sparse")
    with open(sparse, "wb") as f:
        f.truncate(256 << 20)
        f.seek(100 << 20)
        f.write(b"island")
    os.chmod(os.path.join(src, "a", "data"), 0o640)
    os.chmod(os.path.join(src, "a", "deep"), 0o750)
    os.utime(os.path.join(src, "a", "deep", "er"), ns=(10**18, 10**18))
    os.utime(os.path.join(src, "empty"), ns=(1, 123456789))
    area.own()
    # small slices and width 3: the hard-linked names land in different tasks
    job = hpcmove.submit("--slice-size", "1M", "--stripe-width", "3", src, area.dst)
    s = hpcmove.wait(job)
    assert s["state"] == "Done", s["reason"]
    out = os.path.join(area.dst, "t")
    tree_equal(src, out)
    assert os.stat(os.path.join(out, "a", "data")).st_ino == \
        os.stat(os.path.join(out, "b", "data-hardlink")).st_ino
    assert os.stat(os.path.join(out, "sparse")).st_blocks * 512 < (8 << 20)
    no_spool_left(area.dst)


def test_hostile_names_arrive_intact_and_run_nothing(hpcmove, area, base):
    src = os.path.join(os.fsencode(area.src), b"in $(touch pwned) 'q'")
    os.makedirs(os.path.join(src, b"sub dir\n$(touch pwned)"))
    expected = {}
    for i, name in enumerate(HOSTILE):
        for parent in (src, os.path.join(src, b"sub dir\n$(touch pwned)")):
            path = os.path.join(parent, name)
            with open(path, "wb") as f:
                f.write(b"content %d of %s" % (i, path))
            expected[os.path.relpath(path, src)] = open(path, "rb").read()
    area.own()
    dst = os.path.join(os.fsencode(area.dst), b"-out `touch pwned` \"x\"")
    os.makedirs(dst)
    chown_tree(dst)
    job = hpcmove.submit("--slice-size", "4K", src, dst + b"/")
    s = hpcmove.wait(job)
    assert s["state"] == "Done", s["reason"]
    out = os.path.join(dst, os.path.basename(src))
    for rel, content in expected.items():
        with open(os.path.join(out, rel), "rb") as f:
            assert f.read() == content, rel
    found = subprocess.run(["find", base, area.home, "-name", "pwned"], capture_output=True)
    assert found.stdout == b""
    assert not os.path.exists(os.path.join(os.path.expanduser("~"), "pwned"))


def test_unreadable_source_fails_job_and_places_nothing(hpcmove, area):
    src = unreadable_set(area)
    job = hpcmove.submit(src, area.dst)
    marker = os.path.join(area.root, "compute-ran")
    chained = chain(hpcmove, area, job, f"touch {shlex.quote(marker)}")
    try:
        check_failed(hpcmove, area, job, src)
        if chained:
            never_starts(hpcmove, area, chained, job)
            assert not os.path.exists(marker)
    finally:
        drop(hpcmove, area, chained, job)


def check_failed(hpcmove, area, job, src):
    waited = hpcmove.run("wait", "--timeout", "600", job, check=False)
    assert waited.returncode == 1  # wait exits 0 only for Done
    s = hpcmove.status(job)
    assert s["state"] == "Failed"
    assert "secret file" in s["reason"]
    bad = next(f for f in s["files"] if f["src"].endswith("secret file"))
    assert bad["state"] == "Failed" and "secret file" in bad["reason"] \
        and "ermission denied" in bad["reason"]
    assert not os.path.exists(os.path.join(area.dst, "set"))
    no_spool_left(area.dst)
    assert sorted(os.listdir(src)) == ["good-1", "good-2", "secret file"]  # source untouched


def test_cancel_during_transfer(hpcmove, dataset, area):
    job = hpcmove.submit("--bwlimit", "20M", "--stripe-width", "2", "--slice-size", "64M",
                         os.path.join(dataset, "big.bin"), area.dst)
    marker = os.path.join(area.root, "compute-ran")
    chained = chain(hpcmove, area, job, f"touch {shlex.quote(marker)}")
    try:
        s = hpcmove.wait_for(job, lambda s: s["state"] == "Active")
        time.sleep(1)
        hpcmove.run("cancel", job)
        s = hpcmove.status(job)
        assert s["state"] == "Cancelled"
        assert not os.path.exists(os.path.join(area.dst, "big.bin"))
        no_spool_left(area.dst)
        if hpcmove.backend == "slurm":
            ids = ",".join(x["id"] for x in s["slurm_job_ids"])
            left = run_as_user(["squeue", "-h", "-j", ids], slurm_user_env(area))
            assert left.stdout.strip() == b""
        if hpcmove.backend == "drmaa":  # the array and finalize are deleted; the gate is not
            record = drmaa_record(hpcmove, job)
            assert ge_state(hpcmove, record["array"].split(".")[0]) is None
            assert ge_state(hpcmove, record["finalize"]) is None
        if chained:
            never_starts(hpcmove, area, chained, job)
            assert not os.path.exists(marker)
    finally:
        drop(hpcmove, area, chained, job)


def test_move_removes_sources_only_after_placing(hpcmove, area):
    src = os.path.join(area.src, "m")
    os.makedirs(os.path.join(src, "inner"))
    payload = {}
    for name in ("one", "inner/two"):
        payload[name] = os.urandom(50_000)
        with open(os.path.join(src, name), "wb") as f:
            f.write(payload[name])
    area.own()
    job = hpcmove.submit("--move", src, area.dst)
    s = hpcmove.wait(job)
    assert s["state"] == "Done", s["reason"]
    for name, data in payload.items():
        with open(os.path.join(area.dst, "m", name), "rb") as f:
            assert f.read() == data
    assert not os.path.exists(src)


def test_skip_existing_leaves_what_is_already_there(hpcmove, area):
    src = os.path.join(area.src, "set")
    os.makedirs(src)
    data = {n: os.urandom(3 << 20) for n in ("same", "differs", "missing", "partly")}
    for n, d in data.items():
        with open(os.path.join(src, n), "wb") as f:
            f.write(d)
    out = os.path.join(area.dst, "set")
    os.makedirs(out)
    for n, d in data.items():
        d = already_there(n, d)
        if d is not None:
            with open(os.path.join(out, n), "wb") as f:
                f.write(d)
    area.own()
    inode = os.stat(os.path.join(out, "same")).st_ino
    job = hpcmove.submit("--skip-existing", "--slice-size", "1M", src, area.dst)
    s = hpcmove.wait(job)
    assert s["state"] == "Done", s["reason"]
    for n, d in data.items():
        assert open(os.path.join(out, n), "rb").read() == d, n
    assert os.stat(os.path.join(out, "same")).st_ino == inode  # left where it was
    skipped = {os.path.basename(f["src"]): [x["skipped"] for x in f["slices"]]
               for f in s["files"] if f["type"] == "file"}
    assert skipped == {"same": [True] * 3, "differs": [False] * 3, "missing": [False] * 3,
                       "partly": [True, False, False]}
    no_spool_left(area.dst)


def test_copyjob_file_pairs(hpcmove, area):
    pairs = []
    for i, name in enumerate(["plain", "with space"]):
        path = os.path.join(area.src, name)
        with open(path, "wb") as f:
            f.write(b"%d" % i * 1000)
        pairs.append((path, os.path.join(area.dst, f"renamed {i}")))
    listing = os.path.join(area.root, "copyjob")
    with open(listing, "w") as f:
        f.write("# source destination\n\n")
        f.writelines(f"{shlex.quote(a)} {shlex.quote(b)}\n" for a, b in pairs)
    area.own()
    job = hpcmove.submit("--from-file", listing)
    s = hpcmove.wait(job)
    assert s["state"] == "Done", s["reason"]
    for a, b in pairs:
        assert open(a, "rb").read() == open(b, "rb").read()


def test_status_json_fields(hpcmove, area):
    with open(os.path.join(area.src, "f"), "wb") as f:
        f.write(b"x" * 5000)
    area.own()
    job = hpcmove.submit("--slice-size", "4K", os.path.join(area.src, "f"),
                         os.path.join(area.dst, "g"))
    s = hpcmove.wait(job)
    assert {"id", "state", "slurm_job_ids", "bytes_total", "bytes_done", "files"} <= set(s)
    assert [x["final"] for x in s["slurm_job_ids"]][-1] is True
    (f,) = s["files"]
    assert {"src", "dst", "size", "state", "reason", "checksum", "slices"} <= set(f)
    assert [(x["offset"], x["length"]) for x in f["slices"]] == [(0, 4096), (4096, 904)]
    assert all({"offset", "length", "state", "host", "attempts"} <= set(x) for x in f["slices"])
    listed = hpcmove.run("list", "--json").stdout
    assert s["id"].encode() in listed and b'"files"' not in listed
    assert open(os.path.join(area.dst, "g"), "rb").read() == b"x" * 5000
    # the hpcmove id works wherever the final batch id does
    assert hpcmove.status(s["id"])["id"] == s["id"]


# --- chaining compute jobs on the final job -------------------------------------------

def chain(hpcmove, area, final, command):
    """A compute job running the sh `command` that may start only once the transfer
    whose final id is `final` succeeded; None on the local backend (no batch system)."""
    if hpcmove.backend == "slurm":
        return sbatch(area, "-p", "compute", f"--dependency=afterok:{final}", "--wrap", command)
    if hpcmove.backend == "drmaa":
        return qsub_after(hpcmove, final, command)
    return None


def never_starts(hpcmove, area, chained, final):
    """The compute job chained on a failed or cancelled transfer waits for good: Slurm
    says its dependency can never be satisfied; on Grid Engine the final (gate) job
    stays held once finalize has left, and so does what holds on it."""
    if hpcmove.backend == "slurm":
        assert wait_pending_reason(area, chained) == "DependencyNeverSatisfied"
        return
    finalize = drmaa_record(hpcmove, final)["finalize"]
    deadline = time.monotonic() + 120
    while ge_state(hpcmove, finalize) is not None:
        assert time.monotonic() < deadline, f"finalize {finalize} did not end"
        time.sleep(0.5)
    time.sleep(3)  # several scheduler runs (1 s interval)
    assert ge_state(hpcmove, final) == "hqw" and ge_state(hpcmove, chained) == "hqw"


def drop(hpcmove, area, chained, final):
    """Remove a compute job that will never run (and, on Grid Engine, the held gate:
    after what holds on it, since deleting the gate releases its dependants)."""
    if hpcmove.backend == "slurm" and chained:
        run_as_user(["scancel", chained], slurm_user_env(area))
    if hpcmove.backend == "drmaa":
        if chained:
            ge(hpcmove, "qdel", chained, check=False)
        ge(hpcmove, "qdel", final, check=False)


def drmaa_record(hpcmove, final):
    """The drmaa backend's registry entry of a job: its array, finalize and gate ids."""
    with open(os.path.join(hpcmove.area.home, "drmaa", f"{final}.json")) as f:
        return json.load(f)


def ended_ok(hpcmove, area, job_id, timeout=300):
    """Whether a compute job ended with exit status 0 (waits for it to end)."""
    if hpcmove.backend == "slurm":
        return sacct_state(area, job_id, timeout) == "COMPLETED"
    deadline = time.monotonic() + timeout
    while not ge_accounting(job_id):  # written when the job has ended
        assert time.monotonic() < deadline, f"job {job_id}: {ge_state(hpcmove, job_id)}"
        time.sleep(1)
    return all(failed == 0 and status == 0 for _t, failed, status, *_ in ge_accounting(job_id))


def slurm_user_env(area):
    return {"PATH": "/usr/bin:/bin", "SLURM_CONF": os.environ["SLURM_CONF"], "HOME": area.home}


def sbatch(area, *args):
    done = run_as_user(["sbatch", "--parsable", *args], slurm_user_env(area), cwd=area.root)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().strip().split(";")[0]


def wait_pending_reason(area, job_id, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = run_as_user(["squeue", "-h", "-j", job_id, "-o", "%T %r"],
                          slurm_user_env(area)).stdout.decode().split()
        if len(out) == 2 and out[0] == "PENDING" and out[1] == "DependencyNeverSatisfied":
            return out[1]
        time.sleep(1)
    return out


def sacct_state(area, job_id, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = run_as_user(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State"],
                          slurm_user_env(area)).stdout.decode().split()
        if out and out[0] not in ("PENDING", "RUNNING", "COMPLETING"):
            return out[0]
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {out}")


# the local backend has no batch system to chain on
@pytest.mark.parametrize("backend", ["slurm", "drmaa"], indirect=True)
def test_compute_job_chains_on_parsable_id(hpcmove, dataset, area):
    big = os.path.join(dataset, "big.bin")
    out = os.path.join(area.dst, "big.bin")
    marker = os.path.join(area.root, "compute-saw")
    check = f"cmp {big} {out} && touch {marker}"
    submit = (f"hpcmove submit --parsable {shlex.join(hpcmove.backend_args)} --slice-size 128M "
              f"{shlex.quote(big)} {shlex.quote(area.dst)}")
    # exactly the documented pattern, through a shell as a user would type it
    if hpcmove.backend == "slurm":
        line = (f"sbatch --parsable -p compute --dependency=afterok:$({submit}) "
                f"--wrap {shlex.quote(check)}")
    else:
        script = os.path.join(area.root, "compute.sh")
        with open(script, "w") as f:
            f.write(f"#!/bin/sh\n{check}\n")
        line = f"qsub -terse -hold_jid $({submit}) -o /dev/null -j y -S /bin/sh {script}"
    done = run_as_user(["bash", "-c", line], hpcmove.env, cwd=area.root)
    assert done.returncode == 0, done.stderr
    compute = done.stdout.decode().strip().split(";")[0]
    assert ended_ok(hpcmove, area, compute)
    assert os.path.exists(marker)


# the local backend has no tasks to kill from outside
@pytest.mark.parametrize("backend", ["slurm", "drmaa"], indirect=True)
def test_task_cancelled_outside_hpcmove_is_recovered_by_finalize(hpcmove, dataset, area):
    job = hpcmove.submit("--bwlimit", "20M", "--stripe-width", "2", "--slice-size", "64M",
                         os.path.join(dataset, "big.bin"), area.dst)
    s = hpcmove.wait_for(job, lambda s: s["state"] == "Active")
    array = next(x["id"] for x in s["slurm_job_ids"] if x["role"] == "transfer")
    if hpcmove.backend == "slurm":
        done = run_as_user(["scancel", f"{array}_1"], slurm_user_env(area))
        assert done.returncode == 0, done.stderr
    else:  # task index 1 is Grid Engine's task 2
        ge(hpcmove, "qdel", array.split(".")[0], "-t", "2")
    s = hpcmove.wait(job)
    assert s["state"] == "Done", s["reason"]
    assert subprocess.run(["cmp", os.path.join(dataset, "big.bin"),
                           os.path.join(area.dst, "big.bin")]).returncode == 0
    no_spool_left(area.dst)
