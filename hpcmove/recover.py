"""The retry agent, run by finalize before anything is placed (after FTS's retry agent).

1. Integrity: every Done slice is read back from the spool and its digest compared with
   the source digest the worker recorded; a slice whose data changed since (a flipped
   bit, a stray writer) goes back to Wait. For slices pushed to a remote host this is
   their verification on that host (the task does not read them back: once is enough,
   and a range read there costs a pipe), so a mismatch there is sent again too.
2. Retries: slices left Wait (transient errors, mismatches), or still Pending/Active
   because their array task died (killed, node lost, time limit), are copied again here,
   with backoff, until their attempts reach the policy's count.
   Slices left AuthRequired (the control socket to a remote host is gone) stay so:
   copying them needs the socket a person must open again (`hpcmove auth`).
3. What still fails goes to Hold (a person must look; `hpcmove retry` resumes it);
   what cannot succeed by retrying (permission, missing or changed source, no space)
   stays Failed.

Running the retries inside the final job keeps its batch id, the one compute jobs
chain on, valid: no new final job is needed for failures that retrying fixes.
"""
import inspect
import json
import os
import socket

from . import db, plugins, states, worker
from .errors import TransferError
from .plan import spool_path

LEFT_OVER = (states.SUBMITTED, states.PENDING, states.ACTIVE, states.WAIT)
CHECK_CHUNK = 50_000


def _item(f, s):
    return {"slice": s.id, "file": f.id, "src": f.src,
            "spool": spool_path(f.spool, f.dst), "offset": s.offset,
            "length": s.length, "size": f.size, "mtime_ns": f.mtime_ns}


def _set(s, state, **fields):
    """Record a slice's new state where the transition table allows it."""
    db.bulk_state(db.Slice, "slice", db.Slice.id == s.id, state, **fields)
    for k, v in fields.items():
        setattr(s, k, v)
    s.state = state


def check_integrity(engine, files, slices_by_file, chunk=CHECK_CHUNK, verified=None):
    """Done slices whose data (in the spool, or at the destination for a slice that was
    already there) no longer matches their source digest -> Wait, to be copied. One
    call to the engine (one remote session for SSH) per `chunk` slices: a million
    files' paths and digests at once took 300 MB more than the job's rows. The digests
    of slices verified here for the first time are recorded per chunk; with `verified`
    (a list) and one chunk, they go into it instead, for the caller's own commit."""
    done = [(f, s) for f in files for s in slices_by_file.get(f.id, [])
            if s.state == states.DONE]
    keep = verified if verified is not None and len(done) <= chunk else None
    for start in range(0, len(done), chunk):
        if not _check_part(engine, done[start:start + chunk], keep):
            return  # the remote spool cannot be read without its socket: after `auth`


def record_verified(verified):
    """Record the slices of `verified` (their ids) as verified at rest: each one's
    destination digest is its source digest, as _check_part found it."""
    with db.atomic():
        db.verified_at_rest(verified)


def _digests(engine, ranges, sources):
    """engine.digests of the ranges, with each range's source for an engine that takes
    them (`sources=`); an engine written before they existed is called as it was."""
    try:
        takes = "sources" in inspect.signature(engine.digests).parameters
    except (TypeError, ValueError):
        takes = False
    return engine.digests(ranges, sources=sources) if takes else engine.digests(ranges)


def _check_part(engine, done, keep=None):
    try:
        now = _digests(engine, [(f.dst if s.skipped else spool_path(f.spool, f.dst),
                                 s.offset, s.length, f.size) for f, s in done],
                       [f.src for f, _s in done])
    except TransferError as e:
        if not getattr(e, "auth", False):
            raise
        return False
    verified = []  # ids of slices whose task left the verification here
    for (f, s), digest in zip(done, now):
        first = not s.dst_digest
        if digest == s.src_digest:
            if first:
                s.dst_digest = digest[:64]
                verified.append(s.id)
            continue
        what = "differs from the source" if first else "changed after it was verified"
        _set(s, states.WAIT, reason=f"destination slice at offset {s.offset} {what}",
             dst_digest=digest[:64], skipped=False)
        db.event(f.job_id, "integrity", f"{os.fsdecode(f.dst)}: slice {s.index} re-sent")
    if keep is not None:
        keep.extend(verified)
    else:
        record_verified(verified)  # one statement for them all
    return True


def retry(engine, f, s, retries, backoff, why_left):
    """Copy a left-over slice again; it ends Done, Failed or Hold."""
    left = retries - s.attempts
    if left <= 0:
        _set(s, states.HOLD, reason=s.reason or why_left)
        return
    if s.state != states.ACTIVE:
        _set(s, states.ACTIVE)
    r = worker.copy_one(engine, _item(f, s), retries=left, backoff=backoff)
    state = r["state"]
    if state == states.WAIT:  # still failing after the last allowed attempt
        _set(s, states.WAIT)
        state = states.HOLD
    _set(s, state, attempts=s.attempts + r["attempts"], src_digest=r["src"],
         dst_digest=r["dst"], reason=r["reason"] or (why_left if state != states.DONE else ""),
         host=socket.gethostname() if state == states.DONE else s.host)


def run(job, files, slices_by_file, task_reason, verified=None):
    """Integrity check and retries for every regular file; updates slices in place.
    `task_reason(slice)` says why a slice's task left it unfinished; `verified`: see
    check_integrity. Returns how many slices were copied again (their sources read
    once more)."""
    options = json.loads(job.options or "{}")
    retries = options.get("retries", worker.RETRIES)
    backoff = options.get("retry_backoff", 1)
    engine = plugins.make_engine(options)
    check_integrity(engine, files, slices_by_file, verified=verified)
    copied = 0
    for f in files:
        slices = slices_by_file.get(f.id, [])
        if any(s.state == states.FAILED for s in slices):
            continue  # the file cannot be placed; copying its other slices is wasted
        for s in slices:
            if s.state in LEFT_OVER:
                retry(engine, f, s, retries, backoff, task_reason(s))
                copied += 1
    return copied
