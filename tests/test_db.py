"""The job database: transitions enforced on rows, and many array tasks recording at
the same moment without losing a result to 'database is locked'."""
import multiprocessing
import os
import uuid

import pytest

from hpcmove import db, states, worker
from hpcmove.errors import DatabaseError, IllegalTransition
from hpcmove.plan import Options, plan


def make_job(tmp_path, n_files=64):
    src = tmp_path / "src"
    src.mkdir(parents=True)
    for i in range(n_files):
        (src / f"f{i}").write_bytes(b"x" * 10)
    (tmp_path / "dst").mkdir()
    token = uuid.uuid4().hex[:12]  # unique also in a shared database that outlives the test
    the_plan = plan([str(src)], str(tmp_path / "dst"), Options(stripe_width=n_files), token)
    job = db.Job.create(token=token, owner="me", backend="local", jobdir=b"/nowhere",
                        stripe_width=n_files, slice_size=1 << 20, n_tasks=the_plan.n_tasks,
                        bytes_total=the_plan.bytes_total)
    db.insert_plan(job, the_plan)
    return job, the_plan


@pytest.fixture
def url(tmp_path):
    u = f"sqlite:///{tmp_path}/jobs.db"
    db.connect(u)
    yield u
    db.close()


def test_illegal_job_transition_raises(url, tmp_path):
    job, _ = make_job(tmp_path, 2)
    job = db.set_job_state(job, states.PENDING)
    job = db.set_job_state(job, states.DONE)
    with pytest.raises(IllegalTransition):
        db.set_job_state(job, states.ACTIVE)
    assert db.Job.get_by_id(job.id).state == states.DONE
    assert db.Event.select().where(db.Event.job == job.id).count() == 2


def test_bulk_state_skips_rows_that_may_not_move(url, tmp_path):
    job, _ = make_job(tmp_path, 3)
    first = db.Slice.select().first()
    db.Slice.update(state=states.DONE).where(db.Slice.id == first.id).execute()
    moved = db.bulk_state(db.Slice, "slice", db.Slice.job == job.id, states.CANCELLED)
    assert moved == 2
    assert db.Slice.get_by_id(first.id).state == states.DONE


def plain_matches_models(job):
    """db.plain's rows carry what peewee's model instances carry (bytes paths, bools)."""
    for query in (job.files.order_by(db.File.index),
                  db.Slice.select().where(db.Slice.job == job.id).order_by(db.Slice.id)):
        rows, models = db.plain(query), list(query.clone())
        assert len(rows) == len(models) > 0
        for row, model in zip(rows, models):
            want = {f.name: getattr(model, f.name) if not isinstance(
                f, db.pw.ForeignKeyField) else getattr(model, f.name + "_id")
                for f in query.model._meta.sorted_fields}
            got = {name: getattr(row, name) for name in want}
            assert got == want and all(type(got[k]) is type(want[k]) for k in want)
            if hasattr(row, "file_id"):
                assert row.file_id == model.file_id and row.job_id == model.job_id


def reserved_ids_hold(tmp_path):
    """A plan's rows carry the ids given out before they were written (the manifest
    names them): files by entry, slices in plan order, each slice under its file; the
    next job's ids and the table's own next id do not collide with them."""
    job, the_plan = make_job(tmp_path / "a", 3)
    files = list(db.File.select().where(db.File.job == job.id).order_by(db.File.index))
    slices = list(db.Slice.select().where(db.Slice.job == job.id).order_by(db.Slice.id))
    assert len(files) == len(the_plan.entries) and len(slices) == len(the_plan.slices)
    assert [f.index for f in files] == [e.index for e in the_plan.entries]
    by_index = {f.index: f.id for f in files}
    for row, s in zip(slices, the_plan.slices):
        assert row.file_id == by_index[s.entry] and (row.index, row.offset) == (s.index, s.offset)
    second, _ = make_job(tmp_path / "b", 3)
    assert not {f.id for f in second.files} & set(by_index.values())
    assert not {s.id for s in second.slices} & {s.id for s in slices}
    fresh = db.File.create(job=job, index=99, kind="dir", src=b"s", dst=b"d", spool=b"p")
    assert fresh.id not in set(by_index.values()) | {f.id for f in second.files}


def test_a_plans_ids_are_given_out_before_its_rows_go_in(url, tmp_path):
    reserved_ids_hold(tmp_path)


