"""The local copy engine: one pass over the source slice (read -> xxh3 -> pwrite),
then one read of the written slice to verify it.

Holes in sparse sources are found with SEEK_DATA/SEEK_HOLE and stay holes at the
destination; their zeros are still hashed so digests cover every byte.

Runs of data of MAP_MIN bytes or more are read through mmap windows: xxh3 and pwrite
take their bytes straight from the page cache, with no copy into a buffer first. On
2 cores, two tasks writing halves of one 2 GiB file took 0.5 s this way and 0.7-2.2 s
with pread into a buffer (bench/README.md). Shorter runs (small files) use one pread:
fewer system calls than map + unmap. A source truncated while it is mapped kills the
task with SIGBUS; finalize then finds the source changed and fails the file, as it
would for any source changed during the transfer.
"""
import errno
import json
import mmap
import os
import time
from dataclasses import dataclass

import xxhash

from hpcmove.errors import TransferError

BUFFER = 1 << 20  # fits in L2: read, hash and write from cache-hot memory
MAP_MIN = 8 << 20  # data runs at least this long are read through mmap
MAP_WINDOW = 64 << 20  # mapped at a time
# finalize's re-check of what is at rest hashes in forked helpers from this much on
HELPERS, HELPER_MIN_RANGES, HELPER_MIN_BYTES = 4, 1000, 256 << 20
# Errors worth retrying in the task; everything else fails the file at once.
TRANSIENT = {errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ESTALE,
             errno.EBUSY, errno.ECONNRESET, errno.EREMOTEIO}


def read_buffer(size=BUFFER):
    """A writable buffer that begins at a page boundary, for reading files into. A
    bytearray this big begins 16 bytes past one (malloc's header), and on AMD EPYC the
    kernel's copy from the page cache into memory 1-31 bytes past a page boundary runs
    at a third of its speed: reading 2 GiB took 0.95 CPU s against 0.29
    (bench/stream.py's `offset16` row). Anonymous and private: a fork gets a copy."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _fork_digests(engine, ranges):
    """engine._digests(ranges) in a forked child; returns a function that waits for the
    child and returns its list (a child that died: each range 'unreadable (...)', so
    the check sends those slices again rather than trusting them)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only hashing, then gone without running any cleanup
        code = 1
        try:
            # no inherited descriptor but its pipe (an ssh session's stdin held open
            # here would keep that session from seeing its end)
            os.closerange(3, write_fd)
            os.closerange(write_fd + 1, os.sysconf("SC_OPEN_MAX"))
            data = json.dumps(engine._digests(ranges)).encode()
            with os.fdopen(write_fd, "wb") as out:
                out.write(data)
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)

    def collect():
        with os.fdopen(read_fd, "rb") as f:
            data = f.read()
        _pid, status = os.waitpid(pid, 0)
        try:
            if os.waitstatus_to_exitcode(status) == 0:
                return json.loads(data)
        except ValueError:
            pass
        return [f"unreadable (the hashing helper ended with status {status})"] * len(ranges)
    return collect


@dataclass
class SliceWork:
    src: bytes
    dst: bytes  # the spool file
    offset: int
    length: int
    size: int  # whole-file size, planned
    mtime_ns: int  # whole-file mtime, planned


def new_hash():
    return xxhash.xxh3_128()


def small_digest(fd, offset, length):
    """new_hash()'s digest of a range of at most BUFFER bytes, read whole and hashed at
    once: half the time of a hash object fed from the buffer for 20,000 files of 1-64 KiB
    (0.14 against 0.28-0.39 s per 10,000). A file that ends first is hashed as far as it
    goes, as by the loop."""
    data = os.pread(fd, length, offset)
    while 0 < len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            break
        data += more
    return xxhash.xxh3_128_hexdigest(data)


