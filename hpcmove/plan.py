"""Planning: sources + options -> entries, slices and array tasks.

Pure apart from reading the source trees (lstat/scandir); no database, no
scheduler, no writes. Every path is bytes, so names that are not UTF-8 survive.
"""
import functools
import heapq
import math
import os
import stat
from dataclasses import dataclass, field

from .errors import PlanError

FILE, DIR, SYMLINK, HARDLINK = "file", "dir", "symlink", "hardlink"


@dataclass(slots=True)
class Entry:
    """One thing to create at the destination."""

    index: int
    kind: str  # FILE, DIR, SYMLINK or HARDLINK
    src: bytes
    dst: bytes
    spool: bytes  # spool directory (same file system as dst)
    size: int = 0
    mode: int = 0
    mtime_ns: int = 0
    link_target: bytes = b""  # SYMLINK: what the link says
    link_to: int = -1  # HARDLINK: index of the entry whose data it shares

    @property
    def spool_path(self):
        return spool_path(self.spool, self.dst)


@dataclass(slots=True)
class Slice:
    entry: int
    index: int
    offset: int
    length: int
    task: int = -1


@dataclass
class Options:
    slice_size: int = 256 << 20
    stripe_width: int = 4
    max_task_bytes: int = 64 << 30  # e.g. what one task can move within its time limit
    size_table: tuple = ()  # ((min_size, slice_size), ...) ascending: per-file slice size
    small_file_threshold: int = 0  # files up to this size are never cut
    streams: int = 1  # slices each task moves at once (a remote transfer's streams)
    even_waves: bool = False  # slice sizes may shrink so that the streams end together

    def slice_size_for(self, size):
        if size <= self.small_file_threshold:
            return max(size, 1)
        chosen = self.slice_size
        for min_size, slice_size in self.size_table:
            if size >= min_size:
                chosen = slice_size
        return chosen


@dataclass
class Plan:
    token: str
    entries: list = field(default_factory=list)
    slices: list = field(default_factory=list)
    n_tasks: int = 0
    warnings: list = field(default_factory=list)

    @property
    def bytes_total(self):
        return sum(e.size for e in self.entries if e.kind == FILE)

    @property
    def spools(self):
        return sorted({e.spool for e in self.entries})

    @property
    def spool_dirs(self):
        """Every directory the spools need before data arrives, parents first: each spool,
        its tree, and the place of every directory entry in it."""
        out = {}
        for spool in self.spools:
            out[spool] = out[os.path.join(spool, SPOOL_TREE)] = None
        for e in self.entries:
            if e.kind == DIR:
                out[e.spool_path] = None
        return list(out)

    def task_slices(self, task):
        return [s for s in self.slices if s.task == task]


def spool_dir(parent, token):
    return os.path.join(parent, b".hpcmove-" + token.encode() + b".spool")


SPOOL_TREE = b"t"  # <spool>/t: the destination's layout


def spool_path(spool, dst):
    """Where an entry waits until it is placed: `dst`'s place in the destination's own
    layout under <spool>/t (the spool sits in the directory its destinations are named
    from). A directory that does not exist at the destination is then placed with all
    it holds by one rename, not one rename per file."""
    tree, base, prefix = _spool_parts(spool)
    path = dst
    if path.startswith(prefix) and b"/." not in path and b"//" not in path:
        rel = path[len(prefix):].rstrip(b"/")  # already in normal form: most entries
        return tree + b"/" + rel if rel else tree
    if path.startswith(b"/") != base.startswith(b"/"):
        # a relative destination whose spool was made absolute: both are read, like the
        # destination itself, from the directory hpcmove was called in
        base, path = os.path.abspath(base), os.path.abspath(path)
    base, path = _norm(base), _norm(path)
    if path == base:
        rel = b""
    elif base == b".":
        rel = path
    else:
        prefix = base.rstrip(b"/") + b"/"
        if not path.startswith(prefix):
            raise ValueError(f"{os.fsdecode(dst)} is not below the spool's directory "
                             f"{os.fsdecode(base)}")
        rel = path[len(prefix):]
    return tree + b"/" + rel if rel else tree


