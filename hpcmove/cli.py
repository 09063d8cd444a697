"""The command line: a thin click layer over hpcmove.jobs. Library errors become
click errors here and nowhere else."""
import json
import os
import sys

import click

from . import cli_ops, cli_ssh, db, jobs, notify, plugins, policy, progress, ssh, states
from .errors import HpcmoveError, UsageError
from .units import human, parse_size


class Size(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        try:
            return parse_size(value)
        except UsageError as e:
            self.fail(str(e), param, ctx)


def _connect(missing_ok=False):
    """Open the job database. A user's SQLite file that does not exist yet means nothing
    was submitted with these settings: say so rather than show an empty answer."""
    path = db.sqlite_path(db.default_url())
    if path and not os.path.exists(path):
        if missing_ok:
            click.echo(f"no jobs: no job database at {path} yet", err=True)
            return False
        raise click.ClickException(f"no job database at {path}: nothing was submitted with "
                                   "this HPCMOVE_HOME / HPCMOVE_DB")
    db.connect()
    return True


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except HpcmoveError as e:
        raise click.ClickException(str(e)) from e


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hpcmove")
def cli():
    """Move large data sets through the batch system: striped over data-transfer
    nodes, verified, renamed into place, chainable with afterok."""


# flag name -> policy key, for the flags that set a policy value
FLAG_KEYS = {"partition": "partition", "account": "account", "qos": "qos", "time_": "time",
             "stripe_width": "stripe_width", "slice_size": "slice_size", "bwlimit": "bwlimit",
             "backend": "backend", "engine": "engine", "skip_existing": "skip_existing",
             "mail_user": "mail_user",
             "mail_type": "mail_type"}


def effective_settings(flags):
    """The policy layers resolved with the flags the user gave (None = not given)."""
    site = policy.load_site()
    user, user_path = policy.load_user()
    given = {FLAG_KEYS[k]: (v, "--" + FLAG_KEYS[k].replace("_", "-"))
             for k, v in flags.items() if k in FLAG_KEYS and v is not None}
    return policy.resolve(site, user, user_path, os.environ, given)


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("paths", nargs=-1, type=click.Path(), metavar="SRC... DST")
@click.option("-p", "--partition", default=None,
              help="Partition for the transfer and finalize jobs (sbatch -p).")
@click.option("-A", "--account", default=None, help="Account (sbatch -A).")
@click.option("-q", "--qos", default=None, help="QOS (sbatch -q).")
@click.option("-t", "--time", "time_", default=None, help="Time limit per task (sbatch -t).")
@click.option("-d", "--dependency", default="",
              help="Start the transfer after these jobs, e.g. afterok:123 (sbatch -d).")
@click.option("--parsable", is_flag=True,
              help="Print only the batch id of the final job, for --dependency=afterok:ID.")
@click.option("--stripe-width", type=click.IntRange(min=1), default=None,
              help="Array tasks running at once [default: 4 on Slurm, fewer if the "
                   "partition has fewer CPUs; cores locally].")
@click.option("--slice-size", type=Size(), default=None,
              help="Files larger than this are cut into slices of this size [default: 256M, "
                   "or smaller, never below a quarter of it, when the streams then end "
                   "together].")
@click.option("--bwlimit", type=Size(), default=None,
              help="Bandwidth limit per array task, bytes per second (e.g. 100M).")
@click.option("--backend", type=click.Choice(["slurm", "local", "drmaa", "pyslurm"]),
              default=None,
              help="Batch backend [default: slurm if sbatch answers, else local; "
                   "drmaa: Grid Engine; pyslurm: Slurm through its C API].")
@click.option("--engine", default=None, help="Transfer engine plugin [default: copy].")
@click.option("--skip-existing/--no-skip-existing", "skip_existing", default=None,
              help="Leave files already at the destination with the same size and checksum.")
@click.option("--mail-type", "mail_type", default=None,
              help="Mail on BEGIN, END, FAIL, AUTH, ALL or NONE (comma list, as sbatch).")
@click.option("--mail-user", "mail_user", default=None, help="Where mail goes [default: you].")
@click.option("--move", is_flag=True, help="Remove each source once its copy is verified and in place.")
@click.option("--from-file", "from_file", type=click.Path(exists=True, dir_okay=False),
              help="Copyjob file: one 'SRC DST' pair per line (instead of SRC... DST).")
@click.option("-S", "--socket", "socket", default="", metavar="PATH",
              help="Control socket for the remote host [default: your newest live one "
                   "from `hpcmove socket open`].")
@click.option("--streams", type=click.IntRange(min=1, max=16), default=None,
              help="Concurrent slice streams per task to or from a remote host "
                   "(the local backend runs such a job as one task of all its tasks' "
                   "streams) [default: 3].")
@click.option("--ssh-sessions", "ssh_sessions", type=click.IntRange(min=1, max=1024),
              default=None, help="Sessions at once through the control socket, for all "
                                 "tasks and jobs on its node: the remote sshd's MaxSessions "
                                 "[default: 10, OpenSSH's].")
@click.option("--dry-run", is_flag=True, help="Print the plan and the batch scripts; submit nothing.")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the job to end; exit 0 only if Done.")
@click.option("--then", "then", type=click.Path(exists=True, dir_okay=False), default=None,
              metavar="SCRIPT", help="Submit SCRIPT (sbatch) to start only once the job is "
                                     "Done; --parsable still prints the transfer's final id.")
def submit(paths, dependency, parsable, move, from_file, dry_run, wait_, then, socket, streams,
           ssh_sessions, **flags):
    """Copy SRC... to DST through the batch system and print the job id at once.

    Defaults come from the site policy and your config (see `hpcmove policy show`);
    flags and HPCMOVE_* variables override them within the site's limits.

    \b
    Examples:
      hpcmove submit /scratch/run42 /archive/projects/
      hpcmove submit /scratch/run42 alice@archive.example:/store/   # after `socket open`
      sbatch --dependency=afterok:$(hpcmove submit --parsable in/ /scratch/in) compute.sh
      hpcmove submit -p dtn --then next.sh "$SCRATCH/out/" /project/run42/  # in a job
    """
    if from_file and paths:
        raise click.UsageError("give either SRC... DST or --from-file, not both")
    if not from_file and len(paths) < 2:
        raise click.UsageError("need at least one SRC and a DST")
    eff = _run(effective_settings, flags)
    _run(notify.parse_mail_types, eff["mail_type"])  # a typo is an error now, not at the end
    for note in eff.notes:
        click.echo(f"note: {note}", err=True)
    options = _run(jobs.SubmitOptions.from_policy, eff, dependency=dependency, move=move,
                   then=then or "")
    options.socket, options.streams = socket, streams or options.streams
    options.ssh_sessions = ssh_sessions or options.ssh_sessions
    pairs = _run(jobs.read_copyjob, from_file) if from_file else None
    sources, dest = (paths[:-1], paths[-1]) if paths else ((), None)
    sub = _run(jobs.submit, sources, dest, options, pairs=pairs, dry_run=dry_run, site=eff.site)
    for warning in sub.plan.warnings:
        click.echo(f"warning: {warning}", err=True)
    if dry_run:
        _print_dry_run(sub)
        return
    job = sub.job
    if parsable:
        click.echo(job.final_id if job.backend != "local" else job.label)
    else:
        click.echo(f"Submitted {job.label}: {len(sub.plan.entries)} entries, "
                   f"{human(job.bytes_total)} in {job.n_tasks} tasks "
                   f"({job.backend} transfer {job.array_id or '-'}, final {job.final_id})"
                   + (f"; then {then} as {jobs.then_id(job)}" if then else ""))
    if wait_:
        job = _run(jobs.wait, job)
        if job.state != states.DONE:  # say why, e.g. in a burst-buffer stage-in's reason
            click.echo(f"{job.label} {job.state}: {job.reason}", err=True)
        sys.exit(0 if job.state == states.DONE else 1)


@cli.group("policy")
def policy_():
    """Site policy and your settings: what applies, and where each value came from."""


@policy_.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def policy_show(as_json):
    """Print the effective settings and the source of each value."""
    eff = _run(effective_settings, {})
    site = eff.site
    data = {"policy_file": site.path or None, "settings": eff.as_dict(), "limits": site.limits,
            "allowed_roots": site.allowed_roots, "allowed_hosts": site.allowed_hosts,
            "size_table": [{"min_size": m, "slice_size": s, "stripe_width": w}
                           for m, s, w in site.size_table],
            "template_dirs": list(_run(jobs.template_dirs, site)),
            "locked_templates": site.locked_templates, "notes": eff.notes,
            "sockets": _socket_policy(site)}
    if as_json:
        click.echo(json.dumps(data, indent=1))
        return
    click.echo(f"policy file: {site.path or '(none: ' + policy.policy_path() + ' not found)'}")
    for k, v in eff.values.items():
        lock = "  [locked]" if k in site.locked else ""
        click.echo(f"{k:22} {v.value!r:28} {v.source}{lock}")
    for k, v in site.limits.items():
        click.echo(f"limit {k:16} {v!r}")
    if site.allowed_roots:
        click.echo(f"allowed roots: {', '.join(site.allowed_roots)}")
    if site.allowed_hosts:
        click.echo(f"allowed hosts: {', '.join(site.allowed_hosts)}")
    sockets = _socket_policy(site)
    cap = sockets["max_ttl"] and f", at most {sockets['max_ttl'] // 60} min"
    click.echo(f"control sockets: --ttl {sockets['ttl']}{cap or ''}, "
               f"--connections {sockets['connections']}")


def _socket_policy(site):
    """What `socket open` and `auth` take by default under the site policy."""
    return {"ttl": site.socket_ttl or ssh.DEFAULT_TTL, "max_ttl": site.max_socket_ttl,
            "connections": site.socket_connections or 1}


@policy_.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--partitions/--no-partitions", default=True,
              help="Also ask Slurm whether the partitions named exist.")
