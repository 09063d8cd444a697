"""Remote endpoints (`[user@]host:path`, as scp writes them) and the shell commands run
on the remote host through an SSH control socket.

The remote side needs only sshd, a POSIX shell, coreutils and find: slices move with
`dd` at byte offsets, are hashed there with `xxhsum -H2` when it is installed (the same
xxh3-128 hpcmove uses everywhere) or `cksum` (coreutils' CRC) otherwise, and placement
is a generated shell script of mkdir/chmod/touch/mv. Every path in a command is quoted
by construction (`q`), as bytes, so any name - spaces, quotes, newlines, `$(...)`,
leading '-', non-UTF-8 - reaches the remote shell as one literal word.

The pure part (parsing, quoting, command and script text) is separate from `Remote`,
which runs commands.
"""
import atexit
import fcntl
import json
import os
import random
import re
import shlex
import stat
import subprocess
import threading
import time
from dataclasses import dataclass

import xxhash

from .errors import HpcmoveError, PlanError, TransferError
from .plan import DIR, FILE, HARDLINK, SYMLINK, hardlink_tmp, spool_path

SUMS = ("xxh128", "cksum")  # remote checksum programs, fastest first
PROBE_MARK = b"hpcmove-probe"  # what the probe prints first: anything before it is noise
DD_BS = b"1M"
# The pipes an SSH end writes into hold this much (Linux: F_SETPIPE_SZ, at most
# fs.pipe-max-size, 1 MiB by default, for any user) instead of 64 KiB, so that it waits
# for a slow reader far less often:
# - here, a session's output: the control master writes every session's output, 32 KiB
#   at a time (20,000 files pulled on six streams: 0.86-0.97 CPU s for the master instead
#   of 1.14-1.22). Its input keeps the default: pushes were no faster with it wider.
# - there, the tar that unpacks a pushed bundle: its stdin, the pipe sshd writes into,
#   widened by WIDE_STDIN (tar creating 20,000 files of a push: 0.74-0.79 CPU s for sshd
#   instead of 1.07-1.16). dd writing a pushed slice reads fast enough: a 2 GiB push
#   took as long either way, so its pipe is left as it is.
PIPE_BYTES = 1 << 20
# Perl does it on the remote host if it has Perl (a Debian system always does), in 1-2 ms;
# on a system other than Linux, where 1031 means something else, nothing is done.
WIDE_STDIN = (b"perl -e '$^O eq q(linux) and fcntl(STDIN, 1031, %d)' 2>/dev/null; "
              % PIPE_BYTES)


class AuthRequired(TransferError):
    """The control socket is gone: a person must open it again (`hpcmove auth JOB`)."""

    auth = True


@dataclass(frozen=True)
class Endpoint:
    host: str  # '' for a local path; else [user@]host as written
    path: bytes

    @property
    def remote(self):
        return bool(self.host)

    def __str__(self):
        p = os.fsdecode(self.path)
        return f"{self.host}:{p}" if self.host else p


# neither part may start with '-': ssh would read the word as an option
_HOST = re.compile(r"^(?:[A-Za-z0-9._+][A-Za-z0-9._+-]*@)?"
                   r"(?:[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\])$")


def valid_host(host):
    """`[user@]host` as ssh and scp name a host, and nothing ssh could take for an
    option."""
    return bool(_HOST.match(host))


def parse(arg):
    """`[user@]host:path` -> remote Endpoint; anything else is a local path. As with scp,
    a colon after a '/' (`./a:b`, `/x/y:z`) is part of a local name."""
    raw = os.fsencode(arg)
    bracket = raw.find(b"]:") if b"@[" in raw or raw.startswith(b"[") else -1
    colon = bracket + 1 if bracket > 0 else raw.find(b":")
    slash = raw.find(b"/")
    if colon <= 0 or (0 <= slash < colon):
        return Endpoint("", raw)
    host = os.fsdecode(raw[:colon])
    if not valid_host(host):
        raise PlanError(f"not a valid remote host in {os.fsdecode(raw)!r}: {host!r}")
    path = raw[colon + 1:] or b"."
    return Endpoint(host, path)


_TILDE = re.compile(rb"~([A-Za-z0-9._][A-Za-z0-9._-]*)?(/+|$)")


def tilde_users(endpoints):
    """The users whose home a remote path names (`~alice/x`), sorted."""
    return sorted({m.group(1).decode() for e in endpoints if e.remote
                   for m in [_TILDE.match(e.path)] if m and m.group(1)})


def untilde(endpoint, homes):
    """A remote path's leading `~` as scp reads it: `~` and `~/x` are in the home
    directory, where every remote command starts (so they become `.` and `x`); `~alice/x`
    is in alice's (`homes`: {user: home directory}, from Remote.homes). Any other `~` is
    part of a name."""
    m = _TILDE.match(endpoint.path) if endpoint.remote else None
    if not m:
        return endpoint
    user, rest = m.group(1), endpoint.path[m.end():]
    if not user:
        return Endpoint(endpoint.host, rest or (b"./" if m.group(2) else b"."))
    home = homes.get(user.decode())
    if not home:
        raise PlanError(f"no user {user.decode()!r} on {endpoint.host} "
                        f"(in {os.fsdecode(endpoint.path)!r})")
    return Endpoint(endpoint.host, os.path.join(os.fsencode(home), rest) if rest
                    else os.fsencode(home) + (b"/" if m.group(2) else b""))