@functools.lru_cache(maxsize=64)
def _spool_parts(spool):
    """(its tree, the directory it sits in, that directory as a prefix): a job has few
    spools and finalize asks for 20,000 files' spool paths several times."""
    base = os.path.dirname(spool)
    return spool + b"/" + SPOOL_TREE, base, base.rstrip(b"/") + b"/"


def _norm(path):
    path = os.path.normpath(path)
    return b"/" + path.lstrip(b"/") if path.startswith(b"//") else path


def spool_root(path, token):
    """The spool directory a spool path (spool_path's) lies in."""
    marker = b"/.hpcmove-" + token.encode() + b".spool/"
    return path[:path.index(marker) + len(marker) - 1]


def hardlink_tmp(spool, index):
    """A hard link is made beside its destination's spool, by index, once its target is
    in place."""
    return os.path.join(spool, b"%d" % index)


def resolve_pairs(sources, dst, dst_isdir=os.path.isdir, src_isdir=os.path.isdir):
    """Like cp/rsync: DST is a directory to copy into when it exists as one, ends in '/',
    or there are several sources; otherwise it is the new name. A source ending in '/'
    that is a directory puts its contents, not itself, into the target (rsync's rule).
    `dst_isdir`/`src_isdir` answer for the side that is remote."""
    sources = [os.fsencode(s) for s in sources]
    dst = os.fsencode(dst)
    if not sources:
        raise PlanError("no source given")
    dst_is_dir = dst_isdir(dst)
    into = len(sources) > 1 or dst.endswith(b"/") or dst_is_dir
    if len(sources) > 1 and not dst_is_dir:
        raise PlanError(f"destination is not a directory: {os.fsdecode(dst)}")
    pairs = []
    for src in sources:
        if into and src.endswith(b"/") and src_isdir(src):
            pairs.append((src, dst))
        elif into:
            pairs.append((src, os.path.join(dst, os.path.basename(src.rstrip(b"/")))))
        else:
            pairs.append((src, dst))
    return pairs


def _check_pair(src, dst):
    try:
        st = os.lstat(src)
    except OSError as e:
        raise PlanError(f"cannot read source {os.fsdecode(src)}: {e.strerror}") from e
    parent = os.path.dirname(os.path.abspath(dst.rstrip(b"/") or b"/"))
    if not os.path.isdir(parent):
        raise PlanError(f"destination directory does not exist: {os.fsdecode(parent)}")
    a_src, a_dst = os.path.realpath(src), os.path.realpath(dst)
    if a_src == a_dst:
        raise PlanError(f"source and destination are the same: {os.fsdecode(src)}")
    if stat.S_ISDIR(st.st_mode) and (a_dst + b"/").startswith(a_src.rstrip(b"/") + b"/"):
        raise PlanError(f"destination {os.fsdecode(dst)} is inside source {os.fsdecode(src)}")
    return parent


class LocalTree:
    """The source file system as the planner reads it: lstat, readlink, sorted children."""

    lstat = staticmethod(os.lstat)
    readlink = staticmethod(os.readlink)
    isdir = staticmethod(os.path.isdir)

    @staticmethod
    def children(path):
        try:
            with os.scandir(path) as it:
                found = sorted(it, key=lambda d: d.name)
            return [(d.name, d.path, d.stat(follow_symlinks=False)) for d in found]
        except OSError as e:
            raise PlanError(f"cannot read directory {os.fsdecode(path)}: {e.strerror}") from e


