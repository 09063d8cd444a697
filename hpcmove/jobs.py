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

from . import db, jobdir, plugins, policy, remote, render, ssh, states
from .backends import ACTIVE, Backend, SubmitSpec, parse_batch_ids
from .backends import slurm as slurm_backend
from .errors import HpcmoveError, JobNotFound, PlanError, UsageError
from .plan import FILE, Options, pack, plan_pairs, resolve_pairs, spool_path
from .remote import SESSIONS
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
    even_waves: bool = False  # the slice size is no one's choice: plan.even_waves may cut
    template_dirs: tuple = ()  # user then site override directories
    move: bool = False
    socket: str = ""  # -S/--socket: the control socket for a remote host
    remote: dict = None  # {host, socket, side, sum, node} for a push or pull
    streams: int = 3  # concurrent slice streams per task (remote transfers)
    ssh_sessions: int = SESSIONS  # the remote sshd's MaxSessions (remote.Slots)
    then: str = ""  # --then: a batch script to start once the job is Done (afterok)

    @classmethod
    def from_policy(cls, eff, dependency="", move=False, then=""):
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
                   even_waves=not user_chose,
                   small_file_threshold=eff["small_file_threshold"],
                   bwlimit_per_user=eff.site.limits.get("max_bwlimit_per_user", 0),
                   template_dirs=template_dirs(eff.site), move=move,
                   then=os.path.abspath(then) if then else "")


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


def default_stripe_width(backend, partition=""):
    """The cores here for the local backend; else 4 tasks, or fewer when the partition
    cannot run 4 at once (a task that waits for another to end doubles the time)."""
    if backend == "local":
        return os.cpu_count() or 1
    cpus = plugins.backend(backend).total_cpus(partition)
    return min(4, cpus) if cpus else 4


def read_copyjob(path):
    """A copyjob file (FTS, fdtcp): one 'SRC DST' pair per line; '#' comments. Names with
    spaces are written with shell-style quoting. Either side may be [user@]host:path, the
    same side on one host for every pair (all push there, or all pull from there)."""
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


def check_paths(site, pairs, local_src=True, local_dst=True):
    """The site's allowed roots, for every local source and destination, before anything
    runs (a remote side is checked against remote.allowed_hosts instead)."""
    for src, dst in pairs:
        if local_src:
            policy.check_path(site, src, "source")
        if local_dst:
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


WARM_TEMPLATES = ("transfer.sh.j2", "finalize.sh.j2", "base.sh.j2")


def submit(sources, dest, options, pairs=None, dry_run=False, site=None):
    """Check against the site policy, plan, record and submit a job. With dry_run: plan
    and render only; nothing is written, recorded or submitted."""
    backend = choose_backend(options.backend)
    if options.then and type(plugins.backend(backend)).submit_after is Backend.submit_after:
        plugins.backend(backend).submit_after(options.then, "")  # its refusal, before anything
    options = _one_task(backend, options, sources, dest, pairs)
    warm = _warm_start(backend, options, dry_run)
    try:
        return _submit(sources, dest, options, pairs, dry_run, site or policy.Site(), backend,
                       warm)
    finally:
        if warm:
            warm.close()  # sent, or the runner forked ahead ends with its processes


MAX_STREAMS = 16  # --streams' bound


def _one_task(backend, options, sources, dest, pairs):
    """On the local backend a remote transfer runs as one task with the streams (and
    --bwlimit) of the tasks it would have had: every stream goes through the one control
    master on this machine either way, and each further task process costs its start,
    its imports and a read of the manifest (20,000 files moved 0.1-0.15 s sooner by one
    task of 6 streams than by two of 3, on 2 cores: bench/README.md, run 27)."""
    if backend != "local":
        return options
    names = [a for pair in pairs for a in pair] if pairs is not None else [*sources, dest]
    try:
        if not any(remote.parse(a).remote for a in names):
            return options
    except PlanError:
        return options  # _endpoints says what is wrong with it
    width = _stripe_width(backend, options)
    return replace(options, stripe_width=1,
                   streams=min(MAX_STREAMS, width * options.streams),
                   bwlimit=options.bwlimit * width)


