"""The Python API, for workflow tools that want a call rather than a shell-out:

    import hpcmove
    job = hpcmove.submit(["/scratch/run42"], "/project/run42/", partition="dtn")
    job.final_slurm_id   # chain compute jobs on it: sbatch --dependency=afterok:<id>
    job.wait()           # -> "Done"

Keyword options are the policy keys (`hpcmove policy show`): partition, account, qos,
time, stripe_width, slice_size, bwlimit, backend, engine, skip_existing, mail_type,
mail_user, ...; they rank as command-line flags do, within the site's limits. Besides
them: dependency (sbatch syntax), move, pairs (a list of (src, dst) instead of
sources and dest), then (a batch script to start once the job is Done) and dry_run.
"""
import os

from . import db, jobs, policy, states
from .errors import UsageError
from .units import parse_size

_SIZES = {"slice_size", "bwlimit", "small_file_threshold", "rate"}


class Job:
    """A handle on one hpcmove job: its ids, status, wait and cancel."""

    def __init__(self, row):
        self._row = row

    @classmethod
    def load(cls, ident):
        """A job by 'hm-N' or by its final batch id."""
        db.connect()
        return cls(jobs.find(ident))

    @property
    def id(self):
        return self._row.label

    @property
    def final_slurm_id(self):
        """The batch id of the final job: what `--parsable` prints, what to chain on."""
        return self._row.final_id

    @property
    def state(self):
        return self._reload().state

    def _reload(self):
        self._row = db.Job.get_by_id(self._row.id)
        return self._row

    def status(self, files=True):
        """The status as `hpcmove status --json` prints it (without files if asked)."""
        row = jobs.refresh([self._reload()])[0]
        return jobs.status_dict(row) if files else jobs.summary(row)

    def wait(self, timeout=None):
        """Block until the job ends or is on Hold (or `timeout` seconds pass); its state."""
        self._row = jobs.wait(self._reload(), timeout)
        return self._row.state

    def cancel(self):
        if self._reload().state not in states.JOB_TERMINAL:
            self._row = jobs.cancel(self._row)
        return self._row.state

    def __repr__(self):
        return f"<hpcmove.Job {self.id} {self._row.state} final={self.final_slurm_id}>"


def submit(sources, dest=None, *, dependency="", move=False, pairs=None, dry_run=False,
           then="", **settings):
    """Submit a transfer; returns a Job at once (see the module doc for the options)."""
    if isinstance(sources, (str, bytes, os.PathLike)):
        sources = [sources]
    unknown = set(settings) - set(policy.KEYS)
    if unknown:
        raise UsageError(f"unknown option {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(policy.KEYS))}")
    given = {k: (parse_size(v) if k in _SIZES and not isinstance(v, int) else v,
                 f"submit({k}=)") for k, v in settings.items()}
    site = policy.load_site()
    user, user_path = policy.load_user()
    eff = policy.resolve(site, user, user_path, os.environ, given)
    options = jobs.SubmitOptions.from_policy(eff, dependency=dependency, move=move, then=then)
    if not dry_run:
        db.connect()
    sub = jobs.submit(sources, dest, options, pairs=pairs, dry_run=dry_run, site=site)
    return sub if dry_run else Job(sub.job)
