"""Slurm through pyslurm, the Python bindings of the Slurm C API (`pip install
'hpcmove[pyslurm]'`), instead of its command-line tools.

The jobs are the same as the `slurm` backend's (this class is that backend with four
calls replaced), only the way they reach Slurm differs:

- submit: `pyslurm.JobSubmitDescription(...).submit()` with the fields that sbatch's
  options and the script's #SBATCH lines would set (`submit_fields`);
- poll and task states: one `pyslurm.Jobs.load()` for all ids, then one
  `pyslurm.db.Jobs.load(pyslurm.db.JobFilter(ids=...))` for the ids Slurm no longer
  holds in memory (squeue, then sacct, in the CLI backend);
- cancel, hold, release: `pyslurm.Job(id).cancel()`, `.hold(mode="user")`, `.release()`.

Reading the cluster's configuration (MaxArraySize, a partition's MaxTime), moving the
final job's dependency when a job is fed in chunks, and the feeder job itself still use
the command-line tools.

pyslurm is built against one Slurm release (its version's first two numbers, e.g.
25.11.x for Slurm 25.11) and speaks only that release's protocol. When `import pyslurm`
fails, or its release is not the one `sinfo --version` reports, this backend logs one
line saying why and behaves exactly as the `slurm` backend; `hpcmove plugins` then lists
it as unavailable with the same reason.
"""
import logging
import os
import re
from functools import cache

from ..errors import SchedulerError
from . import slurm, submission_env
from .slurm import SlurmBackend, _NOTHING_TO_HOLD, _expand, _state

log = logging.getLogger(__name__)

# #SBATCH lines are read up to the first line that is neither a comment nor blank.
_DIRECTIVE = re.compile(r"^#SBATCH\s+--([a-z-]+)(?:=(\S*))?\s*$")
# sbatch option -> JobSubmitDescription field, for the options hpcmove's scripts and
# the Slurm backend use. Any other #SBATCH line is left to pyslurm's own reader
# (JobSubmitDescription.load_sbatch_options).
_FIELDS = {"job-name": "name", "comment": "comment", "partition": "partitions",
           "account": "account", "qos": "qos", "time": "time_limit", "array": "array",
           "dependency": "dependencies", "output": "standard_output"}
_FLAGS = {"requeue": ("is_requeueable", True), "hold": ("priority", 0),  # priority 0: held
          "kill-on-invalid-dep": ("kill_on_invalid_dependency", None)}
# pyslurm's words for "nothing left to hold or release" (slurm_strerror texts)
_NOTHING_TO_DO = _NOTHING_TO_HOLD + ("already completing or completed",)


