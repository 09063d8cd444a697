"""The process behind the local backend: runs a job's rendered scripts like Slurm would.

  python -m hpcmove.backends.local_runner spawn JOBDIR NTASKS WIDTH
forks a detached runner (its own session, so it outlives the terminal and is
nobody's zombie), prints its id and returns at once.
"""
import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

from ..paths import data_dir


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
    def __init__(self, jobdir, n_tasks, width):
        self.jobdir, self.n_tasks, self.width = jobdir, n_tasks, max(1, width)
        self.id = f"local-{os.getpid()}"
        self.state = {"jobdir": os.fsdecode(jobdir), "tasks": {}}
        self.lock = threading.Lock()

    def save(self):
        path = state_path(self.id)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f)
        os.replace(tmp, path)

    def script(self, name, log, env):
        """Run one script where hpcmove was called (the runner's directory), as sbatch runs
        a job in its submit directory: the plan keeps relative paths relative."""
        with open(log, "ab") as out:
            return subprocess.run(["/bin/bash", os.path.join(self.jobdir, name.encode())],
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  env=env).returncode

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
        if self.n_tasks:
            with ThreadPoolExecutor(self.width) as pool:
                list(pool.map(self.task, range(self.n_tasks)))
        env = dict(os.environ, SLURM_JOB_ID=self.id)
        rc = self.script("finalize.sh", os.path.join(self.jobdir, b"logs", b"finalize.out"), env)
        self.state["final"] = rc
        self.save()
        return rc


def _on_term(runner):
    def handler(signum, frame):
        runner.state["cancelled"] = True
        runner.save()
        os.killpg(os.getpid(), signal.SIGKILL)
    return handler


def spawn(jobdir, n_tasks, width):
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
    runner = Runner(os.fsencode(jobdir), n_tasks, width)
    runner.save()
    os.write(write_fd, runner.id.encode() + b"\n")
    os.close(write_fd)
    signal.signal(signal.SIGTERM, _on_term(runner))
    os._exit(runner.run())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 4 or argv[0] != "spawn":
        print("usage: python -m hpcmove.backends.local_runner spawn JOBDIR NTASKS WIDTH",
              file=sys.stderr)
        return 2
    return spawn(argv[1], int(argv[2]), int(argv[3]))


if __name__ == "__main__":
    sys.exit(main())