def _warm_start(backend, options, dry_run):
    """Backend.prepare's handle, before the sources are even listed (a remote listing
    takes a session), when every script will be the packaged one: processes started
    ahead would skip a site's own."""
    chosen = plugins.backend(backend)
    if dry_run or type(chosen).prepare is Backend.prepare or \
            render.overridden(WARM_TEMPLATES, options.template_dirs):
        return None
    return chosen.prepare(_stripe_width(backend, options))


def _stripe_width(backend, options):
    """The tasks that run at once: the user's or the backend's default, within the cap."""
    width = options.stripe_width or default_stripe_width(backend, options.partition)
    return min(width, options.width_cap) if options.width_cap else width


def _submit(sources, dest, options, pairs, dry_run, site, backend, warm):
    pairs, tree, remote_dst, options = _endpoints(sources, dest, options, site, pairs)
    check_paths(site, pairs, local_src=not options.remote or options.remote["side"] == "dst",
                local_dst=not options.remote or options.remote["side"] == "src")
    if options.remote and backend == "local" and ssh.hop(options.remote["node"]):
        raise UsageError(f"the control socket for {options.remote['host']} is on "
                         f"{options.remote['node']}, and the local backend runs the transfer "
                         f"on this machine: open one here (`hpcmove socket open "
                         f"{options.remote['host']}`) or submit to the batch system")
    width = _stripe_width(backend, options)
    if options.bwlimit_per_user:  # one job's tasks share the user's bandwidth
        share = max(1, options.bwlimit_per_user // width)
        options = replace(options, bwlimit=min(options.bwlimit or share, share))
    token = uuid.uuid4().hex[:12]
    plan_options = Options(slice_size=options.slice_size, stripe_width=width,
                           max_task_bytes=max_task_bytes(backend, options),
                           size_table=options.size_table,
                           small_file_threshold=options.small_file_threshold,
                           streams=options.streams if options.remote else 1,
                           even_waves=options.even_waves)
    the_plan = plan_pairs(pairs, plan_options, token, tree=tree, remote_dst=remote_dst)
    if dry_run:
        settings = _script_settings(options, "hm-DRYRUN", b"JOBDIR", db.default_url())
        return Submission(None, the_plan, render.render(settings, the_plan.n_tasks, width,
                                                        options.template_dirs))
    far = remote.Far(**{k: options.remote[k] for k in ("host", "socket", "side")},
                     via=ssh.hop(options.remote["node"])) if options.remote else None
    made = far.make_spools(the_plan.spool_dirs) if far and far.side == "dst" else None
    if not made:
        _make_spools(the_plan)
    try:
        db.connect()
        return _record_and_submit(the_plan, options, backend, width, made, warm)
    except BaseException:
        if made:
            try:
                made()  # never remove a spool while it is being made
            except HpcmoveError:
                pass
            far.remove_spools(the_plan.entries)
        else:
            for spool in the_plan.spools:
                shutil.rmtree(spool, ignore_errors=True)
        raise


def _local(path):
    """A local path made absolute, its trailing '/' kept (rsync's rule reads it)."""
    path = os.fsencode(path)
    return os.path.abspath(path) + (b"/" if path.endswith(b"/") else b"")


def _endpoints(sources, dest, options, site, pairs=None):
    """Local (src, dst) pairs as cp would make them (or a copyjob's `pairs` as given);
    or, when one side is `[user@]host:path`, the pairs, the remote source tree (pull) or
    the remote "is a directory" test (push), and options that carry the remote side
    (socket, node, checksum program) to the tasks. Returns (pairs, tree, remote_dst,
    options)."""
    if pairs is not None:
        srcs, dsts = [remote.parse(s) for s, _d in pairs], [remote.parse(d) for _s, d in pairs]
    else:
        srcs, dsts = [remote.parse(s) for s in sources], [remote.parse(dest)]
    src_hosts, dst_hosts = {e.host for e in srcs if e.remote}, {e.host for e in dsts if e.remote}
    if not src_hosts and not dst_hosts:
        return (resolve_pairs(sources, dest) if pairs is None else pairs), None, None, options
    if src_hosts and dst_hosts:
        raise UsageError("source and destination are both remote: one side must be local")
    side, ends = ("src", srcs) if src_hosts else ("dst", dsts)
    if len(src_hosts | dst_hosts) > 1 or not all(e.remote for e in ends):
        raise UsageError(f"{'sources' if side == 'src' else 'destinations'} must all be "
                         f"local, or all on one remote host")
    (host,) = src_hosts | dst_hosts
    policy.check_host(site, host.rpartition("@")[2])  # the site's patterns name hosts
    db.connect()
    socket, node = ssh.choose(host, options.socket)
    far = remote.Remote(host, os.fsencode(socket), via=ssh.hop(node),
                        sessions=options.ssh_sessions)
    users = remote.tilde_users(srcs + dsts)
    homes = far.homes(users) if users else {}
    srcs, dsts = [remote.untilde(e, homes) for e in srcs], [remote.untilde(e, homes) for e in dsts]
    # each destination and its parent are looked at in the same session as the probe
    looked = []
    for d in dsts if side == "dst" else []:
        bare = d.path.rstrip(b"/") or b"/"
        looked += [d.path, bare, os.path.dirname(bare) or b"."]
    found = far.probe(list(dict.fromkeys(looked)))
    settings = {"host": host, "socket": socket, "side": side, "node": node,
                "sessions": options.ssh_sessions,
                "sum": os.environ.get("HPCMOVE_REMOTE_SUM") or found["sum"],
                "python": found["python"] and not os.environ.get("HPCMOVE_REMOTE_NO_PYTHON")}
    # Small files go in bundles: tar streams (engine ssh, the default: measured faster
    # here, see bench/README.md), or rsync --files-from (engine rsync), which needs rsync
    # on both hosts. Large files move as dd slices either way.
    if options.engine == "rsync":
        missing = [where for where, has in (("here", shutil.which("rsync")),
                                            (f"on {host}", found["rsync"])) if not has]
        if missing:
            raise UsageError(f"--engine rsync: rsync is not installed {' or '.join(missing)}"
                             f"; without it the default engine sends small files as tar "
                             f"streams")
    options = replace(options, remote=settings,
                      engine="rsync" if options.engine == "rsync" else "ssh")
    if side == "src":
        home = os.fsencode(found["home"])
        paths = [e.path if e.path.startswith(b"/") else os.path.join(home, e.path)
                 for e in srcs]
        tree = remote.RemoteTree.listing(far, paths)
        if pairs is not None:
            return [(p, _local(d)) for p, (_s, d) in zip(paths, pairs)], tree, None, options
        return resolve_pairs(paths, _local(dest), src_isdir=tree.isdir), tree, None, options
    known = dict(found["dirs"])

    def is_dir(path):
        if path not in known:
            known[path] = far.is_dir(path)
        return known[path]

    if pairs is not None:
        pairs = [(_local(s), d.path) for (s, _d), d in zip(pairs, dsts)]
    else:
        pairs = resolve_pairs([_local(e.path) for e in srcs], dsts[0].path, dst_isdir=is_dir)
    for _src, target in pairs:
        parent = os.path.dirname(target.rstrip(b"/")) or b"."
        if not is_dir(parent):
            raise PlanError(f"destination directory does not exist on {host}: "
                            f"{os.fsdecode(parent)}")
    return pairs, None, is_dir, options


def _make_spools(the_plan):
    """Each spool (new: never one left by someone else) and the directories in it."""
    roots, made = set(the_plan.spools), []
    for path in the_plan.spool_dirs:
        try:
            os.mkdir(path, 0o700)
        except OSError as e:
            for spool in made:
                shutil.rmtree(spool, ignore_errors=True)
            raise PlanError(f"cannot create spool directory {os.fsdecode(path)}: "
                            f"{e.strerror}") from e
        if path in roots:
            made.append(path)


def _script_settings(options, label, path, url):
    # a remote transfer runs where its control socket is (sockets are node-local)
    node = (options.remote or {}).get("node", "")
    return render.ScriptSettings(label=label, jobdir=path, db_url=url, python=sys.executable,
                                 partition=options.partition, account=options.account,
                                 qos=options.qos, time=options.time,
                                 finalize_partition=options.finalize_partition,
                                 extra=[f"--nodelist={node}"] if node else [],
                                 mail_types=_mail_types(options.mail_type),
                                 mail_user=options.mail_user)


def _mail_types(text):
    from .notify import parse_mail_types  # notify imports report, which imports this module
    return tuple(sorted(parse_mail_types(text)))


def _record_and_submit(the_plan, options, backend, width, made=None, warm=None):
    """Record the job, write its manifest and submit it; `made` (the remote spools being
    made meanwhile) is waited for before anything runs.

    The rows go in Pending, with the job, in the transaction that writes the manifest:
    one commit, and a manifest that cannot be written leaves no rows behind. On SQLite
    that transaction holds the database's one write lock from its start, so a chain that
    starts at once here (the local backend) is submitted inside it, before the rows are
    inserted: the tasks move data meanwhile, and what they record (start_task first)
    queues behind this commit. Otherwise the chain goes after the commit: a server
    database shows uncommitted rows to no one, and a scheduler's answer can take minutes
    on a busy controller, while every other job's tasks would wait on the lock."""
    path = jobdir.create(the_plan.token)
    job = db.Job.create(token=the_plan.token, owner=getpass.getuser(), backend=backend,
                        jobdir=path, move=options.move, stripe_width=width,
                        slice_size=options.slice_size, n_tasks=the_plan.n_tasks,
                        bytes_total=the_plan.bytes_total, options=json.dumps(asdict(options)))
    early = db.is_sqlite(db.proxy.obj) and plugins.backend(backend).submits_at_once
    sent = None

    def send():
        if made:
            made()
        return _send_chain(job, options, the_plan.n_tasks, width, warm)
    try:
        with db.atomic():
            ids = db.reserve_plan(the_plan)
            jobdir.write_manifest(path, the_plan, *ids)
            if early:
                sent = send()
            db.insert_plan(job, the_plan, states.PENDING, ids)
            db.set_job_state(job, states.PENDING)
            if early:
                _record_chain(job, sent[0])
        if not early:
            sent = send()
            _record_chain(job, sent[0])
    except BaseException as e:
        if sent and early:  # its tasks run, with no rows to record into: stop them first
            _stop_chain(job.backend, sent[0])
        try:
            db.set_job_state(job, states.FAILED,
                             reason=f"submission failed: {e or type(e).__name__}")
        except Exception:  # the database itself may be what failed; say why, not this
            pass
        raise
    if options.then:
        _submit_then(job, options.then, sent[0].final_id)
    return Submission(db.Job.get_by_id(job.id), the_plan, sent[1])


def _send_chain(job, options, n_tasks, width, warm=None):
    """Render the scripts for `n_tasks` tasks and submit transfer array + final job:
    (backends.Submitted, scripts)."""
    path = job.jobdir
    settings = _script_settings(options, job.label, path, db.default_url())
    scripts = render.render(settings, n_tasks, width, options.template_dirs)
    written = jobdir.write_scripts(path, scripts)
    spec = SubmitSpec(path, written, n_tasks, width, options.dependency,
                      logs={"transfer": jobdir.log_path(path, "transfer-%A_%a.out"),
                            "finalize": jobdir.log_path(path, "finalize-%j.out"),
                            "feed": jobdir.log_path(path, "feed-%j.out")},
                      label=job.label, final_waits=not render.overridden(
                          ("finalize.sh.j2", "base.sh.j2"), options.template_dirs),
                      warm=warm, db_url=settings.db_url)
    return plugins.backend(job.backend).submit(spec), scripts


def _record_chain(job, submitted):
    db.Job.update(array_id=submitted.array_id, final_id=submitted.final_id).where(
        db.Job.id == job.id).execute()
    db.event(job.id, "submit", f"array {submitted.array_id}, final {submitted.final_id}")


def _stop_chain(backend_name, submitted, timeout=60.0):
    """Cancel a chain submitted for a job whose recording then failed; a courtesy that
    never hides why (the caller raises that)."""
    ids = [i for i in (submitted.array_id, submitted.final_id) if i]
    try:
        backend = plugins.backend(backend_name)
        backend.cancel(ids)
        _gone_after_cancel(backend, ids, timeout)
    except Exception as e:
        print(f"hpcmove: batch jobs {', '.join(ids)} may still run: {e}", file=sys.stderr)


def _submit_chain(job, options, n_tasks, width):
    """Submit the chain of a recorded job (a retry's); a refusal fails the job."""
    try:
        submitted, scripts = _send_chain(job, options, n_tasks, width)
    except HpcmoveError as e:
        db.set_job_state(job, states.FAILED, reason=f"submission failed: {e}")
        raise
    _record_chain(job, submitted)
    if options.then:
        _submit_then(job, options.then, submitted.final_id)
    return db.Job.get_by_id(job.id), scripts


def _submit_then(job, script, final_id):
    """--then: the next step, held by the batch system until the final job succeeded.
    A refusal here leaves the transfer running (its data is wanted either way)."""
    try:
        then_id = plugins.backend(job.backend).submit_after(script, final_id)
    except HpcmoveError as e:
        db.event(job.id, "then-failed", f"{script}: {e}")
        raise HpcmoveError(f"{job.label} was submitted (final {final_id}), but --then "
                           f"{script} was not: {e}") from e
    db.event(job.id, "then", f"{then_id} {script}")


def then_id(job):
    """The batch id of the job's --then script (the latest submitted), or None."""
    event = (db.Event.select().where(db.Event.job == job.id, db.Event.kind == "then")
             .order_by(db.Event.id.desc()).first())
    return event.message.split(" ", 1)[0] if event else None


def retry(job):
    """Resubmit a job on Hold: only its slices not Done, as a new chain (new array, new
    final job). Done slices are never copied again; the spool kept them."""
    if job.state not in (states.HOLD, states.AUTH):
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
                s.id, f.id, f.src, spool_path(f.spool, f.dst), s.offset,
                s.length, f.size, f.mtime_ns, mode=f.mode))
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