def q(value):
    """One shell word, single-quoted, for any bytes (or str)."""
    if isinstance(value, str):
        value = os.fsencode(value)
    return b"'" + value.replace(b"'", b"'\\''") + b"'"


def word(path):
    """A path as an operand: a leading '-' would be read as an option by find and others."""
    return b"./" + path if path.startswith(b"-") else path


# --- commands (pure: bytes of shell text) -------------------------------------------

def sum_cmd(kind):
    """Reads stdin, prints the digest first on its line."""
    return b"xxhsum -H2" if kind == "xxh128" else b"cksum"


def sums_cmd(kind):
    """Digests of the files named after it, one line each: 'HASH  NAME' or 'CRC LEN NAME'."""
    return b"xxhsum -H2" if kind == "xxh128" else b"cksum"


def parse_sums(out, names, kind):
    """{name: digest} from sums_cmd's output for `names` in order. Names are matched as
    printed (any bytes, newlines too), so nothing is guessed; a name whose line is
    missing (unreadable file) is absent from the result."""
    found, pos = {}, 0
    fields = 1 if kind == "xxh128" else 2
    for name in names:
        name = os.fsencode(name)
        start = pos
        parts = []
        for _ in range(fields):
            end = out.find(b" ", pos)
            if end < 0:
                return found
            parts.append(out[pos:end])
            pos = end + 1
        if kind == "xxh128":
            pos += 1  # two spaces
        if out[pos:pos + len(name) + 1] != name + b"\n":
            pos = start  # no line for this name (unreadable): try the next name here
            continue
        pos += len(name) + 1
        found[name] = parts[0].decode() if kind == "xxh128" else \
            "cksum:%s/%s" % (parts[0].decode(), parts[1].decode())
    return found


# One line: xxhsum's XXH3-128 of a known word from stdin (sum_cmd) and of an empty file
# named after `--` (sums_cmd), as the probe reads them; empty without xxhsum.
XXH_CHECK = (b"{ command -v xxhsum >/dev/null && { printf hpcmove | xxhsum -H2; "
             b"xxhsum -H2 -- /dev/null; }; } 2>/dev/null | tr '\\n' ' '; echo")


def xxhsum_works(line):
    """True when XXH_CHECK's line shows an xxhsum that gives the digests hpcmove computes
    here, in the form parse_digest and parse_sums read: an older one (where -H2 is not
    XXH3-128, or an option is missing) would fail every verification, so cksum then."""
    words = line.split()
    return (len(words) == 4 and words[3] == b"/dev/null"
            and words[0] == xxhash.xxh3_128(b"hpcmove").hexdigest().encode()
            and words[2] == xxhash.xxh3_128(b"").hexdigest().encode())


def read_cmd(path, offset, length):
    return (b"dd if=" + q(path) + b" bs=" + DD_BS + b" skip=%d count=%d "
            b"iflag=skip_bytes,count_bytes status=none" % (offset, length))


def write_cmd(path, offset, kind, length, verify=True):
    """Write stdin at `offset` of `path` (created 0600), then (verify) print the digest of
    what is now on the remote disk for that range: the remote side's verification."""
    write = (b"umask 077 && dd of=" + q(path) + b" bs=" + DD_BS + b" seek=%d "
             b"oflag=seek_bytes conv=notrunc status=none" % offset)
    if not verify:
        return write
    return write + b" && " + read_cmd(path, offset, length) + b" | " + sum_cmd(kind)


def digest_cmd(path, offset, length, kind, mtime=False):
    """Digest of a range; with mtime, first a line 'SIZE MTIME' of the file (lstat), so a
    source that changed since planning is caught in the same call."""
    head = b""
    if mtime:
        head = b"stat -c '%s %.9Y' -- " + q(word(path)) + b" && "
    return head + read_cmd(path, offset, length) + b" | " + sum_cmd(kind)


CHECK_MARK = b"hpcmove-check"


def pull_slice_cmd(path, offset, length, kind):
    """A range's bytes on stdout and, meanwhile, on stderr a line 'hpcmove-check SIZE
    MTIME DIGEST' (the file's lstat, the digest of the range read on its own), so that a
    pulled slice takes one session, not two. The exit code is the data's, else the
    check's."""
    read = read_cmd(path, offset, length)
    return (b"{ s=$(stat -c '%s %.9Y' -- " + q(word(path)) + b") && h=$(" + read + b" | "
            + sum_cmd(kind) + b") && printf '" + CHECK_MARK + b" %s %s\\n' \"$s\" \"$h\" >&2; } & "
            + read + b"; r=$?; wait $!; c=$?; [ $r -ne 0 ] && exit $r; exit $c")


def parse_check(err, kind):
    """((size, mtime_ns, digest) or None, the rest of stderr) from pull_slice_cmd's."""
    found, rest = None, []
    for line in err.splitlines(keepends=True):
        words = line.split()
        if words[:1] == [CHECK_MARK] and len(words) >= 4:
            found = (int(words[1]), mtime_ns(words[2]), parse_digest(b" ".join(words[3:]), kind))
        else:
            rest.append(line)
    return found, b"".join(rest)


def digests_script(ranges, kind, parallel=4):
    """A script printing 'N DIGEST' for the N-th (path, offset, length), or 'N ERR'
    when unreadable; `parallel` ranges are read at once (the lines come in any order,
    each written whole by one echo)."""
    lines = []
    for n, (p, o, length) in enumerate(ranges):
        lines.append(b"{ h=$(" + read_cmd(p, o, length) + b" 2>/dev/null | " + sum_cmd(kind)
                     + b") && echo \"%d $h\" || echo \"%d ERR\"; } &" % (n, n))
        if n % parallel == parallel - 1:
            lines.append(b"wait")
    return b"\n".join(lines + [b"wait"]) + b"\n"


