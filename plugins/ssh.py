"""The SSH engine: slices to (push) or from (pull) a remote host through a control socket.

Push: the local slice is read once, hashed and written to `ssh HOST 'dd of=SPOOL seek=..'`;
what landed on the remote disk is read back there and hashed, and the two digests must
agree: in finalize's at-rest check for slices and bundled files sent by array tasks (once,
not twice: a range read on the remote host goes through a pipe, about 1 CPU s per GiB),
at once for slices finalize itself sends again. Pull: `dd if=SRC skip=..` streams the slice
here, it is written to the local spool and read back for its digest, while a second
session hashes the source range on the remote host (and reports the file's size and
mtime, so a changed source is caught).

Hashes: xxh3-128 (`xxhsum -H2`) when the remote host has xxhsum, else POSIX `cksum`
(coreutils), computed here with zlib's CRC-32 over bit-reversed bytes.

Small whole files travel in bundles, one session each: pushed, a tar stream built here
(each file hashed as it is read) into the remote tar; pulled, the remote digests first,
then the remote tar's stream, straight into this machine's GNU tar for a tree (only the
names asked for) or read here for files renamed on the way.

A task runs `streams` slices at once, each its own session on the control master: a
stream that finishes early takes the next slice (next-available queueing).
"""
import errno
import functools
import io
import math
import os
import shutil
import stat
import subprocess
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import xxhash

from hpcmove import states
from hpcmove.errors import TransferError
from hpcmove.remote import ASKS, SESSION_REFUSED, SESSIONS, WIDE_STDIN, AuthRequired, Remote, \
    ask_later, digest_cmd, digests_script, parse_check, parse_digest, parse_digests, \
    parse_sums, pull_slice_cmd, q, refused, sums_cmd, word, write_cmd
from hpcmove.ssh import further_connections
from hpcmove_plugins.copy import BUFFER, CopyEngine, SliceWork, read_buffer, small_digest

# Whole files up to this size travel in bundles: one tar stream and one session for many
# files, never one connection per file.
BUNDLE_FILE_MAX = 4 << 20
BUNDLE_FILES, BUNDLE_BYTES = 2000, 128 << 20
BUNDLE_MIN_FILES = 200  # fewer per stream: one bundle, not a session per handful
PART_BYTES = 16 << 20  # a pushed spool at most this big may share a bundle with others
WHOLE_READERS = 4  # sources read at once for finalize's check of files whole (as dd's)
_REV = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


class Cksum:
    """POSIX cksum (CRC-32, MSB first, length appended) as coreutils prints it."""

    def __init__(self):
        self.reg, self.n = 0xFFFFFFFF, 0  # zlib's start value for a zero register

    def update(self, data):
        self.reg = zlib.crc32(bytes(data).translate(_REV), self.reg)
        self.n += len(data)

    def hexdigest(self):
        length, tail = self.n, bytearray()
        while length:
            tail.append(length & 0xFF)
            length >>= 8
        reg = zlib.crc32(bytes(tail).translate(_REV), self.reg) ^ 0xFFFFFFFF
        return "cksum:%d/%d" % (int(f"{reg:032b}"[::-1], 2) ^ 0xFFFFFFFF, self.n)


# What the remote tools print (strerror, C or English locale) for errors that a retry
# cannot mend: the slice or bundle fails at once with that reason. Anything else (or
# the same in another language) is retried as before.
PERMANENT = (b"No space left on device", b"Disk quota exceeded", b"Read-only file system",
             b"Permission denied", b"File too large", b"No such file or directory")


# What ssh here prints when a session did not open through a live master: refused by
# the sshd (remote.SESSION_REFUSED, asked again), or the socket not answering for a
# moment. The command never ran (ssh makes no connection of its own: ProxyCommand=false),
# so the next attempt through the same master goes through.
REFUSED = SESSION_REFUSED + (b"Control socket connect",
                             b"mux_client_request_session: read from master failed")


NO_SPLICE = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)  # this file or kernel: copy


def remote_error(host, what, stderr, code):
    """A remote command's failure as a TransferError: its own words (the first two lines
    and the last: tar says it once per file of a bundle), transient unless they say that
    no retry can help (PERMANENT) and do not come from a session the sshd refused."""
    lines = stderr.decode(errors="replace").strip().splitlines() or [f"exit {code}"]
    if len(lines) > 3:
        lines = lines[:2] + [f"... ({len(lines) - 3} more lines)", lines[-1]]
    refused = any(r in stderr for r in REFUSED)
    return TransferError(f"on {host}: {what}: " + "\n".join(lines),
                         transient=refused or not any(p in stderr for p in PERMANENT))


class SessionRefused(TransferError):
    """The control master could not open the session (remote.refused): nothing ran."""


def _asking_again(copy, work):
    """copy(work), asked again when the sshd refused its session: that session never
    ran, so it is no attempt (remote.ASKS times at most, backing off)."""
    for asked in range(ASKS):
        try:
            return copy(work)
        except SessionRefused:
            if asked == ASKS - 1:
                raise
            ask_later(asked)


def new_sum(kind):
    return xxhash.xxh3_128() if kind == "xxh128" else Cksum()


def _close(stream):
    try:
        stream.close()
    except BrokenPipeError:
        pass


