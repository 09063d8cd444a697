"""The process behind the local backend: runs a job's rendered scripts like Slurm would.

  python -m hpcmove.backends.local_runner spawn JOBDIR NTASKS WIDTH [early-final]
forks a detached runner (its own session, so it outlives the terminal and is
nobody's zombie), prints its id and returns at once.

With `early-final` (the final script is the packaged one, see SubmitSpec.final_waits)
the final script starts beside the tasks: its interpreter and imports are ready when
they end, and hpcmove.finalize waits until the runner writes GO to the descriptor
named by AFTER_TASKS. The runner ending any other way (killed) closes the pipe
without GO, and finalize then does nothing: it never runs beside a task.

  python -m hpcmove.backends.local_runner standby WIDTH FD
forks the runner while `submit` still plans (every script is the packaged one, see
SubmitSpec.warm): it starts WIDTH workers and the finalize process ahead
(`python -m MODULE --standby`), which import hpcmove and wait. When the job is
recorded, `submit` writes it to FD as one JSON line; the runner hands each process
its part (standby_job) instead of starting the script that would only have run it.
FD closed without a job (the submit failed or was killed): they end, and so does
the runner, leaving nothing behind.
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


STANDBY = "--standby"


def standby_job(stream=None):
    """In a process the runner started ahead (`--standby`): wait for its part, a JSON
    object {"argv": [...], "env": {...}, "log": path} (names as os.fsdecode gives them),
    then take on what its script would have given it: the environment, stdout and
    stderr appended to the log, stdin empty. Returns the argv; None when the runner had
    nothing for it (end of input): the process then just ends."""
    data = (stream or sys.stdin.buffer).read()
    if not data.strip():
        return None
    part = json.loads(data)
    os.environ.update(part["env"])
    log = os.open(os.fsencode(part["log"]), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    devnull = os.open(os.devnull, os.O_RDONLY)
    for fd, to in ((log, 1), (log, 2), (devnull, 0)):
        os.dup2(fd, to)
    os.close(log)
    os.close(devnull)
    return part["argv"]


def _standby(module, env, pass_fds=()):
    """A process of `module` started ahead, waiting on its stdin for standby_job."""
    return subprocess.Popen([sys.executable, "-m", module, STANDBY], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            pass_fds=pass_fds)


def _hand(proc, argv, env, log):
    """Give a standby process its part; False when it is gone (the script runs then)."""
    part = {"argv": [os.fsdecode(a) for a in argv], "env": env, "log": os.fsdecode(log)}
    try:
        proc.stdin.write(json.dumps(part).encode())
        proc.stdin.close()
        return True
    except (BrokenPipeError, ValueError):
        proc.wait()
        return False


class Runner:
    def __init__(self, jobdir, n_tasks, width, early_final=False):
        self.jobdir, self.n_tasks, self.width = jobdir, n_tasks, max(1, width)
        self.early_final = early_final
        self.id = f"local-{os.getpid()}"
        self.state = {"jobdir": os.fsdecode(jobdir), "tasks": {}}
        self.lock = threading.Lock()
        self.db_url = ""  # a warm start's: what the scripts would export as HPCMOVE_DB
        self.workers, self.final, self.gate = [], None, None  # started ahead (warm start)

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
        ids = dict(SLURM_ARRAY_TASK_ID=str(index), SLURM_ARRAY_JOB_ID=self.id,
                   SLURM_JOB_ID=f"{self.id}_{index}")
        log = os.path.join(self.jobdir, b"logs", b"transfer-%d.out" % index)
        with self.lock:
            ahead = self.workers.pop() if self.workers else None
        if ahead and _hand(ahead, [self.jobdir, b"%d" % index],
                           dict(ids, HPCMOVE_DB=self.db_url), log):
            rc = ahead.wait()
        else:
            rc = self.script("transfer.sh", log, dict(os.environ, **ids))
        with self.lock:
            self.state["tasks"][str(index)] = rc
            self.save()

    def dismiss(self):
        """The processes started ahead that have no part: their input ends, they end."""
        with self.lock:
            idle, self.workers = self.workers, []
        for proc in idle:
            _hand_nothing(proc)

    def run(self):
        self.save()
        env = dict(os.environ, SLURM_JOB_ID=self.id)
        log = os.path.join(self.jobdir, b"logs", b"finalize.out")
        final = gate = None
        if self.final:
            final, gate, self.final = self.final, self.gate, None
            if not (self.n_tasks and _hand(final, [self.jobdir],
                                           dict(SLURM_JOB_ID=self.id,
                                                HPCMOVE_DB=self.db_url), log)):
                _hand_nothing(final)
                os.close(gate)
                final = gate = None
        if self.n_tasks and self.early_final and not final:
            wait_fd, gate = os.pipe()
            final = self.start("finalize.sh", log, dict(env, **{AFTER_TASKS: str(wait_fd)}),
                               pass_fds=(wait_fd,))
            os.close(wait_fd)
        if self.n_tasks:
            with ThreadPoolExecutor(self.width) as pool:
                list(pool.map(self.task, range(self.n_tasks)))
        self.dismiss()
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


def _hand_nothing(proc):
    try:
        proc.stdin.close()
    except BrokenPipeError:
        pass
    proc.wait()


def _state_dir():
    os.makedirs(os.path.join(data_dir(), "local"), mode=0o700, exist_ok=True)


def _detach(runner_main, save=True):
    """Fork the runner (orphaned, its own session and process group), print the id it
    reports and return; the runner runs `runner_main(report)`, report(id) saying it
    started (and, with `save`, writing its state file), and ends the process with its
    return code."""
    if save:
        _state_dir()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd) as r:
            print(r.read().strip(), flush=True)
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

    def report(runner):
        if save:
            runner.save()
        os.write(write_fd, runner.id.encode() + b"\n")
        os.close(write_fd)
        signal.signal(signal.SIGTERM, _on_term(runner))
    os._exit(runner_main(report))


def spawn(jobdir, n_tasks, width, early_final=False):
    def runner_main(report):
        runner = Runner(os.fsencode(jobdir), n_tasks, width, early_final)
        report(runner)
        return runner.run()
    return _detach(runner_main)


def standby(width, job_fd):
    """The warm start (see the module's doc): the runner, its workers and finalize
    started ahead; the job comes on `job_fd`."""
    def runner_main(report):
        runner = Runner(b"", 0, width, early_final=True)
        report(runner)
        env = dict(os.environ, SLURM_JOB_ID=runner.id)
        runner.workers = [_standby("hpcmove.worker", env) for _ in range(runner.width)]
        wait_fd, runner.gate = os.pipe()
        runner.final = _standby("hpcmove.finalize", dict(env, **{AFTER_TASKS: str(wait_fd)}),
                                pass_fds=(wait_fd,))
        os.close(wait_fd)
        with os.fdopen(job_fd, "rb") as f:
            data = f.read()
        try:
            job = json.loads(data) if data.strip() else None
        except ValueError:
            job = None
        if not job:  # the submit ended without a job: nothing of it stays
            runner.dismiss()
            _hand_nothing(runner.final)
            os.close(runner.gate)
            return 0
        _state_dir()  # only now: a refused submit leaves no trace
        runner.jobdir = os.fsencode(job["jobdir"])
        runner.n_tasks, runner.width = job["n_tasks"], max(1, job["width"])
        runner.db_url = job["db_url"]
        runner.state["jobdir"] = job["jobdir"]
        return runner.run()
    return _detach(runner_main, save=False)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["standby"] and len(argv) == 3:
        return standby(int(argv[1]), int(argv[2]))
    if len(argv) not in (4, 5) or argv[0] != "spawn" or argv[4:] not in ([], ["early-final"]):
        print("usage: python -m hpcmove.backends.local_runner spawn JOBDIR NTASKS WIDTH "
              "[early-final]\n       python -m hpcmove.backends.local_runner standby WIDTH FD",
              file=sys.stderr)
        return 2
    return spawn(argv[1], int(argv[2]), int(argv[3]), argv[4:] == ["early-final"])


if __name__ == "__main__":
    sys.exit(main())