def auth(job, socket, node):
    """A job waiting in AuthRequired, with a live control socket again: record the new
    socket (and its node) and resubmit only the slices not Done."""
    if job.state != states.AUTH:
        raise UsageError(f"{job.label} is {job.state}; only an AuthRequired job needs auth")
    options = json.loads(job.options)
    options["remote"].update(socket=socket, node=node)
    db.Job.update(options=json.dumps(options)).where(db.Job.id == job.id).execute()
    db.event(job.id, "auth", f"control socket {socket} on {node or 'this host'}")
    return retry(db.Job.get_by_id(job.id))


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
                s.id, f.id, f.src, spool_path(f.spool, f.dst), s.offset,
                s.length, f.size, f.mtime_ns, mode=f.mode))
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
    if job is None:  # the final id of an earlier chain (before retry or auth)
        event = db.Event.select().where(db.Event.kind == "retry",
                                        db.Event.message.endswith(f" -> {text}")).first()
        job = db.Job.get_by_id(event.job_id) if event else None
    if job is None and text.isdigit():
        job = db.Job.get_or_none(db.Job.id == int(text))
    if job is None:
        raise JobNotFound(f"no job with id or final batch id {text}")
    return job


def refresh(jobs):
    """Reconcile unfinished jobs with the batch system: one poll per backend. A job whose
    final batch job has ended without recording a result is marked Failed."""
    open_jobs = [j for j in jobs if j.state not in states.JOB_SETTLED and j.final_id]
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
            if current.state in states.JOB_SETTLED or current.state == states.CANCELLING:
                continue  # Hold, AuthRequired: finalize recorded it, on purpose
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
    out["then_slurm_id"] = then_id(job)
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


