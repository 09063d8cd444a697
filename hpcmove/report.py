"""A job's report (report.json, report.txt in <jobdir>/logs/) and its batch output.

The report is written when a job ends so that what happened survives in plain files
beside the batch logs: a user reads report.txt, a script reads report.json, mail
carries the text. It is written by the job's final batch job, which a compute job
chained with afterok waits for, whatever the job's size: so the totals come from SQL
aggregates, and the files are read, encoded and written CHUNK at a time (two queries
each: the files, their slices aggregated in SQL), never all held at once.
"""
import datetime
import json
import os
import re
import time

from peewee import Case, fn

from . import db, jobs, states
from .plan import FILE
from .units import human

JSON_NAME, TEXT_NAME = b"report.json", b"report.txt"
# finalize.fail's wording for files that failed only because others did
COLLATERAL = states.NOT_PLACED
TEXT_FAILED_MAX = 20  # report.txt stays short; report.json has every file
LOG_CHUNK = 1 << 16
# Files per chunk: a million-file job's report took 18.6 s and 2.5 GB when built whole
CHUNK = 5000


def logs_dir(job):
    """<jobdir>/logs as bytes (a BlobField may come back as memoryview on PostgreSQL)."""
    return os.path.join(bytes(job.jobdir), b"logs")


def _slice_totals(files):
    """{file id: attempts, hosts, seconds, bytes_done, reasons} of the files that the
    query `files` selects the ids of, aggregated in SQL. Grouping by (file, host, reason)
    gives about one row per file on a healthy job."""
    s = db.Slice
    done = fn.SUM(Case(None, [(s.state == states.DONE, s.length)], 0))
    totals = {}
    for file_id, host, reason, attempts, seconds, done_bytes in db.rows(
            s.select(s.file, s.host, s.reason, fn.SUM(s.attempts), fn.SUM(s.seconds), done)
            .where(s.file.in_(files)).group_by(s.file, s.host, s.reason)):
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


def file_chunks(job):
    """Every file of the job with its slice totals, in plan order, as lists of at most
    CHUNK entries: the files by their (job, index) key, then the slices of that range of
    indexes (rows as the driver gives them: peewee's per-value conversion took half the
    time of a million-file report)."""
    f = db.File
    empty = {"attempts": 0, "hosts": set(), "seconds": 0.0, "bytes_done": 0, "reasons": []}
    last = -1
    while True:
        rows = db.rows(f.select(f.id, f.index, f.src, f.dst, f.kind, f.size, f.checksum,
                                f.state, f.reason).where(f.job == job.id, f.index > last)
                       .order_by(f.index).limit(CHUNK))
        if not rows:
            return
        totals = _slice_totals(f.select(f.id).where(
            f.job == job.id, f.index.between(rows[0][1], rows[-1][1])))
        out = []
        for file_id, _index, src, dst, kind, size, checksum, state, reason in rows:
            t = totals.get(file_id, empty)
            reasons = [reason] if reason else []
            if t["reasons"]:
                reasons += [r for r in dict.fromkeys(t["reasons"]) if r not in reason]
            out.append({"src": os.fsdecode(bytes(src)), "dst": os.fsdecode(bytes(dst)),
                        "type": kind, "size": size, "checksum": checksum, "state": state,
                        "attempts": t["attempts"], "hosts": sorted(t["hosts"]),
                        "seconds": round(t["seconds"], 3), "bytes_done": t["bytes_done"],
                        "reasons": reasons})
        yield out
        if len(rows) < CHUNK:
            return
        last = rows[-1][1]


def summary(job, now=None):
    """The report's "job" part, from aggregates in SQL (three queries)."""
    f, s = db.File, db.Slice
    by_state = {state: int(n) for state, n in f.select(f.state, fn.COUNT(f.id))
                .where(f.job == job.id).group_by(f.state).tuples()}
    regular = f.select(fn.COUNT(f.id)).where(f.job == job.id, f.kind == FILE).scalar()
    done = int(s.select(fn.SUM(s.length)).where(s.job == job.id, s.state == states.DONE)
               .scalar() or 0)
    elapsed = max(0.0, (job.finished or now or time.time()) - job.created)
    return {"id": job.label, "state": job.state, "reason": job.reason, "backend": job.backend,
            "batch_ids": jobs.batch_ids(job), "bytes_total": job.bytes_total,
            "bytes_done": done, "files": int(regular or 0), "entries": sum(by_state.values()),
            "files_by_state": by_state, "created": job.created, "finished": job.finished,
            "elapsed": round(elapsed, 3), "rate": round(done / elapsed, 1) if elapsed > 0 else None}


