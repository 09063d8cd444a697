"""Runs in the job that depends on the transfer array: verify, rename into place, clean up.

All or nothing: files are placed only when every slice of every file verified and
no source changed since it was planned; otherwise nothing is placed, the spool is
removed, the job ends Failed with reasons, and this exits 1 so that jobs chained
with afterok never start.

Usage (from the rendered finalize script): python -m hpcmove.finalize JOBDIR
"""
import os
import shutil
import stat
import sys
from types import SimpleNamespace

import xxhash

from . import db, jobdir, notify, plugins, profiling, recover, remote, states, worker
from .backends.local_runner import AFTER_TASKS, GO, STANDBY, standby_job
from .errors import HpcmoveError
from .plan import DIR, FILE, HARDLINK, SYMLINK, hardlink_tmp, spool_path, spool_root


ONE_SLICE = "xxh3_128:"  # a file of one slice: this, then the slice's digest


def file_checksum(slices):
    """Whole-file checksum from the verified slice digests: a single slice is the plain
    xxh3-128 of the data (what `xxhsum -H2` prints); more are hashed as a list."""
    digests = [s.dst_digest for s in sorted(slices, key=lambda s: s.index)]
    if digests[0].startswith("cksum:"):  # from a remote host without xxhsum
        return digests[0] if len(digests) == 1 else \
            "cksum-list:" + xxhash.xxh3_128(" ".join(digests).encode()).hexdigest()
    if len(digests) == 1:
        return ONE_SLICE + digests[0]
    tree = xxhash.xxh3_128(b"".join(bytes.fromhex(d) for d in digests)).hexdigest()
    return f"xxh3_128-tree/{slices[0].length}:{tree}"


def _name(path):
    return os.fsdecode(path)


def task_reason(s, tasks):
    """Why a slice's array task left it unfinished, from the batch system's record."""
    state, node = tasks.get(s.task, ("NOT RUN", ""))
    where = f" on {node}" if node else ""
    return (f"slice at offset {s.offset} was not copied: transfer task {s.task} "
            f"ended {state}{where}")


def source_stats(files):
    """{file id: (size, mtime_ns), or why lstat failed} of the local regular sources."""
    out = {}
    for f in files:
        if f.kind == FILE:
            try:
                st = os.lstat(f.src)
            except OSError as e:
                out[f.id] = e.strerror
                continue
            out[f.id] = (st.st_size, st.st_mtime_ns)
    return out


def source_problem(f, stats):
    """Why a source is no longer what was copied; None when it is. `stats` holds {file
    id: (size, mtime_ns)}, or for a source that is gone None (a remote host's) or the
    reason (source_stats)."""
    st = stats.get(f.id)
    if st is None or isinstance(st, str):
        why = f" ({st})" if st else ""
        return f"source vanished during transfer: {_name(f.src)}{why}"
    size, mtime = st
    if f.kind == FILE and (size != f.size or mtime != f.mtime_ns):
        return f"source changed during transfer: {_name(f.src)}"
    return None


def check(files, slices_by_file, stats):
    """({file id: reason} that failed for good, {file id: reason} on hold,
    {file id: reason} waiting for authentication). `stats`: see source_problem."""
    failed, held, auth = {}, {}, {}
    for f in files:
        if f.kind != FILE:
            continue
        slices = slices_by_file.get(f.id, [])
        bad = [s.reason for s in slices if s.state == states.FAILED]
        if any(s.state == states.AUTH for s in slices):
            auth[f.id] = f"{_name(f.src)}: " + next(s.reason for s in slices
                                                    if s.state == states.AUTH)
            continue
        source = source_problem(f, stats)
        if source:
            bad.insert(0, source)
        if bad:
            failed[f.id] = f"{_name(f.src)}: " + "; ".join(dict.fromkeys(bad))
            continue
        hold = [s.reason for s in slices if s.state != states.DONE]
        if hold:
            held[f.id] = f"{_name(f.src)}: " + "; ".join(dict.fromkeys(hold))
    return failed, held, auth


