"""Job, file and slice states (after the gLite FTS states) and the one transition table.

Pure: no I/O. db.py applies these rules to rows; everything else asks here.
"""
from .errors import IllegalTransition

# Job states
SUBMITTED, PENDING, ACTIVE, DONE, FAILED = "Submitted", "Pending", "Active", "Done", "Failed"
CANCELLING, CANCELLED, HOLD = "Cancelling", "Cancelled", "Hold"
# ffv's auth- states: the control socket to the remote host is gone; nothing failed, a
# person must open it again (`hpcmove auth JOB`), then only what is not Done moves.
AUTH = "AuthRequired"
# File and slice states beyond the job ones
WAIT = "Wait"

JOB_STATES = (SUBMITTED, PENDING, ACTIVE, DONE, FAILED, CANCELLING, CANCELLED, HOLD, AUTH)
FILE_STATES = (SUBMITTED, PENDING, ACTIVE, DONE, FAILED, WAIT, HOLD, AUTH, CANCELLED)

JOB_TERMINAL = frozenset({DONE, FAILED, CANCELLED})
FILE_TERMINAL = frozenset({DONE, FAILED, CANCELLED})
# Where nothing more happens without a person: `wait` returns on these.
JOB_SETTLED = JOB_TERMINAL | {HOLD, AUTH}

# The reason given to files that were fine but not placed because others failed
# (all or nothing); reports and metrics tell these apart from real failures.
NOT_PLACED = "not placed: other files of the job failed"

_JOB = {
    SUBMITTED: {PENDING, FAILED, CANCELLING, CANCELLED},
    PENDING: {ACTIVE, DONE, FAILED, CANCELLING, HOLD, AUTH},
    ACTIVE: {DONE, FAILED, CANCELLING, HOLD, AUTH},
    HOLD: {PENDING, FAILED, CANCELLING},
    AUTH: {PENDING, FAILED, CANCELLING},
    CANCELLING: {CANCELLED},
    DONE: set(),
    FAILED: set(),
    CANCELLED: set(),
}

_FILE = {
    SUBMITTED: {PENDING, FAILED, CANCELLED},
    PENDING: {ACTIVE, DONE, FAILED, CANCELLED},
    # Active -> Active: a requeued or re-run task takes the slice up again.
    ACTIVE: {ACTIVE, DONE, FAILED, WAIT, AUTH, CANCELLED},
    WAIT: {PENDING, ACTIVE, HOLD, AUTH, FAILED, CANCELLED},
    HOLD: {PENDING, FAILED, CANCELLED},
    AUTH: {PENDING, FAILED, CANCELLED},
    DONE: set(),
    FAILED: set(),
    CANCELLED: set(),
}

# A slice may also leave Done before the file is placed: finalize re-reads every slice
# and sends again one whose data changed since it was verified.
# A paused task hands the slices it has not started back (Active -> Pending).
_SLICE = {**_FILE, DONE: {WAIT}, ACTIVE: _FILE[ACTIVE] | {PENDING}}

TABLES = {"job": _JOB, "file": _FILE, "slice": _SLICE}


def allowed(kind, old, new):
    """True when `kind` ('job', 'file' or 'slice') may go from `old` to `new`."""
    return new in TABLES[kind][old]


def check(kind, old, new):
    """Raise IllegalTransition unless the change is in the table."""
    if not allowed(kind, old, new):
        raise IllegalTransition(kind, old, new)


def sources_of(kind, new):
    """Every state from which `kind` may move to `new` (for conditional bulk updates)."""
    return sorted(old for old, targets in TABLES[kind].items() if new in targets)


def job_state_from_files(file_states):
    """The job state implied by its files' states (FTS: a function of the file states)."""
    states = set(file_states)
    if not states or states <= {DONE}:
        return DONE
    if AUTH in states:
        return AUTH
    if HOLD in states:
        return HOLD
    if states <= FILE_TERMINAL:
        return CANCELLED if CANCELLED in states and FAILED not in states else FAILED
    if states & {ACTIVE, DONE, WAIT}:
        return ACTIVE
    return PENDING
