"""The worker's retry rule: transient errors are retried a bounded number of times,
permanent ones fail the slice at once with the engine's reason."""
import collections
import contextlib

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


class Connection:
    """A stream's engine on one of a socket's connections; `dies_after` units in, its
    connection is gone (as the ssh engine's `gone`) and every unit after fails AUTH."""

    def __init__(self, streams, plan, taken):
        self.streams, self.plan, self.taken, self.gone = streams, plan, taken, False
        self.dies_after = plan.pop(0) if plan else None

    def fork(self):
        return Connection(self.streams, self.plan, self.taken)

    def one(self, unit):
        if self.dies_after is not None and len(self.taken[id(self)]) >= self.dies_after:
            self.gone = True
        self.taken[id(self)].append(unit[0])
        state = states.AUTH if self.gone else states.DONE
        return [(unit[0], {"slice": unit[0], "state": state})]


@pytest.mark.parametrize("plan, auth", [
    ([1, None, None], 1),  # one connection of three dies: its unit in flight waits, no more
    ([1, 2, 0], 3),        # all die: the last stream takes the rest, each waits AUTH
])
def test_a_stream_whose_connection_is_gone_leaves_the_rest_to_the_others(plan, auth):
    taken = collections.defaultdict(list)
    engine = Connection(3, list(plan), taken)
    units = [[n] for n in range(40)]
    ended = list(worker._streams(engine, lambda eng, unit: eng.one(unit), units))
    assert [left for _r, left in ended] == list(range(39, -1, -1))
    results = [r for unit, _left in ended for r in unit]
    assert sorted(item for item, _r in results) == list(range(40))  # none lost
    states_seen = collections.Counter(r["state"] for _i, r in results)
    if auth == 1:
        assert states_seen == {states.DONE: 39, states.AUTH: 1}
    else:
        assert states_seen[states.DONE] == 3 and states_seen[states.AUTH] == 37


READ_TASK = """
import sys
from hpcmove import jobdir
assert sys.getfilesystemencoding() == "ascii", sys.getfilesystemencoding()
sys.stdout.buffer.write(b"\\0".join(i["src"] + b"|" + i["spool"] for i in jobdir.read_task(
    sys.argv[1].encode(), 0)))
"""


def test_a_manifest_reads_back_the_same_bytes_under_any_locale(tmp_path):
    """Written under UTF-8 (a login node), read where the file system encoding is ASCII
    (a batch job in the C locale without UTF-8 mode): every name the same bytes."""
    import os
    import subprocess
    import sys
    from hpcmove import jobdir
    from hpcmove.plan import Options, plan
    names = ["caf\u00e9", "\udcff-not-utf8", "plain", "\u65e5\u672c"]
    (tmp_path / "src").mkdir()
    for name in names:
        (tmp_path / "src" / name).write_bytes(b"x")
    (tmp_path / "dst").mkdir()
    the_plan = plan([str(tmp_path / "src")], str(tmp_path / "dst"), Options(stripe_width=1),
                    "abcdef123456")
    path = bytes(tmp_path / "job")
    os.makedirs(path + b"/tasks")
    jobdir.write_manifest(path, the_plan, range(1, 100), range(1, 100))
    env = dict(os.environ, LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    done = subprocess.run([sys.executable, "-c", READ_TASK, path], env=env, cwd=tmp_path,
                          capture_output=True)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    want = [the_plan.entries[s.entry].src + b"|" + the_plan.entries[s.entry].spool_path
            for s in the_plan.slices]
    assert done.stdout.split(b"\0") == want
    assert {os.path.basename(w.split(b"|")[0]) for w in want} == {os.fsencode(n) for n in names}


def test_manifest_lines_are_the_items_json_for_any_name(tmp_path):
    """write_manifest formats its lines itself: each is what json.dumps gives for the
    slice's manifest_item (quotes, backslashes, control characters, newlines, non-UTF-8
    bytes, non-ASCII names), and reads back the same."""
    import json
    import os
    from hpcmove import jobdir
    from hpcmove.plan import Options, plan
    names = [b'q"uo\\te', b"new\nline\ttab\x01\x7f", b"\xff\xfe-not-utf8", "caf\u00e9 \u65e5"
             .encode(), b"$(touch x)", b"-lead"]
    (tmp_path / "src").mkdir()
    for n, name in enumerate(names):
        with open(os.path.join(bytes(tmp_path / "src"), name), "wb") as f:
            f.write(b"y" * n)
    (tmp_path / "dst").mkdir()
    the_plan = plan([str(tmp_path / "src")], str(tmp_path / "dst"), Options(stripe_width=1),
                    "abcdef123456")
    path = bytes(tmp_path / "job")
    os.makedirs(path + b"/tasks")
    file_ids, slice_ids = range(10, 99), range(500, 599)
    jobdir.write_manifest(path, the_plan, file_ids, slice_ids)
    want = []
    for s, slice_id in zip(the_plan.slices, slice_ids):
        e = the_plan.entries[s.entry]
        want.append(json.dumps(jobdir.manifest_item(
            slice_id, file_ids[s.entry], e.src, e.spool_path, s.offset, s.length, e.size,
            e.mtime_ns, e.dst, e.mode)) + "\n")
    with open(path + b"/tasks/0.jsonl") as f:
        assert f.readlines() == want
    got = {os.path.basename(i["src"]): i for i in jobdir.read_task(path, 0)}
    assert set(got) == set(names)
    assert [got[n]["size"] for n in names] == list(range(len(names)))


class Bundler:
    """A task's engine of three streams that moves units of two items, all Done."""
    streams = 3

    def fork(self):
        return self

    def units(self, items):
        return [items[k:k + 2] for k in range(0, len(items), 2)]

    def copy_bundle(self, items):
        return [(i, {"slice": i["slice"], "state": states.DONE, "seconds": 0.0,
                     "attempts": 1, "src": "ab", "dst": "", "reason": ""}) for i in items]


def test_the_last_wave_is_recorded_unit_by_unit(monkeypatch):
    """Once fewer units are left to end than there are streams, each unit's results are
    recorded as it ends: the task's last write, which finalize waits for, holds one
    unit's rows, not all since the last timed flush."""
    from types import SimpleNamespace
    from hpcmove import jobdir, plugins
    items = [dict(ITEM, slice=n, spool=b"/d/.hpcmove-t.spool/t/f%d" % n) for n in range(24)]
    monkeypatch.setattr(jobdir, "read_task", lambda path, task: [dict(i) for i in items])
    monkeypatch.setattr(worker.db, "connect", lambda *a: None)
    monkeypatch.setattr(worker.db, "atomic", contextlib.nullcontext)
    monkeypatch.setattr(worker.db.Job, "get", lambda *a: SimpleNamespace(
        id=1, options="{}", token="t"))
    monkeypatch.setattr(worker, "done_slices", lambda *a: set())
    monkeypatch.setattr(worker, "start_meanwhile", lambda *a: None)
    monkeypatch.setattr(plugins, "make_engine", lambda options: Bundler())
    monkeypatch.setattr(worker, "FLUSH_SECONDS", 1e9)  # no flush but the rule's
    writes = []
    monkeypatch.setattr(worker.db, "record_results",
                        lambda host, results: writes.append(sorted(r["slice"] for r in results)))
    assert worker.run(b"/jobs/x", 0) == 0
    assert sorted(s for w in writes for s in w) == list(range(24))  # each once
    assert [len(w) for w in writes] == [20, 2, 2]  # the units ending with 2, 1, 0 left