def policy_check(path, partitions):
    """Validate a policy file: unknown keys, wrong types, unreachable partitions."""
    site = _run(lambda: policy.parse_site(policy._read_toml(path), path))
    if partitions:
        for key in ("partition", "finalize_partition"):
            name = site.defaults.get(key)
            if name:
                _run(jobs.check_partition, name, f"{path}: defaults.{key}")
    click.echo(f"{path}: ok")


def _print_dry_run(sub):
    p = sub.plan
    click.echo(f"plan: {len(p.entries)} entries, {human(p.bytes_total)}, "
               f"{len(p.slices)} slices in {p.n_tasks} tasks")
    for task in range(p.n_tasks):
        items = p.task_slices(task)
        click.echo(f"  task {task}: {len(items)} slices, {human(sum(s.length for s in items))}")
    for name, text in sub.scripts.items():
        click.echo(f"--- {name}")
        click.echo(text, nl=False)


def _line(s):
    ids = " -> ".join(x["id"] for x in s["slurm_job_ids"]) or "-"
    reason = f"  {s['reason']}" if s["reason"] else ""
    return (f"{s['id']}\t{s['state']}\t{human(s['bytes_done'])}/{human(s['bytes_total'])}"
            f"\t[{ids}]{reason}")


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with every file.")
@click.option("--summary", is_flag=True, help="Entries and bytes per file state.")
@click.option("--files", "files_", is_flag=True,
              help="One line per file: state, size, src -> dst, reason.")
