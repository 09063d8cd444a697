"""The shared PostgreSQL job database (postgres/testbed): many users, one database.

User B must not read, change or cancel user A's jobs, through hpcmove or by talking
to the server directly; an admin sees everything; 64 tasks record at the same moment.
"""
import json
import os
import subprocess

import pytest

from conftest import Hpcmove, run_as_user
from hpcmove import db, states
from test_db import (_record_task, done_rows_match, make_job, plain_matches_models,
                     reserved_ids_hold)


@pytest.fixture(scope="session")
def pg_url():
    url = os.environ.get("HPCMOVE_TEST_PG")
    if not url:
        pytest.fail("PostgreSQL is not up: run tests/run (or postgres/testbed up and "
                    "eval \"$(postgres/testbed env)\")")
    import sys
    done = subprocess.run(["runuser", "-u", "postgres", "--", sys.executable, "-m", "hpcmove",
                           "db", "setup-site", url], capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    return url


def psql(user, sql, url):
    host = url.split("host=")[1].split("&")[0]
    port = url.split("port=")[1].split("&")[0]
    env = {"PATH": "/usr/bin:/bin"}
    return run_as_user(["psql", "-X", "-A", "-t", "-h", host, "-p", port, "-d", "hpcmove",
                        "-c", sql], env, user=user)


def as_user(backend, area, url, user):
    hm = Hpcmove(backend, area, user=user)
    hm.env["HPCMOVE_DB"] = url
    return hm


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as two users")
def test_user_b_cannot_see_change_or_cancel_user_a_jobs(backend, area, pg_url):
    with open(os.path.join(area.src, "a.dat"), "wb") as f:
        f.write(os.urandom(50_000))
    area.own()
    a = as_user(backend, area, pg_url, "hpcmove-u1")
    job = a.submit("--bwlimit", "10K", os.path.join(area.src, "a.dat"), area.dst)
    s = a.status(job)
    number = int(s["id"].split("-")[1])
    b = as_user(backend, area, pg_url, "hpcmove-u2")
    b.env["HPCMOVE_HOME"] = os.path.join(area.root, "home-b")
    listed = json.loads(b.run("list", "--json").stdout)
    assert s["id"] not in [j["id"] for j in listed]
    for command in (["status", s["id"]], ["cancel", s["id"]], ["status", job]):
        done = b.run(*command, check=False)
        assert done.returncode == 1 and b"no job" in done.stderr, done.stderr
    # straight to the server, as user B: nothing visible, nothing changes
    assert psql("hpcmove-u2", f"SELECT count(*) FROM job WHERE id = {number}",
                pg_url).stdout.strip() == b"0"
    assert psql("hpcmove-u2", f"UPDATE job SET state = 'Cancelled' WHERE id = {number}",
                pg_url).stdout.strip() == b"UPDATE 0"
    assert psql("hpcmove-u2", f"DELETE FROM slice WHERE job_id = {number}",
                pg_url).stdout.strip() == b"DELETE 0"
    forged = psql("hpcmove-u2", "INSERT INTO job (token, owner, state, reason, backend, jobdir,"
                  " move, stripe_width, slice_size, n_tasks, bytes_total, created, options)"
                  " VALUES ('x', 'hpcmove-u1', 'Done', '', 'local', '\\x00', false, 1, 1, 0,"
                  " 0, 0, '{}')", pg_url)
    assert forged.returncode != 0 and b"row-level security" in forged.stderr
    # an admin (root is a member of hpcmove_admin) sees it; A's job still ends Done
    assert psql("root", f"SELECT owner FROM job WHERE id = {number}",
                pg_url).stdout.strip() == b"hpcmove-u1"
    s = a.wait(job)
    assert s["state"] == "Done", s["reason"]
    assert open(os.path.join(area.dst, "a.dat"), "rb").read() == \
        open(os.path.join(area.src, "a.dat"), "rb").read()


def test_plain_rows_are_the_models_values_in_postgres(pg_url, tmp_path):
    """psycopg2 hands paths back as memoryview: plain rows still carry bytes."""
    db.connect(pg_url)
    try:
        job, _ = make_job(tmp_path, 5)
        db.File.update(src=b"/caf\xe9 \n$(x)").where(db.File.job == job.id,
                                                       db.File.index == 1).execute()
        db.Slice.update(skipped=True).where(db.Slice.job == job.id, db.Slice.index == 0).execute()
        plain_matches_models(job)
    finally:
        db.close()


@pytest.fixture
def pg_db(pg_url):
    """The models bound to the shared database for one test (as root: an admin role)."""
    db.connect(pg_url)
    yield pg_url
    db.close()


def test_a_plans_ids_come_from_the_tables_sequences_in_postgres(pg_db, tmp_path):
    reserved_ids_hold(tmp_path)


def test_done_rows_are_what_file_checksum_says_in_postgres(pg_db, tmp_path):
    done_rows_match(tmp_path)


def test_64_tasks_record_at_the_same_moment_in_postgres(pg_url, tmp_path):
    import multiprocessing
    db.connect(pg_url)  # root: an admin role, sees and writes every row
    try:
        job, _ = make_job(tmp_path, 64)
        db.bulk_state(db.Slice, "slice", db.Slice.job == job.id, states.PENDING)
        db.bulk_state(db.Slice, "slice", db.Slice.job == job.id, states.ACTIVE)
        tasks = {}
        for sid, task in db.Slice.select(db.Slice.id, db.Slice.task).where(
                db.Slice.job == job.id).tuples():
            tasks.setdefault(task, []).append(sid)
    finally:
        db.close()
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(len(tasks))
    procs = [ctx.Process(target=_record_task, args=(pg_url, ids, barrier))
             for ids in tasks.values()]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    db.connect(pg_url)
    try:
        done = db.Slice.select().where(db.Slice.job == job.id, db.Slice.state == states.DONE)
        assert done.count() == 64
    finally:
        db.close()


def test_a_task_starts_in_its_own_connection_only_on_sqlite(pg_url, tmp_path):
    """On the server a task marks its slices Active at once, in its one connection (a
    second connection per task could pass the server's limit as a large array starts)."""
    from hpcmove import worker
    db.connect(pg_url)
    try:
        job, _ = make_job(tmp_path, 4)
        db.bulk_state(db.Slice, "slice", db.Slice.job == job.id, states.PENDING)
        db.bulk_state(db.File, "file", db.File.job == job.id, states.PENDING)
        db.set_job_state(job, states.PENDING)
        task = db.Slice.select().where(db.Slice.job == job.id).first().task
        mine = db.Slice.select().where(db.Slice.job == job.id, db.Slice.task == task)
        wait = worker.start_meanwhile(job.id, task, "dtn9")
        assert {s.state for s in mine} == {states.ACTIVE}  # before anything waited
        wait()
        assert db.Job.get_by_id(job.id).state == states.ACTIVE
    finally:
        db.close()


def test_a_user_command_never_creates_or_alters_the_shared_schema(tmp_path, pg_url):
    from hpcmove.errors import DatabaseError
    env_url = pg_url.replace("/hpcmove?", "/postgres?")  # a database without the schema
    with pytest.raises(DatabaseError, match="site admin runs `hpcmove db setup-site`"):
        db.connect(env_url)
    db.close()