class _Walker:
    """Turns source paths into entries, remembering hard links across the whole plan."""

    def __init__(self, plan, tree):
        self.plan, self.tree = plan, tree
        self.inodes = {}

    def add(self, kind, src, dst, spool, st, **extra):
        e = Entry(len(self.plan.entries), kind, src, dst, spool, mode=stat.S_IMODE(st.st_mode),
                  mtime_ns=st.st_mtime_ns, **extra)
        self.plan.entries.append(e)
        return e

    def visit(self, src, dst, spool, st):
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            self.add(SYMLINK, src, dst, spool, st, link_target=self.tree.readlink(src))
        elif stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in self.inodes:
                self.add(HARDLINK, src, dst, spool, st, link_to=self.inodes[key], size=0)
                return
            e = self.add(FILE, src, dst, spool, st, size=st.st_size)
            if st.st_nlink > 1:
                self.inodes[key] = e.index
        elif stat.S_ISDIR(mode):
            self.add(DIR, src, dst, spool, st)
            self.walk(src, dst, spool)
        else:
            self.plan.warnings.append(f"skipping special file {os.fsdecode(src)}")

    def walk(self, src, dst, spool):
        for name, path, st in self.tree.children(src):
            self.visit(path, os.path.join(dst, name), spool, st)


def cut(entry, slice_size):
    """Offset/length slices of a regular file; an empty file still gets one (empty) slice."""
    if entry.size == 0:
        return [Slice(entry.index, 0, 0, 0)]
    n = math.ceil(entry.size / slice_size)
    return [Slice(entry.index, i, i * slice_size, min(slice_size, entry.size - i * slice_size))
            for i in range(n)]


# Even waves. The streams of a job take its slices next-available, so its end waits for
# the last wave: a 2 GiB file in 8 slices of 256 MiB on 6 streams moves 6 slices, then 2
# while 4 streams have nothing to do (bench/README.md, run 33: 4.63 s median against
# 4.42 in 6 slices of 342 MiB and 4.46 in 12 of 171 MiB). A job of a few waves therefore
# has its cut files' slices made smaller, down to a quarter of the size asked for, when
# that ends the streams sooner. Only then: in a job of many waves the last one is a small
# part of the time, and every slice costs a session, a process and a row.
WAVES_AT_MOST = 4  # waves of the streams a job's slices make, for evening out
SHARE_AT_LEAST = 4  # a slice made smaller keeps at least 1/4 of its size
EVEN_ALIGN = 1 << 20  # sizes of evened-out slices: whole MiB (the engines' buffer)
FACTORS_AT_MOST = 48  # factors tried
# What a slice costs beyond its bytes, in bytes moved meanwhile (starting a session and
# its remote process, recording, checking: tens of ms at a few hundred MB/s)
SLICE_COST = 8 << 20


