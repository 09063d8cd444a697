"""The library API behind the CLI: submit, find, refresh, status, cancel, wait.

Side effects live here and in the backends; planning and rendering stay pure.
"""
import getpass
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, replace

from peewee import fn

from . import db, jobdir, plugins, policy, render, states
from .backends import ACTIVE, Backend, SubmitSpec, parse_batch_ids
from .backends import slurm as slurm_backend
from .errors import HpcmoveError, JobNotFound, PlanError, UsageError
from .plan import FILE, Options, pack, plan_pairs, resolve_pairs
from .units import parse_duration

# A task is planned to finish within this share of its time limit at the assumed rate.
WALLTIME_SAFETY = 0.8


@dataclass
class SubmitOptions:
    backend: str = ""  # '' = Slurm when sbatch answers, else local
    partition: str = ""
    finalize_partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = ""
    dependency: str = ""
    stripe_width: int = 0  # 0 = backend default
    width_cap: int = 0  # the site's limit on tasks at once; 0 = none
    slice_size: int = 256 << 20
    bwlimit: int = 0  # bytes per second per task; 0 = unlimited
    engine: str = "copy"  # transfer engine plugin
    skip_existing: bool = False  # leave files already at the destination (same size, xxh3)
    mail_user: str = ""
    mail_type: str = ""  # sbatch's spelling: BEGIN, END, FAIL, ALL, NONE; and AUTH
    retries: int = 3
    retry_backoff: int = 1
    rate: int = 200 << 20  # assumed bytes/s per task, for fitting tasks in the time limit
    small_file_threshold: int = 0
    bwlimit_per_user: int = 0  # the site's cap on one job's tasks together; 0 = none
    size_table: tuple = ()  # ((min_size, slice_size), ...) when the size is the site's
    template_dirs: tuple = ()  # user then site override directories
    move: bool = False

    @classmethod
    def from_policy(cls, eff, dependency="", move=False):
        """Options from effective settings; the site's size table applies where the slice
        size was not chosen by the user."""
        user_chose = not eff.values["slice_size"].source.startswith(("built-in", "site"))
        table = () if user_chose else tuple((m, s) for m, s, _w in eff.site.size_table)
        return cls(backend=eff["backend"], partition=eff["partition"],
                   finalize_partition=eff["finalize_partition"], account=eff["account"],
                   qos=eff["qos"], time=eff["time"], dependency=dependency,
                   stripe_width=eff["stripe_width"], width_cap=eff.site.width_cap,
                   slice_size=eff["slice_size"],
                   bwlimit=eff["bwlimit"], engine=eff["engine"], retries=eff["retries"],
                   skip_existing=eff["skip_existing"],
                   mail_user=eff["mail_user"], mail_type=eff["mail_type"],
                   retry_backoff=eff["retry_backoff"], rate=eff["rate"], size_table=table,
                   small_file_threshold=eff["small_file_threshold"],
                   bwlimit_per_user=eff.site.limits.get("max_bwlimit_per_user", 0),
                   template_dirs=template_dirs(eff.site), move=move)


def template_dirs(site, env=os.environ):
    """[user dir, site dir] that exist; a user dir may not replace a locked site template."""
    user = env.get("HPCMOVE_USER_TEMPLATES") or os.path.join(
        os.path.dirname(policy.user_config_path(env)), "templates")
    site_dir = env.get("HPCMOVE_TEMPLATES", site.template_dir)
    if os.path.isdir(user):
        clash = sorted(set(os.listdir(user)) & set(site.locked_templates))
        if clash:
            raise policy.PolicyError(f"templates {', '.join(clash)} in {user} may not override "
                                     f"the site's locked templates (templates.locked in "
                                     f"{site.path})")
    return tuple(d for d in (user, site_dir) if os.path.isdir(d))


@dataclass
class Submission:
    job: object  # db.Job, or None for a dry run
    plan: object
    scripts: dict


def choose_backend(name):
    if name:
        plugins.load("backend", name)  # unknown or broken: a clear error now
        return name
    return "slurm" if slurm_backend.available() else "local"


def check_partition(name, where):
    """Refuse a partition Slurm does not know (for `policy check`)."""
    try:
        slurm_backend.run("scontrol", "show", "partition", name)
    except HpcmoveError as e:
        raise policy.PolicyError(f"{where}: partition {name!r} is not reachable: "
                                 f"{getattr(e, 'stderr', '') or e}".strip()) from None