def status(job_id, as_json, summary, files_):
    """Show a job's state. JOB is hm-N or the final batch id from --parsable."""
    _run(_connect)
    job = _run(jobs.find, job_id)
    job = _run(jobs.refresh, [job])[0]
    if as_json:
        click.echo(json.dumps(jobs.status_dict(job), indent=1))
    elif summary or files_:
        for line in (progress.summary_lines(job) if summary else progress.file_lines(job)):
            click.echo(line)
    else:
        click.echo(_line(jobs.summary(job)))


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of job summaries.")
def list_(as_json):
    """List your jobs, newest last."""
    if not _run(_connect, missing_ok=True):
        click.echo("[]" if as_json else "", nl=as_json)
        return
    found = _run(jobs.refresh, list(db.Job.select().order_by(db.Job.id)))
    summaries = [jobs.summary(j) for j in found]
    if as_json:
        click.echo(json.dumps(summaries, indent=1))
    else:
        for s in summaries:
            click.echo(_line(s))


@cli.command()
@click.argument("job_id", metavar="JOB")
def cancel(job_id):
    """Cancel a job: stop its batch jobs, remove its spool data. Placed files stay."""
    _run(_connect)
    job = _run(jobs.find, job_id)
    spool_left = job.state == states.CANCELLED and "remote spool" in job.reason
    if job.state in states.JOB_TERMINAL and not spool_left:
        raise click.ClickException(f"{job.label} already ended {job.state}; nothing to cancel")
    job = _run(jobs.cancel, job)
    if not spool_left:
        notify.job_ended(job)
    click.echo(f"{job.label} {job.state}" + (f": {job.reason}" if job.reason else ""))