def test_plain_rows_are_the_models_values(url, tmp_path):
    job, _ = make_job(tmp_path, 5)
    db.File.update(src=b"/caf\xe9 \n$(x)").where(db.File.index == 1).execute()
    db.Slice.update(skipped=True).where(db.Slice.index == 0).execute()
    plain_matches_models(job)
    # a million files and their slices took 1.9 GB as one dict each, 0.8 GB so
    files = db.plain(job.files.order_by(db.File.index))
    assert not hasattr(files[0], "__dict__")
    assert len({f.spool for f in files}) == 1 and len({id(f.spool) for f in files}) == 1
    files[1].state = states.DONE  # finalize updates its rows as it goes
    assert files[1].state == states.DONE and files[2].state == states.SUBMITTED


def test_a_task_starts_its_own_slices_by_number(url, tmp_path):
    """start_task marks Active exactly the slices (and their files) numbered for the task,
    and returns those of its slices already Done (a requeued task skips them)."""
    job, _ = make_job(tmp_path, 8)
    by_task = {}
    for s in db.Slice.select():
        by_task.setdefault(s.task, []).append(s)
    assert len(by_task) >= 2
    task, mine = sorted(by_task.items())[0]
    db.Slice.update(state=states.DONE).where(db.Slice.id == mine[0].id).execute()
    db.bulk_state(db.Slice, "slice", db.Slice.state != states.DONE, states.PENDING)
    db.bulk_state(db.File, "file", db.File.job == job.id, states.PENDING)
    db.set_job_state(job, states.PENDING)
    done = worker.start_task(job.id, task, "dtn9")
    assert done == {mine[0].id}
    active = {s.id for s in db.Slice.select().where(db.Slice.state == states.ACTIVE,
                                                    db.Slice.host == "dtn9")}
    assert active == {s.id for s in mine[1:]}
    files = {f.id for f in db.File.select().where(db.File.state == states.ACTIVE)}
    assert files == {s.file_id for s in mine}
    assert db.Job.get_by_id(job.id).state == states.ACTIVE


def test_a_task_records_results_only_after_its_start_in_a_thread(url, tmp_path,
                                                                    monkeypatch):
    """The worker marks its slices Active in a thread of its own while the first units
    move; the first flush of results waits for it (Pending -> Active -> Done), and what
    it raised is raised there."""
    job, _ = make_job(tmp_path, 4)
    db.bulk_state(db.Slice, "slice", db.Slice.job == job.id, states.PENDING)
    db.bulk_state(db.File, "file", db.File.job == job.id, states.PENDING)
    db.set_job_state(job, states.PENDING)
    task = db.Slice.select().first().task
    mine = [s.id for s in db.Slice.select().where(db.Slice.task == task)]
    rec = worker.Recorder("dtn9", before=worker.start_meanwhile(job.id, task, "dtn9"))
    for n, sid in enumerate(mine):  # Wait may only follow Active: written too soon, lost
        rec.add({"slice": sid, "state": states.WAIT if n == 0 else states.DONE,
                 "seconds": 0.1, "attempts": 1, "src": "ab", "dst": "ab", "reason": ""})
    rec.flush()
    got = {s.id: s.state for s in db.Slice.select().where(db.Slice.id.in_(mine))}
    assert got == {sid: states.WAIT if n == 0 else states.DONE for n, sid in enumerate(mine)}
    assert db.Job.get_by_id(job.id).state == states.ACTIVE

    def refused(*_args):
        raise RuntimeError("the database refused")
    monkeypatch.setattr(worker, "start_task", refused)
    rec = worker.Recorder("dtn9", before=worker.start_meanwhile(job.id, task, "dtn9"))
    with pytest.raises(RuntimeError, match="the database refused"):
        rec.flush()


def test_database_file_is_private(tmp_path):
    path = tmp_path / "sub" / "jobs.db"
    db.connect(f"sqlite:///{path}")
    db.close()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"


def test_corrupt_database_is_a_clear_error(tmp_path):
    path = tmp_path / "jobs.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(DatabaseError, match="cannot use the job database"):
        db.connect(f"sqlite:///{path}")


def _record_task(url, slice_ids, barrier):
    db.connect(url)
    barrier.wait()
    rec = worker.Recorder(host=f"node{os.getpid()}")
    for sid in slice_ids:
        rec.add({"slice": sid, "state": states.DONE, "seconds": 0.01, "attempts": 1,
                 "src": "ab", "dst": "ab", "reason": ""})
    rec.flush()
    db.close()


def test_many_tasks_record_at_the_same_moment(url, tmp_path):
    job, _ = make_job(tmp_path, 64)
    db.bulk_state(db.Slice, "slice", db.Slice.job == job.id, states.PENDING)
    db.bulk_state(db.Slice, "slice", db.Slice.job == job.id, states.ACTIVE)
    tasks = {}
    for sid, task in db.Slice.select(db.Slice.id, db.Slice.task).tuples():
        tasks.setdefault(task, []).append(sid)
    assert len(tasks) >= 32
    db.close()
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(len(tasks))
    procs = [ctx.Process(target=_record_task, args=(url, ids, barrier)) for ids in tasks.values()]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    db.connect(url)
    done = db.Slice.select().where(db.Slice.job == job.id, db.Slice.state == states.DONE)
    assert done.count() == 64
    assert len({s.host for s in done}) == len(tasks)


