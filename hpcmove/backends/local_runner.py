"""The process behind the local backend: runs a job's rendered scripts like Slurm would.

  python -m hpcmove.backends.local_runner spawn JOBDIR NTASKS WIDTH [early-final]
forks a detached runner (its own session, so it outlives the terminal and is
nobody's zombie), prints its id and returns at once.

With `early-final` (the final script is the packaged one, see SubmitSpec.final_waits)
the final script starts beside the tasks: its interpreter and imports are ready when
they end, and hpcmove.finalize waits until the runner writes GO to the descriptor
named by AFTER_TASKS. The runner ending any other way (killed) closes the pipe
without GO, and finalize then does nothing: it never runs beside a task.
"""
import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from ..paths import data_dir

AFTER_TASKS = "HPCMOVE_AFTER_TASKS"  # the descriptor finalize reads GO from
GO = b"go\n"


def state_path(job_id):
    return os.path.join(data_dir(), "local", f"{job_id}.json")


def pid_of(job_id):
    return int(str(job_id).rsplit("-", 1)[1])


def read_state(job_id):
    try:
        with open(state_path(job_id)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


class Runner:
    def __init__(self, jobdir, n_tasks, width, early_final=False):
        self.jobdir, self.n_tasks, self.width = jobdir, n_tasks, max(1, width)
        self.early_final = early_final
        self.id = f"local-{os.getpid()}"
        self.state = {"jobdir": os.fsdecode(jobdir), "tasks": {}}
        self.lock = threading.Lock()

    def save(self):
        path = state_path(self.id)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f)
        os.replace(tmp, path)

    def start(self, name, log, env, pass_fds=()):
        """Start one script where hpcmove was called (the runner's directory), as sbatch
        runs a job in its submit directory: the plan keeps relative paths relative."""
        with open(log, "ab") as out:
            return subprocess.Popen(["/bin/bash", os.path.join(self.jobdir, name.encode())],
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env, pass_fds=pass_fds)

    def script(self, name, log, env):
        return self.start(name, log, env).wait()

    def task(self, index):
        env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(index), SLURM_ARRAY_JOB_ID=self.id,
                   SLURM_JOB_ID=f"{self.id}_{index}")
        rc = self.script("transfer.sh", os.path.join(self.jobdir, b"logs",
                                                     b"transfer-%d.out" % index), env)
        with self.lock:
            self.state["tasks"][str(index)] = rc
            self.save()

    def run(self):
        self.save()
        env = dict(os.environ, SLURM_JOB_ID=self.id)
        log = os.path.join(self.jobdir, b"logs", b"finalize.out")
        final = gate = None
        if self.n_tasks and self.early_final:
            wait_fd, gate = os.pipe()
            final = self.start("finalize.sh", log, dict(env, **{AFTER_TASKS: str(wait_fd)}),
                               pass_fds=(wait_fd,))
            os.close(wait_fd)
        if self.n_tasks:
            with ThreadPoolExecutor(self.width) as pool:
                list(pool.map(self.task, range(self.n_tasks)))
        if final:
            try:
                os.write(gate, GO)
            except BrokenPipeError:  # it ended already (it failed to start): its code says
                pass
            os.close(gate)
            rc = final.wait()
        else:
            rc = self.script("finalize.sh", log, env)
        self.state["final"] = rc
        self.save()
        return rc


def _on_term(runner):
    def handler(signum, frame):
        runner.state["cancelled"] = True
        runner.save()
        os.killpg(os.getpid(), signal.SIGKILL)
    return handler


def spawn(jobdir, n_tasks, width, early_final=False):
    os.makedirs(os.path.join(data_dir(), "local"), mode=0o700, exist_ok=True)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd) as r:
            print(r.read().strip())
        os.waitpid(pid, 0)
        return 0
    # intermediate child: new session, fork the runner, exit so the runner is orphaned
    os.close(read_fd)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.setpgid(0, 0)  # the runner leads its own process group: cancel signals it whole
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    runner = Runner(os.fsencode(jobdir), n_tasks, width, early_final)
    runner.save()
    os.write(write_fd, runner.id.encode() + b"\n")
    os.close(write_fd)
    signal.signal(signal.SIGTERM, _on_term(runner))
    os._exit(runner.run())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (4, 5) or argv[0] != "spawn" or argv[4:] not in ([], ["early-final"]):
        print("usage: python -m hpcmove.backends.local_runner spawn JOBDIR NTASKS WIDTH "
              "[early-final]", file=sys.stderr)
        return 2
    return spawn(argv[1], int(argv[2]), int(argv[3]), argv[4:] == ["early-final"])


if __name__ == "__main__":
    sys.exit(main())
