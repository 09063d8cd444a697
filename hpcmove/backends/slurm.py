"""Slurm through its command-line tools (sbatch, squeue, sacct, scancel), via `sh`.

Argument lists only; one squeue and at most one sacct call per poll, whatever the
number of jobs; a failed command raises SchedulerError with its full output.
"""
import os
import re

from ..errors import SchedulerError
from ..units import parse_duration
from . import Backend, Submitted, overall, parse_batch_ids, submission_env

_ARRAY_RANGE = re.compile(r"^(\d+)_\[([^\]]+)\]$")
# what scontrol hold/release say when no part of the job is pending any more
_NOTHING_TO_HOLD = ("already finished", "not pending", "no longer pending",
                    "Job is no longer pending execution")


def run(command, *args):
    """Run a Slurm command; stdout as text, or SchedulerError explaining the failure."""
    import sh  # here, not at the top: it brings asyncio, 0.01-0.02 s of every command
    argv = [command, *[os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args]]
    try:
        return str(sh.Command(command)(*argv[1:], _env=submission_env(), _tty_out=False))
    except sh.CommandNotFound as e:
        raise SchedulerError(argv, 127, "", f"{command}: command not found") from e
    except sh.ErrorReturnCode as e:
        raise SchedulerError(argv, e.exit_code, e.stdout.decode(errors="replace"),
                             e.stderr.decode(errors="replace")) from e
    except (sh.ForkException, UnicodeError) as e:
        raise SchedulerError(argv, -1, "", f"cannot start {command}: {e}") from e


def available():
    try:
        run("sinfo", "--version")
        run("squeue", "--noheader", "--me", "--format=%i")
        return True
    except SchedulerError:
        return False


def _state(text):
    # sacct prints "CANCELLED by 1001"; squeue prints plain names.
    return text.split()[0].rstrip("+") if text.strip() else "UNKNOWN"


def _expand(spec):
    """'0-3,7' (array task list, maybe with %N) -> [0, 1, 2, 3, 7]."""
    out = []
    for part in spec.split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def _parse_rows(text):
    """'JobID|State|NodeList' rows -> [(job id, task or None, state, nodes)]."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        jobid, state, nodes = (line.split("|") + ["", ""])[:3]
        if "." in jobid:
            continue  # a job step (123.batch, 123_4.extern), not an allocation
        m = _ARRAY_RANGE.match(jobid)
        if m:
            rows.extend((m.group(1), t, _state(state), nodes) for t in _expand(m.group(2)))
        elif "_" in jobid:
            base, task = jobid.split("_", 1)
            rows.append((base, int(task), _state(state), nodes))
        else:
            rows.append((jobid, None, _state(state), nodes))
    return rows


def _parse_squeue(text):
    """'ArrayJobID|ArrayTaskID|State|NodeList' rows (task 'N/A' outside arrays)."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        jobid, tasks, state, nodes = (line.split("|") + ["", "", ""])[:4]
        if tasks in ("N/A", ""):
            rows.append((jobid, None, _state(state), nodes))
        else:
            rows.extend((jobid, t, _state(state), nodes) for t in _expand(tasks))
    return rows


_overall = overall  # the shared rule, under the name the parsing tests know


