"""Runs inside one batch array task: copy and verify this task's slices, record results.

Usage (from the rendered transfer script): python -m hpcmove.worker JOBDIR TASK
Exit status 0 when every slice of the task is Done, 1 otherwise.
"""
import concurrent.futures
import json
import queue
import threading
import os
import socket
import sys
import time

from . import db, jobdir, notify, plugins, profiling, states
from .backends.local_runner import STANDBY, standby_job
from .errors import TransferError
from .plan import spool_root

RETRIES = 3  # transient I/O errors retried in the task
FLUSH_SECONDS = 1.0  # results are written in batches, not one transaction per slice


class Recorder:
    """Buffers slice results and writes them in one transaction at a time; `before`, if
    given, is called (once) before the first write: what must be in the database first."""

    def __init__(self, host, before=None):
        self.host, self.pending, self.last = host, [], time.monotonic()
        self.before = before

    def add(self, result):
        self.pending.append(result)
        if time.monotonic() - self.last >= FLUSH_SECONDS:
            self.flush()

    def flush(self):
        if self.before:
            self.before, before = None, self.before
            before()
        if not self.pending:
            return
        with db.atomic():
            db.record_results(self.host, self.pending)
        self.pending, self.last = [], time.monotonic()


def copy_one(engine, item, retries=RETRIES, backoff=0.5):
    """Copy one slice, retrying transient errors and verification mismatches with backoff
    up to `retries` attempts in all. The result's state is Done; Wait when it kept failing
    in a way a later retry may fix; or Failed when retrying cannot help (permission,
    missing or changed source, no space)."""
    work = plugins.SliceWork(item["src"], item["spool"], item["offset"], item["length"],
                             item["size"], item["mtime_ns"])
    start, attempts, src, dst = time.monotonic(), 0, "", ""
    state, reason = states.WAIT, "not attempted: no retries left"
    while attempts < max(1, retries):
        if attempts:
            time.sleep(backoff * 2 ** (attempts - 1))
        attempts += 1
        try:
            src, dst = engine.copy_slice(work)
        except TransferError as e:
            src = dst = ""
            if getattr(e, "auth", False):  # the control socket is gone: no use retrying
                state, reason = states.AUTH, str(e)
                break
            state, reason = (states.WAIT, str(e)) if e.transient else (states.FAILED, str(e))
            if not e.transient:
                break
            continue
        if dst is None:  # the engine leaves verification to finalize's at-rest check
            state, reason, dst = states.DONE, "", ""
            break
        if src == dst:
            state, reason = states.DONE, ""
            break
        state, reason = states.WAIT, (f"verification failed: destination slice at offset "
                                      f"{item['offset']} differs from source")
    return {"slice": item["slice"], "state": state, "seconds": time.monotonic() - start,
            "attempts": attempts, "src": src, "dst": dst, "reason": reason}


def skip_one(engine, item):
    """--skip-existing: a Done result, marked skipped, when the destination already holds
    this slice; None when it must be copied."""
    found = skip_many(engine, [item])
    return found[0][1] if found else None


def skip_many(engine, items):
    """--skip-existing: [(item, Done result marked skipped)] for the items whose final
    path already holds their bytes; an engine that can asks once for all of them (over
    SSH: one remote session for a bundle's files). A check that cannot be made leaves the
    item to be copied, which then reports what is wrong."""
    start = time.monotonic()
    try:
        if hasattr(engine, "existing"):
            found = engine.existing(items)
        else:
            found = {}
            for item in items:
                work = plugins.SliceWork(item["src"], item["spool"], item["offset"],
                                         item["length"], item["size"], item["mtime_ns"])
                digest, same = engine.already_there(work, item["dst"])
                if same:
                    found[item["slice"]] = digest
    except TransferError:
        return []
    seconds = (time.monotonic() - start) / max(1, len(items))
    return [(item, {"slice": item["slice"], "state": states.DONE, "seconds": seconds,
                    "attempts": 1, "src": found[item["slice"]], "dst": found[item["slice"]],
                    "reason": "", "skipped": True})
            for item in items if item["slice"] in found]


def _mine(job_id, task):
    return (db.Slice.job == job_id) & (db.Slice.task == task)