def parse_digests(out, count, kind):
    """[digest or 'unreadable'] in range order, from digests_script's output."""
    found = {}
    for line in out.splitlines():
        number, _, rest = line.partition(b" ")
        if number.isdigit() and rest != b"ERR":
            found[int(number)] = parse_digest(rest, kind)
    return [found.get(n) or "unreadable" for n in range(count)]


def parse_digest(out, kind):
    """The hex digest from xxhsum/cksum output (cksum: CRC and length, as one token)."""
    fields = out.split()
    if kind == "xxh128":
        return fields[0].decode() if fields else ""
    return "cksum:%s/%s" % (fields[0].decode(), fields[1].decode()) if len(fields) >= 2 else ""


FIND_FORMAT = r"%y\0%s\0%m\0%T@\0%D\0%i\0%n\0%l\0%p\0"
_FIELDS = 9


@dataclass(slots=True)
class RemoteStat:
    """What find printed for one remote path, shaped like os.stat_result where it matters."""

    st_mode: int
    st_size: int
    st_mtime_ns: int
    st_dev: int
    st_ino: int
    st_nlink: int
    link_target: bytes
    path: bytes


_TYPES = {b"f": stat.S_IFREG, b"d": stat.S_IFDIR, b"l": stat.S_IFLNK}


def mtime_ns(text):
    sec, _, frac = text.partition(b".")
    return int(sec) * 1_000_000_000 + int((frac[:9] or b"0").ljust(9, b"0"))


def parse_find(out):
    """Records of `find ... -printf FIND_FORMAT`, in find's order."""
    parts = out.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) % _FIELDS:
        raise PlanError("unexpected output from find on the remote host")
    records = []
    for i in range(0, len(parts), _FIELDS):
        y, size, mode, mt, dev, ino, nlink, link, path = parts[i:i + _FIELDS]
        kind = _TYPES.get(y, stat.S_IFIFO)  # anything else is skipped as special
        records.append(RemoteStat(kind | int(mode, 8), int(size), mtime_ns(mt), int(dev),
                                  int(ino), int(nlink), link, path))
    return records


# find's records of the paths NUL-terminated on stdin (any number: a copyjob's sources)
FIND_CMD = (b"xargs -0 -r sh -c " + q(b'exec find "$@" -printf ' + q(FIND_FORMAT.encode()))
            + b" sh")


def paths_input(paths):
    """Paths as the commands that read them from stdin take them: NUL-terminated, each
    as an operand (word)."""
    return b"".join(word(p) + b"\0" for p in paths)


def _touch(path, ns, link=False):
    stamp = b"@%d.%09d" % divmod(ns, 1_000_000_000)
    return b"touch -m " + (b"-h " if link else b"") + b"-d " + stamp + b" -- " + q(word(path))


def place_script(files, spools):
    """All-or-nothing placement on the remote host, as finalize.place does it locally:
    first every conflict is looked for (exit 3, nothing moved); modes, mtimes and symlinks
    in the spool's tree; then parents first, a directory not yet at the destination moves
    in one rename with all it holds (its entries are then gone from the spool and left
    alone), anything else one rename each; hard links; directory metadata deepest first;
    the spool directories go last.
    `files` have kind, index, dst, spool, mode, mtime_ns, link_target, link_to."""
    out = [b"set -e"]
    for f in files:
        d = q(word(f.dst))
        if f.kind == DIR:
            out.append(b"if [ -e " + d + b" ] && [ ! -d " + d + b" ]; then echo CONFLICT "
                       + d + b" is not a directory; exit 3; fi")
        else:
            out.append(b"if [ -d " + d + b" ] && [ ! -L " + d + b" ]; then echo CONFLICT "
                       + d + b" is a directory; exit 3; fi")
    by_index = {f.index: f for f in files}
    dirs = [f for f in files if f.kind == DIR]
    for f in files:  # in the spool: modes, mtimes, symlinks
        tmp = spool_path(f.spool, f.dst)
        if f.kind == FILE:
            out += [b"chmod %o -- " % f.mode + q(word(tmp)), _touch(tmp, f.mtime_ns)]
        elif f.kind == SYMLINK:
            out += [b"ln -s -- " + q(f.link_target) + b" " + q(word(tmp)),
                    _touch(tmp, f.mtime_ns, link=True)]
    for f in files:  # parents first; what went with a directory is no longer in the spool
        tmp, d = q(word(spool_path(f.spool, f.dst))), q(word(f.dst))
        if f.kind == DIR:
            out.append(b"[ -e " + d + b" ] || [ -L " + d + b" ] || mv -T -- " + tmp + b" " + d)
        elif f.kind != HARDLINK:
            out.append(b"if [ -e " + tmp + b" ] || [ -L " + tmp + b" ]; then mv -f -T -- "
                       + tmp + b" " + d + b"; fi")
    for f in files:
        if f.kind == HARDLINK:
            tmp = q(word(hardlink_tmp(f.spool, f.index)))
            out += [b"ln -- " + q(word(by_index[f.link_to].dst)) + b" " + tmp,
                    b"mv -f -T -- " + tmp + b" " + q(word(f.dst))]
    for f in sorted(dirs, key=lambda d: -d.dst.count(b"/")):
        out += [b"chmod %o -- " % f.mode + q(word(f.dst)), _touch(f.dst, f.mtime_ns)]
    out += [b"rm -rf -- " + q(word(s)) + b" || true" for s in spools]  # placed: done
    return b"\n".join(out) + b"\nexit 0\n"


