"""The command line: a thin click layer over hpcmove.jobs. Library errors become
click errors here and nowhere else."""
import json
import os
import sys

import click

from . import db, jobs, plugins, states
from .errors import HpcmoveError, UsageError
from .units import human, parse_size


class Size(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        try:
            return parse_size(value)
        except UsageError as e:
            self.fail(str(e), param, ctx)


def _connect():
    db.connect()


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


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("paths", nargs=-1, type=click.Path(), metavar="SRC... DST")
@click.option("-p", "--partition", envvar="HPCMOVE_PARTITION", default="",
              help="Partition for the transfer and finalize jobs (sbatch -p).")
@click.option("-A", "--account", envvar="HPCMOVE_ACCOUNT", default="", help="Account (sbatch -A).")
@click.option("-q", "--qos", envvar="HPCMOVE_QOS", default="", help="QOS (sbatch -q).")
@click.option("-t", "--time", "time_", default="", help="Time limit per task (sbatch -t).")
@click.option("-d", "--dependency", default="",
              help="Start the transfer after these jobs, e.g. afterok:123 (sbatch -d).")
@click.option("--parsable", is_flag=True,
              help="Print only the batch id of the final job, for --dependency=afterok:ID.")
@click.option("--stripe-width", type=click.IntRange(min=1), default=None,
              help="Array tasks running at once [default: 4 on Slurm, cores locally].")
@click.option("--slice-size", type=Size(), default="256M", show_default=True,
              help="Files larger than this are cut into slices of this size.")
@click.option("--backend", type=click.Choice(["slurm", "local"]), envvar="HPCMOVE_BACKEND",
              default=None, help="Batch backend [default: slurm if sbatch answers, else local].")
@click.option("--bwlimit", type=Size(), default=None,
              help="Bandwidth limit per array task, bytes per second (e.g. 100M).")
@click.option("--move", is_flag=True, help="Remove each source once its copy is verified and in place.")
@click.option("--from-file", "from_file", type=click.Path(exists=True, dir_okay=False),
              help="Copyjob file: one 'SRC DST' pair per line (instead of SRC... DST).")
@click.option("--dry-run", is_flag=True, help="Print the plan and the batch scripts; submit nothing.")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the job to end; exit 0 only if Done.")
def submit(paths, partition, account, qos, time_, dependency, parsable, stripe_width,
           slice_size, bwlimit, backend, move, from_file, dry_run, wait_):
    """Copy SRC... to DST through the batch system and print the job id at once.

    \b
    Examples:
      hpcmove submit /scratch/run42 /archive/projects/
      sbatch --dependency=afterok:$(hpcmove submit --parsable in/ /scratch/in) compute.sh
    """
    if from_file and paths:
        raise click.UsageError("give either SRC... DST or --from-file, not both")
    if not from_file and len(paths) < 2:
        raise click.UsageError("need at least one SRC and a DST")
    options = jobs.SubmitOptions(backend=backend or "", partition=partition, account=account,
                                 qos=qos, time=time_, dependency=dependency,
                                 stripe_width=stripe_width or 0, slice_size=slice_size,
                                 bwlimit=bwlimit or 0, move=move)
    pairs = _run(jobs.read_copyjob, from_file) if from_file else None
    sources, dest = (paths[:-1], paths[-1]) if paths else ((), None)
    sub = _run(jobs.submit, sources, dest, options, pairs=pairs, dry_run=dry_run)
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
                   f"({job.backend} transfer {job.array_id or '-'}, final {job.final_id})")
    if wait_:
        job = _run(jobs.wait, job)
        sys.exit(0 if job.state == states.DONE else 1)


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
def status(job_id, as_json):
    """Show a job's state. JOB is hm-N or the final batch id from --parsable."""
    _run(_connect)
    job = _run(jobs.find, job_id)
    job = _run(jobs.refresh, [job])[0]
    if as_json:
        click.echo(json.dumps(jobs.status_dict(job), indent=1))
    else:
        click.echo(_line(jobs.summary(job)))


@cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of job summaries.")
def list_(as_json):
    """List your jobs, newest last."""
    _run(_connect)
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
    if job.state in states.JOB_TERMINAL:
        raise click.ClickException(f"{job.label} already ended {job.state}; nothing to cancel")
    job = _run(jobs.cancel, job)
    click.echo(f"{job.label} {job.state}")


@cli.command()
@click.argument("job_id", metavar="JOB")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
def wait(job_id, timeout):
    """Block until JOB ends; exit 0 only when it is Done."""
    _run(_connect)
    job = _run(jobs.find, job_id)
    job = _run(jobs.wait, job, timeout)
    click.echo(_line(jobs.summary(job)))
    sys.exit(0 if job.state == states.DONE else 1)


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins_(as_json):
    """List the installed backends and transfer engines, and whether each loads."""
    rows = [{"kind": kind, "name": name, "available": ok, "reason": why}
            for kind in ("backend", "engine") for name, ok, why in plugins.status(kind)]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        click.echo(f"{r['kind']}\t{r['name']}\t{'ok' if r['available'] else 'unavailable'}"
                   f"\t{r['reason']}".rstrip())


def main():
    cli()
