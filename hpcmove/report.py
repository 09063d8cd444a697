"""A job's report (report.json, report.txt in <jobdir>/logs/) and its batch output.

The report is written when a job ends so that what happened survives in plain files
beside the batch logs: a user reads report.txt, a script reads report.json, mail
carries the text. It is built with one query per table (files, slices aggregated in
SQL, events) so a job of millions of files costs three queries, not millions.
"""
import datetime
import json
import os
import re
import time
from collections import Counter

from peewee import Case, fn

from . import db, jobs, states
from .plan import FILE
from .units import human

JSON_NAME, TEXT_NAME = b"report.json", b"report.txt"
# finalize.fail's wording for files that failed only because others did
COLLATERAL = states.NOT_PLACED
TEXT_FAILED_MAX = 20  # report.txt stays short; report.json has every file
LOG_CHUNK = 1 << 16


def logs_dir(job):
    """<jobdir>/logs as bytes (a BlobField may come back as memoryview on PostgreSQL)."""
    return os.path.join(bytes(job.jobdir), b"logs")


def _slice_totals(job):
    """{file id: attempts, hosts, seconds, bytes_done, reasons}, aggregated in SQL.
    Grouping by (file, host, reason) gives about one row per file on a healthy job."""
    s = db.Slice
    done = fn.SUM(Case(None, [(s.state == states.DONE, s.length)], 0))
    rows = (s.select(s.file, s.host, s.reason, fn.SUM(s.attempts), fn.SUM(s.seconds), done)
            .where(s.job == job.id).group_by(s.file, s.host, s.reason).tuples())
    totals = {}
    for file_id, host, reason, attempts, seconds, done_bytes in rows:
        t = totals.setdefault(file_id, {"attempts": 0, "hosts": set(), "seconds": 0.0,
                                        "bytes_done": 0, "reasons": []})
        t["attempts"] += int(attempts or 0)  # PostgreSQL sums to Decimal
        t["seconds"] += float(seconds or 0.0)
        t["bytes_done"] += int(done_bytes or 0)
        if host:
            t["hosts"].add(host)
        if reason:
            t["reasons"].append(reason)
    return totals


def _file_entries(job):
    """Every file of the job with its slice totals, in plan order (two queries)."""
    totals = _slice_totals(job)
    f = db.File
    rows = (f.select(f.id, f.src, f.dst, f.kind, f.size, f.checksum, f.state, f.reason)
            .where(f.job == job.id).order_by(f.index).tuples())
    empty = {"attempts": 0, "hosts": set(), "seconds": 0.0, "bytes_done": 0, "reasons": []}
    out = []
    for file_id, src, dst, kind, size, checksum, state, reason in rows:
        t = totals.get(file_id, empty)
        reasons = [reason] if reason else []
        reasons += [r for r in dict.fromkeys(t["reasons"]) if r not in reason]
        out.append({"src": os.fsdecode(bytes(src)), "dst": os.fsdecode(bytes(dst)),
                    "type": kind, "size": size, "checksum": checksum, "state": state,
                    "attempts": t["attempts"], "hosts": sorted(t["hosts"]),
                    "seconds": round(t["seconds"], 3), "bytes_done": t["bytes_done"],
                    "reasons": reasons})
    return out


def _job_summary(job, files, now):
    elapsed = max(0.0, (job.finished or now) - job.created)
    done = sum(f["bytes_done"] for f in files)
    return {"id": job.label, "state": job.state, "reason": job.reason, "backend": job.backend,
            "batch_ids": jobs.batch_ids(job), "bytes_total": job.bytes_total,
            "bytes_done": done, "files": sum(f["type"] == FILE for f in files),
            "entries": len(files), "files_by_state": dict(Counter(f["state"] for f in files)),
            "created": job.created, "finished": job.finished, "elapsed": round(elapsed, 3),
            "rate": round(done / elapsed, 1) if elapsed > 0 else None}


def build(job, now=None):
    """The whole report as a dict: {job, files, events}. Three queries, no per-file ones."""
    files = _file_entries(job)
    events = [{"time": t, "kind": k, "message": m} for t, k, m in
              db.Event.select(db.Event.time, db.Event.kind, db.Event.message)
              .where(db.Event.job == job.id).order_by(db.Event.time, db.Event.id).tuples()]
    return {"job": _job_summary(job, files, now or time.time()), "files": files,
            "events": events}