def _events(job):
    return [{"time": t, "kind": k, "message": m} for t, k, m in
            db.Event.select(db.Event.time, db.Event.kind, db.Event.message)
            .where(db.Event.job == job.id).order_by(db.Event.time, db.Event.id).tuples()]


class Failures:
    """The files that failed on their own (not only because others did), as text()
    lists them: the first TEXT_FAILED_MAX, and how many in all."""

    def __init__(self):
        self.first, self.count = [], 0

    def add(self, entries):
        for e in entries:
            if e["state"] == states.FAILED and e["reasons"] != [COLLATERAL]:
                self.count += 1
                if len(self.first) < TEXT_FAILED_MAX:
                    self.first.append(e)

    def head(self, job_summary):
        return {"job": job_summary, "failed": self.first, "failed_count": self.count}


def build(job, now=None):
    """The whole report as a dict, {job, files, events}, held in memory: a live report
    of a running job (write_report streams an ended one to its file)."""
    return {"job": summary(job, now), "files": [e for c in file_chunks(job) for e in c],
            "events": _events(job)}


def head(job):
    """What text() and the mail need, {job, failed, failed_count}, without the JSON."""
    failures = Failures()
    for chunk in file_chunks(job):
        failures.add(chunk)
    return failures.head(summary(job))


def head_of(data):
    """head() of a report built whole (build())."""
    failures = Failures()
    failures.add(data["files"])
    return failures.head(data["job"])


def duration(seconds):
    """'2.4 s' for short jobs, else H:MM:SS (or 'D days, H:MM:SS')."""
    seconds = seconds or 0
    if seconds < 60:
        return f"{seconds:.1f} s"
    return str(datetime.timedelta(seconds=int(round(seconds))))


def text(head):
    """The short human report of a head(): a few lines, then the files that failed on
    their own."""
    j = head["job"]
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
    if head["failed_count"]:
        lines.append(f"Failed files ({head['failed_count']}):")
        lines += [f"  {f['src']} -> {f['dst']}: {'; '.join(f['reasons']) or 'no reason recorded'}"
                  for f in head["failed"]]
        if head["failed_count"] > len(head["failed"]):
            lines.append(f"  ... and {head['failed_count'] - len(head['failed'])} more "
                         f"(see report.json)")
    return "\n".join(lines) + "\n"


def _write(path, payload):
    """Write-then-rename, so a reader never sees half a report."""
    tmp = path + b".tmp"
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, path)


def write_report(job):
    """Write report.json and report.txt into the job's logs folder, the files streamed
    CHUNK at a time into one line of JSON (json's C encoder runs only without indent);
    return the head() of the report."""
    folder = logs_dir(job)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    job_summary, failures = summary(job), Failures()
    path = os.path.join(folder, JSON_NAME)
    tmp = path + b".tmp"
    with open(tmp, "wb") as out:
        out.write(b'{"job": ' + json.dumps(job_summary).encode() + b', "files": [')
        sep = b""
        for chunk in file_chunks(job):
            out.write(sep + json.dumps(chunk)[1:-1].encode())
            sep = b", "
            failures.add(chunk)
        out.write(b'], "events": ' + json.dumps(_events(job)).encode() + b"}\n")
    os.replace(tmp, path)  # a reader never sees half a report
    written = failures.head(job_summary)
    _write(os.path.join(folder, TEXT_NAME), text(written).encode("utf-8", "surrogateescape"))
    return written


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


def saved(job):
    """Are report.json and report.txt written?"""
    return all(os.path.exists(os.path.join(logs_dir(job), n)) for n in (JSON_NAME, TEXT_NAME))


def json_chunks(job):
    """report.json as written, in chunks."""
    with open(os.path.join(logs_dir(job), JSON_NAME), "rb") as f:
        yield from iter(lambda: f.read(LOG_CHUNK), b"")


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