@cli.command()
@click.argument("job_id", metavar="JOB")
def pause(job_id):
    """Pause a job: hold its queued tasks; running ones stop after their slice.

    The final batch id does not change: jobs chained on it keep waiting. Resume with
    `hpcmove resume JOB`.
    """
    _run(_connect)
    job = _run(jobs.pause, _run(jobs.find, job_id))
    click.echo(f"{job.label} {job.state}: {job.reason}")


@cli.command()
@click.argument("job_id", metavar="JOB")
def resume(job_id):
    """Resume a paused job from where its slices stopped."""
    _run(_connect)
    job = _run(jobs.resume, _run(jobs.find, job_id))
    click.echo(f"{job.label} {job.state}")


@cli.command()
@click.argument("job_id", metavar="JOB")
def retry(job_id):
    """Resubmit a job on Hold: only the slices not yet Done, as a new chain.

    Fix what held it first (see `hpcmove status JOB --json`, the files' reasons). The
    job keeps its id; `status` shows the new final batch id, the history is kept.
    """
    _run(_connect)
    job = _run(jobs.find, job_id)
    job, _scripts = _run(jobs.retry, job)
    click.echo(f"{job.label} resubmitted: final {job.final_id}")


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
@click.option("--progress", "show_progress", is_flag=True,
              help="Show live progress on stderr (a bar on a terminal, lines otherwise).")
def wait(job_id, timeout, show_progress):
    """Block until JOB ends (or is on Hold); exit 0 only when it is Done."""
    _run(_connect)
    job = _run(jobs.find, job_id)
    if show_progress:
        job = _run(progress.watch, job.id, sys.stderr, sys.stderr.isatty(), timeout=timeout)
    else:
        job = _run(jobs.wait, job, timeout)
    click.echo(_line(jobs.summary(job)))
    sys.exit(0 if job.state == states.DONE else 1)


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins_(as_json):
    """List the installed backends and transfer engines, and whether each loads."""
    rows = []
    for kind in ("backend", "engine"):
        for name, ok, why in plugins.status(kind):
            # a plugin that loads may still be unusable here, and say why (pyslurm)
            probe = getattr(plugins.load(kind, name), "unavailable", None) if ok else None
            why = (probe() if probe else "") or why
            rows.append({"kind": kind, "name": name, "available": ok and not why,
                         "reason": why})
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        click.echo(f"{r['kind']}\t{r['name']}\t{'ok' if r['available'] else 'unavailable'}"
                   f"\t{r['reason']}".rstrip())


@cli.group("db")
def db_():
    """The job database: set up and upgrade a site's shared PostgreSQL database."""


@db_.command("setup-site")
@click.argument("url", required=False)
def db_setup_site(url):
    """Create or upgrade the shared schema and its row-level security (site admin).

    Run as the role that owns the tables, e.g. `sudo -u postgres hpcmove db setup-site
    'postgresql:///hpcmove?host=/run/postgresql'`. Give users login roles named as their
    OS users, members of hpcmove_user; operators, members of hpcmove_admin.
    """
    from . import sitedb
    version = _run(sitedb.setup_site, url or db.default_url())
    click.echo(f"schema {version}, row-level security on")


@db_.command("upgrade")
@click.argument("url", required=False)
def db_upgrade(url):
    """Apply the numbered migrations a database lacks (SQLite or PostgreSQL)."""
    _run(db.connect_admin, url or db.default_url())
    start, end = _run(db.upgrade, db.proxy.obj)
    click.echo(f"schema {start} -> {end}" if start != end else f"schema {end}: up to date")


cli_ops.register(cli)
cli_ssh.register(cli)


def main():
    cli(complete_var=cli_ops.COMPLETE_VAR)