def segments(fd, start, end):
    """(offset, length, is_data) runs covering [start, end), holes found by SEEK_DATA."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole from here to EOF
                yield pos, end - pos, False
                return
            yield pos, end - pos, True  # file system without hole reporting
            return
        if data > pos:
            yield pos, min(data, end) - pos, False
            pos = min(data, end)
            if pos >= end:
                return
        hole = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
        yield pos, hole - pos, True
        pos = hole


class _NoMap(Exception):
    """The file system cannot map this file; read it instead."""


class CopyEngine:
    """Copies slices between local (or shared) file systems."""

    name = "copy"
    streams = 1  # slices a task copies at once with this engine

    def __init__(self, buffer_size=BUFFER, bwlimit=0):
        self.buf = read_buffer(buffer_size)
        self.zeros = bytes(buffer_size)
        self.bwlimit = bwlimit  # bytes per second for this task; 0 = unlimited
        self._budget_start, self._budget_bytes = time.monotonic(), 0

    @classmethod
    def from_options(cls, options):
        """The engine a job's recorded options ask for."""
        return cls(bwlimit=options.get("bwlimit", 0))

    def _throttle(self, n):
        """Sleep as needed so this task's data rate stays under bwlimit."""
        if not self.bwlimit:
            return
        self._budget_bytes += n
        ahead = self._budget_bytes / self.bwlimit - (time.monotonic() - self._budget_start)
        if ahead > 0:
            time.sleep(ahead)

    def copy_slice(self, work):
        """Copy and verify one slice; returns (source digest, destination digest)."""
        src_fd, st = self.open_source(work)
        try:
            # No holes when every byte has a block (SEEK_DATA/SEEK_HOLE are skipped then).
            dense = st.st_blocks * 512 >= st.st_size
            # A slice that is the whole file owns the spool file: truncate on open, and
            # let the writes give it its size (fewer calls per small file).
            whole = work.offset == 0 and work.length == work.size
            try:
                dst_fd = os.open(work.dst, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
                                 | (os.O_TRUNC if whole else 0), 0o600)
            except OSError as e:
                raise self._error(e, work.dst) from e
            try:
                if not (whole and dense) and os.fstat(dst_fd).st_size != work.size:
                    os.ftruncate(dst_fd, work.size)  # every task sets the same size
                src_digest = self._copy(src_fd, dst_fd, work, dense)
                dst_digest = self._digest(dst_fd, work.offset, work.length)
            except OSError as e:
                raise self._error(e, work.src) from e
            finally:
                os.close(dst_fd)
        finally:
            os.close(src_fd)
        return src_digest, dst_digest

    def already_there(self, work, dst):
        """(source digest, True) when `dst`, the final path, already holds this slice's
        bytes (same planned size, same xxh3-128), else (None, False). For --skip-existing."""
        try:
            st = os.stat(dst)
        except OSError:
            return None, False
        if st.st_size != work.size:
            return None, False
        try:
            theirs = self.digest(dst, work.offset, work.length)
            ours = self.digest(work.src, work.offset, work.length)
        except TransferError:
            return None, False
        return ours, ours == theirs

    def digest(self, path, offset, length):
        """xxh3-128 of [offset, offset + length) of `path` (an integrity re-check)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise self._error(e, path) from e
        try:
            return self._digest(fd, offset, length)
        finally:
            os.close(fd)

    def open_source(self, work):
        """(fd, stat) of the slice's source, opened without following a symlink, or
        TransferError when it cannot be read or is not what was planned."""
        try:
            fd = os.open(work.src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise self._error(e, work.src) from e
        st = os.fstat(fd)
        if st.st_size != work.size or st.st_mtime_ns != work.mtime_ns:
            os.close(fd)
            raise TransferError(f"source changed since it was planned: {os.fsdecode(work.src)}")
        return fd, st

    def digests(self, ranges, sources=None):
        """digest() of each (path, offset, length[, file size]); 'unreadable (...)' where
        it fails. `sources` (each range's file's source, for an engine that may check a
        remote file whole against it) is not needed here. Many ranges are shared with
        forked helpers, one per CPU this process may use (at most HELPERS): one Python
        thread hashes 20,000 small files in 0.25 s, two threads take longer (the GIL),
        two processes 0.15 s."""
        helpers = min(HELPERS, len(os.sched_getaffinity(0))) - 1
        if helpers < 1 or len(ranges) < HELPER_MIN_RANGES and \
                sum(r[2] for r in ranges) < HELPER_MIN_BYTES:
            return self._digests(ranges)
        n = min(helpers + 1, len(ranges))
        shares = [ranges[i::n] for i in range(n)]  # interleaved: like sizes in each share
        children = [_fork_digests(self, share) for share in shares[1:]]
        got = [self._digests(shares[0])] + [collect() for collect in children]
        out = [None] * len(ranges)
        for i, share in enumerate(got):
            out[i::n] = share
        return out

    def _digests(self, ranges):
        out = []
        for path, offset, length, *_size in ranges:
            try:
                out.append(self.digest(path, offset, length))
            except TransferError as e:
                out.append(f"unreadable ({e})")
        return out

    def _copy(self, src_fd, dst_fd, work, dense=False):
        h = new_hash()
        end = work.offset + work.length
        if work.length >= MAP_MIN:
            os.posix_fadvise(src_fd, work.offset, work.length, os.POSIX_FADV_SEQUENTIAL)
        runs = [(work.offset, work.length, True)] if dense else \
            segments(src_fd, work.offset, end)
        for pos, length, is_data in runs:
            if not is_data:
                self._hash_zeros(h, length)
                continue
            for at, piece in self._pieces(src_fd, pos, pos + length):
                if not piece:
                    raise TransferError(f"source changed (shorter than planned): "
                                        f"{os.fsdecode(work.src)}")
                h.update(piece)
                written = 0
                while written < len(piece):
                    written += os.pwrite(dst_fd, piece[written:], at + written)
                self._throttle(len(piece))
        return h.hexdigest()

    def _digest(self, fd, offset, length):
        if length <= len(self.buf):
            return small_digest(fd, offset, length)
        h = new_hash()
        for _at, piece in self._pieces(fd, offset, offset + length):
            if not piece:
                break
            h.update(piece)
        return h.hexdigest()

    def _pieces(self, fd, pos, stop):
        """(offset, memoryview) pieces of at most BUFFER bytes covering [pos, stop) of fd;
        an empty piece when the file ends early. Each piece is valid only until the next
        one is asked for."""
        if stop - pos >= MAP_MIN:
            try:
                yield from self._mapped_pieces(fd, pos, stop)
                return
            except _NoMap:
                pass  # a file system without mmap: read it
        mv = memoryview(self.buf)
        while pos < stop:
            n = os.preadv(fd, [mv[:min(len(mv), stop - pos)]], pos)
            yield pos, mv[:n]
            if n == 0:
                return
            pos += n

    @staticmethod
    def _mapped_pieces(fd, pos, stop):
        planned, stop = stop, min(stop, os.fstat(fd).st_size)  # past the end would SIGBUS
        first = True
        while pos < stop:
            base = pos - pos % mmap.ALLOCATIONGRANULARITY
            size = min(stop - base, MAP_WINDOW)
            try:
                window = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ, offset=base)
            except OSError as e:
                if first:
                    raise _NoMap from e
                raise
            first = False
            with window, memoryview(window) as view:
                while pos < base + size:
                    n = min(BUFFER, base + size - pos)
                    piece = view[pos - base:pos - base + n]
                    try:
                        yield pos, piece
                    finally:
                        piece.release()  # no view may outlive the window's unmapping
                    pos += n
        if pos < planned:
            yield pos, memoryview(b"")  # the file is shorter than planned

    def _hash_zeros(self, h, length):
        while length > 0:
            n = min(length, len(self.zeros))
            h.update(memoryview(self.zeros)[:n])
            length -= n

    @staticmethod
    def _error(exc, path):
        name = os.fsdecode(path)
        reason = f"{exc.strerror or exc}: {name}"
        if exc.errno == errno.ENOSPC:
            reason = f"no space left on device (ENOSPC) writing {name}"
        return TransferError(reason, transient=exc.errno in TRANSIENT)