def default_stripe_width(backend):
    return (os.cpu_count() or 1) if backend == "local" else 4


def read_copyjob(path):
    """A copyjob file (FTS, fdtcp): one 'SRC DST' pair per line; '#' comments. Names with
    spaces are written with shell-style quoting."""
    import shlex
    pairs = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = os.fsdecode(raw.rstrip(b"\n"))
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                words = shlex.split(line)
            except ValueError as e:
                raise UsageError(f"{path}:{number}: {e}") from e
            if len(words) != 2:
                raise UsageError(f"{path}:{number}: expected 'SRC DST', got {len(words)} fields")
            pairs.append((os.fsencode(words[0]), os.fsencode(words[1])))
    return pairs


def check_paths(site, pairs):
    """The site's allowed roots, for every source and destination, before anything runs."""
    for src, dst in pairs:
        policy.check_path(site, src, "source")
        parent = os.path.dirname(os.path.abspath(os.fsencode(dst).rstrip(b"/") or b"/"))
        policy.check_path(site, dst if os.path.lexists(dst) else parent, "destination")


def max_task_bytes(backend, options):
    """Bytes one task may be given so that, at the assumed rate, it ends within its time
    limit: the smaller of the user's -t and the partition's MaxTime."""
    limits = [parse_duration(options.time)] if options.time else []
    partition_max = plugins.backend(backend).max_time(options.partition)
    if partition_max:
        limits.append(partition_max)
    if not limits:
        return Options.max_task_bytes
    return max(1 << 20, int(min(limits) * options.rate * WALLTIME_SAFETY))