def _task_states(job):
    if not job.array_id:
        return {}
    try:
        return plugins.backend(job.backend).task_states(job.array_id)
    except Exception as e:  # the reason is a courtesy; never let it hide the failure
        return {-1: (f"unknown ({e})", "")}


def _set_meta(path, f, symlink=False):
    if not symlink:
        os.chmod(path, f.mode)
    os.utime(path, ns=(f.mtime_ns, f.mtime_ns), follow_symlinks=not symlink)


def _fix_meta(path, f):
    """A spool file's mode and mtime as planned, changing only what differs: a task that
    wrote it whole set both (plugins' set_meta); one lstat instead of a chmod and a utime
    (20,000 pulled files: 0.21 s of placement)."""
    st = os.lstat(path)
    if stat.S_IMODE(st.st_mode) != f.mode:
        os.chmod(path, f.mode)
    if st.st_mtime_ns != f.mtime_ns:
        os.utime(path, ns=(f.mtime_ns, f.mtime_ns))


def conflicts(files):
    """What would stop placement half-way, found before anything is placed: a file whose
    destination is a directory, a directory whose destination is something else. Files
    come parents first, so what lies under a directory absent at the destination is
    absent too and not looked up (a pull into a new directory: 22 lstat, not 20,000)."""
    problems, absent = {}, set()
    for f in files:
        path = f.dst.rstrip(b"/")
        if os.path.dirname(path) in absent:
            if f.kind == DIR:
                absent.add(path)
            continue
        try:
            st = os.lstat(f.dst)
        except FileNotFoundError:
            if f.kind == DIR:
                absent.add(path)
            continue
        except OSError as e:
            problems[f.id] = f"{_name(f.dst)}: cannot place: {e.strerror}"
            continue
        is_dir = stat.S_ISDIR(st.st_mode)
        if (f.kind == DIR) != is_dir:
            what = "a directory" if is_dir else "not a directory"
            problems[f.id] = f"{_name(f.dst)}: cannot place: destination is {what}"
    return problems


def fill_skipped(files, slices_by_file):
    """--skip-existing: the ids of files wholly at the destination already (left where
    they are); for files partly there, copy those ranges from the destination into the
    spool file so it is whole before it replaces the destination."""
    in_place, fill = remote.skipped_ranges(files, slices_by_file)
    for dst, tmp, offset, length in fill:
        with open(dst, "rb") as old, open(tmp, "r+b") as new:
            copied = 0
            while copied < length:
                n = os.copy_file_range(old.fileno(), new.fileno(), length - copied,
                                       offset + copied, offset + copied)
                if n == 0:
                    raise OSError(f"{_name(dst)} shrank while being completed")
                copied += n
    return in_place


def place(files, move, in_place=frozenset()):
    """Move the spool's tree into place: first each file's mode and mtime (and symlinks)
    in the spool; then, parents first, a directory not yet at the destination goes with
    everything in it in one rename, anything else one rename each; hard links once their
    targets are in place; directory metadata last, deepest first (placing entries
    changes a directory's mtime)."""
    by_index = {f.index: f for f in files}
    for f in files:
        if f.id in in_place:
            continue
        if f.kind == FILE:
            tmp = spool_path(f.spool, f.dst)
            _fix_meta(tmp, f)
            if move:
                _fsync(tmp)
        elif f.kind == SYMLINK:
            tmp = spool_path(f.spool, f.dst)
            os.symlink(f.link_target, tmp)
            _set_meta(tmp, f, symlink=True)
    moved = set()  # directories renamed whole: what is below them is in place
    below = {}  # parent directory -> in one of them (parents come first: never changes)
    for f in files:
        if f.kind == HARDLINK:
            continue
        parent = os.path.dirname(f.dst.rstrip(b"/"))
        if parent not in below:
            below[parent] = _below(f.dst, moved)
        if below[parent]:
            continue
        if f.id in in_place:  # --skip-existing found it whole: only the metadata
            _set_meta(f.dst, f)
        elif f.kind == DIR:
            if not os.path.lexists(f.dst):
                os.rename(spool_path(f.spool, f.dst), f.dst)
                moved.add(f.dst.rstrip(b"/"))
        else:
            os.rename(spool_path(f.spool, f.dst), f.dst)
    for f in files:
        if f.kind == HARDLINK:
            tmp = hardlink_tmp(f.spool, f.index)
            os.link(by_index[f.link_to].dst, tmp)
            os.rename(tmp, f.dst)
    for d in sorted((f for f in files if f.kind == DIR), key=lambda d: -d.dst.count(b"/")):
        _set_meta(d.dst, d)


