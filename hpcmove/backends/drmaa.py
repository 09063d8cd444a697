"""Grid Engine through DRMAA 1.0 (the `drmaa` package, `pip install 'hpcmove[drmaa]'`).

One hpcmove job is three batch jobs:

- the transfer array: one bulk job (`runBulkJobs`, GE tasks 1..N) throttled to the
  stripe width with `-tc`; each task runs the rendered transfer script through a small
  bash wrapper that sets the 0-based SLURM_ARRAY_TASK_ID the script expects and writes
  the Slurm-named log (transfer-<job>_<index>.out). Its id reads `N.1-M:1` (GE's own
  notation for an array), so that every other call knows it is one;
- finalize, with `-hold_jid <array>`: Grid Engine releases it when the array has left,
  whatever the tasks' outcome (Slurm's afterany), so it always runs to record reasons;
- the *gate*: `/bin/true`, submitted with a user hold and `-hold_jid <finalize>`. Its id
  is the final id (`--parsable`), the one compute jobs chain on with `-hold_jid`. The
  finalize wrapper releases the gate's user hold only when finalize exited 0.

Why the gate: a GE job held with -hold_jid starts when its predecessor has left the
system, however it ended. GE's exception (exit status 100 puts a job into error state,
and its dependants stay held) does not apply here: libdrmaa marks every job it submits
JOB_TYPE_NO_ERROR, so a DRMAA job exiting 100 simply ends, and its dependants start. A
job that is never released never leaves, so what holds on it never starts: on a failed
or cancelled transfer the gate stays in `hqw` for good (state HELD here, not active).
Delete such a gate only after the jobs that wait on it (deleting releases them).

States are Slurm's names (see ACTIVE): the DRMAA state while GE knows the job; once it
has left, the accounting file (`$SGE_ROOT/$SGE_CELL/common/accounting`, read backwards,
one pass for all ids) says COMPLETED or FAILED; a job in neither is UNKNOWN.

`drmaa` is imported only when the backend is loaded or used: importing this module
never needs it, while loading the entry point (`DrmaaBackend`) does, so `hpcmove
plugins` reports the backend unavailable with the reason when the package, the library
(DRMAA_LIBRARY_PATH) or GLIBC_TUNABLES (libjemalloc's static TLS) is missing.

HPCMOVE_DRMAA_NATIVE adds native specification options (e.g. `-P project -l mem=2G`)
to all three jobs. Partition, account and time from the rendered scripts' #SBATCH lines
become `-q`, `-A` and `-l h_rt`.
"""
import contextlib
import json
import os
import re
import shlex
import sys

from ..errors import SchedulerError, UsageError
from . import Backend, Submitted, overall

TUNABLES_HINT = ("set GLIBC_TUNABLES=glibc.rtld.optional_static_tls=4096 before Python "
                 "starts (libdrmaa's libjemalloc needs static TLS)")

# GE array tasks are 1..N; the rendered script wants SLURM_ARRAY_TASK_ID 0..N-1. Paths
# arrive as arguments ($1 script, $2 log pattern), never inside this text, which must be
# one line: Grid Engine keeps a job's arguments one per line and cuts them at newlines.
# The arguments after those are NAME=VALUE pairs to export: GE 8.1.9 cuts an environment
# value at its first '=' (GLIBC_TUNABLES=glibc.rtld.optional_static_tls=4096 arrives as
# ...optional_static_tls), so such variables travel as arguments. `export "$a"` assigns;
# it evaluates nothing. Exit 99 would make GE requeue the task: never pass it on.
TRANSFER_WRAPPER = (
    'script=$1; log=$2; shift 2; for a in "$@"; do export "$a"; done; '
    'i=$((SGE_TASK_ID - 1)); '
    'log=${log//"%A"/$JOB_ID}; log=${log//"%a"/$i}; log=${log//"%j"/$JOB_ID.$SGE_TASK_ID}; '
    'exec >>"$log" 2>&1; '
    'SLURM_ARRAY_TASK_ID=$i /bin/bash "$script"; rc=$?; '
    '[ "$rc" -ne 99 ] || rc=1; exit "$rc"')

