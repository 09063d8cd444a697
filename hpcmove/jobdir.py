"""A job's run directory: manifest (the work of each array task), scripts and logs.

Lives under the user's data directory (0700). Paths are stored with
surrogateescape so any byte sequence round-trips through JSON.
"""
import json
import os
from json.encoder import encode_basestring_ascii as _json_str  # json.dumps' own, for str

from .errors import UsageError
from .paths import jobs_dir


def create(token):
    base = jobs_dir()
    try:
        base.encode("utf-8")
    except UnicodeEncodeError:
        # the job dir is named on batch command lines; data paths may be any bytes
        raise UsageError(f"hpcmove's data directory must be a UTF-8 path: {base!r} "
                         "(set HPCMOVE_HOME)") from None
    path = os.path.join(os.fsencode(base), token.encode())
    os.makedirs(path, mode=0o700, exist_ok=False)
    os.makedirs(os.path.join(path, b"tasks"), mode=0o700)
    os.makedirs(os.path.join(path, b"logs"), mode=0o700)
    return path


# Paths go into the manifest as UTF-8 with surrogateescape, whatever the locale of the
# process that writes or reads it (a login node's and a DTN's may differ); any bytes
# round-trip. The codec's own calls: os.fsdecode/fsencode cost twice as much, and a
# manifest holds three paths for each of up to a million slices.
def _enc(p):
    return p if isinstance(p, str) else p.decode("utf-8", "surrogateescape")


def _dec(p):
    return p.encode("utf-8", "surrogateescape")


def manifest_item(slice_id, file_id, src, spool_path, offset, length, size, mtime_ns,
                  dst=b"", mode=None):
    """`mode`: the file's permission bits, for a task that writes a whole file at once
    to give its spool copy (placement then changes only what differs)."""
    item = {"slice": slice_id, "file": file_id, "src": _enc(src), "spool": _enc(spool_path),
            "offset": offset, "length": length, "size": size, "mtime_ns": mtime_ns,
            "dst": _enc(dst)}
    if mode is not None:
        item["mode"] = mode
    return item


def write_manifest(path, plan, file_ids, slice_ids):
    """The work of every array task: tasks/<index>.jsonl, one slice a line with all the
    worker needs; `file_ids` by entry, `slice_ids` in plan.slices' order (db.reserve_plan).
    Written as it is built (plan.slices are in task order), so a job of a million files
    never holds a million dicts at once."""
    clear_tasks(path)
    out, current = None, None
    try:
        for s, slice_id in zip(plan.slices, slice_ids):
            if s.task != current:
                if out:
                    out.close()
                current, out = s.task, open(_task_file(path, s.task), "w")
            e = plan.entries[s.entry]
            out.write(_line(slice_id, file_ids[s.entry], e.src, e.spool_path,
                            s.offset, s.length, e.size, e.mtime_ns, e.dst, e.mode))
    finally:
        if out:
            out.close()


def _line(slice_id, file_id, src, spool_path, offset, length, size, mtime_ns, dst, mode):
    """json.dumps(manifest_item(...)) + newline, formatted directly: 20,000 lines in
    0.04 s instead of 0.09, while every task waits for the manifest."""
    return ('{"slice": %d, "file": %d, "src": %s, "spool": %s, "offset": %d, "length": %d, '
            '"size": %d, "mtime_ns": %d, "dst": %s%s}\n' % (
                slice_id, file_id, _json_str(_enc(src)), _json_str(_enc(spool_path)), offset,
                length, size, mtime_ns, _json_str(_enc(dst)),
                "" if mode is None else ', "mode": %d' % mode))


def _task_file(path, task):
    return os.path.join(os.fsencode(path), b"tasks", b"%d.jsonl" % int(task))


def clear_tasks(path):
    tasks = os.path.join(os.fsencode(path), b"tasks")
    for name in os.listdir(tasks):
        os.unlink(os.path.join(tasks, name))


def write_tasks(path, by_task):
    """Replace the manifest with {task index: [items]} (a retry's smaller one)."""
    clear_tasks(path)
    add_tasks(path, by_task)


def add_tasks(path, by_task):
    """Add task files beside the existing ones (catch-up tasks after a pause)."""
    for task, items in by_task.items():
        with open(_task_file(path, task), "w") as f:
            f.writelines(json.dumps(item) + "\n" for item in items)


def read_task(path, task):
    with open(_task_file(path, task)) as f:
        items = [json.loads(line) for line in f]
    for item in items:
        item["src"], item["spool"] = _dec(item["src"]), _dec(item["spool"])
        item["dst"] = _dec(item.get("dst", ""))
    return items


def read_all(path):
    """Every task's items, task after task."""
    tasks = os.path.join(os.fsencode(path), b"tasks")
    for name in sorted(os.listdir(tasks)):
        if name.endswith(b".jsonl"):
            yield from read_task(path, int(name[:-len(b".jsonl")]))


def write_scripts(path, scripts):
    written = {}
    for name, text in scripts.items():
        target = os.path.join(path, name.encode())
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
        written[name] = target
    return written


PAUSE_FLAG = b"paused"


def paused(path):
    """True while the job is paused (`hpcmove pause`): tasks stop between slices."""
    return os.path.exists(os.path.join(os.fsencode(path), PAUSE_FLAG))


def set_paused(path, on):
    flag = os.path.join(os.fsencode(path), PAUSE_FLAG)
    if on:
        open(flag, "w").close()
    elif os.path.exists(flag):
        os.unlink(flag)


def log_path(path, name):
    return os.path.join(path, b"logs", name.encode())
