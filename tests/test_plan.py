"""Planning: resolve_pairs, cut, pack, plan() on real trees, and copyjob files."""
import math
import os
import stat

import pytest

from hpcmove import plan as P
from hpcmove.errors import PlanError, UsageError
from hpcmove.jobs import read_copyjob

MiB, GiB = 1 << 20, 1 << 30
TOKEN = "tok123"


def b(path):
    return os.fsencode(path)


def write(path, data=b"x"):
    path = b(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


# --------------------------------------------------------------------------- resolve_pairs

def test_single_source_to_new_name(tmp_path):
    src = write(tmp_path / "a.txt")
    dst = b(tmp_path / "renamed.txt")
    assert P.resolve_pairs([src], dst) == [(src, dst)]


def test_accepts_str_and_returns_bytes(tmp_path):
    write(tmp_path / "a.txt")
    pairs = P.resolve_pairs([str(tmp_path / "a.txt")], str(tmp_path / "n"))
    assert pairs == [(b(tmp_path / "a.txt"), b(tmp_path / "n"))]
    assert all(isinstance(x, bytes) for pair in pairs for x in pair)


def test_existing_directory_dst_copies_into_it(tmp_path):
    src = write(tmp_path / "a.txt")
    (tmp_path / "d").mkdir()
    dst = b(tmp_path / "d")
    assert P.resolve_pairs([src], dst) == [(src, dst + b"/a.txt")]


def test_dst_with_trailing_slash_is_a_directory_to_copy_into(tmp_path):
    src = write(tmp_path / "a.txt")
    dst = b(tmp_path / "notyet") + b"/"
    assert P.resolve_pairs([src], dst) == [(src, b(tmp_path / "notyet" / "a.txt"))]


def test_several_sources_into_directory(tmp_path):
    s1, s2 = write(tmp_path / "a"), write(tmp_path / "sub" / "b")
    (tmp_path / "d").mkdir()
    dst = b(tmp_path / "d")
    assert P.resolve_pairs([s1, s2], dst) == [(s1, dst + b"/a"), (s2, dst + b"/b")]


def test_directory_source_without_slash_goes_in_by_name(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "d").mkdir()
    src, dst = b(tmp_path / "src"), b(tmp_path / "d")
    assert P.resolve_pairs([src], dst) == [(src, dst + b"/src")]


def test_rsync_trailing_slash_source_means_contents(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "d").mkdir()
    src, dst = b(tmp_path / "src") + b"/", b(tmp_path / "d")
    assert P.resolve_pairs([src], dst) == [(src, dst)]
    # mixed with a plain source
    other = write(tmp_path / "f")
    assert P.resolve_pairs([src, other], dst) == [(src, dst), (other, dst + b"/f")]


@pytest.mark.parametrize("make_dst", ["file", "missing", "missing_slash"])
def test_several_sources_into_non_directory_is_refused(tmp_path, make_dst):
    s1, s2 = write(tmp_path / "a"), write(tmp_path / "b")
    dst = tmp_path / "target"
    if make_dst == "file":
        write(dst)
    d = b(dst) + (b"/" if make_dst == "missing_slash" else b"")
    with pytest.raises(PlanError, match="not a directory") as info:
        P.resolve_pairs([s1, s2], d)
    assert str(dst) in str(info.value)


def test_no_source_is_refused(tmp_path):
    with pytest.raises(PlanError):
        P.resolve_pairs([], b(tmp_path))


# --------------------------------------------------------------------------- cut

def entry(size, index=0):
    return P.Entry(index, P.FILE, b"/s", b"/d", b"/sp", size=size)


def test_cut_exact_multiple():
    slices = P.cut(entry(3 * MiB, index=5), MiB)
    assert [(s.entry, s.index, s.offset, s.length) for s in slices] == [
        (5, 0, 0, MiB), (5, 1, MiB, MiB), (5, 2, 2 * MiB, MiB)]


def test_cut_with_remainder():
    slices = P.cut(entry(3 * MiB + 5), MiB)
    assert [(s.offset, s.length) for s in slices] == [
        (0, MiB), (MiB, MiB), (2 * MiB, MiB), (3 * MiB, 5)]
    assert sum(s.length for s in slices) == 3 * MiB + 5


def test_cut_smaller_than_slice():
    assert [(s.offset, s.length) for s in P.cut(entry(10), MiB)] == [(0, 10)]


def test_cut_empty_file_gets_one_empty_slice():
    slices = P.cut(entry(0, index=2), MiB)
    assert len(slices) == 1
    assert (slices[0].entry, slices[0].index, slices[0].offset, slices[0].length) == (2, 0, 0, 0)


# --------------------------------------------------------------------- even waves

def test_even_waves_cuts_a_last_short_wave_into_whole_ones():
    # 8 slices of 256 MiB on 6 streams: 6, then 2 with 4 streams idle; 12 make two waves
    (size,) = P.even_waves([2048 * MiB], [256 * MiB], 6)
    assert size == 171 * MiB and len(P.cut(entry(2048 * MiB), size)) == 12


@pytest.mark.parametrize("sizes, slice_sizes, streams", [
    ([2048 * MiB], [256 * MiB], 4),  # 8 slices: two whole waves already
    ([2048 * MiB], [256 * MiB], 8),
    ([2048 * MiB], [256 * MiB], 1),
    ([100 << 30], [256 * MiB], 6),  # 400 slices: the last wave is a small part
    ([200 * MiB], [256 * MiB], 6),  # no file is cut
    ([2048 * MiB, 1024 * MiB, 5 * MiB], [256 * MiB] * 3, 6),  # 12 slices; a small file
    ([6 * MiB], [MiB], 4),  # slices too small to cut smaller
])
def test_even_waves_keeps_what_ends_together_or_hardly_matters(sizes, slice_sizes, streams):
    assert P.even_waves(sizes, slice_sizes, streams) == slice_sizes


@pytest.mark.parametrize("seed", range(40))
def test_even_waves_never_ends_later_nor_cuts_below_a_quarter(seed):
    import random
    rng = random.Random(seed)
    streams = rng.choice([2, 3, 4, 6, 12])
    base = rng.choice([64, 256, 1024]) * MiB
    sizes = [rng.randrange(1, 5 * base) for _ in range(rng.randrange(1, 6))]
    got = P.even_waves(sizes, [base] * len(sizes), streams)

    def units(slice_sizes):
        return [s.length for n, size in zip(sizes, slice_sizes)
                for s in P.cut(entry(n), size) if n >= size // 4 or n > size]

    assert P.makespan(units(got), streams) <= P.makespan(units([base] * len(sizes)), streams)
    for n, size in zip(sizes, got):
        assert size == base or (n > base and base // 4 <= size < base and size % MiB == 0)
    # one factor for every file cut smaller
    assert len({size for n, size in zip(sizes, got) if n > base}) <= 1


def test_makespan_counts_waves_and_each_slice_cost():
    assert P.makespan([10 * MiB] * 4, 2) == 2 * (10 * MiB + P.SLICE_COST)
    assert P.makespan([30 * MiB, 10 * MiB, 10 * MiB], 2) == 30 * MiB + P.SLICE_COST
    assert P.makespan([MiB], 6) == MiB + P.SLICE_COST


def test_plan_evens_waves_only_when_asked(tmp_path):
    f = tmp_path / "big"
    with open(f, "wb") as out:
        out.truncate(2048 * MiB)  # sparse: only its size is read
    for even, n in ((True, 12), (False, 8)):
        p = P.plan([b(f)], b(tmp_path / "out"),
                   P.Options(stripe_width=2, streams=3, even_waves=even), TOKEN)
        assert len(p.slices) == n
        ends = sorted((s.offset, s.offset + s.length) for s in p.slices)
        assert ends[0][0] == 0 and ends[-1][1] == 2048 * MiB
        assert all(a[1] == b_[0] for a, b_ in zip(ends, ends[1:]))
        assert max(s.length for s in p.slices) <= 256 * MiB
    # a local copy's tasks take one slice at a time: 8 slices on 2 tasks, whole waves
    p = P.plan([b(f)], b(tmp_path / "out"), P.Options(stripe_width=2, even_waves=True), TOKEN)
    assert len(p.slices) == 8


# --------------------------------------------------------------------------- pack

def loads(slices, n):
    out = [0] * n
    for s in slices:
        out[s.task] += s.length
    return out


def test_pack_one_gib_file_stripe_three():
    slices = P.cut(entry(GiB), 64 * MiB)
    assert len(slices) == 16
    n = P.pack(slices, stripe_width=3, max_task_bytes=64 * GiB)
    assert n == 3
    counts = sorted(sum(1 for s in slices if s.task == t) for t in range(n))
    assert counts == [5, 5, 6]
    assert all(0 <= s.task < n for s in slices)


def test_pack_n_tasks_formula():
    # total / max_task_bytes wins over the stripe width
    slices = [P.Slice(i, 0, 0, GiB) for i in range(10)]
    assert P.pack(slices, stripe_width=2, max_task_bytes=2 * GiB) == 5
    assert loads(slices, 5) == [2 * GiB] * 5
    # never more tasks than slices
    slices = [P.Slice(i, 0, 0, GiB) for i in range(2)]
    assert P.pack(slices, stripe_width=4, max_task_bytes=64 * GiB) == 2
    # ceil, not floor
    slices = [P.Slice(i, 0, 0, MiB) for i in range(10)]
    assert P.pack(slices, stripe_width=1, max_task_bytes=3 * MiB) == math.ceil(10 / 3)


def test_pack_nothing():
    assert P.pack([], stripe_width=4, max_task_bytes=GiB) == 0


def test_pack_balances_by_bytes_not_count():
    # one big slice and many small ones: the big one gets a task of its own
    slices = [P.Slice(0, 0, 0, 8 * MiB)] + [P.Slice(i, 0, 0, MiB) for i in range(1, 9)]
    n = P.pack(slices, stripe_width=2, max_task_bytes=GiB)
    assert n == 2
    assert sorted(loads(slices, n)) == [8 * MiB, 8 * MiB]
    big_task = slices[0].task
    assert all(s.task != big_task for s in slices[1:])


def test_pack_assigns_every_slice_and_spreads_empty_ones():
    slices = [P.Slice(i, 0, 0, 0) for i in range(4)]
    n = P.pack(slices, stripe_width=4, max_task_bytes=GiB)
    assert n == 4
    assert sorted(s.task for s in slices) == [0, 1, 2, 3]


def test_pack_balanced_within_one_slice():
    slices = []
    for e, size in enumerate([5 * MiB + 3, 17 * MiB, 1, 0, 9 * MiB, 64 * MiB - 1]):
        slices += P.cut(entry(size, index=e), 4 * MiB)
    n = P.pack(slices, stripe_width=3, max_task_bytes=GiB)
    assert n == 3
    assert all(0 <= s.task < n for s in slices)
    ld = loads(slices, n)
    assert max(ld) - min(ld) <= 4 * MiB


# --------------------------------------------------------------------------- plan() on a tree

@pytest.fixture
def tree(tmp_path):
    """src/ with files, a hard link across directories, symlinks and a FIFO."""
    src = tmp_path / "src"
    write(src / "a.txt", b"hello")
    write(src / "d1" / "orig", b"z" * (2 * 4096 + 100))
    (src / "d2").mkdir()
    os.link(src / "d1" / "orig", src / "d2" / "zlink")
    (src / "empty").mkdir()
    write(src / "zero", b"")
    os.symlink("../a.txt", src / "d1" / "link")
    os.symlink("/nonexistent/target", src / "dangling")
    os.symlink("d1", src / "dirlink")
    os.mkfifo(src / "fifo")
    return src


def by_src(p):
    return {e.src: e for e in p.entries}


def test_plan_tree(tree, tmp_path):
    dst = tmp_path / "out"
    p = P.plan([b(tree)], b(dst), P.Options(slice_size=4096, stripe_width=2), TOKEN)
    assert p.token == TOKEN
    rel = {os.path.relpath(e.src, b(tree)): e for e in p.entries}
    assert set(rel) == {b".", b"a.txt", b"d1", b"d1/orig", b"d1/link", b"d2", b"d2/zlink",
                        b"empty", b"zero", b"dangling", b"dirlink"}
    for r, e in rel.items():
        assert e.dst == os.path.normpath(os.path.join(b(dst), r))
        assert e.index == p.entries.index(e)
    kinds = {r: e.kind for r, e in rel.items()}
    assert kinds == {b".": "dir", b"a.txt": "file", b"d1": "dir", b"d1/orig": "file",
                     b"d1/link": "symlink", b"d2": "dir", b"d2/zlink": "hardlink",
                     b"empty": "dir", b"zero": "file", b"dangling": "symlink",
                     b"dirlink": "symlink"}
    # the top directory comes first (it must exist before its children)
    assert p.entries[0].kind == P.DIR and p.entries[0].dst == b(dst)

    # symlinks: not followed, target kept verbatim, nothing planned below a linked dir
    assert rel[b"d1/link"].link_target == b"../a.txt"
    assert rel[b"dangling"].link_target == b"/nonexistent/target"
    assert rel[b"dirlink"].link_target == b"d1"
    assert not any(e.src.startswith(b(tree / "dirlink") + b"/") for e in p.entries)

    # hard link: second name (in walk order) points at the first one's index
    hl, first = rel[b"d2/zlink"], rel[b"d1/orig"]
    assert hl.link_to == first.index and first.kind == P.FILE
    assert hl.size == 0
    assert p.bytes_total == 5 + 2 * 4096 + 100  # linked data counted once

    # sizes, modes, mtimes from lstat
    st = os.lstat(tree / "a.txt")
    a = rel[b"a.txt"]
    assert (a.size, a.mode, a.mtime_ns) == (5, stat.S_IMODE(st.st_mode), st.st_mtime_ns)

    # the FIFO is skipped with a warning naming it
    assert not any(e.src.endswith(b"fifo") for e in p.entries)
    assert len(p.warnings) == 1 and "fifo" in p.warnings[0] and "special" in p.warnings[0]

    # slices only for files, covering each file exactly
    for e in p.entries:
        mine = sorted((s for s in p.slices if s.entry == e.index), key=lambda s: s.index)
        if e.kind != P.FILE:
            assert mine == []
            continue
        assert sum(s.length for s in mine) == e.size
        assert [s.offset for s in mine] == [i * 4096 for i in range(len(mine))]
    assert len([s for s in p.slices if s.entry == first.index]) == 3
    assert len([s for s in p.slices if s.entry == rel[b"zero"].index]) == 1

    # tasks: the formula, every slice assigned, file/offset order inside a task
    assert p.n_tasks == 2
    assert all(0 <= s.task < p.n_tasks for s in p.slices)
    assert p.slices == sorted(p.slices, key=lambda s: (s.task, s.entry, s.index))
    for t in range(p.n_tasks):
        ts = p.task_slices(t)
        assert ts and ts == sorted(ts, key=lambda s: (s.entry, s.offset))

    # one spool, next to the destination, on its file system
    spool = b(tmp_path / ".hpcmove-tok123.spool")
    assert p.spools == [spool]
    assert all(e.spool == spool for e in p.entries)
    # where each entry waits: the destination's layout under <spool>/t
    assert a.spool_path == spool + b"/t/out/a.txt"
    assert p.spool_dirs[:3] == [spool, spool + b"/t", spool + b"/t/out"]
    assert set(p.spool_dirs) == {spool, spool + b"/t"} | {
        e.spool_path for e in p.entries if e.kind == P.DIR}


@pytest.mark.parametrize("spool, dst, expect", [
    (b"/a/.hpcmove-x.spool", b"/a/d", b"/a/.hpcmove-x.spool/t/d"),
    (b"/a/.hpcmove-x.spool", b"/a/d/e/f", b"/a/.hpcmove-x.spool/t/d/e/f"),
    (b"/a/d/.hpcmove-x.spool", b"/a/d/", b"/a/d/.hpcmove-x.spool/t"),  # into an existing dir
    (b"/.hpcmove-x.spool", b"/d", b"/.hpcmove-x.spool/t/d"),
    (b"./.hpcmove-x.spool", b"d/e", b"./.hpcmove-x.spool/t/d/e"),  # relative (remote home)
    (b"store/.hpcmove-x.spool", b"store/-f\n$(x)", b"store/.hpcmove-x.spool/t/-f\n$(x)"),
])
def test_spool_path_keeps_the_destination_layout(spool, dst, expect):
    assert P.spool_path(spool, dst) == expect
    assert P.spool_root(expect + b"/more", "x") == spool


def test_spool_path_of_a_relative_destination_with_an_absolute_spool(tmp_path, monkeypatch):
    """A local copy to a relative new name: the spool is made beside it from the absolute
    parent, the destination stays relative (read from where hpcmove was called)."""
    monkeypatch.chdir(tmp_path)
    spool = P.spool_dir(bytes(tmp_path / "out"), TOKEN)
    assert P.spool_path(spool, b"out/new") == spool + b"/t/new"
    assert P.spool_path(spool, b"./out//new/x") == spool + b"/t/new/x"


def test_spool_path_refuses_a_destination_outside_its_spool():
    with pytest.raises(ValueError):
        P.spool_path(b"/a/.hpcmove-x.spool", b"/ab/c")


def test_plan_reads_only(tree, tmp_path):
    before = sorted(os.listdir(tmp_path))
    P.plan([b(tree)], b(tmp_path / "out"), P.Options(), TOKEN)
    assert sorted(os.listdir(tmp_path)) == before


def test_hard_links_across_sources(tmp_path):
    f = write(tmp_path / "one" / "f", b"abc")
    os.link(f, tmp_path / "two")
    (tmp_path / "d").mkdir()
    p = P.plan([f, b(tmp_path / "two")], b(tmp_path / "d"), P.Options(), TOKEN)
    assert [e.kind for e in p.entries] == [P.FILE, P.HARDLINK]
    assert p.entries[1].link_to == 0
    assert p.entries[1].dst == b(tmp_path / "d" / "two")


def test_plan_single_file_to_new_name(tmp_path):
    src = write(tmp_path / "in" / "f", b"12345")
    (tmp_path / "outdir").mkdir()
    dst = b(tmp_path / "outdir" / "g")
    p = P.plan([src], dst, P.Options(), TOKEN)
    assert [(e.kind, e.src, e.dst, e.size) for e in p.entries] == [(P.FILE, src, dst, 5)]
    assert p.spools == [b(tmp_path / "outdir" / ".hpcmove-tok123.spool")]
    assert p.n_tasks == 1


def test_plan_top_level_symlink_is_not_followed(tmp_path):
    write(tmp_path / "real" / "f")
    os.symlink("real", tmp_path / "ln")
    p = P.plan([b(tmp_path / "ln")], b(tmp_path / "copy"), P.Options(), TOKEN)
    assert [(e.kind, e.link_target) for e in p.entries] == [(P.SYMLINK, b"real")]
    assert p.slices == [] and p.n_tasks == 0


def test_plan_rsync_contents_into_existing_dir(tmp_path):
    write(tmp_path / "src" / "f", b"1")
    write(tmp_path / "src" / "sub" / "g", b"2")
    dst = tmp_path / "dst"
    dst.mkdir()
    p = P.plan([b(tmp_path / "src") + b"/"], b(dst), P.Options(), TOKEN)
    dsts = [e.dst for e in p.entries]
    assert dsts[0] == b(dst) and p.entries[0].kind == P.DIR
    assert sorted(dsts[1:]) == [b(dst / "f"), b(dst / "sub"), b(dst / "sub" / "g")]
    assert not any(b"/src" in d[len(b(dst)):] for d in dsts)


def test_plan_destination_inside_source_refused(tmp_path):
    write(tmp_path / "src" / "f")
    with pytest.raises(PlanError, match="inside"):
        P.plan([b(tmp_path / "src")], b(tmp_path / "src" / "copy"), P.Options(), TOKEN)
    # the same through "copy into an existing directory": src -> src/src
    with pytest.raises(PlanError, match="inside"):
        P.plan([b(tmp_path / "src")], b(tmp_path / "src"), P.Options(), TOKEN)


def test_plan_source_equal_destination_refused(tmp_path):
    f = write(tmp_path / "f")
    with pytest.raises(PlanError, match="same"):
        P.plan([f], f, P.Options(), TOKEN)


def test_plan_missing_source_named(tmp_path):
    ok = write(tmp_path / "ok")
    missing = tmp_path / "no such file"
    (tmp_path / "d").mkdir()
    with pytest.raises(PlanError) as info:
        P.plan([ok, b(missing)], b(tmp_path / "d"), P.Options(), TOKEN)
    assert str(missing) in str(info.value)


def test_plan_missing_destination_parent(tmp_path):
    f = write(tmp_path / "f")
    with pytest.raises(PlanError, match="does not exist"):
        P.plan([f], b(tmp_path / "nope" / "g"), P.Options(), TOKEN)


@pytest.mark.parametrize("opts", [P.Options(slice_size=0), P.Options(stripe_width=0)])
def test_plan_bad_options(tmp_path, opts):
    f = write(tmp_path / "f")
    with pytest.raises(PlanError):
        P.plan([f], b(tmp_path / "g"), opts, TOKEN)


def test_plan_non_utf8_names_survive(tmp_path):
    top = b(tmp_path) + b"/src\xfe"
    os.mkdir(top)
    name = b"\xff\xfe"
    with open(top + b"/" + name, "wb") as f:
        f.write(b"data")
    dst = b(tmp_path) + b"/dst\xff"
    p = P.plan([top], dst, P.Options(), TOKEN)
    assert [(e.kind, e.src, e.dst) for e in p.entries] == [
        (P.DIR, top, dst), (P.FILE, top + b"/" + name, dst + b"/" + name)]
    assert all(isinstance(e.src, bytes) and isinstance(e.dst, bytes) for e in p.entries)
    assert p.entries[1].size == 4


def test_spool_dir_name():
    assert P.spool_dir(b"/a/b", "abc") == b"/a/b/.hpcmove-abc.spool"


# --------------------------------------------------------------------------- copyjob files

def test_read_copyjob(tmp_path):
    path = tmp_path / "job.txt"
    path.write_bytes(
        b"# a comment\n"
        b"\n"
        b"   \t\n"
        b"   # indented comment\n"
        b"/src/a /dst/a\n"
        b"\"/src/with space\" '/dst/it''s here'\n"
        b"/src/back\\ slash\t/dst/x\r\n"
        b"/src/\xff\xfe /dst/\xff\n"
    )
    assert read_copyjob(str(path)) == [
        (b"/src/a", b"/dst/a"),
        (b"/src/with space", b"/dst/its here"),
        (b"/src/back slash", b"/dst/x"),
        (b"/src/\xff\xfe", b"/dst/\xff"),
    ]


@pytest.mark.parametrize("bad, what", [
    (b"/only/one\n", "1 fields"),
    (b"/a /b /c\n", "3 fields"),
    (b"\"/unclosed /b\n", ""),
])
def test_read_copyjob_malformed_line_names_line_number(tmp_path, bad, what):
    path = tmp_path / "job.txt"
    path.write_bytes(b"# header\n\n/ok/src /ok/dst\n" + bad + b"/more /lines\n")
    with pytest.raises(UsageError) as info:
        read_copyjob(str(path))
    message = str(info.value)
    assert f"{path}:4:" in message
    assert what in message


def test_read_copyjob_empty(tmp_path):
    path = tmp_path / "job.txt"
    path.write_bytes(b"# nothing\n\n")
    assert read_copyjob(str(path)) == []