def _below(path, dirs):
    """Is `path` inside one of `dirs`?"""
    if not dirs:
        return False
    parent = os.path.dirname(path.rstrip(b"/"))
    while parent not in dirs:
        up = os.path.dirname(parent)
        if up == parent:
            return False
        parent = up
    return True


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_sources(files):
    """--move: sources go only after every copy is verified and in place."""
    for f in files:
        if f.kind != DIR:
            os.unlink(f.src)
    for d in sorted((f for f in files if f.kind == DIR), key=lambda d: -d.src.count(b"/")):
        try:
            os.rmdir(d.src)
        except OSError:
            pass  # something new appeared in it: leave it


def remove_spools(files):
    for spool in {f.spool for f in files}:
        shutil.rmtree(spool, ignore_errors=True)


def hold(job, files, held):
    """Retries ran out: keep the spool (what is done stays done), Hold for a person."""
    with db.atomic():
        for f in files:
            if f.id in held:  # Active -> Wait -> Hold, as the table has it
                db.bulk_state(db.File, "file", db.File.id == f.id, states.WAIT)
                db.bulk_state(db.File, "file", db.File.id == f.id, states.HOLD, reason=held[f.id])
    first = next(iter(held.values()))
    more = f" (and {len(held) - 1} more files)" if len(held) > 1 else ""
    db.set_job_state(job, states.HOLD, reason=f"on hold after retries: {first}{more}; "
                                              f"fix the cause, then: hpcmove retry {job.label}")


def auth_required(job, files, auth):
    """The control socket is gone: files wait (spools kept, local and remote) for
    `hpcmove auth JOB`, which resumes only the slices not Done."""
    with db.atomic():
        for f in files:
            if f.id in auth:
                db.bulk_state(db.File, "file", db.File.id == f.id, states.AUTH, reason=auth[f.id])
    db.set_job_state(job, states.AUTH, reason=f"auth-required: {len(auth)} files wait for the "
                                              f"control socket; open it again with: "
                                              f"hpcmove auth {job.label}")


def fail(job, files, problems):
    failed = [f for f in files if f.id in problems]
    with db.atomic():
        for f in failed:
            db.bulk_state(db.File, "file", db.File.id == f.id, states.FAILED,
                          reason=problems[f.id])
        others = [f.id for f in files if f.id not in problems]
        for chunk in (others[i:i + 500] for i in range(0, len(others), 500)):
            db.bulk_state(db.File, "file", db.File.id.in_(chunk), states.FAILED,
                          reason=states.NOT_PLACED)
    first = problems[failed[0].id]
    more = f" (and {len(failed) - 1} more failed files)" if len(failed) > 1 else ""
    db.set_job_state(job, states.FAILED, reason=first + more)