# The same placement as place_script, in one python3 process on the remote host (a
# shell spawns several processes per file). place_ops' records arrive on stdin: the
# counts of entries and of spools, then eight NUL-terminated fields for each entry (no
# name holds a NUL) and the spools, which go once everything is placed; anything else
# (no input: a session started ahead and not used; a cut one) places nothing and exits
# 4, so the spools stay. Entries come parents first, so what lies under a directory
# absent at the destination is absent too (not looked up), and what lies under a
# directory moved in one rename has gone with it.
PLACE_PY = """
import os, shutil, stat, sys
counts, _, raw = sys.stdin.buffer.read().partition(b"\\0")
raw, counts = raw.split(b"\\0"), counts.split()
if len(counts) != 2 or not all(c.isdigit() for c in counts):
    sys.exit(4)
n, spools = int(counts[0]), int(counts[1])
if len(raw) != n * 8 + spools + 1 or raw[-1]:
    sys.exit(4)
spools = raw[n * 8:-1]
fs = [(k.decode(), int(i), d, t, int(m), int(ns), target, int(to or -1))
      for k, i, d, t, m, ns, target, to in zip(*[iter(raw[:n * 8])] * 8)]
key = lambda path: path.rstrip(b"/") or path
absent = set()
for kind, _i, dst, _t, _m, _ns, _target, _to in fs:
    if os.path.dirname(key(dst)) in absent:
        st = None
    else:
        try:
            st = os.lstat(dst)
        except FileNotFoundError:
            st = None
    if st is None:
        if kind == "dir":
            absent.add(key(dst))
    elif (kind == "dir") != stat.S_ISDIR(st.st_mode):
        print("CONFLICT", os.fsdecode(dst), "is", "not a directory" if kind == "dir"
              else "a directory")
        sys.exit(3)
for kind, _i, _d, tmp, mode, ns, target, _to in fs:
    if kind == "file":  # a bundle's tar set both already: only what differs
        st = os.lstat(tmp)
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(tmp, mode)
        if st.st_mtime_ns != ns:
            os.utime(tmp, ns=(ns, ns))
    elif kind == "symlink":
        os.symlink(target, tmp)
        os.utime(tmp, ns=(ns, ns), follow_symlinks=False)
moved = set()
for kind, _i, dst, tmp, _m, _ns, _target, _to in fs:
    if os.path.dirname(key(dst)) in moved:
        if kind == "dir":
            moved.add(key(dst))
    elif kind == "dir":
        if not os.path.lexists(dst):
            os.rename(tmp, dst)
            moved.add(key(dst))
    elif kind != "hardlink":
        os.rename(tmp, dst)
by = {f[1]: f for f in fs}
for kind, _i, dst, tmp, _m, _ns, _target, to in fs:
    if kind == "hardlink":
        os.link(by[to][2], tmp)
        os.rename(tmp, dst)
for kind, _i, dst, _t, mode, ns, _target, _to in sorted(
        (f for f in fs if f[0] == "dir"), key=lambda f: -f[2].count(b"/")):
    os.chmod(dst, mode)
    os.utime(dst, ns=(ns, ns))
for spool in spools:  # placed: done
    shutil.rmtree(spool, ignore_errors=True)
"""

# PLACE_PY on the remote host (its input from place_ops)
PLACE_COMMAND = b"python3 -c " + q(PLACE_PY)


def skipped_ranges(files, slices_by_file):
    """--skip-existing: (ids of files whose every slice was already at the destination,
    [(destination, spool file, offset, length)] of the skipped ranges of the others)."""
    in_place, fill = set(), []
    for f in files:
        slices = slices_by_file.get(f.id, [])
        skipped = [s for s in slices if s.skipped]
        if skipped and len(skipped) == len(slices):
            in_place.add(f.id)
        else:
            fill += [(f.dst, spool_path(f.spool, f.dst), s.offset, s.length) for s in skipped]
    return in_place, fill


def place_ops(files, spools):
    """PLACE_PY's input: the counts, eight NUL-terminated fields per entry, the spools."""
    return b"%d %d\0" % (len(files), len(spools)) + b"".join(b"\0".join((
        f.kind.encode(), b"%d" % f.index, f.dst,
        hardlink_tmp(f.spool, f.index) if f.kind == HARDLINK else spool_path(f.spool, f.dst),
        b"%d" % f.mode, b"%d" % f.mtime_ns, f.link_target or b"",
        b"" if f.link_to is None else b"%d" % f.link_to)) + b"\0" for f in files) \
        + b"".join(s + b"\0" for s in spools)


# Paths NUL-terminated on stdin, out 'SIZE MTIME<TAB>PATH<NUL>' for each that exists
# (lstat): a few stat processes for any number of files (one per file took 20 s for
# 20,000 files), names matched as printed, any bytes but NUL.
STAT_CMD = b"xargs -0 stat --printf '%s %.9Y\\t%n\\0' -- 2>/dev/null; exit 0"


def parse_stats(out, paths):
    """{path: (size, mtime_ns)} from STAT_CMD's output; a path missing there is absent."""
    wanted, found = set(paths), {}
    for record in out.split(b"\0"):
        head, tab, name = record.partition(b"\t")
        fields = head.split()
        if tab and name in wanted and len(fields) == 2:
            found[name] = (int(fields[0]), mtime_ns(fields[1]))
    return found


