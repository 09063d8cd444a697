"""Batch backends: each declares how to submit, poll and cancel; nothing else knows
which scheduler is behind a job. Loaded by name through hpcmove.plugins."""
import os
import time
from dataclasses import dataclass, field

from ..errors import UsageError

# Scheduler states in which a job may still run (Slurm's names; other backends map to them).
ACTIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "CONFIGURING",
                    "COMPLETING", "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT",
                    "STOPPED", "UNKNOWN"})


def overall(states):
    """One state for a job from its tasks' states: active wins, then failures."""
    if not states:
        return "UNKNOWN"
    for s in states:
        if s in ACTIVE and s != "UNKNOWN":
            return s
    if all(s == "COMPLETED" for s in states):
        return "COMPLETED"
    return next((s for s in states if s not in ("COMPLETED", "UNKNOWN")), "UNKNOWN")


# What a batch job's environment may pass on to the jobs it submits (sbatch's default
# --export=ALL): none of the variables Slurm set for the calling job, except this one.
_SLURM_KEEP = frozenset({"SLURM_CONF"})


def submission_env(environ=None):
    """The environment for submitting from `environ` (default: ours). Inside a batch job
    (or salloc) the variables Slurm set for *that* job would otherwise travel into the
    jobs submitted from it: SLURM_ARRAY_TASK_ID in a job that is no array,
    SLURM_MEM_PER_CPU next to the new job's SLURM_MEM_PER_NODE (srun then refuses to
    run), SLURM_EXPORT_ENV=NONE (sbatch reads it as --export=NONE). They are dropped,
    SLURM_CONF is kept; outside a job the environment is passed on as it is."""
    env = dict(os.environ if environ is None else environ)
    if "SLURM_JOB_ID" not in env and "SLURM_JOBID" not in env:
        return env
    return {k: v for k, v in env.items()
            if not k.startswith(("SLURM_", "SLURMD_")) or k in _SLURM_KEEP}


def parse_batch_ids(text):
    """Job.array_id holds every transfer-side batch id: '123' or, for a job fed in
    chunks, '123@0,140@64,feed:141' (array id @ first task index; feeder jobs).
    Returns ([(array id, task offset)], [feeder ids])."""
    arrays, feeders = [], []
    for item in filter(None, (text or "").split(",")):
        if item.startswith("feed:"):
            feeders.append(item[5:])
        else:
            job_id, _, offset = item.partition("@")
            arrays.append((job_id, int(offset or 0)))
    return arrays, feeders


@dataclass
class SubmitSpec:
    """What a backend needs to start one job's chain."""

    jobdir: bytes
    scripts: dict  # name -> path of the rendered script ('transfer.sh' may be absent)
    n_tasks: int
    stripe_width: int
    dependency: str = ""  # sbatch syntax, applies to the transfer step
    logs: dict = field(default_factory=dict)  # name -> output path pattern
    label: str = ""  # hpcmove's job id (hm-N), for the feeder
    # the final script is the packaged one, whose only command (hpcmove.finalize) waits
    # for the tasks when told to (finalize.AFTER_TASKS): a backend may start it early
    final_waits: bool = False
    # what Backend.prepare returned (every script the packaged one: the processes that
    # would run them may have been started ahead), and the database the scripts name
    warm: object = None
    db_url: str = ""


@dataclass
class Submitted:
    array_id: str | None  # see parse_batch_ids
    final_id: str


class Backend:
    """Base of every backend. Subclasses set `name` and implement the four calls."""

    name = "base"
    # True: running tasks are asked to stop between slices (a flag in the job dir);
    # False: hold() stops them where they are.
    pause_by_flag = False
    # True: submit() starts processes here and returns at once (no scheduler to ask),
    # so it may run while the job database's write lock is held (see jobs.py)
    submits_at_once = False

    def prepare(self, width):
        """Called before planning, when every script of the coming job will be the
        packaged one: start what may start ahead, with `width` tasks at most at once.
        Returns a handle for SubmitSpec.warm (closed by the caller whatever happens), or
        None."""
        return None

    def submit(self, spec):
        """Start the transfer array and the dependent final job; return their ids."""
        raise NotImplementedError

    def poll(self, ids):
        """{id: state} for many ids in one query; an unknown id maps to 'UNKNOWN'."""
        raise NotImplementedError

    def cancel(self, ids):
        raise NotImplementedError

    def task_states(self, array_id):
        """{task index: (state, node)} of the array's tasks, for reasons of the dead."""
        raise NotImplementedError

    def hold(self, ids):
        """Keep the pending parts of these batch jobs from starting (pause)."""
        raise NotImplementedError

    def release(self, ids):
        """Let held batch jobs start again (resume)."""
        raise NotImplementedError

    def submit_after(self, script, final_id):
        """Submit the user's `script` to start only when the batch job `final_id` ended
        successfully (`--then`); returns its batch id."""
        raise UsageError(f"--then needs a batch system: the {self.name} backend cannot "
                         "hold a job until another succeeded; use --wait and run the "
                         "script after it")

    def max_time(self, partition):
        """The longest a task may run in `partition`, in seconds; None when unlimited."""
        return None

    def total_cpus(self, partition):
        """How many one-CPU tasks `partition` can run at once; None when not known."""
        return None

    def wait_gone(self, ids, timeout=120.0):
        """Block until none of `ids` can still run (after cancel); True if so in time."""
        deadline, delay = time.monotonic() + timeout, 0.2
        while time.monotonic() < deadline:
            polled = self.poll(ids)
            if not any(polled.get(i, "UNKNOWN") in ACTIVE - {"UNKNOWN"} for i in ids):
                return True
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
        return False