def test_upgrade_from_schema_1_keeps_every_row(tmp_path):
    url = f"sqlite:///{tmp_path}/old.db"
    db.connect(url)
    job, _ = make_job(tmp_path, 3)
    database = db.proxy.obj
    database.execute_sql("DROP INDEX slice_job_id_state")  # what schema 1 lacked
    database.execute_sql("ALTER TABLE slice DROP COLUMN skipped")
    database.execute_sql("DROP TABLE controlsocket")
    db.SchemaVersion.delete().execute()
    db.SchemaVersion.create(version=1)
    db.close()
    db.connect(url)  # a user's own SQLite file is upgraded on the fly
    try:
        assert db.schema_version(db.proxy.obj) == db.SCHEMA_VERSION == 4
        assert db.proxy.obj.table_exists("controlsocket")
        names = [i.name for i in db.proxy.obj.get_indexes("slice")]
        assert "slice_job_id_state" in names
        assert "skipped" in [c.name for c in db.proxy.obj.get_columns("slice")]
        assert not any(s.skipped for s in db.Slice.select())
        assert db.Slice.select().where(db.Slice.job == job.id).count() == 3
    finally:
        db.close()


def test_a_newer_schema_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path}/new.db"
    db.connect(url)
    db.SchemaVersion.create(version=99)
    db.close()
    with pytest.raises(DatabaseError, match="newer than this hpcmove"):
        db.connect(url)


def test_the_at_rest_check_names_each_ranges_source_to_an_engine_that_takes_them(url, tmp_path):
    """An engine whose digests() takes `sources` gets each range's source (the ssh
    engine checks a pushed file whole with them); one written before they existed (the
    stand-in of the test below) is called with the ranges alone."""
    from hpcmove import plugins, recover
    from hpcmove.plan import spool_path
    job, _ = make_job(tmp_path, 4)
    files = db.plain(job.files.order_by(db.File.index))
    db.Slice.update(state=states.DONE, src_digest="d").where(db.Slice.job == job.id).execute()
    by_file = {}
    for s in db.plain(db.Slice.select().where(db.Slice.job == job.id)):
        by_file.setdefault(s.file_id, []).append(s)
    seen = []

    class Engine(type(plugins.make_engine({}))):
        def digests(self, ranges, sources=None):
            seen.append((ranges, sources))
            return ["d"] * len(ranges)

    recover.check_integrity(Engine(), files, by_file)
    done = [(f, s) for f in files for s in by_file.get(f.id, [])]
    assert len(done) >= 3 and seen == [
        ([(spool_path(f.spool, f.dst), s.offset, s.length, f.size) for f, s in done],
         [f.src for f, _s in done])]


@pytest.mark.parametrize("chunk, keep", [(3, False), (3, True), (50, True)])
def test_the_at_rest_check_goes_in_chunks_and_finds_a_changed_spool_file(url, tmp_path,
                                                                         chunk, keep):
    """finalize's integrity check asks the engine a chunk of slices at a time (a million
    files' paths and digests at once cost 300 MB): every Done slice is still checked, a
    spool file changed since its task copied it goes back to Wait, the rest are
    recorded as verified: at once, or (one chunk, finalize's list) left to the caller's
    commit."""
    from hpcmove import plugins, recover
    from hpcmove.plan import spool_path
    job, _ = make_job(tmp_path, 7)
    files = db.plain(job.files.order_by(db.File.index))
    engine = plugins.make_engine({})
    for f in files:
        if f.kind == "file":
            os.makedirs(os.path.dirname(spool_path(f.spool, f.dst)), exist_ok=True)
            with open(spool_path(f.spool, f.dst), "wb") as out:
                out.write(b"x" * 10)
    digest = engine.digest(spool_path(files[1].spool, files[1].dst), 0, 10)
    db.Slice.update(state=states.DONE, src_digest=digest).where(
        db.Slice.job == job.id).execute()
    slices = db.plain(db.Slice.select().where(db.Slice.job == job.id))
    by_file = {}
    for s in slices:
        by_file.setdefault(s.file_id, []).append(s)
    changed = files[4]
    with open(spool_path(changed.spool, changed.dst), "r+b") as f:
        f.write(b"y")
    calls = []
    real = engine.digests
    engine.digests = lambda ranges: calls.append(len(ranges)) or real(ranges)
    verified = [] if keep else None
    recover.check_integrity(engine, files, by_file, chunk=chunk, verified=verified)
    assert calls == ([3, 3, 1] if chunk == 3 else [7])
    after = {s.file_id: s for s in db.Slice.select().where(db.Slice.job == job.id)}
    assert after[changed.id].state == states.WAIT
    assert "differs from the source" in after[changed.id].reason
    left = chunk == 50
    assert all(s.state == states.DONE and s.dst_digest == ("" if left else digest)
               for f, s in after.items() if f != changed.id)
    if keep:
        assert sorted(verified) == sorted(s.id for f, s in after.items()
                                          if f != changed.id and left)