def finish(job, files, slices_by_file, verified=()):
    """Done: the files, the digests verified at rest (recover.check_integrity's
    `verified`) and the job in one commit (whoever sees Done sees all, and a commit of
    20,000 rows' digests on its own took 0.1 s). A file of one slice takes its checksum
    from that slice's row in the database, as its digest was just recorded there (runs
    of ids, no row sent: 20,000 files 0.023 s against 0.052)."""
    one, rows = [], []
    for f in files:
        slices = slices_by_file[f.id] if f.kind == FILE else []
        checksum = file_checksum(slices) if slices else ""
        if len(slices) == 1 and checksum == ONE_SLICE + slices[0].dst_digest:
            one.append(f.id)
        else:
            rows.append((states.DONE, "", checksum, f.id))
    with db.atomic():
        if verified:
            recover.record_verified(verified)
            verified.clear()  # recorded: not again on finalize's way out
        db.done_from_slice(one, ONE_SLICE)
        db.bulk_update(db.File, ("state", "reason", "checksum"), rows)
        db.set_job_state(job, states.DONE)


def _job_files(path):
    with db.atomic():  # SQLite: waits for a `submit` still recording the job's rows
        job = db.Job.get(db.Job.jobdir == path)
    return job, db.plain(job.files.order_by(db.File.index))


def _files_early(path):
    """The job's files, read while its tasks still run (they change only the rows'
    state, which finalize does not read); None when that fails (read again later)."""
    try:
        db.connect()
        return _job_files(path)[1]
    except Exception:
        return None
    finally:
        db.close()  # no connection held while the tasks run (a server counts them)


def run(path, wait=None):
    """Finalize the job of the job directory `path`. `wait`: started before the tasks
    ended (the local runner's early start), a function that waits for them and answers
    whether they did (tasks_ended); the files' rows are read meanwhile."""
    early = None
    if wait:
        early = _files_early(path)
        if not wait():
            print("hpcmove: finalize: the local runner ended before the job's tasks did; "
                  "nothing was checked or placed", file=sys.stderr)
            return 1
    db.connect()
    if early:
        job, files = db.Job.get(db.Job.jobdir == path), early
    else:
        job, files = _job_files(path)
    far = remote.of_job(job)  # the remote side of a push or pull, or None
    if job.state in (states.CANCELLING, states.CANCELLED):
        _remove_spools(far, files)
        return 1
    if not files and job.state in (states.SUBMITTED, states.FAILED):
        return _unrecorded(job, far)
    if far and far.side == "dst":
        far.start_checks()  # their sessions start while the rows are read
    slices_by_file = {}
    for s in db.plain(db.Slice.select().where(db.Slice.job == job.id).order_by(db.Slice.index)):
        slices_by_file.setdefault(s.file_id, []).append(s)
    stat_sources = far.source_stats if far and far.side == "src" else source_stats
    tasks, stats = {}, None
    if any(s.state != states.DONE for ss in slices_by_file.values() for s in ss):
        tasks = _task_states(job)
    else:  # the tasks read the sources for the last time (unless a retry reads them
        stats = worker.meanwhile(stat_sources, files)  # again): stat them meanwhile
    verified = []  # recorded by finish with Done, else on the way out
    copied = recover.run(job, files, slices_by_file, lambda s: task_reason(s, tasks),
                         verified)
    try:
        try:
            problems, held, auth = check(files, slices_by_file,
                                         stats() if stats and not copied
                                         else stat_sources(files))
            if not problems and not auth and not held and far and far.side == "dst":
                # all or nothing, on the remote host
                problems = far.place(files, far.python, slices_by_file)
        except remote.AuthRequired as e:  # the socket went away while finalize needed it
            problems, held = {}, {}
            auth = {f.id: f"{_name(f.src)}: {e}" for f in files if f.kind == FILE}
        if not problems and auth:
            auth_required(job, files, auth)
            _ended(job, verified)
            return 1
        if not problems and held:
            hold(job, files, held)
            return 1
        if not problems and (not far or far.side == "src"):
            problems = _place_here(files, job, slices_by_file)
        if problems:
            _remove_spools(far, files)
            fail(job, files, problems)
            _ended(job, verified)
            return 1
        if not far or far.side == "src":  # a remote placement removed its spools itself
            _remove_spools(far, files)  # before Done: whoever waits on Done finds nothing of ours
        if job.move:  # before Done too: Done means moved
            _remove_sources(far, job, files)
        finish(job, files, slices_by_file, verified)
        _ended(job, verified)
        return 0
    finally:
        if verified:  # held, or stopped by an error
            recover.record_verified(verified)


