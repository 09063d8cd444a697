"""The worker's retry rule: transient errors are retried a bounded number of times,
permanent ones fail the slice at once with the engine's reason."""
import pytest

from hpcmove import states, worker
from hpcmove.errors import TransferError

ITEM = {"slice": 7, "file": 1, "src": b"/s", "spool": b"/d", "offset": 0, "length": 10,
        "size": 10, "mtime_ns": 1}


class FlakyEngine:
    def __init__(self, failures, transient=True, result=("ab", "ab")):
        self.failures, self.transient, self.result, self.calls = failures, transient, result, 0

    def copy_slice(self, work):
        self.calls += 1
        if self.calls <= self.failures:
            raise TransferError("Input/output error: /s", transient=self.transient)
        return self.result


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    monkeypatch.setattr(worker.time, "sleep", lambda s: None)


def test_transient_error_is_retried_then_succeeds():
    engine = FlakyEngine(failures=2)
    r = worker.copy_one(engine, ITEM)
    assert (r["state"], r["attempts"], engine.calls) == (states.DONE, 3, 3)


def test_transient_errors_beyond_the_bound_fail_the_slice():
    engine = FlakyEngine(failures=10)
    r = worker.copy_one(engine, ITEM)
    assert (r["state"], engine.calls) == (states.WAIT, worker.RETRIES)  # for the retry agent
    assert "Input/output error: /s" in r["reason"]


def test_permanent_error_is_not_retried():
    engine = FlakyEngine(failures=1, transient=False)
    r = worker.copy_one(engine, ITEM)
    assert (r["state"], engine.calls) == (states.FAILED, 1)


def test_digest_mismatch_is_retried_then_waits_with_a_verification_reason():
    engine = FlakyEngine(0, result=("aa", "bb"))
    r = worker.copy_one(engine, ITEM)
    assert r["state"] == states.WAIT and "verification failed" in r["reason"]
    assert engine.calls == worker.RETRIES
