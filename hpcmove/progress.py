"""Live progress (`hpcmove watch`, `wait --progress`) and the status levels
(`status --summary`, `status --files`).

Progress polls the database with aggregate queries only (COUNT/SUM GROUP BY state):
a job of millions of slices costs the same three queries per update as a small one.
The batch system is asked (jobs.refresh) at most every few seconds, because squeue
and sacct load the controller of a shared cluster.
"""
import math
import os
import time
from dataclasses import dataclass, field

from peewee import fn

from . import db, jobs, states
from .units import human

# Watching stops here: ended, or on Hold, which waits for a person (e.g. `hpcmove retry`).
SETTLED = states.JOB_SETTLED


@dataclass(frozen=True)
class Snapshot:
    label: str
    state: str
    reason: str
    bytes_total: int
    bytes_done: int
    files: dict = field(default_factory=dict)  # file state -> count

    @property
    def terminal(self):
        return self.state in SETTLED

    @property
    def files_total(self):
        return sum(self.files.values())


def state_summary(job):
    """[(state, entries, bytes)] for the job's files, in the order of FILE_STATES."""
    f = db.File
    rows = (f.select(f.state, fn.COUNT(f.id), fn.COALESCE(fn.SUM(f.size), 0))
            .where(f.job == job.id).group_by(f.state).tuples())
    found = {state: (n, int(size)) for state, n, size in rows}  # int(): Decimal on PostgreSQL
    return [(st, *found[st]) for st in states.FILE_STATES if st in found]


def snapshot(job, rows=None):
    """The job's progress from two aggregate queries (or one, given state_summary rows)."""
    rows = state_summary(job) if rows is None else rows
    done = job.bytes_total if job.state == states.DONE else jobs.bytes_done(job)
    return Snapshot(job.label, job.state, job.reason, job.bytes_total, done,
                    {st: n for st, n, _ in rows})


def summary_lines(job):
    """`status --summary`: one line for the job, then entries and bytes per file state."""
    rows = state_summary(job)
    snap = snapshot(job, rows)
    yield f"{snap.label} {snap.state}: {human(snap.bytes_done)} of {human(snap.bytes_total)}" \
          + (f"  {snap.reason}" if snap.reason else "")
    yield f"  {'state':<10} {'entries':>9} {'bytes':>12}"
    for st, n, size in rows:
        yield f"  {st:<10} {n:>9} {human(size):>12}"


def file_lines(job):
    """`status --files`: state, size, src -> dst and reason per file; streamed from one
    query so a big job is not held in memory."""
    f = db.File
    rows = (f.select(f.state, f.kind, f.size, f.src, f.dst, f.reason)
            .where(f.job == job.id).order_by(f.index).tuples().iterator())
    for state, kind, size, src, dst, reason in rows:
        size_text = human(size) if kind == jobs.FILE else kind
        line = f"{state:<9} {size_text:>10}  {os.fsdecode(bytes(src))} -> {os.fsdecode(bytes(dst))}"
        yield line + (f"  ({reason})" if reason else "")


def _eta(seconds):
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _counts(snap):
    return ", ".join(f"{n} {st}" for st, n in snap.files.items()) or "no entries"


class PlainView:
    """One line per update for batch logs: printed when something changed, at most every
    `every` seconds, and always for the terminal state."""

    def __init__(self, stream, every=10.0):
        self.stream, self.every = stream, every
        self.start = self.last_time = None
        self.start_bytes, self.last_line = 0, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def rate(self, snap, now):
        if self.start is None:
            self.start, self.start_bytes = now, snap.bytes_done
        elapsed = now - self.start
        return (snap.bytes_done - self.start_bytes) / elapsed if elapsed > 0 else 0.0

    def line(self, snap, rate):
        pct = 100 * snap.bytes_done / snap.bytes_total if snap.bytes_total else 100.0
        eta = (snap.bytes_total - snap.bytes_done) / rate if rate > 0 else None
        text = (f"{snap.label} {snap.state}: {_counts(snap)}; {human(snap.bytes_done)}/"
                f"{human(snap.bytes_total)} ({pct:.0f}%)")
        if not snap.terminal:
            text += f"; {human(rate)}/s; ETA {_eta(eta)}"
        return text + (f"; {snap.reason}" if snap.terminal and snap.reason else "")

    def update(self, snap):
        now = time.monotonic()
        line = self.line(snap, self.rate(snap, now))
        due = self.last_time is None or now - self.last_time >= self.every
        if line != self.last_line and (due or snap.terminal):
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self.stream.write(f"{stamp} {line}\n")
            self.stream.flush()
            self.last_line, self.last_time = line, now


class RichView:
    """A rich progress bar: bytes done of total, rate, ETA, entries per state."""

    def __init__(self, stream):
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)
        console = Console(file=stream, force_terminal=True)
        self.progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                                 DownloadColumn(binary_units=True), TransferSpeedColumn(),
                                 TimeRemainingColumn(),
                                 TextColumn("{task.fields[counts]}", markup=False),
                                 console=console)
        self.task = None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()
        return False

    def update(self, snap):
        text = f"{snap.label} {snap.state}"
        if self.task is None:
            self.task = self.progress.add_task(text, total=snap.bytes_total or None,
                                               counts=_counts(snap))
        self.progress.update(self.task, description=text, completed=snap.bytes_done,
                             counts=_counts(snap))
        if snap.terminal:
            self.progress.stop()  # draw the final bar, then the closing line below it
            # reasons hold file names: no rich markup or highlighting may touch them
            self.progress.console.print(text + (f": {snap.reason}" if snap.reason else ""),
                                        markup=False, highlight=False)


def view_for(stream, tty, every=10.0):
    """RichView on a terminal when rich is installed; plain lines otherwise."""
    if tty:
        try:
            return RichView(stream)
        except ImportError:
            pass
    return PlainView(stream, every)


def watch(job_id, stream, tty, interval=1.0, refresh_every=5.0, every=10.0, timeout=None):
    """Show the job's progress on `stream` until it ends or is on Hold (or `timeout`
    seconds pass); return the job. `tty` picks the live bar over plain log lines."""
    start, asked = time.monotonic(), float("-inf")
    with view_for(stream, tty, every) as view:
        while True:
            job = db.Job.get_by_id(job_id)
            if job.state not in SETTLED and time.monotonic() - asked >= refresh_every:
                job, asked = jobs.refresh([job])[0], time.monotonic()
            view.update(snapshot(job))
            if job.state in SETTLED:
                return job
            if timeout is not None and time.monotonic() - start >= timeout:
                return job
            time.sleep(interval)