CANCEL_AGAIN = 10.0  # s between cancels of batch jobs that are still there


def _gone_after_cancel(backend, ids, timeout, again=CANCEL_AGAIN):
    """backend.wait_gone(ids, timeout), cancelling what is left again every `again`
    seconds: a Grid Engine whose execd had just started killed one task of an array 2
    minutes after the first qdel, the other at once."""
    deadline = time.monotonic() + timeout
    while not backend.wait_gone(ids, min(again, max(0.0, deadline - time.monotonic()))):
        if time.monotonic() >= deadline:
            return False
        backend.cancel(ids)
    return True


def cancel(job, timeout=120.0):
    """Stop the job's batch jobs, remove its spool, mark what had not finished Cancelled."""
    if job.state == states.CANCELLED and remote.of_job(job):
        return _cancel_again(job)  # a remote spool left behind when no socket was there
    job = db.set_job_state(job, states.CANCELLING)
    backend = plugins.backend(job.backend)
    cancelled = set()
    while True:  # a feeder may add a chunk while we cancel: repeat until nothing is new
        ids = [x["id"] for x in batch_ids(db.Job.get_by_id(job.id))]
        if set(ids) <= cancelled:
            break
        backend.cancel(ids)
        cancelled |= set(ids)
        if not _gone_after_cancel(backend, ids, timeout):
            raise HpcmoveError(f"{job.label}: batch jobs {', '.join(ids)} still running "
                               f"{timeout:.0f} s after cancel; state left Cancelling")
    files = list(job.files)
    far, left = remote.of_job(job), None
    if far and far.side == "dst":
        if not far.remove_spools(files, _live_socket(far.remote.host)):
            left = (f"cancelled; the remote spool on {far.remote.host} is left "
                    f"({', '.join(sorted({os.fsdecode(f.spool) for f in files}))}): no live "
                    f"control socket; open one and cancel {job.label} again to remove it")
    else:
        for spool in {f.spool for f in files}:
            shutil.rmtree(spool, ignore_errors=True)
    with db.atomic():
        db.bulk_state(db.Slice, "slice", db.Slice.job == job.id, states.CANCELLED)
        db.bulk_state(db.File, "file", db.File.job == job.id, states.CANCELLED)
    return db.set_job_state(job, states.CANCELLED, reason=(left or "") if far else None)


def _cancel_again(job):
    far = remote.of_job(job)
    if far.side == "dst" and not far.remove_spools(list(job.files), _live_socket(far.remote.host)):
        raise UsageError(f"{job.label}: no live control socket for {far.remote.host}; "
                         f"`hpcmove socket open {far.remote.host}` first")
    db.Job.update(reason="").where(db.Job.id == job.id).execute()
    db.event(job.id, "cancel", "remote spool removed")
    return db.Job.get_by_id(job.id)


def _live_socket(host):
    """A Remote through the live socket for host (on its node), or None."""
    try:
        path, node = ssh.choose(host)
    except ssh.SocketError:
        return None
    return remote.Remote(host, os.fsencode(path), via=ssh.hop(node))


def wait(job, timeout=None, poll_max=5.0, scheduler_every=2.0):
    """Block until the job is terminal or on Hold (or timeout seconds pass); return it.
    The database is read often (a read of one row: 40 a second cost ~1% of a core, and
    a short job's end is noticed within 25 ms), for 10 s, then less and less often; the
    batch system is asked at most every `scheduler_every` seconds."""
    start, delay, asked = time.monotonic(), 0.025, float("-inf")
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