def release_of(version):
    """(major, minor) of '25.11.0', 'slurm 22.05.8' or '24.5.1' (pyslurm writes 24.05
    as 24.5); None when there is no such number."""
    m = re.search(r"(\d+)\.(\d+)", str(version or ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


@cache
def probe():
    """(the pyslurm module, '') when this backend can use it, else (None, why not)."""
    try:
        import pyslurm
    except (ImportError, OSError) as e:  # OSError: its libslurm cannot be loaded
        return None, (f"the Python package 'pyslurm' cannot be imported "
                      f"(pip install 'hpcmove[pyslurm]' on a Slurm of the same release): {e}")
    built = getattr(pyslurm, "__version__", "") or getattr(pyslurm, "version", str)()
    try:
        running = slurm.run("sinfo", "--version").strip()
    except SchedulerError as e:
        return None, f"cannot tell which Slurm runs here (sinfo --version): {e.stderr.strip()}"
    if release_of(built) is None or release_of(built) != release_of(running):
        return None, (f"pyslurm {built} is built for Slurm "
                      f"{'.'.join(map(str, release_of(built) or ('?',)))}, "
                      f"but the running Slurm is {running.removeprefix('slurm ')}")
    return pyslurm, ""


@cache
def usable():
    """The pyslurm module, or None after logging once in this process why not."""
    module, why = probe()
    if module is None:
        log.warning("hpcmove: the pyslurm backend uses the Slurm command-line tools: %s", why)
    return module


def _directives(path):
    """{option: value} of a script's #SBATCH lines (value '' for a bare flag)."""
    found = {}
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            if line.startswith("#!") or not line.strip():
                continue
            if not line.startswith("#"):
                break
            m = _DIRECTIVE.match(line.rstrip("\n"))
            if m:
                found[m.group(1)] = m.group(2) or ""
    return found


def submit_fields(args, environ=None, cwd=None):
    """JobSubmitDescription fields for an sbatch argument list as the slurm backend
    builds it (options, the script, the script's arguments). The script's #SBATCH lines
    count as sbatch reads them: an option on the command line wins."""
    args = [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args]
    n = next((i for i, a in enumerate(args) if not a.startswith("--")), None)
    if n is None:
        raise ValueError(f"no batch script in {args}")
    options = _directives(args[n])
    for arg in args[:n]:
        option, _, value = arg[2:].partition("=")
        options[option] = value
    environ = submission_env(environ)  # not the calling job's own SLURM_* (stage-out)
    fields = {"script": args[n], "working_directory": cwd or os.getcwd(),
              "environment": environ}
    if args[n + 1:]:
        fields["script_args"] = args[n + 1:]
    for option, value in options.items():
        if option in _FIELDS:
            fields[_FIELDS[option]] = value
        elif option in _FLAGS:
            field, fixed = _FLAGS[option]
            fields[field] = value != "no" if fixed is None else fixed
        elif option == "export":  # 'ALL,NAME=VALUE,...' (sbatch's default is ALL)
            first, *pairs = value.split(",")
            if first != "ALL":
                raise ValueError(f"--export={value}: only ALL[,NAME=VALUE...] is passed on")
            environ.update(pair.partition("=")[::2] for pair in pairs)
    return fields


def _rows(records, wanted):
    """[(job id, task or None, state, node)] of pyslurm job records (live or from the
    accounting database) that belong to a wanted job id. A pending array's remainder
    is one record that lists its tasks in array_tasks_waiting."""
    rows = []
    for job in records:
        key = str(job.array_id or job.id)
        if key not in wanted:
            continue
        state = _state(job.state or "")
        node = getattr(job, "batch_host", None) or getattr(job, "nodelist", None) or ""
        waiting = getattr(job, "array_tasks_waiting", None)
        if waiting:
            rows.extend((key, t, state, "") for t in _expand(waiting))
        else:
            task = job.array_task_id if job.array_id else None
            rows.append((key, task, state, node))
    return rows


def _error(action, e, job=""):
    return SchedulerError(["pyslurm", action, *([str(job)] if job else [])],
                          getattr(e, "errno", -1) or -1, "", f"{type(e).__name__}: {e}")


class PyslurmBackend(SlurmBackend):
    name = "pyslurm"

    def __init__(self, api=None):
        self.api = api or usable()  # None: every call goes the slurm backend's way

    @staticmethod
    def unavailable():
        """Why this backend cannot use pyslurm here ('' when it can)."""
        return probe()[1]

    def _sbatch(self, *args):
        if not self.api:
            return super()._sbatch(*args)
        desc = self.api.JobSubmitDescription(**submit_fields(args))
        try:
            desc.load_sbatch_options()  # any further #SBATCH line; the fields set stay
            return str(desc.submit())
        except (self.api.RPCError, ValueError, OSError) as e:
            raise _error("submit", e, desc.script) from e

    def _rows(self, ids):
        if not self.api:
            return super()._rows(ids)
        wanted = [str(i) for i in ids if i]
        if not wanted:
            return []
        try:
            rows = _rows(self.api.Jobs.load().values(), set(wanted))
        except self.api.RPCError as e:
            raise _error("Jobs.load", e) from e
        missing = set(wanted) - {r[0] for r in rows}
        if missing:
            db = self.api.db
            try:
                ended = db.Jobs.load(db.JobFilter(ids=sorted(int(i) for i in missing)))
            except self.api.RPCError:
                return rows  # no accounting at this site: what Slurm holds is all there is
            rows += _rows(ended.values(), missing)
        return rows

    def cancel(self, ids):
        if not self.api:
            return super().cancel(ids)
        for job_id in (str(i) for i in ids if i):
            try:
                self.api.Job(int(job_id)).cancel()
            except self.api.RPCError as e:
                raise _error("cancel", e, job_id) from e

    def _each(self, verb, ids):
        if not self.api:
            return super()._each(verb, ids)
        for job_id in filter(None, ids):
            job = self.api.Job(int(job_id))
            try:
                job.hold(mode="user") if verb == "hold" else job.release()
            except self.api.RPCError as e:
                if not any(s in str(e) for s in _NOTHING_TO_DO):
                    raise _error(verb, e, job_id) from e