def test_id_runs():
    assert db.id_runs([]) == []
    assert db.id_runs([7, 3, 4, 5, 9, 10, 1]) == [(1, 1), (3, 5), (7, 7), (9, 10)]


def test_slices_verified_at_rest_take_their_source_digest_and_no_other_does(url, tmp_path):
    from hpcmove import recover
    job, _ = make_job(tmp_path, 5)
    ids = [s.id for s in db.Slice.select().where(db.Slice.job == job.id).order_by(db.Slice.id)]
    for i in ids:
        db.Slice.update(src_digest=f"{i:064x}ff").where(db.Slice.id == i).execute()
    db.Slice.update(dst_digest="differs").where(db.Slice.id == ids[2]).execute()
    recover.record_verified([ids[0], ids[1], ids[3]])
    assert [s.dst_digest for s in db.Slice.select().where(db.Slice.job == job.id)
            .order_by(db.Slice.id)] == [f"{ids[0]:064x}", f"{ids[1]:064x}", "differs",
                                        f"{ids[3]:064x}", ""]


def done_rows_match(tmp_path):
    """finalize.finish records what file_checksum says of each file (a file of one slice
    from its slice's row, the others sent as rows) and the digests verified at rest,
    whether their ids come in runs or alone; nothing of another job changes."""
    from hpcmove import finalize
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for name, size in (("a", 5), ("b", 8), ("c", 20), ("e", 0), ("sub/d", 3)):
        (src / name).write_bytes(b"x" * size)
    (tmp_path / "dst").mkdir()
    jobs = []
    for _ in range(2):
        token = uuid.uuid4().hex[:12]
        the_plan = plan([str(src)], str(tmp_path / "dst"), Options(slice_size=8, stripe_width=2),
                        token)
        job = db.Job.create(token=token, owner="me", backend="local", jobdir=b"/nowhere",
                            stripe_width=2, slice_size=8, n_tasks=the_plan.n_tasks,
                            bytes_total=the_plan.bytes_total)
        db.insert_plan(job, the_plan)
        jobs.append(db.set_job_state(job, states.PENDING))
    job, other = jobs
    files = db.plain(job.files.order_by(db.File.index))
    slices = db.plain(db.Slice.select().where(db.Slice.job == job.id).order_by(db.Slice.id))
    by_file, verified = {}, []
    for s in slices:
        by_file.setdefault(s.file_id, []).append(s)
        digest = "cksum:99 8" if s.length == 8 and s.index == 0 and len(
            [t for t in slices if t.file_id == s.file_id]) == 1 else f"{s.id:032x}"
        # odd ids were verified by their task; even ones at rest just now (finalize's list)
        db.Slice.update(state=states.DONE, src_digest=digest,
                        dst_digest=digest if s.id % 2 else "").where(
                            db.Slice.id == s.id).execute()
        s.state, s.src_digest, s.dst_digest = states.DONE, digest, digest
        if not s.id % 2:
            verified.append(s.id)
    assert len(slices) == 7 and any(len(ss) == 3 for ss in by_file.values())
    finalize.finish(job, files, by_file, verified)
    assert verified == []  # recorded
    rows = {f.id: f for f in db.File.select().where(db.File.job == job.id)}
    assert {f.id: (f.state, f.checksum) for f in rows.values()} == {
        f.id: (states.DONE, finalize.file_checksum(by_file[f.id]) if f.kind == "file" else "")
        for f in files}
    assert {r.checksum.split(":")[0] for r in rows.values()} >= {
        "xxh3_128", "xxh3_128-tree/8", "cksum", ""}
    assert all(s.dst_digest == s.src_digest
               for s in db.Slice.select().where(db.Slice.job == job.id))
    assert db.Job.get_by_id(job.id).state == states.DONE
    assert {(f.state, f.checksum) for f in other.files} == {(states.SUBMITTED, "")}
    assert {s.dst_digest for s in other.slices} == {""}


def test_done_rows_are_what_file_checksum_says(url, tmp_path):
    done_rows_match(tmp_path)