def _ended(job, verified):
    """The job's outcome is recorded: the digests verified at rest too (finish records
    them with Done), then the report and mail."""
    if verified:
        recover.record_verified(verified)
        verified.clear()
    notify.job_ended(db.Job.get_by_id(job.id), stream=sys.stdout)


def _unrecorded(job, far):
    """The chain ran, but the job's rows were never committed: on SQLite the tasks start
    while `submit` records them, and that command failed (then the job is Failed already
    and the chain was cancelled, unless that failed too) or was killed (the job is still
    Submitted). Nothing is placed; the spools the tasks filled (named by the manifest)
    go, and the job fails saying why."""
    roots = {spool_root(item["spool"], job.token) for item in jobdir.read_all(job.jobdir)}
    _remove_spools(far, [SimpleNamespace(spool=root) for root in sorted(roots)])
    if job.state == states.SUBMITTED:
        db.set_job_state(job, states.FAILED, reason="submission did not complete: the "
                                                    "submitting command ended before it "
                                                    "recorded the job's files; nothing was "
                                                    "placed")
    notify.job_ended(db.Job.get_by_id(job.id), stream=sys.stdout)
    return 1


def _place_here(files, job, slices_by_file):
    """Place on this host; {file id: reason} of what stopped it (nothing placed then)."""
    problems = conflicts(files)
    if problems:
        return problems
    try:
        place(files, job.move, fill_skipped(files, slices_by_file))
    except OSError as e:
        # os.rename names the spool path first and the destination second
        target = os.fsencode(e.filename2 or e.filename or b"")
        bad = next((f for f in files if target in (f.dst, f.src)), files[0])
        return {bad.id: f"{_name(bad.dst)}: cannot place: {e.strerror or e}"}
    return {}


def _remove_sources(far, job, files):
    """--move: the sources go once every copy is verified, placed and on disk; a source
    that cannot be removed is an event, never a reason to touch the placed data."""
    try:
        if far and far.side == "src":
            far.remove_sources(files)
            return
        if far:
            far.flush(files)
        remove_sources(files)
    except (OSError, HpcmoveError) as e:
        db.event(job.id, "move", f"sources kept: {e}")
        print(f"hpcmove: --move: sources kept: {e}", file=sys.stderr)


def _remove_spools(far, files):
    if far and far.side == "dst":
        far.remove_spools(files)
    else:
        remove_spools(files)


def tasks_ended(environ=os.environ):
    """Started before the tasks ended (the local runner's early start, AFTER_TASKS names
    a pipe): wait for its GO. False when the runner ended without it: then this must
    not run at all, since the tasks may still be writing."""
    fd = environ.pop(AFTER_TASKS, None)
    if fd is None:
        return True
    try:
        with open(int(fd), "rb", closefd=True) as gate:
            return gate.read() == GO
    except (OSError, ValueError) as e:
        print(f"hpcmove: finalize: {AFTER_TASKS}={fd!r} names no pipe ({e})", file=sys.stderr)
        return False


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv == [STANDBY]:
        argv = standby_job()
        if argv is None:
            return 0
    if len(argv) != 1:
        print("usage: python -m hpcmove.finalize JOBDIR", file=sys.stderr)
        return 2
    wait = tasks_ended if AFTER_TASKS in os.environ else None
    return profiling.run("finalize", run, os.fsencode(argv[0]), wait)


if __name__ == "__main__":
    sys.exit(main())