def done_slices(job_id, task):
    """The ids of this task's slices already Done (a requeued task skips them)."""
    return {sid for (sid,) in db.Slice.select(db.Slice.id).where(
        _mine(job_id, task), db.Slice.state == states.DONE).tuples()}


def start_task(job_id, task, host):
    """Mark the job, and the files and slices of this task, Active; return the ids of its
    slices already Done. By the slices' task number, one statement per table: every
    slice not Done is in exactly one task file, the one of its number (retry and catch-up
    renumber the slices they resubmit). Lists of 10,000 ids cost 0.3-0.5 s of SQL
    building per task, holding the database's write lock while the job's other tasks
    waited to start."""
    mine = _mine(job_id, task)
    with db.atomic():
        began = db.try_job_state(job_id, states.ACTIVE)
        done = done_slices(job_id, task)
        db.bulk_state(db.Slice, "slice", mine, states.ACTIVE, host=host)
        db.bulk_state(db.File, "file", db.File.id.in_(
            db.Slice.select(db.Slice.file).where(mine)), states.ACTIVE)
    if began:  # this task moved the job to Active: the first to start; mail after commit
        notify.job_began(job_id)
    return done


def start_meanwhile(job_id, task, host):
    """start_task in a thread of its own (its own database connection), so that the
    task's first units move while it waits for SQLite's one write lock (the job's other
    tasks start at the same moment) and writes; returns a function that waits for it and
    raises what it raised. Results are recorded only after it (Recorder's `before`):
    Pending -> Active -> Done, as the table has it. A database server locks rows, not
    the database, and counts connections (a second one per task could pass its limit
    when a large array starts): there start_task runs here, at once."""
    if not db.is_sqlite(db.proxy.obj):
        start_task(job_id, task, host)
        return lambda: None

    def start():
        try:
            start_task(job_id, task, host)
        finally:
            db.close()  # this thread's connection
    return meanwhile(start)


def meanwhile(fn, *args):
    """Start fn(*args) in a thread; returns a function that waits for its result (or
    raises its exception)."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future.result


def hand_back(items, done):
    """Paused: this task's slices not yet copied go back to Pending for a later task."""
    ids = [i["slice"] for i in items if i["slice"] not in done]
    with db.atomic():
        for chunk in _chunks(ids):
            db.bulk_state(db.Slice, "slice", db.Slice.id.in_(chunk), states.PENDING, host="")


def _chunks(seq, n=500):
    return (seq[i:i + n] for i in range(0, len(seq), n))


def run(path, task):
    items = jobdir.read_task(path, task)
    db.connect()
    job = db.Job.get(db.Job.jobdir == os.fsencode(path))
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    done = done_slices(job.id, task)  # a read: it does not wait for the write lock
    started = start_meanwhile(job.id, task, host)
    options = json.loads(job.options)
    engine = plugins.make_engine(options)
    if hasattr(engine, "defer_verify"):  # finalize hashes every slice at rest anyway
        engine.defer_verify = True
    retries, backoff = options.get("retries", RETRIES), options.get("retry_backoff", 0.5)
    skip_existing = options.get("skip_existing", False)
    recorder = Recorder(host, before=started)

    def one(eng, unit):
        """[(item, result)] of one unit of work; result None: handed back (paused)."""
        if jobdir.paused(path):  # finish the current slices, hand the rest back, stop
            return [(item, None) for item in unit]
        if len(unit) > 1:  # a bundle of small files: one transfer for all of them
            skipped = skip_many(eng, unit) if skip_existing else []
            there = {item["slice"] for item, _r in skipped}
            rest = [item for item in unit if item["slice"] not in there]
            if len(rest) <= 1:
                return skipped + [(item, copy_one(eng, item, retries, backoff)) for item in rest]
            out = eng.copy_bundle(rest)
            # what the bundle did not finish is copied again one by one (not when the
            # bundle failed for a reason no retry mends: a full or read-only disk)
            return skipped + [(item, r if r["state"] in (states.DONE, states.AUTH, states.FAILED)
                               else copy_one(eng, item, retries, backoff)) for item, r in out]
        item = unit[0]
        result = skip_one(eng, item) if skip_existing else None
        return [(item, result or copy_one(eng, item, retries, backoff))]

    todo = [i for i in items if i["slice"] not in done]
    for item in todo:  # bundles are made per spool and name files by their path in it
        item["root"] = spool_root(item["spool"], job.token)
    units = engine.units(todo) if hasattr(engine, "units") else [[i] for i in todo]
    # the next unit's session starts while this one moves (not when it may be skipped)
    ahead = None if skip_existing or not hasattr(engine, "prepare") else type(engine).prepare
    failed, handed = 0, []
    for results, left in _streams(engine, one, units, ahead):
        for item, result in results:
            if result is None:
                handed.append(item)
                continue
            failed += result["state"] != states.DONE
            recorder.add(result)
        if left < getattr(engine, "streams", 1):
            # the last wave, streams ending one by one: each unit's results are recorded
            # as it ends, so that the flush below, which finalize waits for, holds only
            # the last unit's (20,000 files on six streams: 1,667 rows, not 10,000)
            recorder.flush()
    recorder.flush()  # waits for start_task first, also when there was nothing to record
    if handed:
        hand_back(handed, done)
        return 0
    return 1 if failed else 0