def duration(seconds):
    """'2.4 s' for short jobs, else H:MM:SS (or 'D days, H:MM:SS')."""
    seconds = seconds or 0
    if seconds < 60:
        return f"{seconds:.1f} s"
    return str(datetime.timedelta(seconds=int(round(seconds))))


def text(data):
    """The short human report: a few lines, then the files that failed on their own."""
    j = data["job"]
    rate = f", {human(j['rate'])}/s" if j["rate"] else ""
    counts = ", ".join(f"{n} {s}" for s, n in sorted(j["files_by_state"].items()))
    ids = " -> ".join(f"{b['id']} ({b['role']})" for b in j["batch_ids"]) or "-"
    lines = [f"hpcmove {j['id']} {j['state']}",
             f"  {j['files']} files ({j['entries']} entries), {human(j['bytes_done'])} of "
             f"{human(j['bytes_total'])} in {duration(j['elapsed'])}{rate}",
             f"  entries by state: {counts or 'none'}",
             f"  batch jobs: {ids} [{j['backend']}]"]
    if j["reason"]:
        lines.append(f"  reason: {j['reason']}")
    failed = [f for f in data["files"] if f["state"] == states.FAILED
              and f["reasons"] != [COLLATERAL]]
    if failed:
        lines.append(f"Failed files ({len(failed)}):")
        lines += [f"  {f['src']} -> {f['dst']}: {'; '.join(f['reasons']) or 'no reason recorded'}"
                  for f in failed[:TEXT_FAILED_MAX]]
        if len(failed) > TEXT_FAILED_MAX:
            lines.append(f"  ... and {len(failed) - TEXT_FAILED_MAX} more (see report.json)")
    return "\n".join(lines) + "\n"


def _write(path, payload):
    """Write-then-rename, so a reader never sees half a report."""
    tmp = path + b".tmp"
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, path)


def write_report(job):
    """Write report.json and report.txt into the job's logs folder; return the data."""
    data = build(job)
    folder = logs_dir(job)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    # one line: json's C encoder runs only without indent (5-10x faster for 20k files)
    _write(os.path.join(folder, JSON_NAME), json.dumps(data).encode() + b"\n")
    _write(os.path.join(folder, TEXT_NAME), text(data).encode("utf-8", "surrogateescape"))
    return data


def _read(job, name):
    try:
        with open(os.path.join(logs_dir(job), name), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def read_text(job):
    """report.txt as written, or None when there is none yet."""
    raw = _read(job, TEXT_NAME)
    return None if raw is None else raw.decode("utf-8", "surrogateescape")


def read_json(job):
    """report.json as written, or None when there is none yet."""
    raw = _read(job, JSON_NAME)
    return None if raw is None else json.loads(raw)


# --- batch output ----------------------------------------------------------------

_LOG = re.compile(rb"^(transfer|feed|finalize)(?:-([0-9]+))?(?:_([0-9]+))?\.out$")


def _log_key(name):
    """Submission order: Slurm ids grow, so transfer arrays and feeders interleave as they
    were submitted (array 120, feed 121, array 122...); finalize output comes last.
    Local names carry the task index instead (transfer-3.out, finalize.out)."""
    m = _LOG.match(name)
    if not m:
        return (2, 0, 0, name)
    number, task = int(m.group(2) or 0), int(m.group(3) or -1)
    return (1 if m.group(1) == b"finalize" else 0, number, task, name)


def log_files(job):
    """Paths of the job's batch output files (*.out in <jobdir>/logs), in reading order."""
    folder = logs_dir(job)
    try:
        names = [n for n in os.listdir(folder) if n.endswith(b".out")]
    except FileNotFoundError:
        return []
    return [os.path.join(folder, n) for n in sorted(names, key=_log_key)]


def harvest(job):
    """Every batch output file of the job as bytes chunks, each after a `==> name <==`
    header (as `tail` prints several files); streamed, so big logs are not held whole."""
    for path in log_files(job):
        name = os.path.basename(path)
        try:
            f = open(path, "rb")
        except OSError as e:
            yield b"==> %s (unreadable: %s) <==\n" % (name, os.fsencode(e.strerror or ""))
            continue
        with f:
            first = f.read(LOG_CHUNK)
            yield b"==> %s%s <==\n" % (name, b"" if first else b" (empty)")
            chunk, last = first, first
            while chunk:
                yield chunk
                last = chunk
                chunk = f.read(LOG_CHUNK)
            if last and not last.endswith(b"\n"):
                yield b"\n"