# $1 finalize script, $2 python, $3 the job's registry file, then NAME=VALUE pairs: the
# gate is released only when finalize succeeded; if releasing fails, this job fails and
# the gate stays held.
FINALIZE_WRAPPER = (
    'script=$1; py=$2; registry=$3; shift 3; for a in "$@"; do export "$a"; done; '
    '/bin/bash "$script"; rc=$?; '
    'if [ "$rc" -eq 0 ]; then "$py" -m hpcmove.backends.drmaa release "$registry" || rc=1; fi; '
    '[ "$rc" -ne 99 ] || rc=1; exit "$rc"')

# --then: $1 the user's script, then NAME=VALUE pairs as above.
THEN_WRAPPER = 'script=$1; shift; for a in "$@"; do export "$a"; done; exec /bin/bash "$script"'

# Variables Grid Engine sets in every job: never carried over from the submitter.
_GE_OWN = frozenset({"JOB_ID", "JOB_NAME", "JOB_SCRIPT", "NSLOTS", "NHOSTS", "NQUEUES", "QUEUE",
                     "PE", "PE_HOSTFILE", "RESTARTED", "ENVIRONMENT", "TMPDIR", "TMP",
                     "REQNAME", "REQUEST", "ARC", "HOSTNAME", "PWD", "OLDPWD", "SHLVL", "_"})
_GE_KEEP = frozenset({"SGE_ROOT", "SGE_CELL", "SGE_QMASTER_PORT", "SGE_EXECD_PORT"})
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ARRAY = re.compile(r"^(\d+)\.(\d+)-(\d+)(?::(\d+))?$")
_SBATCH = re.compile(r"^#SBATCH\s+--([a-z-]+)=(\S+)\s*$", re.M)

# DRMAA job state -> Slurm-style name; None: the job has ended, ask the accounting.
_STATES = {"undetermined": None, "queued_active": "PENDING", "system_on_hold": "PENDING",
           "user_system_on_hold": "PENDING", "user_on_hold": "HELD", "running": "RUNNING",
           "system_suspended": "SUSPENDED", "user_suspended": "SUSPENDED",
           "user_system_suspended": "SUSPENDED", "done": None, "failed": None}
# ... and what the session's own word is worth when accounting has no record yet.
_ENDED = {"done": "COMPLETED", "failed": "FAILED"}

ACCOUNTING_FIELDS = 45  # SGE 8.x accounting(5): qname:hostname:group:owner:job_name:...
ACCOUNTING_SCAN = int(os.environ.get("HPCMOVE_DRMAA_ACCOUNTING_SCAN") or 256 << 20)


def import_drmaa():
    """The drmaa module, or ImportError saying what is missing."""
    try:
        import drmaa
    except ImportError as e:
        raise ImportError(f"the Python package 'drmaa' is not installed "
                          f"(pip install 'hpcmove[drmaa]'): {e}") from e
    except OSError as e:
        hint = TUNABLES_HINT if "static TLS" in str(e) else \
            "check DRMAA_LIBRARY_PATH (e.g. /usr/lib/gridengine-drmaa/lib/libdrmaa.so.1.0)"
        raise ImportError(f"the DRMAA library cannot be loaded: {e}; {hint}") from e
    except RuntimeError as e:  # drmaa raises this when it finds no library at all
        raise ImportError(f"{e} (e.g. /usr/lib/gridengine-drmaa/lib/libdrmaa.so.1.0)") from e
    return drmaa


def _error(action, e, detail=""):
    return SchedulerError(["drmaa", action, *([detail] if detail else [])], -1, "",
                          f"{type(e).__name__}: {e}")


_active = []  # the one DRMAA session this process may have, while in use


@contextlib.contextmanager
def session():
    """A DRMAA session for the duration of a call (one per process; reentrant)."""
    if _active:
        yield _active[-1]
        return
    drmaa = import_drmaa()
    s = drmaa.Session()
    try:
        s.initialize()
    except drmaa.errors.DrmaaException as e:
        raise _error("init", e) from e
    _active.append(s)
    try:
        yield s
    finally:
        _active.pop()
        try:
            s.exit()
        except drmaa.errors.DrmaaException:
            pass


