"""Operator and user commands: log, report, watch, metrics, completion. A thin click layer
like cli.py; `register(group)` adds them to a group (cli.py's `cli`), so this module never
imports cli.py and no import cycle can arise."""
import json
import os
import sys

import click
from click.shell_completion import get_completion_class

from . import db, jobs, metrics, progress, report, states
from .errors import HpcmoveError


def _run(fn, *args, **kwargs):
    """Library errors become click errors here, as in cli._run; so do file errors (a
    job directory removed by hand, an unwritable logs folder), which these commands meet."""
    try:
        return fn(*args, **kwargs)
    except HpcmoveError as e:
        raise click.ClickException(str(e)) from e
    except OSError as e:
        raise click.ClickException(f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")) from e


def _job(job_id):
    _run(db.connect)
    return _run(jobs.find, job_id)


@click.command("log", short_help="Print the batch output of JOB's tasks.")
@click.argument("job_id", metavar="JOB")
def log(job_id):
    """Print the batch output of JOB: transfer tasks, feeders, then finalize.

    Each file (<jobdir>/logs/*.out) follows a '==> NAME <==' header, in the order the
    batch jobs were submitted.

    \b
    Example:
      hpcmove log hm-7 | less
    """
    job = _job(job_id)
    found = False
    for chunk in report.harvest(job):
        click.echo(chunk, nl=False)  # bytes: logs may hold any byte sequence
        found = True
    if not found:
        click.echo(f"{job.label}: no batch output yet ({job.state})", err=True)


@click.command("report")
@click.argument("job_id", metavar="JOB")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def report_(job_id, as_json):
    """Print the report of JOB: totals, rate, and every file that failed.

    An ended job's report is kept in <jobdir>/logs/report.txt and report.json (written
    here if missing); a running job gets a live one that is not saved.

    \b
    Examples:
      hpcmove report hm-7
      hpcmove report --json hm-7 | jq '.files[] | select(.state == "Failed")'
    """
    job = _run(jobs.refresh, [_job(job_id)])[0]
    if job.state not in states.JOB_TERMINAL:  # a live report, not saved
        data = _run(report.build, job)
        click.echo(json.dumps(data) if as_json else report.text(report.head_of(data)),
                   nl=as_json)
        return
    if not report.saved(job):
        _run(report.write_report, job)
    if not as_json:
        click.echo(report.read_text(job), nl=False)
        return
    for chunk in report.json_chunks(job):  # as written: a million files need not be
        click.echo(chunk, nl=False)         # held in memory


@click.command("watch", short_help="Show JOB's progress until it ends.")
@click.argument("job_id", metavar="JOB")
@click.option("--plain", is_flag=True,
              help="One line per update even on a terminal (as in batch logs).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between database polls.")
@click.option("--every", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Plain output: at most one line per this many seconds.")
@click.option("--timeout", type=float, default=None, help="Give up after this many seconds.")
def watch(job_id, plain, interval, every, timeout):
    """Show JOB's progress until it ends or is on Hold; exit 0 only when it is Done.

    On a terminal: a live bar with bytes and entries done, rate, ETA and entries per
    state. Otherwise (or with --plain): a time-stamped line per update.

    \b
    Examples:
      hpcmove watch hm-7
      hpcmove watch --plain --every 60 hm-7 >> transfer.log
    """
    job = _job(job_id)
    tty = not plain and sys.stdout.isatty()
    job = _run(progress.watch, job.id, sys.stdout, tty, interval=interval, every=every,
               timeout=timeout)
    sys.exit(0 if job.state == states.DONE else 1)


@click.command("metrics", short_help="Print Prometheus metrics of the job database.")
def metrics_():
    """Print Prometheus metrics of the job database (text exposition format).

    Jobs by state, bytes moved, bytes and copy seconds per data-transfer node, and
    failures by reason class. For node_exporter's textfile collector, write a temporary
    file in the same directory and rename it, so the collector never reads half a file
    (e.g. from cron every minute):

    \b
    Example:
      hpcmove metrics > /var/lib/node_exporter/textfile/hpcmove.prom.$$ \\
        && mv /var/lib/node_exporter/textfile/hpcmove.prom.$$ \\
              /var/lib/node_exporter/textfile/hpcmove.prom
    """
    _run(db.connect)
    click.echo(_run(metrics.prometheus_text), nl=False)


# The variable click's completion reads: the same however hpcmove was started (the
# `hpcmove` script, `python -m hpcmove`), see cli.main.
COMPLETE_VAR = "_HPCMOVE_COMPLETE"
SHELLS = ("bash", "zsh", "fish")


@click.command("completion", short_help="Print the shell completion script.")
@click.argument("shell", required=False, type=click.Choice(SHELLS))
def completion(shell):
    """Print the script that makes SHELL complete hpcmove's commands and options.

    SHELL is bash, zsh or fish; without it, the one $SHELL names (bash if another).
    Bash needs version 4.4 or later. The same script comes from
    `_HPCMOVE_COMPLETE=bash_source hpcmove` (zsh_source, fish_source).

    \b
    Examples:
      eval "$(hpcmove completion bash)"      # in ~/.bashrc
      eval "$(hpcmove completion zsh)"       # in ~/.zshrc
      hpcmove completion fish > ~/.config/fish/completions/hpcmove.fish
    """
    if shell is None:
        name = os.path.basename(os.environ.get("SHELL", ""))
        shell = name if name in SHELLS else "bash"
    root = click.get_current_context().find_root().command
    script = get_completion_class(shell)(root, {}, "hpcmove", COMPLETE_VAR).source()
    click.echo(script, nl=not script.endswith("\n"))


COMMANDS = (log, report_, watch, metrics_, completion)


def register(group):
    """Add every command of this module to `group` (cli.py: `cli_ops.register(cli)`)."""
    for command in COMMANDS:
        group.add_command(command)
    return group
