"""The local copy engine (plugins/copy.py, installed as hpcmove_plugins.copy)."""
import os
import random

import pytest
import xxhash

from hpcmove.errors import TransferError
from hpcmove_plugins.copy import CopyEngine, SliceWork, segments

MiB = 1 << 20


def xxh(data):
    return xxhash.xxh3_128(data).hexdigest()


def work_for(src, dst, offset, length):
    st = os.stat(src)
    return SliceWork(os.fsencode(src), os.fsencode(dst), offset, length, st.st_size,
                     st.st_mtime_ns)


def supports_holes(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_DATA) > 0
    except OSError:
        return False
    finally:
        os.close(fd)


def make_sparse(path, size=64 * MiB, pieces=((10 * MiB, b"ten MiB"), (40 * MiB, b"forty"))):
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
    if not supports_holes(path):
        pytest.skip("file system does not report holes")
    return path


def test_copy_three_slices_small_buffer(tmp_path):
    data = random.Random(1234).randbytes(3 * MiB)
    src, dst = tmp_path / "src", tmp_path / "spool"
    src.write_bytes(data)
    engine = CopyEngine(buffer_size=256 * 1024)
    # tasks run in any order: copy the slices backwards
    for i in (2, 0, 1):
        off = i * MiB
        s, d = engine.copy_slice(work_for(src, dst, off, MiB))
        assert s == d == xxh(data[off:off + MiB])
    assert dst.read_bytes() == data
    assert os.stat(dst).st_mode & 0o777 == 0o600


def test_copy_uneven_last_slice(tmp_path):
    data = random.Random(5).randbytes(MiB + 12345)
    src, dst = tmp_path / "src", tmp_path / "spool"
    src.write_bytes(data)
    engine = CopyEngine(buffer_size=64 * 1024)
    s, d = engine.copy_slice(work_for(src, dst, MiB, 12345))
    assert s == d == xxh(data[MiB:])
    assert os.path.getsize(dst) == len(data)  # sized to the whole file at once
    s, d = engine.copy_slice(work_for(src, dst, 0, MiB))
    assert s == d == xxh(data[:MiB])
    assert dst.read_bytes() == data