def even_waves(file_sizes, slice_sizes, streams):
    """Slice sizes for files of `file_sizes` cut at `slice_sizes`, on `streams` streams at
    once: the same, or each made smaller by one factor (whole MiB, at least 1/4 of it)
    when the streams would then end sooner by the model of `makespan`."""
    cut_files = [i for i, (n, s) in enumerate(zip(file_sizes, slice_sizes))
                 if n > s >= SHARE_AT_LEAST * EVEN_ALIGN]
    if streams <= 1 or not cut_files:
        return slice_sizes
    # what the streams take one by one: the cut files' slices and every file of a quarter
    # slice or more (smaller ones travel in bundles, or in a moment)
    big = [i for i, (n, s) in enumerate(zip(file_sizes, slice_sizes))
           if n >= s // SHARE_AT_LEAST]
    if len(big) > WAVES_AT_MOST * streams:
        return slice_sizes

    def units(sizes):
        out = []
        for i in big:
            n, s = file_sizes[i], sizes[i]
            out.extend([s] * (n // s) + ([n % s] if n % s else []))
        return out

    first = units(slice_sizes)
    if len(first) % streams == 0 or len(first) > WAVES_AT_MOST * streams:
        return slice_sizes
    # the factors at which a cut file gets one slice more, largest first; of many (many
    # streams), some across their range
    factors = sorted({file_sizes[i] / (k * slice_sizes[i]) for i in cut_files
                      for k in range(math.ceil(file_sizes[i] / slice_sizes[i]) + 1,
                                     SHARE_AT_LEAST * math.ceil(file_sizes[i] /
                                                                slice_sizes[i]) + 1)
                      if file_sizes[i] / (k * slice_sizes[i]) >= 1 / SHARE_AT_LEAST},
                     reverse=True)
    factors = factors[::math.ceil(len(factors) / FACTORS_AT_MOST)]
    best, best_time = slice_sizes, makespan(first, streams)
    for f in factors:
        sizes = list(slice_sizes)
        for i in cut_files:
            sizes[i] = max(EVEN_ALIGN, -(-int(slice_sizes[i] * f) // EVEN_ALIGN) * EVEN_ALIGN)
        t = makespan(units(sizes), streams)
        if t < best_time * 0.98:  # a clear gain, else the fewer slices
            best, best_time = sizes, t
    return best


def makespan(units, streams):
    """When `streams` streams taking `units` (bytes each) in order, next-available, end:
    in bytes moved by one stream, each unit costing SLICE_COST more."""
    ends = [0] * min(streams, len(units))
    for n in units:
        heapq.heapreplace(ends, ends[0] + n + SLICE_COST)
    return max(ends)


def pack(slices, stripe_width, max_task_bytes):
    """Assign slices to array tasks balanced by bytes (largest first onto the lightest task).
    Returns the number of tasks. Inside a task, slices keep file/offset order."""
    if not slices:
        return 0
    total = sum(s.length for s in slices)
    n = min(len(slices), max(stripe_width, math.ceil(total / max_task_bytes)))
    heap = [(0, 0, t) for t in range(n)]
    for s in sorted(slices, key=lambda s: -s.length):
        load, count, t = heapq.heappop(heap)
        s.task = t
        heapq.heappush(heap, (load + s.length, count + 1, t))
    return n


def plan(sources, dst, options, token):
    """The whole plan for copying `sources` to `dst` (see resolve_pairs)."""
    return plan_pairs(resolve_pairs(sources, dst), options, token)


def plan_pairs(pairs, options, token, tree=None, remote_dst=None):
    """The whole plan for explicit (src, dst) pairs, as a copyjob file gives them.
    `tree` reads the sources (LocalTree, or a remote host's listing). `remote_dst`, when
    the destination is on another host, answers "is this a directory there?"; that host
    was checked before planning and is not looked at here."""
    if options.slice_size <= 0 or options.stripe_width <= 0:
        raise PlanError("slice size and stripe width must be positive")
    tree = tree or LocalTree
    result = Plan(token=token)
    walker = _Walker(result, tree)
    for src, dst in pairs:
        src, dst = os.fsencode(src), os.fsencode(dst)
        if tree is LocalTree and not remote_dst:
            parent = _check_pair(src, dst)
        else:
            parent = _parent(dst) if remote_dst else _check_dst_parent(dst)
        try:
            st = tree.lstat(src)
        except OSError as e:
            raise PlanError(f"cannot read source {os.fsdecode(src)}: {e.strerror}") from e
        dst_isdir = remote_dst or os.path.isdir
        if stat.S_ISDIR(st.st_mode) and src.endswith(b"/") and dst_isdir(dst):
            # rsync's trailing slash: the contents go into an existing dst, which keeps
            # its own entry so its mode and mtime follow the source's.
            walker.add(DIR, src, dst, spool_dir(dst, token), st)
            walker.walk(src, dst, spool_dir(dst, token))
        else:
            walker.visit(src, dst.rstrip(b"/") or dst, spool_dir(parent, token), st)
    files = [e for e in result.entries if e.kind == FILE]
    sizes = [min(options.slice_size_for(e.size), options.max_task_bytes) for e in files]
    if options.even_waves:
        sizes = even_waves([e.size for e in files], sizes,
                           options.stripe_width * options.streams)
    for e, size in zip(files, sizes):
        result.slices.extend(cut(e, size))
    result.n_tasks = pack(result.slices, options.stripe_width, options.max_task_bytes)
    result.slices.sort(key=lambda s: (s.task, s.entry, s.index))
    return result


def _parent(dst):
    return os.path.dirname(dst.rstrip(b"/")) or b"."


def _check_dst_parent(dst):
    parent = os.path.dirname(os.path.abspath(dst.rstrip(b"/") or b"/"))
    if not os.path.isdir(parent):
        raise PlanError(f"destination directory does not exist: {os.fsdecode(parent)}")
    return parent