def submit(sources, dest, options, pairs=None, dry_run=False, site=None):
    """Check against the site policy, plan, record and submit a job. With dry_run: plan
    and render only; nothing is written, recorded or submitted."""
    site = site or policy.Site()
    pairs = pairs or resolve_pairs(sources, dest)
    check_paths(site, pairs)
    backend = choose_backend(options.backend)
    width = options.stripe_width or default_stripe_width(backend)
    if options.width_cap:
        width = min(width, options.width_cap)
    if options.bwlimit_per_user:  # one job's tasks share the user's bandwidth
        share = max(1, options.bwlimit_per_user // width)
        options = replace(options, bwlimit=min(options.bwlimit or share, share))
    token = uuid.uuid4().hex[:12]
    plan_options = Options(slice_size=options.slice_size, stripe_width=width,
                           max_task_bytes=max_task_bytes(backend, options),
                           size_table=options.size_table,
                           small_file_threshold=options.small_file_threshold)
    the_plan = plan_pairs(pairs, plan_options, token)
    if dry_run:
        settings = _script_settings(options, "hm-DRYRUN", b"JOBDIR", db.default_url())
        return Submission(None, the_plan, render.render(settings, the_plan.n_tasks, width,
                                                        options.template_dirs))
    _make_spools(the_plan)
    try:
        db.connect()
        return _record_and_submit(the_plan, options, backend, width)
    except BaseException:
        for spool in the_plan.spools:
            shutil.rmtree(spool, ignore_errors=True)
        raise


def _make_spools(the_plan):
    for spool in the_plan.spools:
        try:
            os.mkdir(spool, 0o700)
        except OSError as e:
            for made in the_plan.spools:
                if made == spool:
                    break
                shutil.rmtree(made, ignore_errors=True)
            raise PlanError(f"cannot create spool directory {os.fsdecode(spool)}: "
                            f"{e.strerror}") from e


def _script_settings(options, label, path, url):
    return render.ScriptSettings(label=label, jobdir=path, db_url=url, python=sys.executable,
                                 partition=options.partition, account=options.account,
                                 qos=options.qos, time=options.time,
                                 finalize_partition=options.finalize_partition)


def _record_and_submit(the_plan, options, backend, width):
    path = jobdir.create(the_plan.token)
    job = db.Job.create(token=the_plan.token, owner=getpass.getuser(), backend=backend,
                        jobdir=path, move=options.move, stripe_width=width,
                        slice_size=options.slice_size, n_tasks=the_plan.n_tasks,
                        bytes_total=the_plan.bytes_total, options=json.dumps(asdict(options)))
    try:
        file_ids, slice_ids = db.insert_plan(job, the_plan)
        jobdir.write_manifest(path, the_plan, file_ids, slice_ids)
        _to_pending(job)
    except HpcmoveError as e:
        db.set_job_state(job, states.FAILED, reason=f"submission failed: {e}")
        raise
    job, scripts = _submit_chain(job, options, the_plan.n_tasks, width)
    return Submission(job, the_plan, scripts)


def _submit_chain(job, options, n_tasks, width):
    """Render the scripts for `n_tasks` tasks and submit transfer array + final job."""
    path = job.jobdir
    try:
        settings = _script_settings(options, job.label, path, db.default_url())
        scripts = render.render(settings, n_tasks, width, options.template_dirs)
        written = jobdir.write_scripts(path, scripts)
        spec = SubmitSpec(path, written, n_tasks, width, options.dependency,
                          logs={"transfer": jobdir.log_path(path, "transfer-%A_%a.out"),
                                "finalize": jobdir.log_path(path, "finalize-%j.out"),
                                "feed": jobdir.log_path(path, "feed-%j.out")},
                          label=job.label)
        submitted = plugins.backend(job.backend).submit(spec)
    except HpcmoveError as e:
        db.set_job_state(job, states.FAILED, reason=f"submission failed: {e}")
        raise
    db.Job.update(array_id=submitted.array_id, final_id=submitted.final_id).where(
        db.Job.id == job.id).execute()
    db.event(job.id, "submit", f"array {submitted.array_id}, final {submitted.final_id}")
    return db.Job.get_by_id(job.id), scripts


def _to_pending(job):
    with db.atomic():
        db.set_job_state(job, states.PENDING)
        db.bulk_state(db.File, "file", db.File.job == job.id, states.PENDING)
        db.bulk_state(db.Slice, "slice", db.Slice.job == job.id, states.PENDING)


def retry(job):
    """Resubmit a job on Hold: only its slices not Done, as a new chain (new array, new
    final job). Done slices are never copied again; the spool kept them."""
    if job.state != states.HOLD:
        raise UsageError(f"{job.label} is {job.state}; only a job on Hold can be retried")
    todo = list(db.Slice.select(db.Slice, db.File).join(db.File)
                .where(db.Slice.job == job.id, db.Slice.state != states.DONE))
    n_tasks = pack(todo, job.stripe_width, Options.max_task_bytes)
    by_task = {}
    with db.atomic():
        for s in todo:
            db.Slice.update(task=s.task, attempts=0, reason="").where(
                db.Slice.id == s.id).execute()
            f = s.file
            by_task.setdefault(s.task, []).append(jobdir.manifest_item(
                s.id, f.id, f.src, os.path.join(f.spool, b"%d" % f.index), s.offset,
                s.length, f.size, f.mtime_ns))
        db.bulk_state(db.Slice, "slice", db.Slice.id.in_([s.id for s in todo]), states.PENDING)
        db.bulk_state(db.File, "file", db.File.job == job.id, states.PENDING, reason="")
        db.event(job.id, "retry", f"{len(todo)} slices in {n_tasks} tasks; previous chain: "
                                  f"{job.array_id or '-'} -> {job.final_id}")
        db.Job.update(n_tasks=n_tasks).where(db.Job.id == job.id).execute()
        job = db.set_job_state(job, states.PENDING, reason="")
    jobdir.write_tasks(job.jobdir, by_task)
    options = SubmitOptions(**{k: v for k, v in json.loads(job.options).items()
                               if k in SubmitOptions.__dataclass_fields__})
    options.dependency = ""
    return _submit_chain(job, options, n_tasks, job.stripe_width)


PAUSED = "paused by the user: hpcmove resume {label}"


def pause(job):
    """Hold what has not started, let running tasks finish their current slice and stop.
    The final batch id stays the same, so jobs chained on it keep waiting."""
    if job.state not in (states.PENDING, states.ACTIVE):
        raise UsageError(f"{job.label} is {job.state}; only a Pending or Active job pauses")
    backend = plugins.backend(job.backend)
    if type(backend).hold is Backend.hold:
        raise UsageError(f"pause is not available on the {job.backend} backend")
    if backend.pause_by_flag:
        jobdir.set_paused(job.jobdir, True)
    backend.hold([x["id"] for x in batch_ids(job) if x["role"] != "feed"])
    return db.set_job_state(job, states.HOLD, reason=PAUSED.format(label=job.label))


def resume(job):
    """Undo pause: slices handed back by stopped tasks go to a catch-up array that the
    final job also waits for; held tasks and the final job are released."""
    if job.state != states.HOLD or job.reason != PAUSED.format(label=job.label):
        raise UsageError(f"{job.label} is not paused ({job.state})")
    backend = plugins.backend(job.backend)
    jobdir.set_paused(job.jobdir, False)
    ids = [x["id"] for x in batch_ids(job) if x["role"] == "transfer"]
    if backend.pause_by_flag:
        extra = _catch_up(job, backend)
        if extra:
            backend.point_final(job.final_id, *ids, extra)
    backend.release(ids + [job.final_id])
    busy = db.Slice.select().where(db.Slice.job == job.id, db.Slice.state == states.DONE).exists()
    return db.set_job_state(job, states.PENDING, reason="") if not busy else \
        _hold_to_active(job)


def _hold_to_active(job):
    job = db.set_job_state(job, states.PENDING, reason="")
    return db.set_job_state(job, states.ACTIVE)


def _catch_up(job, backend):
    """Submit the slices that paused tasks handed back (Pending, in tasks that ended) as
    new array tasks numbered after the job's last; returns the array id or None."""
    tasks = backend.task_states(job.array_id)
    ended = {t for t, (state, _node) in tasks.items() if state not in ACTIVE}
    todo = list(db.Slice.select(db.Slice, db.File).join(db.File).where(
        db.Slice.job == job.id, db.Slice.state == states.PENDING, db.Slice.task.in_(ended)))
    if not todo:
        return None
    count = pack(todo, job.stripe_width, Options.max_task_bytes)
    by_task = {}
    with db.atomic():
        for s in todo:
            s.task += job.n_tasks
            db.Slice.update(task=s.task).where(db.Slice.id == s.id).execute()
            f = s.file
            by_task.setdefault(s.task, []).append(jobdir.manifest_item(
                s.id, f.id, f.src, os.path.join(f.spool, b"%d" % f.index), s.offset,
                s.length, f.size, f.mtime_ns))
    jobdir.add_tasks(job.jobdir, by_task)
    spec = SubmitSpec(job.jobdir, {"transfer.sh": os.path.join(job.jobdir, b"transfer.sh")},
                      count, job.stripe_width,
                      logs={"transfer": jobdir.log_path(job.jobdir, "transfer-%A_%a.out")})
    array = backend.resume_extra(spec, job.n_tasks, count)
    with db.atomic():
        db.Job.update(n_tasks=job.n_tasks + count,
                      array_id=",".join(filter(None, [job.array_id, f"{array}@{job.n_tasks}"]))
                      ).where(db.Job.id == job.id).execute()
        db.event(job.id, "resume", f"{len(todo)} handed-back slices as array {array}")
    return array


def find(ident):
    """A job by 'hm-N', by the id of its final batch job (what --parsable printed), or by N."""
    text = str(ident).strip()
    if text.lower().startswith("hm"):
        number = text[2:].lstrip("-")
        if number.isdigit():
            job = db.Job.get_or_none(db.Job.id == int(number))
            if job:
                return job
        raise JobNotFound(f"no job {text}")
    job = db.Job.select().where(db.Job.final_id == text).order_by(db.Job.id.desc()).first()
    if job is None and text.isdigit():
        job = db.Job.get_or_none(db.Job.id == int(text))
    if job is None:
        raise JobNotFound(f"no job with id or final batch id {text}")
    return job


def refresh(jobs):
    """Reconcile unfinished jobs with the batch system: one poll per backend. A job whose
    final batch job has ended without recording a result is marked Failed."""
    open_jobs = [j for j in jobs if j.state not in states.JOB_TERMINAL and j.state != states.HOLD
                 and j.final_id]
    by_backend = {}
    for j in open_jobs:
        by_backend.setdefault(j.backend, []).append(j)
    for name, group in by_backend.items():
        polled = plugins.backend(name).poll([j.final_id for j in group])
        for j in group:
            state = polled.get(j.final_id, "UNKNOWN")
            if state in ACTIVE:
                continue
            current = db.Job.get_by_id(j.id)
            if current.state in states.JOB_TERMINAL or current.state in (
                    states.CANCELLING, states.HOLD):  # Hold: finalize recorded it, on purpose
                continue
            db.set_job_state(current, states.FAILED,
                             reason=f"final batch job {j.final_id} ended {state} "
                                    "without recording a result")
    return [db.Job.get_by_id(j.id) for j in jobs]


def bytes_done(job):
    # int(): PostgreSQL sums bigints as numeric (Decimal)
    return int(db.Slice.select(fn.COALESCE(fn.SUM(db.Slice.length), 0))
               .where(db.Slice.job == job.id, db.Slice.state == states.DONE).scalar())


def _text(path):
    return os.fsdecode(path) if path is not None else None


def batch_ids(job):
    """[{id, role, final}] of every batch job of `job`, the final one last."""
    arrays, feeders = parse_batch_ids(job.array_id)
    out = [{"id": i, "role": "transfer", "final": False} for i, _ in arrays]
    out += [{"id": i, "role": "feed", "final": False} for i in feeders]
    if job.final_id:
        out.append({"id": job.final_id, "role": "finalize", "final": True})
    return out


def summary(job):
    return {"id": job.label, "state": job.state, "reason": job.reason, "backend": job.backend,
            "slurm_job_ids": batch_ids(job),
            "final_slurm_id": job.final_id, "bytes_total": job.bytes_total,
            "bytes_done": bytes_done(job) if job.state != states.DONE else job.bytes_total,
            "created": job.created, "finished": job.finished}


def status_dict(job):
    """The full status: summary plus every file with its slices."""
    out = summary(job)
    slices = {}
    for s in db.Slice.select().where(db.Slice.job == job.id).order_by(db.Slice.index):
        slices.setdefault(s.file_id, []).append(
            {"offset": s.offset, "length": s.length, "state": s.state, "host": s.host,
             "attempts": s.attempts, "skipped": s.skipped})
    out["files"] = [{"src": _text(f.src), "dst": _text(f.dst), "type": f.kind, "size": f.size,
                     "state": f.state, "reason": f.reason, "checksum": f.checksum,
                     "slices": slices.get(f.id, [])}
                    for f in job.files.order_by(db.File.index)]
    return out


def cancel(job, timeout=120.0):
    """Stop the job's batch jobs, remove its spool, mark what had not finished Cancelled."""
    job = db.set_job_state(job, states.CANCELLING)
    backend = plugins.backend(job.backend)
    cancelled = set()
    while True:  # a feeder may add a chunk while we cancel: repeat until nothing is new
        ids = [x["id"] for x in batch_ids(db.Job.get_by_id(job.id))]
        if set(ids) <= cancelled:
            break
        backend.cancel(ids)
        cancelled |= set(ids)
        if not backend.wait_gone(ids, timeout):
            raise HpcmoveError(f"{job.label}: batch jobs {', '.join(ids)} still running "
                               f"{timeout:.0f} s after cancel; state left Cancelling")
    files = list(job.files)
    for spool in {f.spool for f in files}:
        shutil.rmtree(spool, ignore_errors=True)
    with db.atomic():
        db.bulk_state(db.Slice, "slice", db.Slice.job == job.id, states.CANCELLED)
        db.bulk_state(db.File, "file", db.File.job == job.id, states.CANCELLED)
    return db.set_job_state(job, states.CANCELLED)


def wait(job, timeout=None, poll_max=5.0, scheduler_every=2.0):
    """Block until the job is terminal or on Hold (or timeout seconds pass); return it.
    The database is read often (cheap, and short jobs end quickly); the batch system
    is asked at most every `scheduler_every` seconds."""
    start, delay, asked = time.monotonic(), 0.1, float("-inf")
    while True:
        job = db.Job.get_by_id(job.id)
        if job.state not in states.JOB_SETTLED and time.monotonic() - asked >= scheduler_every:
            job, asked = refresh([job])[0], time.monotonic()
        if job.state in states.JOB_SETTLED:
            return job
        if timeout is not None and time.monotonic() - start >= timeout:
            return job
        time.sleep(delay)
        if time.monotonic() - start > 10:  # short jobs are noticed at once, long ones lazily
            delay = min(poll_max, delay * 1.5)


__all__ = ["SubmitOptions", "submit", "find", "refresh", "status_dict", "summary",
           "cancel", "wait", "FILE"]