def remove_script(files):
    """--move on a remote source: files, then directories deepest first (kept if not empty)."""
    out = [b"bad=0"] + [b"rm -f -- " + q(word(f.src)) + b" || bad=1"
                        for f in files if f.kind != DIR]
    out += [b"rmdir -- " + q(word(f.src)) + b" 2>/dev/null || true"
            for f in sorted((f for f in files if f.kind == DIR), key=lambda d: -d.src.count(b"/"))]
    return b"\n".join(out + [b"exit $bad"]) + b"\n"


# --- running commands ----------------------------------------------------------------

class Unreachable(HpcmoveError):
    """The node that keeps a socket cannot be reached over ssh without a prompt."""


# asked on the socket's node: the marker line tells "the master did not answer" from
# "ssh to the node failed" (both are exit 255)
_CHECK_THERE = 'ssh -S "$0" -O check "$1" 2>/dev/null; echo "hpcmove-check $?"'


def master_alive(socket, host, via=""):
    """True when the control master behind `socket` answers (`ssh -O check`), asked on
    the machine `via` when the socket is kept there; Unreachable when that machine
    cannot be asked."""
    if not via:
        return subprocess.run(["ssh", "-S", os.fsdecode(socket), "-O", "check", host],
                              capture_output=True).returncode == 0
    done = subprocess.run(through(via, ["sh", "-c", _CHECK_THERE, os.fsdecode(socket), host]),
                          capture_output=True)
    answer = re.search(rb"^hpcmove-check (\d+)$", done.stdout, re.M)
    if not answer:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        raise Unreachable(f"cannot reach {via} over ssh without a prompt"
                          f"{': ' + said[-1] if said else ''} (the socket for {host} is kept "
                          f"there; `ssh {via}` must work non-interactively from here)")
    return answer.group(1) == b"0"


# Every remote command runs in the C locale: the remote tools then say "No space left on
# device" in English whatever language the user's environment asks for (ssh forwards
# LANG and LC_*; rc files set LANGUAGE), which is how remote_error tells a failure no
# retry can mend, and they treat names as bytes.
C_LOCALE = b"LC_ALL=C; export LC_ALL\n"


def for_any_shell(command):
    """`command` (POSIX sh, any bytes but NUL) as a line that every login shell hands to
    /bin/sh unchanged, to run in the C locale. sshd runs a remote command with the user's
    login shell, and at sites where that is tcsh a quoted newline is an error and `!` is
    expanded even in single quotes, so the command travels as printf octal escapes
    inside one quoted word that only sh reads (sh, bash, zsh, csh, tcsh pass it alike)."""
    return (b"exec /bin/sh -c 'eval \"$(printf \""
            + b"".join(b"\\%03o" % c for c in C_LOCALE + command) + b"\")\"'")


def through(via, argv):
    """`argv` run on the machine `via` over ssh ('' runs it here): the login node's way
    to a socket kept on a data-transfer node. ssh hands the far shell one line, so every
    word is quoted (names with any bytes pass as they are)."""
    if not via:
        return argv
    return ["ssh", "-o", "BatchMode=yes", "-T", "-x", via, "--", shlex.join(argv)]


def ssh_options(socket):
    """ssh through an existing control socket only: no prompt, no new master, and no
    connection of its own when the master is gone or cannot open a session (ssh would
    try one, which a batch job cannot authenticate: the remote host would log a failed
    login for each session, and sites lock hosts out for fewer). The session then ends
    255, as it did when that connection failed."""
    return ["ssh", "-S", os.fsdecode(socket), "-o", "ControlMaster=no", "-o", "BatchMode=yes",
            "-o", "ProxyCommand=false", "-o", "ServerAliveInterval=30", "-T", "-x"]


def ssh_argv(socket, host):
    return ssh_options(socket) + [host, "--"]


# Sessions started ahead of their input (Remote.start), by argv: each new session pays
# for a channel, the remote login shell and the user's rc files (0.1-0.2 s here, seconds
# at sites whose rc files load modules), so a session known to come next is started
# while this end still works, and the run() of that command takes it.
_started = {}
_started_lock = threading.Lock()


def _end_unused(proc):
    """A session started ahead and never used: its stdin closes with nothing sent (an
    empty script; `dd conv=notrunc` writes nothing; tar and the placement program refuse
    an empty input), and it lets its slot go."""
    try:
        proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _discard_started():
    with _started_lock:
        procs = [p for ps in _started.values() for p in ps]
        _started.clear()
    for proc in procs:
        _end_unused(proc)


def _reclaim_started(socket):
    """End one session started ahead through `socket` and not taken yet, so that its slot
    serves a session that runs now; False when there is none. A stream that prepared the
    next unit can lose the race for it (another stream took the unit before the session
    was registered): that session is never taken, and enough of them held every slot
    while every stream waited for one."""
    with _started_lock:
        for argv, procs in _started.items():
            if procs and procs[0]._slots is not None and procs[0]._slots.socket == socket:
                proc = procs.pop(0)
                if not procs:
                    del _started[argv]
                break
        else:
            return False
    _end_unused(proc)
    return True


atexit.register(_discard_started)


# What ssh here prints when the control master could not open a session: the sshd
# refused it (its MaxSessions still counts sessions that are closing, see CLOSING), and
# ssh ends 255 (no connection of its own: ssh_options). The command never ran, so the
# session is asked for again, backing off, up to ASKS times, and that is no attempt of
# the slice's (16 streams of 1 MiB slices through one master on 2 busy cores were
# refused a few times a job).
SESSION_REFUSED = (b"session request failed", b"Session open refused by peer")
ASKS = 6