def _streams(engine, one, units, ahead=None):
    """([(item, result)] of a unit, how many units are still to end) for every unit as it
    ends, `engine.streams` units at a time: each stream takes the next unit when it
    finishes one (next-available queueing, as MPSCP's streams do). Results come back to
    this thread, which alone records them. With `ahead`, a stream that takes a unit
    calls ahead(its engine, the unit next in line) once for that unit, to start what it
    needs while this one works."""
    width = min(getattr(engine, "streams", 1), len(units))
    if width <= 1:
        for k, unit in enumerate(units):
            yield one(engine, unit), len(units) - k - 1
        return
    work, results = queue.Queue(), queue.Queue()
    for unit in units:
        work.put(unit)

    prepared = set()
    streaming = [width]  # streams still taking units

    def leave(eng):
        """A stream whose connection is gone (AuthRequired) leaves while another still
        takes units: each further unit would only fail on it. The last one stays and
        takes the rest, so that no unit is lost."""
        if not getattr(eng, "gone", False):
            return False
        with work.mutex:
            if streaming[0] > 1:
                streaming[0] -= 1
                return True
        return False

    def stream(eng):
        while not leave(eng):
            try:
                unit = work.get_nowait()
            except queue.Empty:
                return
            with work.mutex:
                nxt = work.queue[0] if ahead and work.queue else None
                if nxt is not None and id(nxt) in prepared:
                    nxt = None
                elif nxt is not None:
                    prepared.add(id(nxt))
            if nxt is not None:
                try:
                    ahead(eng, nxt)
                except Exception:  # only a head start: that unit opens its own session
                    pass
            try:
                results.put(one(eng, unit))
            except BaseException as e:  # never lose a slice: report it as failed
                results.put([(item, {"slice": item["slice"], "state": states.WAIT,
                                     "seconds": 0.0, "attempts": 1, "src": "", "dst": "",
                                     "reason": f"stream error: {e}"}) for item in unit])

    threads = [threading.Thread(target=stream, args=(engine.fork() if n else engine,),
                                daemon=True) for n in range(width)]
    for t in threads:
        t.start()
    for k in range(len(units)):
        yield results.get(), len(units) - k - 1
    for t in threads:
        t.join()


def _warm():
    """Started ahead by the local runner: import the engines a task may use now, while
    `submit` still plans (a broken one is reported when a task asks for it)."""
    for name in ("copy", "ssh"):
        try:
            plugins.load("engine", name)
        except Exception:
            pass


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv == [STANDBY]:
        _warm()
        argv = standby_job()
        if argv is None:
            return 0
    if len(argv) != 2:
        print("usage: python -m hpcmove.worker JOBDIR TASK", file=sys.stderr)
        return 2
    path = os.fsencode(argv[0])
    # a job fed in chunks runs arrays whose indices start again at 0
    offset = int(os.environ.get("HPCMOVE_TASK_OFFSET") or 0)
    return profiling.run("worker", run, path, int(argv[1]) + offset)


if __name__ == "__main__":
    sys.exit(main())