class SlurmBackend(Backend):
    name = "slurm"
    pause_by_flag = True

    def submit(self, spec):
        if "transfer.sh" not in spec.scripts:  # only directories and links: finalize alone
            args = ["--parsable", "--export=ALL",
                    f"--output={os.fsdecode(spec.logs['finalize'])}"]
            if spec.dependency:
                args += [f"--dependency={spec.dependency}", "--kill-on-invalid-dep=yes"]
            return Submitted(None, self._sbatch(*args, spec.scripts["finalize.sh"]))
        chunk = self.max_array_size()
        if spec.n_tasks <= chunk:
            array_id = self.submit_chunk(spec.scripts["transfer.sh"], spec.logs["transfer"],
                                         0, spec.n_tasks, spec.stripe_width, spec.dependency)
            # afterany: finalize runs also when tasks failed, to record why and clean up;
            # it then exits non-zero so afterok chains on it never start.
            try:
                final_id = self._sbatch("--parsable", "--export=ALL",
                                        f"--dependency=afterany:{array_id}",
                                        f"--output={os.fsdecode(spec.logs['finalize'])}",
                                        spec.scripts["finalize.sh"])
            except SchedulerError:
                self.cancel([array_id])
                raise
            return Submitted(array_id, final_id)
        return self._submit_fed(spec, chunk)

    def _submit_fed(self, spec, chunk):
        """More tasks than one array may hold: submit the final job held, the first chunk
        and a feeder that submits the next chunk when this one ends (and so on), then
        point the final job at them. The final id the user chains on never changes."""
        final_id = self._sbatch("--parsable", "--hold", "--export=ALL",
                                f"--output={os.fsdecode(spec.logs['finalize'])}",
                                spec.scripts["finalize.sh"])
        submitted = [final_id]
        try:
            array_id = self.submit_chunk(spec.scripts["transfer.sh"], spec.logs["transfer"], 0,
                                         chunk, spec.stripe_width, spec.dependency)
            submitted.append(array_id)
            feeder = self.submit_feeder(spec.scripts["feed.sh"], spec.logs["feed"], array_id,
                                        1, chunk, final_id)
            submitted.append(feeder)
            self.point_final(final_id, array_id, feeder)
            run("scontrol", "release", final_id)
        except SchedulerError:
            self.cancel(submitted)
            raise
        return Submitted(f"{array_id}@0,feed:{feeder}", final_id)

    def submit_chunk(self, script, log, offset, count, width, dependency=""):
        """One array of `count` tasks whose work starts at task index `offset`."""
        args = ["--parsable", f"--array=0-{count - 1}%{width}",
                f"--export=ALL,HPCMOVE_TASK_OFFSET={offset}", f"--output={os.fsdecode(log)}"]
        if dependency:
            args += [f"--dependency={dependency}", "--kill-on-invalid-dep=yes"]
        return self._sbatch(*args, script)

    def submit_feeder(self, script, log, after, chunk_index, chunk, final_id):
        return self._sbatch("--parsable", "--export=ALL", f"--dependency=afterany:{after}",
                            f"--output={os.fsdecode(log)}", script,
                            str(chunk_index), str(chunk), final_id)

    def submit_after(self, script, final_id):
        """`--then`: sbatch SCRIPT after the final job, afterok. Its own #SBATCH lines
        decide the rest (partition, --export, output); if the transfer fails, Slurm
        removes it (--kill-on-invalid-dep) rather than leave it pending for good."""
        return self._sbatch("--parsable", f"--dependency=afterok:{final_id}",
                            "--kill-on-invalid-dep=yes", script)

    @staticmethod
    def point_final(final_id, *after):
        run("scontrol", "update", f"JobId={final_id}",
            f"Dependency=afterany:{':'.join(after)}")

    @staticmethod
    def max_array_size():
        """How many tasks one array may have (MaxArraySize: indices 0..N-1)."""
        for line in run("scontrol", "show", "config").splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "MaxArraySize":
                return int(value.strip())
        return 1001

    @staticmethod
    def _sbatch(*args):
        return run("sbatch", *args).strip().split(";")[0]

    def _rows(self, ids):
        """Rows for `ids`: live ones from squeue, the rest from accounting."""
        ids = [str(i) for i in ids if i]
        if not ids:
            return []
        try:
            rows = _parse_squeue(run("squeue", "--noheader", "--array", "--states=all",
                                     f"--jobs={','.join(ids)}", "--format=%F|%K|%T|%N"))
        except SchedulerError:
            rows = []  # squeue refuses a list in which every id has left its memory
        seen = {r[0] for r in rows}
        missing = [i for i in ids if i not in seen]
        if missing:
            try:
                rows += _parse_rows(run("sacct", "--noheader", "--parsable2", "--allocations",
                                        f"--jobs={','.join(missing)}",
                                        "--format=JobID,State,NodeList"))
            except SchedulerError:
                pass  # no accounting at this site: what squeue knows is all there is
        return rows

    def poll(self, ids):
        by_job = {}
        for job, _task, state, _nodes in self._rows(ids):
            by_job.setdefault(job, []).append(state)
        return {str(i): _overall(by_job.get(str(i), [])) for i in ids if i}

    def cancel(self, ids):
        ids = [str(i) for i in ids if i]
        if ids:
            run("scancel", *ids)

    def hold(self, ids):
        """Pending array tasks and the final job stay queued, held; a running task
        cannot be held (suspending needs an operator), it stops at its next slice."""
        self._each("hold", ids)

    def release(self, ids):
        self._each("release", ids)

    @staticmethod
    def _each(verb, ids):
        """scontrol VERB per id. An array whose tasks all ran or finished has nothing to
        hold or release, which Slurm reports as an error: that one is expected."""
        for job_id in filter(None, ids):
            try:
                run("scontrol", verb, job_id)
            except SchedulerError as e:
                if not any(s in e.stderr for s in _NOTHING_TO_HOLD):
                    raise

    def resume_extra(self, spec, offset, count):
        """A catch-up array for slices handed back by paused tasks (task offset given)."""
        return self.submit_chunk(spec.scripts["transfer.sh"], spec.logs["transfer"], offset,
                                 count, spec.stripe_width)

    @staticmethod
    def _partition(partition):
        """scontrol's fields of the partition (the default partition when '')."""
        out = run("scontrol", "show", "partition", "--oneliner", *([partition] if partition else []))
        for line in out.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if partition or fields.get("Default") == "YES":
                return fields
        return {}

    def max_time(self, partition):
        """MaxTime of the partition from scontrol."""
        fields = self._partition(partition)
        return parse_duration(fields.get("MaxTime", "UNLIMITED")) if fields else None

    def total_cpus(self, partition):
        """TotalCPUs of the partition: how many one-CPU tasks it can run at once."""
        value = self._partition(partition).get("TotalCPUs", "")
        return int(value) if value.isdigit() else None

    def task_states(self, array_id):
        arrays, _feeders = parse_batch_ids(array_id)
        offsets = dict(arrays)
        return {t + offsets[j]: (s, n) for j, t, s, n in self._rows(list(offsets))
                if t is not None and j in offsets}