# ---------------------------------------------------------------------------
# Pure helpers (tested without Grid Engine)
# ---------------------------------------------------------------------------

def parse_id(text):
    """'123' -> ('123', None); '123.1-8:1' (an array, maybe '@offset' after it) ->
    ('123', range(1, 9)); anything else -> None."""
    text = str(text).strip().split("@", 1)[0]
    if text.isdigit():
        return text, None
    m = _ARRAY.match(text)
    if m:
        return m.group(1), range(int(m.group(2)), int(m.group(3)) + 1, int(m.group(4) or 1))
    return None


def hold_list(dependency):
    """sbatch's --dependency ('afterok:1:2,afterany:3') -> GE job ids for -hold_jid.
    Grid Engine only knows 'after the predecessor has left'; afterok holds as such only
    for hpcmove final ids (the gates), which never leave when their transfer failed."""
    ids = []
    text = (dependency or "").strip()
    if not text:
        return ids
    if "?" in text:
        raise UsageError("the drmaa backend cannot express '?' (any-of) dependencies")
    for part in text.split(","):
        kind, _, rest = part.partition(":")
        if kind not in ("afterok", "afterany") or not rest:
            raise UsageError(f"the drmaa backend supports only afterok:ID and afterany:ID "
                             f"dependencies (Grid Engine -hold_jid), not {part!r}")
        for job in rest.split(":"):
            ref = parse_id(job)
            if ref is None:
                raise UsageError(f"not a Grid Engine job id in --dependency: {job!r}")
            ids.append(ref[0])
    return list(dict.fromkeys(ids))


def job_environment(environ=None):
    """The submitter's environment for the jobs (sbatch's default --export=ALL), less
    what Grid Engine sets itself, as ({name: value} for GE, ['NAME=VALUE'] for the
    wrapper's arguments: the values GE would cut at their first '=')."""
    env, exported = {}, []
    for k, v in (os.environ if environ is None else environ).items():
        if not _NAME.match(k) or "\n" in v or k in _GE_OWN or k.startswith("SLURM_"):
            continue
        if k.startswith("SGE_") and k not in _GE_KEEP:
            continue
        if "=" in v:
            exported.append(f"{k}={v}")
        else:
            env[k] = v
    return env, exported


def script_options(text):
    """#SBATCH --job-name/--partition/--account/--time of a rendered script."""
    return dict(_SBATCH.findall(text))


def ge_job_name(name):
    name = re.sub(r"[^A-Za-z0-9_.+-]", "_", name or "hpcmove")
    return name if not name[0].isdigit() else "j" + name


def native_options(sbatch):
    """Native specification words for a script's #SBATCH options."""
    from ..units import parse_duration
    words = []
    if sbatch.get("partition"):
        words += ["-q", sbatch["partition"]]
    if sbatch.get("account"):
        words += ["-A", sbatch["account"]]
    if sbatch.get("time"):
        seconds = parse_duration(sbatch["time"])
        if seconds:
            words += ["-l", f"h_rt={seconds}"]
    extra = os.environ.get("HPCMOVE_DRMAA_NATIVE", "").strip()
    return words + (shlex.split(extra) if extra else [])


def log_pattern_for_ge(pattern):
    """A Slurm log pattern for one job as Grid Engine's -o path ($JOB_ID is GE's)."""
    return pattern.replace("%j", "$JOB_ID").replace("%A", "$JOB_ID")


def parse_accounting_line(line):
    """(job number, task, hostname, failed, exit status) of one accounting(5) record;
    None for comments and lines that are not records. A job name with ':' in it
    shifts the later fields; the first five and the last ones stay put."""
    if not line or line.startswith("#"):
        return None
    f = line.rstrip("\n").split(":")
    shift = len(f) - ACCOUNTING_FIELDS
    if shift < 0:
        return None
    try:
        return (f[5 + shift], int(f[35 + shift]), f[1], int(f[11 + shift]),
                int(f[12 + shift]))
    except (ValueError, IndexError):
        return None