def refused(code, stderr):
    """Did this session end because the master could not open it (nothing ran)?"""
    return code == 255 and any(r in stderr for r in SESSION_REFUSED)


def ask_later(asked):
    """Wait before asking again for a refused session (`asked` times so far)."""
    time.sleep(0.05 * 2 ** asked * (1 + random.random()))


SESSIONS = 10  # sshd's MaxSessions unless the site raised it: sessions per connection
# sshd still counts a session for a moment after its ssh here has exited (the channel
# closes after the exit status is delivered): a new one sent at once into a full
# connection is refused. So two of the sshd's sessions are left for those.
CLOSING = 2
# And the slot of a session that ended here is free again only this much later (sshd
# closes the channel after the exit status is out: on 2 cores busy with 16 streams of
# short sessions, later than two spare sessions covered).
CLOSE_GRACE = 0.05


class Slots:
    """At most `count` sessions at once through one control socket, for every process
    and thread of this machine that uses it (tasks of one job and of others, finalize,
    cancel): sshd refuses a connection's sessions beyond its MaxSessions ("Session open
    refused by peer"), and four tasks of three streams on one node are already 12. One
    file per slot beside the socket (its directory is the user's own), held with flock
    while a session lives; a process that dies lets its slots go with it."""

    POLL = 0.02

    def __init__(self, socket, count=SESSIONS):
        self.socket, self.count = socket, max(1, count)

    def acquire(self, n=1, wait=True):
        """Hold `n` slots at once (all or none, so two sessions wanted together never
        wait for each other): their file descriptors; None when not `wait` and none is
        free now. While waiting, the sessions this process started ahead and has not used
        give their slots up first (a session that is wanted now comes before one that may
        be wanted later)."""
        n = min(n, self.count)
        while True:
            held = []
            for k in random.sample(range(self.count), self.count):
                try:
                    fd = os.open(self.socket + b".slot%d" % k,
                                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                except OSError:  # no slot files beside this socket: sessions unlimited
                    self.release(held)
                    return []
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                held.append(fd)
                if len(held) == n:
                    return held
            self.release(held)
            if not wait:
                return None
            if not _reclaim_started(self.socket):
                time.sleep(self.POLL * (1 + random.random()))

    @staticmethod
    def release(fds):
        for fd in fds:
            os.close(fd)  # the lock goes with the last descriptor of its open file

    @classmethod
    def release_closed(cls, fds):
        """Let the slots of sessions that ended go CLOSE_GRACE later."""
        timer = threading.Timer(CLOSE_GRACE, cls.release, (fds,))
        timer.daemon = True  # at exit the descriptors close with the process
        timer.start()


def widen(pipe):
    """Give `pipe` (a file object) PIPE_BYTES of buffer where the system allows it."""
    try:
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (OSError, AttributeError):  # over the user's pipe limit; not Linux
        pass


class Session(subprocess.Popen):
    """A remote command's ssh process that holds session slots until it is waited for."""

    def __init__(self, argv, slots=None, held=(), **kwargs):
        self._slots, self._held = slots, list(held)
        try:
            super().__init__(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, **kwargs)
        except BaseException:
            self._let_go()
            raise
        widen(self.stdout)

    def _let_go(self):
        held, self._held = self._held, []
        if self._slots and held:
            self._slots.release_closed(held)

    def wait(self, timeout=None):
        code = super().wait(timeout)
        self._let_go()
        return code

    def __del__(self, *args, **kwargs):  # never waited for (an error on the way out)
        self._let_go()
        super().__del__(*args, **kwargs)


class Remote:
    """Commands on one remote host through a control socket; when it is kept on this
    machine, at most `sessions` (the sshd's MaxSessions) less CLOSING at once (Slots)."""

    def __init__(self, host, socket, via="", sessions=SESSIONS):
        self.host, self.socket, self.via, self.sessions = host, socket, via, sessions
        self.slots = None if via or not socket else \
            Slots(socket, max(1, sessions - CLOSING))

    def hold(self, n=1):
        """`n` session slots at once, for a process that opens sessions itself (rsync -e
        ssh): release() them when it has ended."""
        return self.slots.acquire(n) if self.slots else []

    def release(self, held):
        """hold()'s slots, once the sessions in them have ended."""
        if self.slots:
            self.slots.release_closed(held)

    def start(self, command, wait=True, **kwargs):
        """Start `command`'s session now, for a later session() or run() of the same
        command (from any Remote of this host and socket in this process), so that its
        start overlaps what this end does meanwhile. Not `wait`: only if a session slot
        is free now (False if not)."""
        argv = tuple(self.argv(command))
        held = self.slots.acquire(1, wait) if self.slots else []
        if held is None:
            return False
        proc = Session(argv, self.slots, held, **kwargs)
        with _started_lock:
            _started.setdefault(argv, []).append(proc)
        return True

    def session(self, command, held=None, **kwargs):
        """A Session of `command` (stdin, stdout and stderr piped): one started ahead
        for it if there is one, else a new one in the slot `held` or the next free one."""
        argv = tuple(self.argv(command))
        if held is None:
            with _started_lock:
                waiting = _started.get(argv)
                if waiting:
                    proc = waiting.pop()
                    if not waiting:
                        del _started[argv]
                    return proc
        return Session(argv, self.slots, self.hold() if held is None else held, **kwargs)

    def sessions(self, *commands):
        """New Sessions of `commands` that run together, their slots taken at once (two
        sessions that each wait for a slot could wait for each other)."""
        held = self.hold(len(commands))
        return [self.session(c, held=held[k:k + 1] if k < len(commands) - 1 else held[k:])
                for k, c in enumerate(commands)]

    def argv(self, command):
        # ssh joins its arguments with spaces for the remote shell: pass one word of text
        return through(self.via, ssh_argv(self.socket, self.host)
                       + [os.fsdecode(for_any_shell(command))])

    def alive(self):
        if self.via:
            return master_alive(self.socket, self.host, self.via)
        return os.path.exists(self.socket) and master_alive(self.socket, self.host)

    def check_alive(self):
        if not self.alive():
            raise AuthRequired(f"auth-required: the control socket {os.fsdecode(self.socket)} "
                               f"for {self.host} is gone")

    def run(self, command, input=b"", check=True):
        """(exit code, stdout, stderr) of a shell command on the remote host; a session
        the sshd refused is asked for again (refused)."""
        for asked in range(ASKS):
            proc = self.session(command)
            out, err = proc.communicate(input)
            if not refused(proc.returncode, err) or asked == ASKS - 1:
                break
            ask_later(asked)
        if proc.returncode == 255:
            self.check_alive()
        if check and proc.returncode != 0:
            raise HpcmoveError(f"on {self.host}: command failed (exit {proc.returncode}): "
                               f"{err.decode(errors='replace').strip()}")
        return proc.returncode, out, err

    def script(self, text, check=True):
        """Run a generated script with `sh -s`, the script on stdin."""
        return self.run(b"sh -s", input=text, check=check)

    def probe(self, dirs=()):
        """What the remote host offers beyond coreutils, in one call: the checksum
        program ('xxh128' with an xxhsum that gives XXH3-128 as hpcmove reads it, else
        'cksum'), python3 (fast placement), rsync
        (bundles of small files), the home directory (relative remote paths are made
        absolute against it) and which of `dirs` are directories there."""
        code, out, err = self.script(b"echo " + PROBE_MARK + b"; pwd; " + XXH_CHECK + b"\n"
                                     b"command -v python3 || echo -\n"
                                     b"command -v rsync || echo -\n"
                                     + b"".join(b"test -d " + q(word(d)) + b" && echo d || "
                                                b"echo -\n" for d in dirs), check=False)
        noise, mark, out = out.partition(PROBE_MARK + b"\n")
        if not mark:
            raise HpcmoveError(f"on {self.host}: no answer from the remote shell (exit {code}): "
                               f"{err.decode(errors='replace').strip()}")
        if noise:
            said = noise.decode(errors="replace").strip().splitlines() or [""]
            raise HpcmoveError(
                f"on {self.host}: the remote shell prints {said[0][:80]!r}"
                f"{' ...' if len(said) > 1 else ''} before every command (your startup files "
                f"there, e.g. ~/.bashrc, write to stdout in non-interactive shells); that "
                f"would mix into the data. Make them quiet unless interactive (in ~/.bashrc: "
                f"[[ $- == *i* ]] || return, before any output), as scp and rsync also need")
        lines = out.splitlines()
        lines += [b"-"] * (4 + len(dirs) - len(lines))
        return {"sum": "xxh128" if xxhsum_works(lines[1]) else "cksum",
                "python": lines[2] != b"-", "rsync": lines[3] != b"-",
                "home": os.fsdecode(lines[0]),
                "dirs": {d: line == b"d" for d, line in zip(dirs, lines[4:])}}

    def homes(self, users):
        """{user: home directory} on the remote host of those of `users` it knows."""
        _code, out, _err = self.run(b"getent passwd -- " + b" ".join(q(u) for u in users),
                                    check=False)
        found = {}
        for line in out.splitlines():
            fields = line.split(b":")
            if len(fields) >= 7 and fields[5]:
                found[fields[0].decode(errors="replace")] = os.fsdecode(fields[5])
        return found

    def is_dir(self, path):
        return self.run(b"test -d " + q(word(path)), check=False)[0] == 0

    def find(self, paths):
        code, out, err = self.run(FIND_CMD, input=paths_input(paths), check=False)
        if code != 0:
            raise PlanError(f"cannot read source on {self.host}: "
                            f"{err.decode(errors='replace').strip()}")
        return parse_find(out)


def _norm(path):
    return path.rstrip(b"/") or b"/"


class RemoteTree:
    """A remote host's source trees, listed once with find, read like LocalTree."""

    def __init__(self, records):
        self.stats, self.kids = {}, {}
        for r in records:
            key = _norm(r.path)
            if key in self.stats:
                continue  # a root listed twice (nested sources)
            self.stats[key] = r
            parent = os.path.dirname(key)
            if parent in self.stats and parent != key:
                self.kids.setdefault(parent, []).append(r)

    @classmethod
    def listing(cls, remote, sources):
        """One find for every source root (each root's records first, then what is below
        it), in one session."""
        return cls(remote.find(sources))

    def lstat(self, path):
        try:
            return self.stats[_norm(word(path))]
        except KeyError:
            raise FileNotFoundError(2, "No such file or directory", os.fsdecode(path)) from None

    def readlink(self, path):
        return self.lstat(path).link_target

    def isdir(self, path):
        try:
            return stat.S_ISDIR(self.lstat(path).st_mode)
        except FileNotFoundError:
            return False

    def children(self, path):
        found = self.kids.get(_norm(word(path)), [])
        return sorted(((os.path.basename(r.path), r.path, r) for r in found),
                      key=lambda c: c[0])


class Far:
    """The remote end of a job (from its recorded options): what finalize and cancel do
    there. `side` is 'dst' for a push, 'src' for a pull."""

    def __init__(self, host, socket, side, python=False, via="", sessions=SESSIONS):
        self.remote = Remote(host, os.fsencode(socket), via, sessions)
        self.side, self.python = side, python

    def source_stats(self, files):
        """{file id: (size, mtime_ns) or None} of the remote sources, in one call."""
        regular = [f for f in files if f.kind == FILE]
        if not regular:
            return {}
        paths = [word(f.src) for f in regular]
        _code, out, _err = self.remote.run(STAT_CMD, input=b"".join(p + b"\0" for p in paths),
                                           check=False)
        found = parse_stats(out, paths)
        return {f.id: found.get(p) for f, p in zip(regular, paths)}

    def place(self, files, python=False, slices_by_file=None):
        """Place on the remote host (python3 there does it in one process, else a shell
        script), then remove the spools in the same session (each session pays for the
        remote shell's start: a user's rc files); {file id: reason} when it could not
        (nothing placed then, the spools left for remove_spools). With --skip-existing
        (`slices_by_file`), files wholly at the destination already stay where they are,
        and the ranges a file already had there are first copied into its spool file."""
        spools = sorted({f.spool for f in files})
        in_place, fill = skipped_ranges(files, slices_by_file or {})
        if fill:
            code, out, err = self.remote.script(b"".join(
                b"dd if=" + q(word(dst)) + b" of=" + q(word(tmp)) + b" bs=" + DD_BS
                + b" skip=%d seek=%d count=%d iflag=skip_bytes,count_bytes oflag=seek_bytes "
                b"conv=notrunc status=none || exit 1\n" % (offset, offset, length)
                for dst, tmp, offset, length in fill), check=False)
            if code != 0:
                return {files[0].id: f"on {self.remote.host}: cannot take what was already at "
                                     f"the destination: {err.decode(errors='replace').strip()}"}
        placing = [f for f in files if f.id not in in_place]
        if python:
            code, out, err = self.remote.run(PLACE_COMMAND, input=place_ops(placing, spools),
                                             check=False)
        else:
            code, out, err = self.remote.script(place_script(placing, spools), check=False)
        if code == 0:
            return {}
        text = (out + err).decode(errors="replace").strip().splitlines()
        reason = text[-1] if text else f"exit {code}"
        return {files[0].id: f"on {self.remote.host}: cannot place: {reason}"}

    def start_checks(self):
        """Start finalize's sessions on a push's remote host before it needs them: the
        at-rest check's script and (with python3 there) the placement program; their
        starts overlap reading the job's rows. One left unused ends with nothing done."""
        self.remote.start(b"sh -s")
        if self.python:
            self.remote.start(PLACE_COMMAND)

    def remove_spools(self, files, other=None):
        """Remove the remote spool directories; False when no socket reaches the host
        (the job's own, or `other` - a Remote through a live one opened since)."""
        spools = sorted({f.spool for f in files})
        if not spools:
            return True
        remote = other or self.remote
        if not remote.alive():
            return False
        remote.run(b"xargs -0 -r rm -rf --", input=paths_input(spools), check=False)
        return True

    def flush(self, files):
        """--move on a push: what was placed reaches the remote disk (`sync -f` on each
        destination file system) before any local source goes."""
        dirs = sorted({os.path.dirname(f.dst) or b"." for f in files})
        code, _out, err = self.remote.script(b"".join(
            b"sync -f -- " + q(word(d)) + b" || exit 1\n" for d in dirs), check=False)
        if code != 0:
            raise HpcmoveError(f"on {self.remote.host}: cannot flush the placed files to disk: "
                               f"{err.decode(errors='replace').strip()}")

    def remove_sources(self, files):
        """--move on a pull: the remote sources go, after every copy is verified and in
        place (and on disk) here."""
        code, _out, err = self.remote.script(remove_script(files), check=False)
        if code != 0:
            raise HpcmoveError(f"on {self.remote.host}: cannot remove the sources: "
                               f"{err.decode(errors='replace').strip()}")

    def make_spools(self, dirs):
        """Start making the spools and the directories in them, parents first (names on
        stdin: any number, never seen by the shell; mkdir fails on a spool that exists),
        and return a function that waits for it and raises when it failed. Submit records
        the job meanwhile: the session's start (the remote shell's rc files) and the
        database's inserts overlap."""
        proc = subprocess.Popen(self.remote.argv(b"umask 077 && xargs -0 mkdir --"),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        said = []
        talk = threading.Thread(target=lambda: said.extend(proc.communicate(
            b"".join(word(d) + b"\0" for d in dirs))), daemon=True)
        talk.start()

        def made():
            talk.join()
            if proc.returncode == 255:
                self.remote.check_alive()
            if proc.returncode != 0:
                err = said[1].decode(errors="replace").strip() if len(said) > 1 else ""
                raise HpcmoveError(f"on {self.remote.host}: cannot make the spool "
                                   f"directories (exit {proc.returncode}): {err}")
        return made


def of_job(job):
    """The job's Far, reached through the socket's node when that is not this machine
    (cancel on a login node; finalize runs on the node itself)."""
    options = json.loads(job.options or "{}")
    r = options.get("remote")
    if not r:
        return None
    from .ssh import hop  # ssh builds on this module
    return Far(r["host"], r["socket"], r["side"], r.get("python", False),
               via=hop(r.get("node", "")), sessions=r.get("sessions", SESSIONS))
