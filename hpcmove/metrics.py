"""Prometheus text exposition of the job database, for node_exporter's textfile collector.

Everything is aggregated in SQL (GROUP BY), including the classification of failure
reasons (a CASE over LIKE patterns), so the cost does not grow with the number of
slices read into Python. Reason classes are a small fixed set so that label values
stay stable across releases and dashboards do not break when a message is reworded.
"""
import functools
import operator

from peewee import SQL, Case, fn

from . import db, states
from .report import COLLATERAL

# (label, substrings matched case-insensitively); the first matching class wins.
REASON_CLASSES = (
    ("permission", ("permission denied", "operation not permitted", "read-only file system")),
    ("no_space", ("no space left", "enospc", "disk quota exceeded")),
    ("source_changed", ("source changed", "source vanished")),
    ("verification", ("verification failed",)),
    ("task_died", ("was not copied: transfer task", "without recording a result")),
    ("placement", ("cannot place",)),
    ("submission", ("submission failed",)),
)
FAILURE_LABELS = tuple(name for name, _ in REASON_CLASSES) + ("other",)


def reason_class(field):
    """A SQL expression naming the class of `field` (a reason column), 'other' if none."""
    def matches(patterns):
        return functools.reduce(operator.or_, (field ** f"%{p}%" for p in patterns))
    return Case(None, [(matches(p), name) for name, p in REASON_CLASSES], "other")


def _failures(model, extra):
    # grouped by the output alias, not the expression: with server-side parameters the
    # CASE in GROUP BY would not match the one in SELECT (PostgreSQL)
    cls = reason_class(model.reason).alias("reason_class")
    query = (model.select(cls, fn.COUNT(model.id))
             .where(model.state == states.FAILED, *extra)
             .group_by(SQL("reason_class")).tuples())
    return dict(query)


def collect():
    """Every number the exposition shows, as plain dicts (one query per metric family)."""
    s = db.Slice
    done = s.state == states.DONE
    return {
        "jobs": dict(db.Job.select(db.Job.state, fn.COUNT(db.Job.id))
                     .group_by(db.Job.state).tuples()),
        "bytes": int(s.select(fn.COALESCE(fn.SUM(s.length), 0)).where(done).scalar()),
        "hosts": [(h, int(b), float(t)) for h, b, t in  # Decimal on PostgreSQL
                  s.select(s.host, fn.SUM(s.length), fn.SUM(s.seconds))
                  .where(done).group_by(s.host).order_by(s.host).tuples()],
        # files that failed only because another file of their job did are not counted
        "file_failures": _failures(db.File, [db.File.reason != COLLATERAL]),
        "job_failures": _failures(db.Job, []),
    }


def _escape(value):
    return str(value).replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


def _number(value):
    value = value or 0
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _family(name, kind, help_text, samples):
    """HELP and TYPE lines, then one line per (labels, value)."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}")
    return lines


def prometheus_text():
    """The exposition text. Every job state and failure class is always present (zero when
    none), so series do not appear and vanish as jobs come and go."""
    c = collect()
    lines = _family("hpcmove_jobs", "gauge", "Jobs in the database by state.",
                    [({"state": st}, c["jobs"].get(st, 0)) for st in states.JOB_STATES])
    lines += _family("hpcmove_bytes_total", "counter",
                     "Bytes copied and verified (slices in state Done).", [({}, c["bytes"])])
    lines += _family("hpcmove_host_bytes_total", "counter",
                     "Bytes copied and verified per data-transfer node.",
                     [({"host": h}, b) for h, b, _ in c["hosts"]])
    lines += _family("hpcmove_host_seconds_total", "counter",
                     "Seconds spent copying and verifying per data-transfer node "
                     "(rate = host_bytes_total / host_seconds_total).",
                     [({"host": h}, sec) for h, _, sec in c["hosts"]])
    lines += _family("hpcmove_failures_total", "counter",
                     "Failed files by reason class (not counting files failed only "
                     "because another file of their job failed).",
                     [({"reason": r}, c["file_failures"].get(r, 0)) for r in FAILURE_LABELS])
    lines += _family("hpcmove_job_failures_total", "counter",
                     "Failed jobs by reason class of the job's reason.",
                     [({"reason": r}, c["job_failures"].get(r, 0)) for r in FAILURE_LABELS])
    return "\n".join(lines) + "\n"