class SshEngine(CopyEngine):
    name = "ssh"
    mixed_spools = True  # a bundle may hold files of several spools (see units)

    def __init__(self, buffer_size=BUFFER, bwlimit=0, remote=None, streams=3):
        super().__init__(buffer_size, bwlimit)
        remote = remote or {}
        self.side = remote.get("side", "dst")  # which end is remote
        self.kind = remote.get("sum", "cksum")
        self.remote = Remote(remote.get("host", ""), os.fsencode(remote.get("socket", "")),
                             sessions=remote.get("sessions", SESSIONS))
        self.streams = max(1, int(streams))
        self.gone = False  # the socket died: later slices need not try
        self._connections = None  # [Remote] of the socket's connections, on first fork
        self._forks = 0
        # Pushed slices are read back on the remote host once, not twice: in an array
        # task (the worker sets this) the read-back is left to finalize's at-rest check,
        # which hashes every slice on the remote host before anything is placed.
        self.defer_verify = False

    @classmethod
    def from_options(cls, options):
        return cls(bwlimit=options.get("bwlimit", 0), remote=options.get("remote"),
                   streams=options.get("streams", 3))

    def fork(self):
        """An engine for one more concurrent stream (its own buffer), on the socket's
        next connection in turn (`socket open --connections N`): each further master
        that answers when the first stream is added carries a share of the streams."""
        twin = type(self)(len(self.buf), self.bwlimit, streams=self.streams)
        twin.side, twin.kind = self.side, self.kind
        twin.defer_verify = self.defer_verify
        if self._connections is None:
            self._connections = [self.remote] + self._further_connections()
        self._forks += 1
        twin.remote = self._connections[self._forks % len(self._connections)]
        return twin

    def _further_connections(self):
        if not self.remote.socket or self.remote.via:
            return []
        found = [Remote(self.remote.host, os.fsencode(p), sessions=self.remote.sessions)
                 for p in further_connections(self.remote.socket)]
        return [r for r in found if r.alive()]

    # --- one slice ---------------------------------------------------------------

    def copy_slice(self, work):
        if self.gone:
            raise AuthRequired("auth-required: the control socket is gone")
        try:
            return _asking_again(self._push if self.side == "dst" else self._pull, work)
        except AuthRequired:
            self.gone = True
            raise

    def _write_cmd(self, dst, offset, length):
        return write_cmd(dst, offset, self.kind, length, not self.defer_verify)

    def _bundle_cmd(self, spool, names):
        # tar sets each file's mode and mtime from its header (see tar_header), so that
        # placement need not touch 20,000 inodes a second time
        cmd = (WIDE_STDIN + b"umask 077 && tar -x -B -b " + TAR_READ_BLOCKS + b" -f - -C "
               + q(word(spool)) + b" --no-same-owner --same-permissions")
        if not self.defer_verify:  # else finalize's at-rest check hashes them there, once
            cmd += (b" && cd " + q(word(spool)) + b" && " + sums_cmd(self.kind) + b" -- "
                    + b" ".join(q(n) for n in names))
        return cmd

    def _unit_cmd(self, items):
        """The remote command of a pushed bundle: one tar into its spool, or (files of
        several spools) a script of one tar per spool, sent on stdin ahead of the data."""
        roots = _roots(items)
        if len(roots) == 1:
            return self._bundle_cmd(roots[0], [in_spool(i) for i in items])
        return parts_cmd(len(parts_script(roots)))

    def prepare(self, unit):
        """Start the session of a push's next unit (the worker's streams call this for
        the unit next in line while they work), if a session slot is free now: its start
        then overlaps this unit's transfer."""
        if self.side != "dst" or self.gone:
            return
        if len(unit) > 1:
            self.remote.start(self._unit_cmd(unit), wait=False, bufsize=len(self.buf))
        else:
            item = unit[0]
            self.remote.start(self._write_cmd(item["spool"], item["offset"], item["length"]),
                              wait=False)

    def _failed(self, proc_code, stderr, what):
        if proc_code == 255:
            self.remote.check_alive()  # AuthRequired when the master is gone
        error = remote_error(self.remote.host, what, stderr, proc_code)
        if refused(proc_code, stderr):  # the command never ran: asked for again
            return SessionRefused(str(error), transient=True)
        return error

    def _push(self, work):
        src_fd, _st = self.open_source(work)
        try:
            verify = not self.defer_verify
            proc = self.remote.session(self._write_cmd(work.dst, work.offset, work.length))
            h, mv = new_sum(self.kind), memoryview(self.buf)
            pos, end = work.offset, work.offset + work.length
            try:
                while pos < end:
                    n = os.preadv(src_fd, [mv[:min(len(mv), end - pos)]], pos)
                    if n == 0:
                        raise TransferError(f"source changed (shorter than planned): "
                                            f"{os.fsdecode(work.src)}")
                    h.update(mv[:n])
                    if not self._send(src_fd, proc.stdin, mv[:n], pos):
                        raise TransferError(f"source changed (shorter than planned): "
                                            f"{os.fsdecode(work.src)}")
                    pos += n
                    self._throttle(n)
            except BrokenPipeError:
                pass  # the remote end stopped reading: its exit code says why
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            finally:
                _close(proc.stdin)
                proc.stdin = None
            out, err = proc.communicate()
        except OSError as e:
            raise self._error(e, work.src) from e
        finally:
            os.close(src_fd)
        if proc.returncode != 0:
            raise self._failed(proc.returncode, err, f"writing {os.fsdecode(work.dst)}")
        if not verify:
            if pos != end:
                raise TransferError(f"on {self.remote.host}: writing "
                                    f"{os.fsdecode(work.dst)}: stopped after {pos - work.offset} "
                                    f"of {work.length} bytes", transient=True)
            return h.hexdigest(), None  # verified at rest by finalize
        return h.hexdigest(), parse_digest(out, self.kind)

    def _pull(self, work):
        # one session: the data on stdout, the file's lstat and the range's digest (read
        # on its own meanwhile) on stderr
        proc = self.remote.session(pull_slice_cmd(work.src, work.offset, work.length,
                                                  self.kind))
        _close(proc.stdin)
        proc.stdin = None
        found, err = self._receive(work, proc)
        if found is None:
            raise TransferError(f"on {self.remote.host}: no digest of "
                                f"{os.fsdecode(work.src)}: {err.decode(errors='replace')}",
                                transient=True)
        size, mtime, digest = found
        if size != work.size or mtime != work.mtime_ns:
            raise TransferError(f"source changed since it was planned: "
                                f"{self.remote.host}:{os.fsdecode(work.src)}")
        if self.defer_verify:  # finalize's at-rest check reads it once, not twice
            return digest, None
        return digest, self._local_digest(work.dst, work.offset, work.length)

    def _receive(self, work, proc):
        """The session's stdout into the range of work.dst; (the check line parsed, the
        rest of stderr) once it has ended well."""
        try:
            dst_fd = _nofollow(work.dst, os.O_RDWR | os.O_CREAT)
        except OSError as e:
            proc.kill()
            proc.wait()
            raise self._error(e, work.dst) from e
        try:
            if os.fstat(dst_fd).st_size != work.size:
                os.ftruncate(dst_fd, work.size)
            mv, pos, end = memoryview(self.buf), work.offset, work.offset + work.length
            while pos < end:
                n = self._take(proc.stdout, dst_fd, mv[:min(len(mv), end - pos)], pos)
                if not n:
                    break
                pos += n
                self._throttle(n)
        except OSError as e:
            proc.kill()
            raise self._error(e, work.dst) from e
        finally:
            os.close(dst_fd)
            _out, err = proc.communicate()
        found, err = parse_check(err, self.kind)
        if proc.returncode != 0:
            raise self._failed(proc.returncode, err, f"reading {os.fsdecode(work.src)}")
        if pos != end:
            raise TransferError(f"source changed (shorter than planned): "
                                f"{self.remote.host}:{os.fsdecode(work.src)}")
        return found, err

    # The data of a slice moves between the file and the session's pipe with splice(2)
    # where the kernel can: the page cache's pages go to the pipe (a push) or from it
    # into the page cache (a pull) without a copy through this process (the push still
    # reads each piece once, to hash it): bench/stream.py, 2 GiB into `cat` here, 0.70
    # CPU s sending against 0.98. Elsewhere (another kernel, a file system without
    # splice) the copy through the buffer.
    splice = hasattr(os, "splice")

    def _send(self, src_fd, stdin, piece, pos):
        """`piece`, read from `src_fd` at `pos`, into the session's stdin; False when the
        file ended first (it shrank meanwhile)."""
        sent = 0
        if self.splice:
            try:
                while sent < len(piece):
                    n = os.splice(src_fd, stdin.fileno(), len(piece) - sent,
                                  offset_src=pos + sent)
                    if not n:
                        return False
                    sent += n
                return True
            except OSError as e:
                if e.errno not in NO_SPLICE or sent:
                    raise
                self.splice = False
        stdin.write(piece)
        return True

    def _take(self, stdout, dst_fd, mv, pos):
        """At most len(mv) bytes of the session's stdout written at `pos` of `dst_fd`:
        how many (0 at its end)."""
        if self.splice:
            try:
                return os.splice(stdout.fileno(), dst_fd, len(mv), offset_dst=pos)
            except OSError as e:
                if e.errno not in NO_SPLICE:
                    raise
                self.splice = False
        n = stdout.readinto(mv)
        written = 0
        while written < (n or 0):
            written += os.pwritev(dst_fd, [mv[written:n]], pos + written)
        return n

    def _local_digest(self, path, offset, length):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return self._fd_digest(fd, offset, length)
        finally:
            os.close(fd)

    def _fd_digest(self, fd, offset, length):
        """The remote side's kind of digest (xxh128 or cksum) of a local range."""
        if self.kind == "xxh128" and length <= len(self.buf):
            return small_digest(fd, offset, length)
        h, mv, pos, end = new_sum(self.kind), memoryview(self.buf), offset, offset + length
        while pos < end:
            n = os.preadv(fd, [mv[:min(len(mv), end - pos)]], pos)
            if n == 0:
                break
            h.update(mv[:n])
            pos += n
        return h.hexdigest()

    # --- digests of the destination side (finalize's integrity re-check) ------------

    def digest(self, path, offset, length):
        if self.side == "src":  # the destination is here
            try:
                return self._local_digest(path, offset, length)
            except OSError as e:
                raise self._error(e, path) from e
        return self.digests([(path, offset, length)])[0]

    def digests(self, ranges, sources=None):
        """Digest of each (path, offset, length[, file size]) on the destination side;
        for a push, in one remote call: whole files 2,000 to an xxhsum/cksum (matched by
        their whole path: the spool's tree repeats names), slices of larger files with dd.

        `sources` (a push: the local source of each range's file) lets a file whose
        slices are all asked for be checked whole: xxhsum reads it on the remote host
        with the single-slice files, while this end reads the source once, hashing each
        slice and the whole. When the two whole digests agree, what is at rest holds the
        source's bytes, so each slice's digest is the local one. A range read on the
        remote host goes through a pipe to xxhsum, which costs it 0.6 CPU s per GiB
        beside the read (8 slices of a 2 GiB file: 0.52-0.64 s, the file whole 0.33 s).
        Files whose whole digests differ, or whose source cannot be read as planned, are
        checked slice by slice as before, so a slice that differs is still named."""
        if self.side == "src":
            return super().digests(ranges)
        if not ranges:
            return []
        whole = [r for r in ranges if len(r) > 3 and r[1] == 0 and r[2] == r[3]]
        parts = [r for r in ranges if not (len(r) > 3 and r[1] == 0 and r[2] == r[3])]
        found = {}
        files = whole_files(parts, sources, ranges) if self.kind == "xxh128" else {}
        with ThreadPoolExecutor(WHOLE_READERS) as pool:  # xxhash lets go of the GIL
            ours = {path: pool.submit(source_digests, *file) for path, file in files.items()}
            sums = self._remote_sums([r[0] for r in whole], alone=list(files))
            for path, (_src, _size, cuts) in files.items():
                local = ours[path].result()
                if local and sums.get(word(path)) == local[0]:
                    for (offset, length), digest in zip(cuts, local[1]):
                        found[(path, offset, length)] = digest
        parts = [r for r in parts if r[:3] not in found]
        if parts:
            _code, out, _err = self.remote.script(digests_script([r[:3] for r in parts],
                                                                 self.kind), check=False)
            for r, digest in zip(parts, parse_digests(out, len(parts), self.kind)):
                found[r[:3]] = digest
        for r in whole:
            found[r[:3]] = sums.get(word(r[0]), "unreadable")
        return [found.get(r[:3], "unreadable") for r in ranges]

    def _remote_sums(self, paths, alone=()):
        """{path as named: digest} of whole remote files, one session, 2,000 a command
        (`alone`: large files, a command each, so that they are read at once); a file
        that cannot be read has no entry."""
        paths = list(dict.fromkeys(word(p) for p in paths))  # as named to xxhsum/cksum
        alone = [word(p) for p in alone]
        commands = [sums_cmd(self.kind) + b" -- " + b" ".join(q(p) for p in chunk)
                    + b" 2>/dev/null" for chunk in [*_arg_chunks(paths), *([p] for p in alone)]]
        if not commands:
            return {}
        _code, out, _err = self.remote.script(parallel_script(commands), check=False)
        return parse_sums(out, paths + alone, self.kind)

    # --- --skip-existing ----------------------------------------------------------------

    def already_there(self, work, dst):
        """(digest, True) when `dst`, the final path, already holds this slice's bytes,
        else (None, False)."""
        item = {"slice": 0, "src": work.src, "dst": dst, "offset": work.offset,
                "length": work.length, "size": work.size}
        found = self.existing([item])
        return (found[0], True) if 0 in found else (None, False)

    def existing(self, items):
        """{slice id: digest} of the items whose final path already holds their bytes
        (the same size, the same digest of the range), for --skip-existing: the remote end
        hashed on its host (whole files in one session for all of them), the local end
        here."""
        remote_end = "dst" if self.side == "dst" else "src"
        local_end = "src" if self.side == "dst" else "dst"
        whole = [i for i in items if i["offset"] == 0 and i["length"] == i["size"]]
        sums = self._remote_sums([i[remote_end] for i in whole])
        theirs = {i["slice"]: sums.get(word(i[remote_end])) for i in whole}
        for i in items:
            if i["slice"] in theirs:
                continue
            code, out, _err = self.remote.run(digest_cmd(
                i[remote_end], i["offset"], i["length"], self.kind, mtime=True), check=False)
            first, _, rest = out.partition(b"\n")
            if code == 0 and first.split()[:1] == [b"%d" % i["size"]]:
                theirs[i["slice"]] = parse_digest(rest, self.kind)
        found = {}
        for i in items:
            if not theirs.get(i["slice"]):
                continue
            try:
                if os.stat(i[local_end]).st_size != i["size"]:
                    continue
                ours = self._local_digest(i[local_end], i["offset"], i["length"])
            except OSError:
                continue
            if ours == theirs[i["slice"]]:
                found[i["slice"]] = ours
        return found

    # --- bundles of small files ------------------------------------------------------

    def units(self, items):
        """Units of work for the task's streams: each large slice alone; small whole
        files in bundles (pushed: by spool directory, as one remote tar unpacks them),
        at most BUNDLE_FILES / BUNDLE_BYTES each and, when there are enough files, as
        many as keeps every stream busy to the end (10,000 files on 3 streams: 6 bundles
        in two full waves, not 5 with a wave of 2)."""
        single, small = [], {}
        for item in items:
            whole = item["offset"] == 0 and item["length"] == item["size"]
            if not whole or item["size"] > BUNDLE_FILE_MAX:
                single.append([item])
            elif self.side == "src" and self.mixed_spools:
                # pulled: by remote and spool directory, as this machine's tar unpacks
                # a bundle (b"": renamed on the way, each written here by Python)
                parts = untar_parts(item) if local_gnu_tar() else None
                small.setdefault(parts[:2] if parts else b"", []).append(item)
            else:
                small.setdefault(item["root"], []).append(item)
        if self.side == "src" and self.mixed_spools and len(small) > 1:
            # a directory pair of a few files (a copyjob's pairs into many directories)
            # is not worth a session of its own: those come together, written by Python
            few = [k for k, g in small.items() if k == b"" or len(g) < BUNDLE_MIN_FILES]
            if few:
                small = {**{k: g for k, g in small.items() if k not in few},
                         b"": [i for k in few for i in small[k]]}
        groups = list(small.values())
        if self.side == "dst" and self.defer_verify and self.mixed_spools:
            # spools of a few files each (a copyjob's pairs into many directories) go
            # together, a part of a bundle each, instead of a session per spool
            few = [sum(i["size"] + 512 for i in g) <= PART_BYTES for g in groups]
            if sum(few) > 1:
                groups = [g for g, f in zip(groups, few) if not f] + \
                    [[i for g, f in zip(groups, few) if f for i in g]]
        return single + [u for group in groups for u in bundles(group, self.streams)]

    def copy_bundle(self, items):
        """[(item, result)] for whole small files moved as one tar stream."""
        start = time.monotonic()
        if self.gone:
            return [(i, _result(i, states.AUTH, "auth-required: the control socket is gone",
                                start)) for i in items]
        try:
            got = _asking_again(self._push_bundle if self.side == "dst" else self._pull_bundle,
                                items)
        except AuthRequired as e:
            self.gone = True
            return [(i, _result(i, states.AUTH, str(e), start)) for i in items]
        except TransferError as e:  # the whole bundle: each file is tried alone next,
            state = states.WAIT if e.transient else states.FAILED  # unless that cannot help
            return [(i, _result(i, state, str(e), start)) for i in items]
        seconds = (time.monotonic() - start) / max(1, len(items))
        out = []
        for item in items:
            src, dst, reason = got.get(item["slice"], ("", "", "not in the bundle's output"))
            if dst is None:  # written; finalize's at-rest check verifies it (defer_verify)
                state, dst = (states.DONE if src else states.WAIT), ""
            else:
                state = states.DONE if src and src == dst else states.WAIT
            out.append((item, dict(_result(item, state, "" if state == states.DONE else
                                           reason or "verification failed", 0.0),
                                   src=src, dst=dst, seconds=seconds)))
        return out

    def _push_bundle(self, items):
        if len(_roots(items)) > 1:
            return self._push_parts(items)
        spool = items[0]["root"]
        names = [in_spool(i) for i in items]
        proc = self.remote.session(self._bundle_cmd(spool, names), bufsize=len(self.buf))
        ours, problems = {}, {}
        out, err = _send(proc, lambda stdin: stdin.write(
            tar_end(self._add_all(stdin, items, ours, problems))))
        if proc.returncode != 0:
            raise self._failed(proc.returncode, err, f"writing a bundle into {os.fsdecode(spool)}")
        theirs = {} if self.defer_verify else \
            parse_sums(out, [n for i, n in zip(items, names) if i["slice"] in ours], self.kind)
        got = {}
        for item, name in zip(items, names):
            if item["slice"] in ours:
                got[item["slice"]] = (ours[item["slice"]], None if self.defer_verify
                                      else theirs.get(name, ""), "")
            else:
                got[item["slice"]] = ("", "", problems.get(item["slice"], ""))
        return got

    def _push_parts(self, items):
        """A bundle of files of several spools (defer_verify: finalize checks them at
        rest): each spool's files as a tar archive of their own, built in memory (at most
        PART_BYTES, see units) and sent as a part of parts_script's stream."""
        by_root = {}
        for item in items:
            by_root.setdefault(item["root"], []).append(item)
        roots = list(by_root)
        script = parts_script(roots)
        proc = self.remote.session(parts_cmd(len(script)), bufsize=len(self.buf))
        ours, problems = {}, {}

        def write(stdin):
            stdin.write(script)
            for number, root in enumerate(roots, 1):
                part = io.BytesIO()
                part.write(tar_end(self._add_all(part, by_root[root], ours, problems)))
                with part.getbuffer() as data:
                    stdin.write(b"%d %d\n" % (len(data), number))
                    stdin.write(data)
        _out, err = _send(proc, write)
        if proc.returncode != 0:
            raise self._failed(proc.returncode, err, f"writing a bundle into {len(roots)} "
                                                     f"spools, the first "
                                                     f"{os.fsdecode(roots[0])}")
        return {i["slice"]: (ours[i["slice"]], None, "") if i["slice"] in ours else
                ("", "", problems.get(i["slice"], "")) for i in items}

    def _add_all(self, out, items, ours, problems):
        """Each item's file into the tar stream `out` under its name in its spool; their
        digests into `ours`, the reasons of those that could not be read into `problems`
        (by slice id). Returns the bytes written."""
        sent = 0
        for item in items:
            try:
                ours[item["slice"]], size = self._add(out, item, in_spool(item))
            except TransferError as e:
                problems[item["slice"]] = str(e)
                continue
            sent += size
        return sent

    def open_item(self, item):
        """The source of a whole small file in a bundle, opened as open_source opens a
        slice's (no symlink followed, still as planned): (fd, stat)."""
        return self.open_source(SliceWork(item["src"], item["spool"], 0, item["size"],
                                          item["size"], item["mtime_ns"]))

    def _add(self, out, item, name):
        """One source file into the tar stream under `name`: (digest, bytes written)."""
        fd, st = self.open_item(item)
        try:
            data = os.read(fd, item["size"] + 1)  # small by construction (BUNDLE_FILE_MAX)
        except OSError as e:
            raise self._error(e, item["src"]) from e
        finally:
            os.close(fd)
        if len(data) != item["size"]:
            raise TransferError(f"source changed while read: {os.fsdecode(item['src'])}")
        h = new_sum(self.kind)
        h.update(data)
        pad = -len(data) % 512
        header = tar_header(name, len(data), stat.S_IMODE(st.st_mode), st.st_mtime_ns)
        out.write(header)
        out.write(data)
        out.write(bytes(pad))
        return h.hexdigest(), len(header) + len(data) + pad

    def _pull_bundle(self, items):
        parts = [untar_parts(i) for i in items] if local_gnu_tar() else [None]
        if parts[0] and all(p and p[:2] == parts[0][:2] for p in parts):
            return self._pull_tree(items, parts[0][0], parts[0][1], [p[2] for p in parts])
        srcs = [i["src"] for i in items]
        listing = b"\0".join(srcs) + b"\0"
        proc = self.remote.session(pull_bundle_cmd(len(listing), self.kind))
        # the names twice: `head -c` gives the first copy to tar, xargs reads the second;
        # written meanwhile, as a long list could fill every buffer before tar answers
        feed = threading.Thread(target=_feed, args=(proc.stdin, listing + listing))
        feed.start()
        proc.stdin = None
        by_name = {_member(s): i for s, i in zip(srcs, items)}
        ours = {}
        try:
            for name, data in tar_files(proc.stdout):
                item = by_name.get(_member(name))
                if item is not None:
                    ours[item["slice"]] = self._write_whole(item, data)
            sums = proc.stdout.read().lstrip(b"\0")  # after the archive's zero padding
        except BadTar as e:
            proc.kill()
            raise TransferError(f"on {self.remote.host}: bad bundle stream: {e}",
                                transient=True) from e
        finally:
            _out, err = proc.communicate()
            feed.join()
        if proc.returncode == 255:
            self.remote.check_alive()
        if refused(proc.returncode, err) and not ours:
            raise SessionRefused(f"on {self.remote.host}: {err.decode(errors='replace')}",
                                 transient=True)
        theirs = parse_sums(sums, srcs, self.kind)
        got = {}
        for item in items:
            if item["slice"] not in ours:
                got[item["slice"]] = ("", "", f"not received from {self.remote.host}: "
                                              f"{err.decode(errors='replace').strip()}")
                continue
            got[item["slice"]] = (theirs.get(item["src"], ""), ours[item["slice"]], "")
        return got

    def _pull_tree(self, items, rdir, ldir, names):
        """_pull_untar, with this machine's tar taking the members in the order of the
        names (--same-order): it matches each member against the next name, not against
        all of them (a bundle of 1,667 names: 4-8 ms of tar's CPU instead of 16-24). A
        name whose member does not come (its source gone since it was listed) makes tar
        skip every member after it: what was not received goes once more, in a session
        of its own, matched in any order. Should that session fail, what the first one
        received stays received."""
        got = self._pull_untar(items, rdir, ldir, names)
        missing = [k for k, item in enumerate(items) if got[item["slice"]][2]]
        if len(missing) > 1:
            try:
                got.update(self._pull_untar([items[k] for k in missing], rdir, ldir,
                                            [names[k] for k in missing], in_order=False))
            except AuthRequired:
                raise
            except TransferError:
                pass  # each goes alone, as after any bundle
        return got

    def _pull_untar(self, items, rdir, ldir, names, in_order=True):
        """A pulled bundle whose files are `names` both under the remote directory `rdir`
        and under the spool directory `ldir`: the remote tar's stream goes straight into
        this machine's GNU tar, the data never through Python (20,000 files of 1-64 KiB
        on six streams: 2.1-2.3 s against 2.9 s read and written here one by one). The
        remote digests come first, ahead of the stream, as a length and its bytes."""
        listing = b"\0".join(names) + b"\0"
        start = time.time_ns() - CTIME_SLACK_NS
        proc = self.remote.session(pull_untar_cmd(rdir, len(listing), self.kind))
        feed = threading.Thread(target=_feed, args=(proc.stdin, listing + listing))
        feed.start()
        proc.stdin = None
        errs = []
        drain = threading.Thread(target=lambda: errs.append(proc.stderr.read()), daemon=True)
        drain.start()
        untar, sums, why, wanted = None, None, b"", None
        try:
            sums = _read_sums(proc.stdout.fileno())
            if sums is not None:
                # only the members named (what else a stream holds stays out of the spool),
                # their names read from a pipe as the remote tar read them
                names_fd, names_w = os.pipe()
                to_tar = open(names_w, "wb")
                try:
                    untar = subprocess.Popen(
                        ["tar", "-x", "-f", "-", "-b", TAR_READ_BLOCKS.decode(), "-B", "-C",
                         os.fsdecode(ldir), "--no-same-owner", "--same-permissions", "--null",
                         "--verbatim-files-from", "--no-recursion", "--no-wildcards",
                         *(["--same-order"] if in_order else []),
                         "-T", f"/dev/fd/{names_fd}"],
                        stdin=proc.stdout.fileno(), stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, env=dict(os.environ, LC_ALL="C"),
                        pass_fds=(names_fd,))
                except BaseException:
                    to_tar.close()
                    raise
                finally:
                    os.close(names_fd)
                wanted = threading.Thread(target=_feed, args=(to_tar, listing))
                wanted.start()
                why = untar.communicate()[1]
        finally:
            if untar is None:  # no stream to read (the remote end failed first)
                proc.kill()
            # else the stream's end: a tar that stopped early leaves the remote tar a
            # closed pipe, and the session's exit code still says whether the master died
            proc.stdout.close()
            proc.stdout = None
            drain.join()
            proc.wait()
            feed.join()
            if wanted:
                wanted.join()
        err = b"".join(errs)
        if proc.returncode == 255:
            self.remote.check_alive()
        if sums is None and refused(proc.returncode, err):
            raise SessionRefused(f"on {self.remote.host}: {err.decode(errors='replace')}",
                                 transient=True)
        if sums is None:
            raise TransferError(f"on {self.remote.host}: no digests of a bundle in "
                                f"{os.fsdecode(rdir)}: {err.decode(errors='replace').strip()}",
                                transient=True)
        theirs = parse_sums(sums, names, self.kind)
        reason = (err + why).decode(errors="replace").strip()
        got = {}
        for item, name in zip(items, names):
            problem = _untarred(item, start)
            if problem:
                got[item["slice"]] = ("", "", f"not received from {self.remote.host}: "
                                              f"{reason or problem}")
                continue
            if "mode" in item:  # tar's archive holds whole seconds
                os.utime(item["spool"], ns=(item["mtime_ns"], item["mtime_ns"]),
                         follow_symlinks=False)
            ours = None if self.defer_verify else \
                self._local_digest(item["spool"], 0, item["size"])
            got[item["slice"]] = (theirs.get(name, ""), ours, "")
        return got

    def _write_whole(self, item, data):
        if len(data) != item["size"]:
            return "size differs from the plan"
        fd = _nofollow(item["spool"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            set_meta(fd, item)
        finally:
            os.close(fd)
        if self.defer_verify:  # finalize's at-rest check reads it once, not twice
            return None
        return self._local_digest(item["spool"], 0, item["size"])


def spool_mode(mode):
    """The permission bits a spool file is written with: the file's own, u+rw added
    (placement sets the rest, special bits too)."""
    return (mode & 0o777) | 0o600


def set_meta(fd, item):
    """A whole file just written into the spool through `fd` gets its mode (with u+rw:
    the at-rest check reads it, --skip-existing's range copy writes it; the spool is
    private) and mtime as planned, so placement changes only what differs (as a pushed
    bundle's remote tar sets both from the header). Items of an older manifest have
    no mode: placement sets both then."""
    if "mode" in item:
        os.fchmod(fd, spool_mode(item["mode"]))
        os.utime(fd, ns=(item["mtime_ns"], item["mtime_ns"]))


# A file tar made in this bundle has a ctime after the bundle began; the kernel stamps it
# from a clock that may lag the one read here by a tick.
CTIME_SLACK_NS = 50_000_000


def untar_parts(item):
    """(remote directory, spool directory, name) of a pulled whole file: `name` is the
    last components its remote path and its spool path share (at least its own name),
    so that a tar of `name` made in the remote directory and unpacked in the spool
    directory writes its spool path; the spool directory is the job's spool or below
    it. None when they share no name (a copyjob's pair renamed on the way)."""
    src, spool, root = item["src"], item["spool"], item["root"]
    if not spool.startswith(root + b"/"):
        return None
    a, b = src.split(b"/"), spool[len(root) + 1:].split(b"/")
    k = 0
    while k < min(len(a), len(b)) and a[-1 - k] == b[-1 - k] and \
            a[-1 - k] not in (b"", b".", b".."):
        k += 1
    if not k:
        return None
    name = b"/".join(a[-k:])
    rdir = src[:-len(name) - 1] or (b"/" if src.startswith(b"/") else b".")
    return rdir, spool[:-len(name) - 1], name


@functools.lru_cache(maxsize=None)
def local_gnu_tar():
    """True when this machine's `tar` is GNU tar, which unpacks a pulled bundle."""
    try:
        out = subprocess.run(["tar", "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return out.startswith(b"tar (GNU tar)")


def pull_untar_cmd(rdir, size, kind):
    """The remote side of a pulled bundle unpacked by this machine's tar, in one session:
    stdin holds the NUL-separated names (relative to `rdir`) twice, `size` bytes each;
    out comes a line with the length of the digests of the first copy, those digests,
    then the tar stream of the second copy (u+rw added to each mode: the spool's)."""
    names = b"head -c %d" % size
    return (b"CDPATH= cd -- " + q(rdir) + b" || exit 1\n"
            + b"s=$(" + names + b" | xargs -0 -r " + sums_cmd(kind) + b" --)\n"
            + b"printf '%d\\n' \"${#s}\"; printf '%s\\n' \"$s\"\n"
            + names + b" | tar -c -b " + TAR_WRITE_BLOCKS + b" -f - --mode=u+rw "
            b"--hard-dereference --no-recursion --null --verbatim-files-from -T -\n")


def _read_sums(fd):
    """The digests pull_untar_cmd sends ahead of its tar stream, read from `fd` without a
    byte more (the rest is tar's); None if the stream ended first."""
    line = b""
    while not line.endswith(b"\n"):
        c = os.read(fd, 1)
        if not c or len(line) > 20:
            return None
        line += c
    if not line.strip().isdigit():
        return None
    want, data = int(line) + 1, b""
    while len(data) < want:
        chunk = os.read(fd, want - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _untarred(item, since):
    """'' when tar wrote the item's spool file in this bundle as planned, else why not.
    What tar made there that is no regular file (the remote file became a link or a
    directory since it was planned) is removed: nothing may write through it later."""
    try:
        st = os.lstat(item["spool"])
    except OSError as e:
        return e.strerror
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(item["spool"], ignore_errors=True)
    elif not stat.S_ISREG(st.st_mode):
        os.unlink(item["spool"])
    if not stat.S_ISREG(st.st_mode) or st.st_ctime_ns < since:
        return "not in the bundle's stream"
    if st.st_size != item["size"]:
        return "size differs from the plan"
    return ""


def _roots(items):
    """The spool directories of a bundle's files, in their order."""
    return list(dict.fromkeys(i["root"] for i in items))


def parts_script(roots):
    """The remote side of a pushed bundle whose files are in several spools, read from
    stdin ahead of the data (a copyjob's 1,500 spools would not fit in a command line):
    for each part a line 'LENGTH NUMBER', then LENGTH bytes of tar unpacked into the
    NUMBER-th spool with -C, as a one-spool bundle is (a spool removed meanwhile, by
    `cancel`, is not made again). Each part is read whole whatever its tar does, so the
    next line is where it should be; the exit code is 1 if any part failed."""
    return (b"set -- " + b" ".join(q(word(r)) for r in roots) + b"\n"
            b"umask 077\nfailed=0\n"
            b"while read -r n i; do\n"
            b"  eval \"d=\\${$i}\"\n"
            b"  head -c \"$n\" | { tar -x -B -b " + TAR_READ_BLOCKS + b" -f - -C \"$d\" "
            b"--no-same-owner "
            b"--same-permissions; s=$?; cat >/dev/null; exit $s; } || failed=1\n"
            b"done\n"
            b"exit $failed\n")


def parts_cmd(script_size):
    """Run the parts_script that comes first on stdin (`script_size` bytes)."""
    return WIDE_STDIN + b'eval "$(head -c %d)"' % script_size


def pull_bundle_cmd(size, kind):
    """The remote side of a pulled bundle, in one session: stdin holds the NUL-separated
    names twice (`size` bytes each); out comes the tar stream of the first copy, then the
    digests of the second (re-read from the remote page cache)."""
    return (b"head -c " + str(size).encode() + b" | tar -c -b " + TAR_WRITE_BLOCKS +
            b" -f - --no-recursion --null "
            b"--verbatim-files-from -T -; xargs -0 -r " + sums_cmd(kind) + b" --")


def _send(proc, write):
    """write(stdin) of a session while what it prints is read (a remote tar that cannot
    write its errors stops reading: an error for each of 2,000 long names fills the
    pipes and the channel window); then stdin closed and (stdout, stderr) once it has
    ended. A remote end that stopped reading leaves the reason to its exit code."""
    collect = _drain(proc)
    try:
        write(proc.stdin)
    except BrokenPipeError:
        pass
    finally:
        _close(proc.stdin)
        proc.stdin = None
        got = collect()
    return got


def _drain(proc):
    """Read a session's stdout and stderr to their ends in threads; returns a function
    that waits for the session and returns (stdout, stderr)."""
    got = {}

    def read(name, stream):
        got[name] = stream.read()

    threads = [threading.Thread(target=read, args=(n, getattr(proc, n)), daemon=True)
               for n in ("stdout", "stderr")]
    for t in threads:
        t.start()

    def collect():
        for t in threads:
            t.join()
        proc.wait()
        for n in ("stdout", "stderr"):
            getattr(proc, n).close()
        return got.get("stdout", b""), got.get("stderr", b"")
    return collect


def _feed(stream, data):
    try:
        stream.write(data)
    except (BrokenPipeError, ValueError):
        pass  # the session ended early: its exit code and stderr say why
    finally:
        _close(stream)


def bundles(items, streams, min_files=BUNDLE_MIN_FILES):
    """`items` (whole small files, in order) cut into bundles of about equal weight (bytes
    plus a tar header each): enough to respect BUNDLE_FILES and BUNDLE_BYTES, and a
    multiple of `streams` when there is more than one bundle's worth or `min_files` per
    stream, so that the streams finish together."""
    weight = [i["size"] + 512 for i in items]
    total = sum(weight)
    n = max(1, math.ceil(len(items) / BUNDLE_FILES), math.ceil(total / BUNDLE_BYTES))
    if n > 1 or len(items) >= min_files * streams:
        n = math.ceil(max(n, streams) / streams) * streams
    out, cur, acc = [], [], 0
    for item, w in zip(items, weight):
        # a file goes to the next bundle when its middle lies past this bundle's share
        if cur and (len(cur) >= BUNDLE_FILES or acc + w / 2 > (len(out) + 1) * total / n):
            out.append(cur)
            cur = []
        cur.append(item)
        acc += w
    return out + [cur] if cur else out


TAR_RECORD = 20 * 512  # a tar archive ends with two zero blocks, padded to a record
# Remote tar's record sizes, in 512-byte blocks. Unpacking a push reads 1 MiB at a time
# (-B: whatever the pipe gives) and so writes a small file in one write(2), not one per
# 10 KiB: 20,000 files of 1-64 KiB took 84,000 writes and 68,000 reads with tar's default
# of 20 blocks, 21,000 and 700 with 2048 (about 0.2 CPU s less on the remote host). A
# pulled bundle's archive is written 128 KiB at a time: its last record is padded with
# zeros that travel, so not 1 MiB.
TAR_READ_BLOCKS = b"2048"
TAR_WRITE_BLOCKS = b"256"


def whole_files(parts, sources, ranges):
    """{remote path: (local source, size, [(offset, length)] in order)} of the files
    whose slices among `parts` cover them exactly, as digests() can check them whole."""
    if not sources:
        return {}
    source_of = {r[:3]: src for r, src in zip(ranges, sources)}
    by_path = {}
    for r in parts:
        if len(r) > 3:
            by_path.setdefault(r[0], []).append(r)
    files = {}
    for path, rs in by_path.items():
        rs.sort(key=lambda r: r[1])
        size, src = rs[0][3], source_of.get(rs[0][:3])
        ends = [r[1] + r[2] for r in rs]
        if src and len(rs) > 1 and rs[0][1] == 0 and ends[-1] == size and \
                all(r[1] == end for r, end in zip(rs[1:], ends)) and \
                all(r[3] == size and source_of.get(r[:3]) == src for r in rs):
            files[path] = (src, size, [(r[1], r[2]) for r in rs])
    return files


def source_digests(src, size, cuts):
    """(xxh3-128 of the whole file, [xxh3-128 of each (offset, length)]) of a local
    source read once, or None when it cannot be read or is no longer `size` bytes. Read,
    not mapped: a source truncated meanwhile must not kill finalize with SIGBUS."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size != size:
            return None
        whole, each, mv = xxhash.xxh3_128(), [], memoryview(read_buffer())
        for offset, length in cuts:
            h, pos, end = xxhash.xxh3_128(), offset, offset + length
            while pos < end:
                n = os.preadv(fd, [mv[:min(len(mv), end - pos)]], pos)
                if n == 0:
                    return None  # shorter than it was a moment ago
                h.update(mv[:n])
                whole.update(mv[:n])
                pos += n
            each.append(h.hexdigest())
        return whole.hexdigest(), each
    except OSError:
        return None
    finally:
        os.close(fd)


def parallel_script(commands, parallel=4):
    """A script running `commands` `parallel` at a time, printing their outputs whole and
    in order (each into a file of a private temporary directory, then cat): hashing
    20,000 files in ten xxhsum runs took 0.4 s one after the other."""
    if len(commands) == 1:
        return commands[0] + b"\n"
    lines = [b't=$(mktemp -d) || exit 1']
    for n, command in enumerate(commands):
        lines.append(b"{ " + command + b'\n} > "$t/%d" &' % n)
        if n % parallel == parallel - 1:
            lines.append(b"wait")
    lines += [b"wait", b"cat " + b" ".join(b'"$t/%d"' % n for n in range(len(commands))),
              b'rm -rf -- "$t"']
    return b"\n".join(lines) + b"\n"


def _arg_chunks(paths, count=2000, size=256 << 10):
    """`paths` in runs short enough for one command line (ARG_MAX: paths may be long)."""
    chunk, total = [], 0
    for p in paths:
        if chunk and (len(chunk) >= count or total + len(p) > size):
            yield chunk
            chunk, total = [], 0
        chunk.append(p)
        total += len(p) + 3
    if chunk:
        yield chunk


def in_spool(item):
    """A bundled file's path inside its spool (the worker's item["root"])."""
    return item["spool"][len(item["root"]) + 1:]


def _ustar(name, size, kind=b"0", prefix=b"", mode=0o600, mtime=0):
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"%07o\0" % mode
    h[108:116] = h[116:124] = b"0000000\0"
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"%011o\0" % mtime
    h[148:156] = b" " * 8  # the checksum counts its own field as spaces
    h[156:157] = kind
    h[257:265] = b"ustar\x0000"
    h[345:345 + len(prefix)] = prefix
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _pax_record(key, value):
    """'LEN key=value\n', LEN counting the whole record, its own digits too."""
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(b"%d" % n) + len(body) != n:
        n += 1
    return b"%d" % n + body


def tar_header(name, size, mode=0o600, ns=0):
    """The header blocks of a regular file `name` (its path in the spool: any bytes but
    NUL) of `size` bytes, owner 0. The file's own permission bits with u+rw added (the
    spool file is read by the at-rest check, and written by --skip-existing's range copy;
    the spool directory is private) and, with `ns`, its mtime to the nanosecond in a
    pax record: `tar -x --same-permissions` then leaves the file as placement wants it,
    and placement changes only what differs (special bits, a tar that ignores pax). A
    name longer than ustar's 100 bytes goes in ustar's 155-byte prefix when it splits at
    a '/' so, else in a GNU long-name record before the header (GNU tar reads both)."""
    mode, seconds = spool_mode(mode), ns // 1_000_000_000
    pax = b""
    if ns:
        data = _pax_record(b"mtime", b"%d.%09d" % divmod(ns, 1_000_000_000))
        pax = _ustar(b"././@PaxHeader", len(data), kind=b"x") + data + bytes(-len(data) % 512)
    if len(name) <= 100:
        return pax + _ustar(name, size, mode=mode, mtime=seconds)
    cut = name.rfind(b"/", 0, 156)
    if 0 < cut and len(name) - cut - 1 <= 100 and cut < len(name) - 1:
        return pax + _ustar(name[cut + 1:], size, prefix=name[:cut], mode=mode, mtime=seconds)
    data = name + b"\0"
    return (_ustar(b"././@LongLink", len(data), kind=b"L") + data + bytes(-len(data) % 512)
            + pax + _ustar(name[:100], size, mode=mode, mtime=seconds))


class BadTar(Exception):
    """A tar stream that is not what GNU tar writes (cut short, a bad checksum)."""


def _read_exactly(stream, n):
    data = stream.read(n) if n else b""
    if len(data) != n:
        raise BadTar(f"cut short: {len(data)} of {n} bytes")
    return data


def _tar_number(field):
    if field[:1] and field[0] & 0x80:  # base-256, GNU's form for large values
        return int.from_bytes(field[1:], "big")
    digits = field.strip(b"\0 ")
    return int(digits, 8) if digits else 0


def _pax_records(data):
    """{key: value} of pax records, 'LEN key=value\\n' each, LEN counting the whole."""
    out, pos = {}, 0
    try:
        while pos < len(data) and data[pos:pos + 1] != b"\0":
            space = data.index(b" ", pos)
            end = pos + int(data[pos:space])
            key, _, value = data[space + 1:end - 1].partition(b"=")
            out[key], pos = value, end
    except ValueError as e:
        raise BadTar(f"bad pax record: {e}") from e
    return out


def tar_files(stream):
    """(name, data) of each regular file in a tar stream as GNU tar writes it (ustar,
    GNU long names, pax path records), a few reads per member: the tarfile module's
    stream mode took 0.4 ms per member, 8 CPU s for 20,000 small files. Names are bytes
    as stored; other members are skipped; ends at the first zero block."""
    long_name = None
    while True:
        header = _read_exactly(stream, 512)
        if not header.strip(b"\0"):
            return
        if _tar_number(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
            raise BadTar("bad header checksum")
        kind, size = header[156:157], _tar_number(header[124:136])
        data = _read_exactly(stream, size)
        _read_exactly(stream, -size % 512)
        if kind == b"L":  # GNU: the next member's name
            long_name = data.split(b"\0", 1)[0]
        elif kind == b"x":  # pax: the next member's records
            long_name = _pax_records(data).get(b"path", long_name)
        elif kind not in (b"g", b"K"):
            name = long_name or header[:100].split(b"\0", 1)[0]
            if not long_name and header[257:263] == b"ustar\0" and header[345:346] != b"\0":
                name = header[345:500].split(b"\0", 1)[0] + b"/" + name  # POSIX prefix
            long_name = None
            if kind in (b"0", b"\0", b"7"):
                yield name, data


def tar_end(sent):
    """Two zero blocks end the archive; zeros up to a whole record, as tar writes it."""
    return bytes(1024 + (-(sent + 1024) % TAR_RECORD))


def _member(path):
    """A path as tar names its member: no leading '/' or './'."""
    path = os.fsencode(path)
    while path.startswith((b"/", b"./")):
        path = path[1:] if path.startswith(b"/") else path[2:]
    return path


def _nofollow(path, flags, mode=0o600):
    """Open without following a symbolic link at `path` (created: mode 0600)."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def _result(item, state, reason, start):
    return {"slice": item["slice"], "state": state, "seconds": time.monotonic() - start
            if start else 0.0, "attempts": 1, "src": "", "dst": "", "reason": reason}
