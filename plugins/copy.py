"""The local copy engine: one pass over the source slice (pread -> xxh3 -> pwrite),
then one read of the written slice to verify it.

Holes in sparse sources are found with SEEK_DATA/SEEK_HOLE and stay holes at the
destination; their zeros are still hashed so digests cover every byte.
"""
import errno
import os
import time
from dataclasses import dataclass

import xxhash

from hpcmove.errors import TransferError

BUFFER = 1 << 20  # fits in L2: read, hash and write from cache-hot memory
# Errors worth retrying in the task; everything else fails the file at once.
TRANSIENT = {errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ESTALE,
             errno.EBUSY, errno.ECONNRESET, errno.EREMOTEIO}


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


class CopyEngine:
    """Copies slices between local (or shared) file systems."""

    name = "copy"

    def __init__(self, buffer_size=BUFFER, bwlimit=0):
        self.buf = bytearray(buffer_size)
        self.zeros = bytes(buffer_size)
        self.bwlimit = bwlimit  # bytes per second for this task; 0 = unlimited
        self._budget_start, self._budget_bytes = time.monotonic(), 0

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
        try:
            src_fd = os.open(work.src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise self._error(e, work.src) from e
        try:
            st = os.fstat(src_fd)
            if st.st_size != work.size or st.st_mtime_ns != work.mtime_ns:
                raise TransferError(f"source changed since it was planned: {os.fsdecode(work.src)}")
            try:
                dst_fd = os.open(work.dst, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise self._error(e, work.dst) from e
            try:
                if os.fstat(dst_fd).st_size != work.size:
                    os.ftruncate(dst_fd, work.size)  # every task sets the same size
                src_digest = self._copy(src_fd, dst_fd, work)
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

    def _copy(self, src_fd, dst_fd, work):
        h, mv = new_hash(), memoryview(self.buf)
        end = work.offset + work.length
        os.posix_fadvise(src_fd, work.offset, work.length, os.POSIX_FADV_SEQUENTIAL)
        for pos, length, is_data in segments(src_fd, work.offset, end):
            if not is_data:
                self._hash_zeros(h, length)
                continue
            stop = pos + length
            while pos < stop:
                n = os.preadv(src_fd, [mv[:min(len(mv), stop - pos)]], pos)
                if n == 0:
                    raise TransferError(f"source changed (shorter than planned): "
                                        f"{os.fsdecode(work.src)}")
                h.update(mv[:n])
                written = 0
                while written < n:
                    written += os.pwritev(dst_fd, [mv[written:n]], pos + written)
                pos += n
                self._throttle(n)
        return h.hexdigest()

    def _digest(self, fd, offset, length):
        h, mv = new_hash(), memoryview(self.buf)
        pos, end = offset, offset + length
        while pos < end:
            n = os.preadv(fd, [mv[:min(len(mv), end - pos)]], pos)
            if n == 0:
                break
            h.update(mv[:n])
            pos += n
        return h.hexdigest()

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
