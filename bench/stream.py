#!/usr/bin/env python3
"""One pushed stream's CPU on this end: the ssh engine's loop (read a piece, hash it,
hand it to the session's pipe) with splice(2) and with the copy through the buffer,
into `cat > /dev/null` standing in for ssh. Rounds alternate; prints the medians.
The `offset16` row is the splice loop reading into memory 16 bytes past a page
boundary, where a process's first bytearray of this size begins (malloc's header), instead
of the engine's page-aligned buffer (see hpcmove_plugins.copy.read_buffer).

  python bench/stream.py [--size 2G] [--rounds 3] [--dir /var/tmp/hpcmove-bench]
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run  # noqa: E402  (bench/run.py, beside this file: make_file, parse_size)
from hpcmove_plugins.copy import BUFFER, read_buffer  # noqa: E402
from hpcmove_plugins.ssh import SshEngine, new_sum  # noqa: E402


def cpu():
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF,
                                                resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def one(path, way):
    """(wall s, this process's CPU s, the reader's CPU s) of sending `path` once."""
    engine = SshEngine(remote={"sum": "xxh128"})
    engine.splice = way != "copy"
    fd = os.open(path, os.O_RDONLY)
    size, (mine0, kids0), start = os.fstat(fd).st_size, cpu(), time.monotonic()
    reader = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    buf = memoryview(engine.buf)
    if way == "offset16":
        buf = memoryview(read_buffer(BUFFER + 4096))[16:16 + BUFFER]
    h, pos = new_sum("xxh128"), 0
    while pos < size:
        n = os.preadv(fd, [buf], pos)
        h.update(buf[:n])
        engine._send(fd, reader.stdin, buf[:n], pos)
        pos += n
    reader.stdin.close()
    reader.wait()
    os.close(fd)
    mine, kids = cpu()
    return time.monotonic() - start, mine - mine0, kids - kids0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2G")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=run.DEFAULT_DIR)
    args = ap.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    path = run.make_file(os.path.join(args.dir, f"random-{args.size}.bin"),
                         run.parse_size(args.size))
    runs = {"splice": [], "copy": [], "offset16": []}
    for _ in range(args.rounds + 1):  # the first round warms the page cache
        for name in runs:
            runs[name].append(one(path, name))
    print(f"one stream of {args.size} into cat, medians of {args.rounds} rounds")
    for name, results in runs.items():
        wall, mine, theirs = (statistics.median(r[k] for r in results[1:]) for k in range(3))
        print(f"{name:9} {wall:6.2f} s wall  {mine:5.2f} CPU s sending  "
              f"{theirs:5.2f} CPU s reading")
    return 0


if __name__ == "__main__":
    sys.exit(main())
