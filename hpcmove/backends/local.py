"""The embedded default: the same rendered scripts run as detached local processes.

A runner process (hpcmove.backends.local_runner) runs the array tasks, at most
stripe-width at a time, then the finalize script whatever the tasks' outcome
(afterany, as on Slurm); the packaged final script starts with the tasks and
waits for them, so its interpreter is ready when they end. With every script
the packaged one, the runner is forked before planning (prepare) and starts its
task and finalize processes ahead (local_runner's standby). Its id is
'local-PID'; it keeps its state in a small JSON file under the data directory,
which poll reads.
"""
import json
import os
import signal
import subprocess
import sys

from ..errors import SchedulerError, UsageError
from . import Backend, Submitted
from .local_runner import pid_of, read_state


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


class Warm:
    """A runner forked ahead (local_runner standby), waiting for its job on a pipe."""

    def __init__(self, width):
        read_fd, self.fd = os.pipe()
        self.argv = [sys.executable, "-m", "hpcmove.backends.local_runner", "standby",
                     str(width), str(read_fd)]
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         pass_fds=(read_fd,))
        except OSError:
            self.proc = None
        finally:
            os.close(read_fd)

    def send(self, spec):
        """Hand the runner its job; its id, or None when it is not there (the job is
        then spawned as without a warm start)."""
        if self.fd is None or self.proc is None:
            return None
        job_id = self.proc.communicate()[0].decode().strip()
        job = {"jobdir": os.fsdecode(spec.jobdir), "n_tasks": spec.n_tasks,
               "width": spec.stripe_width, "db_url": spec.db_url}
        try:
            if self.proc.returncode == 0 and job_id:
                os.write(self.fd, json.dumps(job).encode() + b"\n")
                return job_id
        except OSError:  # the runner is gone
            pass
        finally:
            self.close()
        return None

    def close(self):
        """No job (or it was sent): the runner sees its pipe end."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.proc is not None and self.proc.returncode is None:
            self.proc.communicate()


class LocalBackend(Backend):
    name = "local"
    pause_by_flag = False
    submits_at_once = True

    def prepare(self, width):
        """Fork the runner now, with `width` workers and finalize started ahead: their
        interpreters and imports (0.2-0.5 s before a task moves its first byte, on a
        machine whose other cores wait for `submit` to plan) overlap the planning."""
        return Warm(width)

    def submit(self, spec):
        if spec.dependency:
            raise UsageError("--dependency needs a batch system; the local backend has none")
        if spec.warm:
            job_id = spec.warm.send(spec)
            if job_id:
                return Submitted(job_id if spec.n_tasks else None, job_id)
        argv = [sys.executable, "-m", "hpcmove.backends.local_runner", "spawn",
                os.fsdecode(spec.jobdir), str(spec.n_tasks), str(spec.stripe_width)]
        if spec.final_waits:
            argv.append("early-final")
        done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise SchedulerError(argv, done.returncode, done.stdout, done.stderr)
        job_id = done.stdout.strip()
        return Submitted(job_id if spec.n_tasks else None, job_id)

    def poll(self, ids):
        out = {}
        for job_id in filter(None, ids):
            state = read_state(job_id)
            if "final" in state:
                out[job_id] = "COMPLETED" if state["final"] == 0 else "FAILED"
            elif _alive(pid_of(job_id)):
                out[job_id] = "RUNNING"
            else:
                out[job_id] = "CANCELLED" if state.get("cancelled") else "FAILED"
        return out

    def cancel(self, ids):
        self._signal(ids, signal.SIGTERM)
        self._signal(ids, signal.SIGCONT)  # a paused (stopped) runner must wake to die

    def hold(self, ids):
        """The local runner's whole process group stops where it is (SIGSTOP)."""
        self._signal(ids, signal.SIGSTOP)

    def release(self, ids):
        self._signal(ids, signal.SIGCONT)

    @staticmethod
    def _signal(ids, sig):
        for job_id in set(filter(None, ids)):
            try:
                os.killpg(pid_of(job_id), sig)
            except ProcessLookupError:
                pass

    def task_states(self, array_id):
        tasks = read_state(array_id).get("tasks", {})
        return {int(t): ("COMPLETED" if rc == 0 else f"FAILED (exit {rc})", "localhost")
                for t, rc in tasks.items()}
