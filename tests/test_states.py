"""The state transition tables, written out independently here as the specification."""
import itertools

import pytest

from hpcmove import states as S
from hpcmove.errors import IllegalTransition

SUB, PEN, ACT, DON, FAI = "Submitted", "Pending", "Active", "Done", "Failed"
CCL, CAN, HOL, WAI = "Cancelling", "Cancelled", "Hold", "Wait"
AUT = "AuthRequired"  # the control socket to the remote host is gone

JOB_EDGES = {
    (SUB, PEN), (SUB, FAI), (SUB, CCL), (SUB, CAN),
    (PEN, ACT), (PEN, DON), (PEN, FAI), (PEN, CCL), (PEN, HOL),
    (ACT, DON), (ACT, FAI), (ACT, CCL), (ACT, HOL),
    (HOL, PEN), (HOL, FAI), (HOL, CCL),
    (PEN, AUT), (ACT, AUT), (AUT, PEN), (AUT, FAI), (AUT, CCL),
    (CCL, CAN),
}
FILE_EDGES = {
    (SUB, PEN), (SUB, FAI), (SUB, CAN),
    (PEN, ACT), (PEN, DON), (PEN, FAI), (PEN, CAN),
    (ACT, ACT), (ACT, DON), (ACT, FAI), (ACT, WAI), (ACT, CAN),
    (WAI, PEN), (WAI, ACT), (WAI, HOL), (WAI, FAI), (WAI, CAN),
    (HOL, PEN), (HOL, FAI), (HOL, CAN),
    (ACT, AUT), (WAI, AUT), (AUT, PEN), (AUT, FAI), (AUT, CAN),
}
# a verified slice whose spool data changed before placement is sent again
SLICE_EDGES = FILE_EDGES | {(DON, WAI), (ACT, PEN)}  # and a paused task hands slices back
SPEC = {"job": (S.JOB_STATES, JOB_EDGES), "file": (S.FILE_STATES, FILE_EDGES),
        "slice": (S.FILE_STATES, SLICE_EDGES)}


def test_state_names():
    assert set(S.JOB_STATES) == {SUB, PEN, ACT, DON, FAI, CCL, CAN, HOL, AUT}
    assert set(S.FILE_STATES) == {SUB, PEN, ACT, DON, FAI, WAI, HOL, AUT, CAN}
    assert S.JOB_SETTLED == {DON, FAI, CAN, HOL, AUT}
    assert S.JOB_TERMINAL == S.FILE_TERMINAL == {DON, FAI, CAN}


@pytest.mark.parametrize("kind", ["job", "file", "slice"])
def test_every_transition_in_table_is_allowed(kind):
    _, edges = SPEC[kind]
    for old, new in edges:
        assert S.allowed(kind, old, new), (kind, old, new)
        S.check(kind, old, new)  # does not raise


@pytest.mark.parametrize("kind", ["job", "file", "slice"])
def test_every_other_transition_is_illegal(kind):
    names, edges = SPEC[kind]
    for old, new in itertools.product(names, names):
        if (old, new) in edges:
            continue
        assert not S.allowed(kind, old, new), (kind, old, new)
        with pytest.raises(IllegalTransition):
            S.check(kind, old, new)


@pytest.mark.parametrize("kind, old, new", [
    ("job", DON, ACT), ("job", CAN, PEN), ("job", FAI, PEN), ("job", HOL, CAN),
    ("job", ACT, ACT), ("job", ACT, PEN), ("file", DON, ACT), ("slice", CAN, PEN),
    ("slice", FAI, ACT), ("file", PEN, WAI), ("job", AUT, ACT), ("file", AUT, DON),
])
def test_illegal_examples(kind, old, new):
    with pytest.raises(IllegalTransition) as info:
        S.check(kind, old, new)
    e = info.value
    assert (e.kind, e.old, e.new) == (kind, old, new)
    assert str(e) == f"illegal {kind} state change {old} -> {new}"


@pytest.mark.parametrize("kind", ["job", "file"])
def test_terminal_states_have_no_way_out(kind):
    names, _ = SPEC[kind]
    for old in S.JOB_TERMINAL:
        assert not any(S.allowed(kind, old, new) for new in names)


@pytest.mark.parametrize("kind", ["job", "file", "slice"])
def test_sources_of_matches_spec(kind):
    names, edges = SPEC[kind]
    for new in names:
        assert S.sources_of(kind, new) == sorted(o for o, n in edges if n == new)


def test_sources_of_examples():
    assert S.sources_of("job", CAN) == [CCL, SUB]
    assert S.sources_of("job", SUB) == []
    assert S.sources_of("slice", ACT) == [ACT, PEN, WAI]
    assert S.sources_of("file", DON) == [ACT, PEN]


@pytest.mark.parametrize("files, job", [
    ([], DON),
    ([DON], DON),
    ([DON, DON, DON], DON),
    ([HOL, ACT, DON], HOL),
    ([HOL, FAI], HOL),
    ([AUT, HOL, DON], AUT),
    ([AUT, ACT], AUT),
    ([FAI], FAI),
    ([DON, FAI], FAI),
    ([DON, FAI, CAN], FAI),
    ([CAN], CAN),
    ([DON, CAN], CAN),
    ([ACT, PEN], ACT),
    ([DON, PEN], ACT),
    ([WAI, PEN], ACT),
    ([ACT, FAI], ACT),
    ([PEN], PEN),
    ([SUB, PEN], PEN),
    ([PEN, FAI], PEN),
    ([PEN, CAN], PEN),
])
def test_job_state_from_files(files, job):
    assert S.job_state_from_files(files) == job
    assert S.job_state_from_files(iter(files)) == job  # any iterable, consumed once
