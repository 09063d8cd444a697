"""Finalize places nothing when any destination is in the way, and blames the right file."""
import os

from hpcmove import finalize
from hpcmove.plan import Options, plan_pairs


class Row:
    """Stands in for a File row: the attributes conflicts() reads."""

    def __init__(self, entry, ident):
        self.id, self.kind, self.dst = ident, entry.kind, entry.dst


def test_conflicts_are_found_before_anything_is_placed(tmp_path):
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "small").write_bytes(b"old")
    (tmp_path / "d" / "occupied").mkdir()
    (tmp_path / "d" / "occupied" / "x").write_bytes(b"x")
    p = plan_pairs([(bytes(tmp_path / "a"), bytes(tmp_path / "d" / "small")),
                    (bytes(tmp_path / "b"), bytes(tmp_path / "d" / "occupied"))], Options(), "t")
    rows = [Row(e, i) for i, e in enumerate(p.entries)]
    problems = finalize.conflicts(rows)
    assert list(problems) == [1]  # overwriting a file is fine; a directory in the way is not
    assert "occupied: cannot place: destination is a directory" in problems[1]
    assert (tmp_path / "d" / "small").read_bytes() == b"old"
    assert os.listdir(tmp_path / "d" / "occupied") == ["x"]


def _tree_rows(tmp_path):
    src = tmp_path / "src" / "t"
    (src / "sub" / "deeper").mkdir(parents=True)
    for name in ("a", "sub/b", "sub/deeper/c"):
        (src / name).write_bytes(b"x")
    (tmp_path / "dst").mkdir()
    p = plan_pairs([(bytes(src), bytes(tmp_path / "dst" / "t"))], Options(), "t")
    return [Row(e, i) for i, e in enumerate(p.entries)]


def test_conflicts_do_not_look_below_a_directory_absent_at_the_destination(tmp_path,
                                                                             monkeypatch):
    """Into a new directory only that directory is looked up; below an existing one
    every entry is, and a conflict deep down is still found."""
    rows = _tree_rows(tmp_path)
    looked, lstat = [], os.lstat
    monkeypatch.setattr(os, "lstat", lambda p, *a, **k: looked.append(p) or lstat(p, *a, **k))
    assert finalize.conflicts(rows) == {}
    assert looked == [bytes(tmp_path / "dst" / "t")]
    (tmp_path / "dst" / "t" / "sub" / "deeper" / "c").mkdir(parents=True)
    looked.clear()
    problems = finalize.conflicts(rows)
    assert len(looked) == len(rows)
    (bad,) = problems.values()
    assert bad.endswith("deeper/c: cannot place: destination is a directory")


class FileRow:
    """Stands in for a File row: what place() reads of a regular file."""

    def __init__(self, ident, dst, spool, mode, mtime_ns):
        self.id = self.index = ident
        self.kind, self.dst, self.spool = "file", dst, spool
        self.mode, self.mtime_ns = mode, mtime_ns


def test_placement_changes_only_the_metadata_that_differs(tmp_path, monkeypatch):
    """A spool file its task left with the planned mode and mtime is renamed, nothing
    more; one whose mode or mtime differ (a mode without u+w, a range written into it
    after the task) gets them set. Every file lands as planned."""
    from hpcmove.plan import spool_path
    spool = bytes(tmp_path / ".hpcmove-t.spool")
    mtime = 1_600_000_000_123_456_789
    rows = [FileRow(i, bytes(tmp_path / ("f%d" % i)), spool, mode, mtime)
            for i, mode in enumerate([0o644, 0o444, 0o640])]
    for row in rows:
        tmp = spool_path(row.spool, row.dst)
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(b"data")
        os.chmod(tmp, row.mode | 0o600)  # as the task left it
        os.utime(tmp, ns=(mtime, mtime))
    os.utime(spool_path(spool, rows[2].dst), ns=(mtime + 5, mtime + 5))  # written later
    calls = []
    chmod, utime = os.chmod, os.utime
    monkeypatch.setattr(os, "chmod", lambda p, *a, **k: calls.append(("chmod", p)) or
                        chmod(p, *a, **k))
    monkeypatch.setattr(os, "utime", lambda p, *a, **k: calls.append(("utime", p)) or
                        utime(p, *a, **k))
    finalize.place(rows, move=False)
    assert calls == [("chmod", spool_path(spool, rows[1].dst)),
                     ("utime", spool_path(spool, rows[2].dst))]
    for row in rows:
        st = os.lstat(row.dst)
        assert (st.st_mode & 0o7777, st.st_mtime_ns) == (row.mode, mtime)