def _reverse_lines(path, limit):
    """Lines of a file from the end backwards, reading at most `limit` bytes."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        pos, tail, read = f.tell(), b"", 0
        while pos > 0 and read < limit:
            size = min(1 << 20, pos)
            pos -= size
            f.seek(pos)
            chunk = f.read(size) + tail
            read += size
            lines = chunk.split(b"\n")
            tail = lines.pop(0)
            for line in reversed(lines):
                if line:
                    yield line.decode("utf-8", "replace")
        if pos == 0 and tail:
            yield tail.decode("utf-8", "replace")


def accounting_path():
    root = os.environ.get("SGE_ROOT", "")
    return os.path.join(root, os.environ.get("SGE_CELL") or "default", "common", "accounting") \
        if root else ""


def read_accounting(wanted, path=None, limit=ACCOUNTING_SCAN):
    """{(job, task): (hostname, failed, exit status)}, the newest record of each wanted
    pair. `wanted` is a set of (job, task) (task 0: not an array) or of job numbers (all
    their tasks). Stops when every wanted pair is found; tolerates a missing file."""
    path = accounting_path() if path is None else path
    pairs = {w for w in wanted if isinstance(w, tuple)}
    whole = {w for w in wanted if not isinstance(w, tuple)}
    found = {}
    if not path or not (pairs or whole):
        return found
    try:
        for line in _reverse_lines(path, limit):
            rec = parse_accounting_line(line)
            if rec is None:
                continue
            key = (rec[0], rec[1])
            if key in found or not (key in pairs or rec[0] in whole):
                continue
            found[key] = rec[2:]
            if not whole and len(found) == len(pairs):
                break
    except OSError:
        pass
    return found


def accounted_state(record):
    """Slurm-style state from an accounting record (hostname, failed, exit status)."""
    _host, failed, status = record
    return "COMPLETED" if failed == 0 and status == 0 else "FAILED"


def describe(record):
    """A task's end for finalize's reasons: 'COMPLETED', 'FAILED (exit 1)'..."""
    _host, failed, status = record
    if failed == 0 and status == 0:
        return "COMPLETED"
    if status > 128:
        what = f"killed by signal {status - 128}"
    else:
        what = f"exit {status}"
    if failed:
        what += f", Grid Engine failure code {failed}"
    return f"FAILED ({what})"



def registry_dir():
    from ..paths import data_dir
    return os.path.join(data_dir(), "drmaa")


def registry_path(gate):
    return os.path.join(registry_dir(), f"{gate}.json")


def read_registry(gate):
    try:
        with open(registry_path(gate)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------

class _DrmaaBackend(Backend):
    name = "drmaa"

    def submit(self, spec):
        drmaa = import_drmaa()
        hold = hold_list(spec.dependency)
        env, exported = job_environment()
        jobdir = os.fsdecode(spec.jobdir)
        texts = {}
        for key, path in spec.scripts.items():
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                texts[key] = f.read()
        os.makedirs(registry_dir(), mode=0o700, exist_ok=True)
        # The jobs run where hpcmove was called, as sbatch's do: the plan keeps relative
        # source and destination paths relative.
        workdir = os.getcwd()
        submitted = []  # ids to delete if a later step fails
        with session() as s:
            try:
                array_id = base = None
                if "transfer.sh" in spec.scripts:
                    opts = script_options(texts["transfer.sh"])
                    native = ["-tc", str(max(1, spec.stripe_width))] + native_options(opts)
                    if hold:
                        native += ["-hold_jid", ",".join(hold)]
                    jt = self._template(
                        s, ge_job_name(opts.get("job-name")), workdir, env,
                        ["-c", TRANSFER_WRAPPER, "hpcmove-task",
                         os.fsdecode(spec.scripts["transfer.sh"]),
                         os.fsdecode(spec.logs["transfer"]), *exported],
                        os.path.join(os.path.dirname(os.fsdecode(spec.logs["transfer"])),
                                     "transfer-$JOB_ID.grid-engine.out"), native)
                    ids = s.runBulkJobs(jt, 1, spec.n_tasks, 1)
                    s.deleteJobTemplate(jt)
                    base = ids[0].split(".")[0]
                    array_id = f"{base}.1-{spec.n_tasks}:1"
                    submitted.append(base)
                opts = script_options(texts["finalize.sh"])
                fin_name = ge_job_name(opts.get("job-name"))
                native = native_options(opts)
                after = [base] if base else hold
                if after:
                    native += ["-hold_jid", ",".join(after)]
                # held until the gate exists and the job's registry file names it
                registry = os.path.join(jobdir, "drmaa.json")
                jt = self._template(
                    s, fin_name, workdir, env,
                    ["-c", FINALIZE_WRAPPER, "hpcmove-finalize",
                     os.fsdecode(spec.scripts["finalize.sh"]), sys.executable, registry,
                     *exported],
                    log_pattern_for_ge(os.fsdecode(spec.logs["finalize"])), native,
                    held=True)
                final = s.runJob(jt)
                s.deleteJobTemplate(jt)
                submitted.append(final)
                jt = self._template(s, fin_name + "-ok", "/", env, [], "/dev/null",
                                    native_options({}) + ["-hold_jid", final], held=True,
                                    command="/bin/true")
                gate = s.runJob(jt)
                s.deleteJobTemplate(jt)
                submitted.append(gate)
                record = {"array": array_id, "finalize": final, "gate": gate,
                          "jobdir": jobdir}
                self._write_registry(registry, record)
                self._write_registry(registry_path(gate), record)
                s.control(final, drmaa.JobControlAction.RELEASE)
            except BaseException as e:
                for job in reversed(submitted):
                    with contextlib.suppress(drmaa.errors.DrmaaException):
                        s.control(job, drmaa.JobControlAction.TERMINATE)
                if isinstance(e, (drmaa.errors.DrmaaException, OSError)):
                    raise _error("submit", e, jobdir) from e
                raise
        return Submitted(array_id, gate)

    def submit_after(self, script, final_id):
        """`--then`: run SCRIPT with bash once the gate `final_id` is released, which
        happens only when the transfer succeeded (-hold_jid on the gate). It runs in
        the current directory, its output in SCRIPT-NAME.o<job id> there, as qsub's
        default; its #$ lines are not read (HPCMOVE_DRMAA_NATIVE adds options)."""
        env, exported = job_environment()
        workdir = os.getcwd()
        name = ge_job_name(os.path.basename(script))
        with session() as s:
            try:
                jt = self._template(s, name, workdir, env,
                                    ["-c", THEN_WRAPPER, "hpcmove-then", script, *exported],
                                    os.path.join(workdir, f"{name}.o$JOB_ID"),
                                    native_options({}) + ["-hold_jid", str(final_id)])
                job = s.runJob(jt)
                s.deleteJobTemplate(jt)
            except import_drmaa().errors.DrmaaException as e:
                raise _error("submit", e, script) from e
        return job

    @staticmethod
    def _template(s, name, workdir, env, args, output, native, held=False,
                  command="/bin/bash"):
        drmaa = import_drmaa()
        for value in (workdir, output, *args):
            if "\n" in value:  # GE would cut the argument there
                raise UsageError(f"Grid Engine cannot pass a path with a newline: {value!r}")
        jt = s.createJobTemplate()
        jt.remoteCommand = command
        jt.args = args
        jt.jobName = name
        jt.workingDirectory = workdir
        jt.outputPath = ":" + output
        jt.joinFiles = True
        jt.jobEnvironment = env
        jt.nativeSpecification = shlex.join(native)
        if held:
            jt.jobSubmissionState = drmaa.JobSubmissionState.HOLD_STATE
        return jt

    @staticmethod
    def _write_registry(path, record):
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)

    # -- states -------------------------------------------------------------

    def _drmaa_states(self, s, refs):
        """{drmaa id: (mapped state or None, raw state or None)} for every job and
        array task named by `refs`."""
        drmaa = import_drmaa()
        out = {}
        for base, tasks in refs:
            for jid in ([base] if tasks is None else [f"{base}.{t}" for t in tasks]):
                try:
                    raw = s.jobStatus(jid)
                except drmaa.errors.InvalidJobException:
                    raw = None
                except drmaa.errors.DrmaaException as e:
                    raise _error("jobStatus", e, jid) from e
                out[jid] = (_STATES.get(raw), raw)
        return out

    def poll(self, ids):
        ids = [str(i) for i in ids if i]
        if not ids:
            return {}
        refs = {i: parse_id(i) for i in ids}
        with session() as s:
            known = self._drmaa_states(s, [r for r in refs.values() if r])
        ended = set()
        for jid, (state, _raw) in known.items():
            if state is None:
                base, _, task = jid.partition(".")
                ended.add((base, int(task or 0)))
        records = read_accounting(ended)
        out = {}
        for i, ref in refs.items():
            if ref is None:
                out[i] = "UNKNOWN"
                continue
            base, tasks = ref
            states = []
            for t in ([0] if tasks is None else tasks):
                jid = base if tasks is None else f"{base}.{t}"
                state, raw = known[jid]
                if state is None:
                    rec = records.get((base, t))
                    state = accounted_state(rec) if rec else _ENDED.get(raw, "UNKNOWN")
                states.append(state)
            out[i] = overall(states)
        return out

    def cancel(self, ids):
        """Delete transfer arrays and finalize jobs; never a gate: deleting it would
        release what holds on it. The gate stays held for good (HELD)."""
        drmaa = import_drmaa()
        targets, holds = [], []
        for i in (str(i) for i in ids if i):
            ref = parse_id(i)
            if ref is None:
                continue
            if ref[1] is not None:
                targets.append(ref[0])
                continue
            record = read_registry(ref[0])
            arr = parse_id(record.get("array") or "") if record else None
            targets += ([arr[0]] if arr else []) + ([record["finalize"]] if record else [])
            # the gate itself (or a final id whose registry is lost): keep it held;
            # finalize, if it still runs, sees the job cancelled and does not release it
            holds.append(ref[0])
        with session() as s:
            for action, jobs in ((drmaa.JobControlAction.TERMINATE, targets),
                                 (drmaa.JobControlAction.HOLD, holds)):
                for job in dict.fromkeys(jobs):
                    try:
                        s.control(job, action)
                    except drmaa.errors.InvalidJobException:
                        pass  # already gone
                    except drmaa.errors.DrmaaException as e:
                        raise _error(f"control {action}", e, job) from e

    def task_states(self, array_id):
        """{0-based task index: (state, host)} from the accounting of finished tasks."""
        out = {}
        for item in str(array_id or "").split(","):
            ref = parse_id(item)
            _, _, offset = item.partition("@")
            if ref is None or ref[1] is None:
                continue
            base, tasks = ref
            first = tasks.start
            records = read_accounting({(base, t) for t in tasks})
            for t in tasks:
                if (base, t) in records:
                    rec = records[(base, t)]
                    out[t - first + int(offset or 0)] = (describe(rec), rec[0])
        return out

    def release(self, gate):
        drmaa = import_drmaa()
        with session() as s:
            try:
                s.control(gate, drmaa.JobControlAction.RELEASE)
            except drmaa.errors.DrmaaException as e:
                raise _error("control RELEASE", e, gate) from e


def __getattr__(name):
    """The entry point's target: loading it checks that drmaa can be imported."""
    if name == "DrmaaBackend":
        import_drmaa()
        return _DrmaaBackend
    raise AttributeError(name)


def main(argv=None):
    """python -m hpcmove.backends.drmaa release REGISTRY (from the finalize wrapper)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "release":
        print("usage: python -m hpcmove.backends.drmaa release REGISTRY", file=sys.stderr)
        return 2
    try:
        with open(argv[1]) as f:
            gate = json.load(f)["gate"]
        _DrmaaBackend().release(gate)
    except (OSError, ValueError, KeyError, ImportError, SchedulerError) as e:
        print(f"hpcmove: cannot release the final job: {e}", file=sys.stderr)
        return 1
    print(f"hpcmove: released final job {gate}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