def test_copy_empty_file(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "spool"
    src.write_bytes(b"")
    s, d = CopyEngine(buffer_size=4096).copy_slice(work_for(src, dst, 0, 0))
    assert s == d == xxh(b"")
    assert dst.exists() and dst.read_bytes() == b""


def test_copy_overwrites_stale_spool_content(tmp_path):
    data = random.Random(9).randbytes(100_000)
    src, dst = tmp_path / "src", tmp_path / "spool"
    src.write_bytes(data)
    dst.write_bytes(b"\x01" * 200_000)  # left over from an earlier attempt, too long
    s, d = CopyEngine(buffer_size=8192).copy_slice(work_for(src, dst, 0, len(data)))
    assert s == d == xxh(data)
    assert dst.read_bytes() == data


def test_sparse_file_stays_sparse(tmp_path):
    src = make_sparse(tmp_path / "src")
    dst = tmp_path / "spool"
    data = src.read_bytes()
    engine = CopyEngine(buffer_size=256 * 1024)
    size, step = 64 * MiB, 16 * MiB
    for off in range(0, size, step):
        s, d = engine.copy_slice(work_for(src, dst, off, step))
        assert s == d == xxh(data[off:off + step])  # holes hashed as zeros
    assert dst.read_bytes() == data
    st = os.stat(dst)
    assert st.st_size == size
    assert st.st_blocks * 512 < 1 * MiB


def test_sparse_slice_that_is_all_hole(tmp_path):
    src = make_sparse(tmp_path / "src")
    dst = tmp_path / "spool"
    s, d = CopyEngine(buffer_size=1 * MiB).copy_slice(work_for(src, dst, 48 * MiB, 16 * MiB))
    assert s == d == xxh(bytes(16 * MiB))


def test_source_changed_size(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "spool"
    src.write_bytes(b"abcdef")
    work = work_for(src, dst, 0, 6)
    work.size += 1
    with pytest.raises(TransferError) as info:
        CopyEngine(buffer_size=4096).copy_slice(work)
    assert not info.value.transient
    assert "changed" in str(info.value) and str(src) in str(info.value)
    assert not dst.exists()


def test_source_changed_mtime(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "spool"
    src.write_bytes(b"abcdef")
    work = work_for(src, dst, 0, 6)
    os.utime(src, ns=(work.mtime_ns, work.mtime_ns - 10**9))
    with pytest.raises(TransferError) as info:
        CopyEngine(buffer_size=4096).copy_slice(work)
    assert not info.value.transient
    assert str(src) in str(info.value)


def test_missing_source_named(tmp_path):
    src, dst = tmp_path / "gone away", tmp_path / "spool"
    work = SliceWork(os.fsencode(src), os.fsencode(dst), 0, 10, 10, 0)
    with pytest.raises(TransferError) as info:
        CopyEngine(buffer_size=4096).copy_slice(work)
    assert str(src) in str(info.value)
    assert not info.value.transient


def test_symlinked_source_not_followed(tmp_path):
    real = tmp_path / "real"
    real.write_bytes(b"x" * 10)
    src = tmp_path / "link"
    os.symlink(real, src)
    work = work_for(real, tmp_path / "spool", 0, 10)
    work.src = os.fsencode(src)
    with pytest.raises(TransferError) as info:
        CopyEngine(buffer_size=4096).copy_slice(work)
    assert str(src) in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_source_named(tmp_path):
    src = tmp_path / "secret"
    src.write_bytes(b"x")
    work = work_for(src, tmp_path / "spool", 0, 1)
    src.chmod(0)
    with pytest.raises(TransferError) as info:
        CopyEngine(buffer_size=4096).copy_slice(work)
    assert str(src) in str(info.value)


def test_missing_spool_directory_named(tmp_path):
    src = tmp_path / "src"
    src.write_bytes(b"x" * 10)
    dst = tmp_path / "no spool" / "0"
    with pytest.raises(TransferError) as info:
        CopyEngine(buffer_size=4096).copy_slice(work_for(src, dst, 0, 10))
    assert str(dst) in str(info.value)


def test_non_utf8_names(tmp_path):
    src = os.fsencode(tmp_path) + b"/src\xff"
    dst = os.fsencode(tmp_path) + b"/spool\xfe"
    with open(src, "wb") as f:
        f.write(b"payload")
    s, d = CopyEngine(buffer_size=4096).copy_slice(work_for(src, dst, 0, 7))
    assert s == d == xxh(b"payload")
    with open(dst, "rb") as f:
        assert f.read() == b"payload"


# --------------------------------------------------------------------------- segments

def runs(path, start, end):
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(segments(fd, start, end))
    finally:
        os.close(fd)


def check_cover(result, start, end):
    pos = start
    for off, length, _ in result:
        assert off == pos and length > 0
        pos += length
    assert pos == end


def test_segments_sparse(tmp_path):
    src = make_sparse(tmp_path / "src")
    size = 64 * MiB
    result = runs(src, 0, size)
    check_cover(result, 0, size)
    assert result[0] == (0, result[0][1], False) and result[0][1] <= 10 * MiB
    assert result[-1][2] is False  # the file ends in a hole
    data = [(o, n) for o, n, is_data in result if is_data]
    assert len(data) == 2
    assert data[0][0] <= 10 * MiB < 10 * MiB + 7 <= data[0][0] + data[0][1]
    assert data[1][0] <= 40 * MiB < 40 * MiB + 5 <= data[1][0] + data[1][1]
    assert sum(n for _, n in data) <= 1 * MiB
    # no two neighbours of the same kind
    assert all(a[2] != b[2] for a, b in zip(result, result[1:]))


def test_segments_subrange(tmp_path):
    src = make_sparse(tmp_path / "src")
    start, end = 5 * MiB, 10 * MiB + 2
    result = runs(src, start, end)
    check_cover(result, start, end)
    assert result[0] == (start, result[0][1], False)
    assert result[-1][2] is True and result[-1][0] + result[-1][1] == end
    # entirely inside the trailing hole
    assert runs(src, 50 * MiB, 60 * MiB) == [(50 * MiB, 10 * MiB, False)]
    assert runs(src, 7, 7) == []


def test_segments_dense_file(tmp_path):
    src = tmp_path / "dense"
    src.write_bytes(b"x" * 100_000)
    assert runs(src, 0, 100_000) == [(0, 100_000, True)]
    assert runs(src, 10, 20) == [(10, 10, True)]


def test_segments_all_hole(tmp_path):
    make_sparse(tmp_path / "probe")  # skips where holes are not reported
    src = tmp_path / "holes"
    with open(src, "wb") as f:
        f.truncate(8 * MiB)
    assert runs(src, 0, 8 * MiB) == [(0, 8 * MiB, False)]
    assert runs(src, MiB, 2 * MiB) == [(MiB, MiB, False)]


@pytest.mark.parametrize("offset", [0, 4096 * 3 + 17])  # page-aligned and not
def test_mapped_copy_across_windows(tmp_path, monkeypatch, offset):
    """Long runs go through mmap windows; digests and bytes match the pread path."""
    import hpcmove_plugins.copy as copy
    monkeypatch.setattr(copy, "MAP_MIN", 64 * 1024)
    monkeypatch.setattr(copy, "MAP_WINDOW", 256 * 1024)
    data = random.Random(77).randbytes(3 * MiB + 999)
    src, dst = tmp_path / "src", tmp_path / "spool"
    src.write_bytes(data)
    length = len(data) - offset
    s, d = CopyEngine(buffer_size=100_000).copy_slice(work_for(src, dst, offset, length))
    assert s == d == xxh(data[offset:])
    assert dst.read_bytes()[offset:] == data[offset:]
    assert CopyEngine().digest(os.fsencode(dst), offset, length) == s


def test_mapped_digest_of_a_shorter_file_stops_at_its_end(tmp_path, monkeypatch):
    import hpcmove_plugins.copy as copy
    monkeypatch.setattr(copy, "MAP_MIN", 64 * 1024)
    path = tmp_path / "f"
    path.write_bytes(b"x" * MiB)
    assert CopyEngine().digest(os.fsencode(path), 0, 2 * MiB) == xxh(b"x" * MiB)


def test_file_system_without_mmap_is_read(tmp_path, monkeypatch):
    import hpcmove_plugins.copy as copy

    def no_mmap(*args, **kwargs):
        raise OSError(19, "No such device")
    engine = CopyEngine()  # its own buffer is anonymous memory: mapped before
    monkeypatch.setattr(copy, "MAP_MIN", 64 * 1024)
    monkeypatch.setattr(copy.mmap, "mmap", no_mmap)
    data = random.Random(3).randbytes(MiB)
    src, dst = tmp_path / "src", tmp_path / "spool"
    src.write_bytes(data)
    s, d = engine.copy_slice(work_for(src, dst, 0, len(data)))
    assert s == d == xxh(data)


def test_many_digests_are_shared_with_forked_helpers_in_order(tmp_path, monkeypatch):
    """finalize's re-check of thousands of spool files hashes in forked helpers (one per
    CPU it may use): the same digests in the same order as one process computes them,
    a range that cannot be read still 'unreadable (reason)', and more than one process
    did the work."""
    import hpcmove_plugins.copy as copy_mod
    files = []
    for i in range(60):
        path = tmp_path / f"f{i:02d}"
        path.write_bytes(os.urandom(100 + i * 37))
        files.append(path)
    ranges = [(bytes(p), 0, p.stat().st_size, p.stat().st_size) for p in files]
    ranges.insert(7, (bytes(tmp_path / "gone"), 0, 10, 10))
    ranges.append((bytes(files[3]), 50, 40, files[3].stat().st_size))  # a part of a file
    engine = CopyEngine()
    alone = engine._digests(ranges)
    pids = tmp_path / "pids"
    real = CopyEngine.digest

    def digest(self, path, offset, length):
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(self, path, offset, length)
    monkeypatch.setattr(CopyEngine, "digest", digest)
    monkeypatch.setattr(copy_mod, "HELPER_MIN_RANGES", 10)
    monkeypatch.setattr(copy_mod.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    shared = engine.digests(ranges)
    assert shared == alone
    assert shared[7].startswith("unreadable (") and "gone" in shared[7]
    assert shared[-1] == xxh(files[3].read_bytes()[50:90])
    assert len(set(pids.read_text().split())) == 3


def test_a_helper_that_dies_leaves_its_ranges_unverified(tmp_path, monkeypatch):
    """A helper killed before it answers: its ranges come back 'unreadable (...)' (sent
    again by the check), never an empty or made-up digest."""
    import signal

    import hpcmove_plugins.copy as copy_mod
    paths = []
    for i in range(20):
        (tmp_path / f"f{i}").write_bytes(b"x" * i)
        paths.append(tmp_path / f"f{i}")
    ranges = [(bytes(p), 0, p.stat().st_size, p.stat().st_size) for p in paths]
    parent = os.getpid()
    real = CopyEngine.digest

    def digest(self, path, offset, length):
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, path, offset, length)
    monkeypatch.setattr(CopyEngine, "digest", digest)
    monkeypatch.setattr(copy_mod, "HELPER_MIN_RANGES", 10)
    monkeypatch.setattr(copy_mod.os, "sched_getaffinity", lambda pid: {0, 1})
    got = CopyEngine().digests(ranges)
    assert got[0::2] == [xxh(p.read_bytes()) for p in paths[0::2]]
    assert all(g.startswith("unreadable (the hashing helper ended") for g in got[1::2])


def test_engines_read_into_a_page_aligned_buffer_of_their_own(tmp_path):
    """The kernel copies from the page cache into memory a few bytes past a page boundary
    at a third of its speed on AMD EPYC (bench/stream.py): the engines' read buffers
    begin at a page boundary, whatever malloc did before, and a fork's copy is private."""
    import ctypes
    import mmap

    from hpcmove_plugins.ssh import SshEngine

    clutter = [bytearray(MiB) for _ in range(3)]  # malloc's placement varies with history
    engines = [CopyEngine(), SshEngine(remote={"sum": "xxh128"}), CopyEngine(buffer_size=4096)]
    engines.append(engines[1].fork())
    for engine in engines:
        address = ctypes.addressof(ctypes.c_char.from_buffer(engine.buf))
        assert address % mmap.PAGESIZE == 0
    pid = os.fork()
    if pid == 0:
        engines[0].buf[:5] = b"child"
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert engines[0].buf[:5] == bytes(5)
    del clutter
    # and it works as the buffer it replaces: a slice copied through it
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * 4096 + 17))
    engine = engines[2]
    work = work_for(src, tmp_path / "dst", 0, src.stat().st_size)
    assert engine.copy_slice(work) == (xxh(src.read_bytes()),) * 2
    assert (tmp_path / "dst").read_bytes() == src.read_bytes()
