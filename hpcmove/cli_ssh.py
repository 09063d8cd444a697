"""Remote-host commands: `hpcmove socket open|list|check|close` and `hpcmove auth JOB`.
A thin click layer over hpcmove.ssh and hpcmove.jobs, registered by cli.py."""
import json
import os
import shlex
import subprocess
import sys
import time

import click

from . import db, jobs, policy, remote, ssh
from .errors import HpcmoveError


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except HpcmoveError as e:
        raise click.ClickException(str(e)) from e


@click.group("socket", short_help="SSH control sockets that batch jobs reuse.")
def socket_():
    """SSH control sockets (ControlMaster) for remote transfers.

    Open one on the data-transfer node before submitting to or from a remote host: you
    authenticate once (agent or passphrase), and the batch tasks reuse the connection
    without any credential. hpcmove never stores a key, passphrase or password. While
    the socket lives, anything running as you on that node can reach the host as you:
    keep --ttl short and close it when done.

    \b
    Examples:
      hpcmove socket open --on dtn1 --ttl 2h alice@archive.example
      hpcmove socket list --json
      hpcmove socket close archive.example
    """


@socket_.command("open")
@click.argument("host", metavar="[USER@]HOST")
@click.option("--on", "node", default="", metavar="NODE",
              help="The node the transfer tasks run on (a DTN); their tasks are pinned to it.")
@click.option("--ttl", default=None, help="How long the socket lives, e.g. 30m, 8h "
              f"[default: the site's remote.socket_ttl, else {ssh.DEFAULT_TTL}; at most "
              "its remote.max_socket_ttl].")
@click.option("-o", "ssh_options", multiple=True, metavar="OPTION",
              help="Further ssh option for the master, e.g. -o Port=2222.")
@click.option("--connections", type=click.IntRange(1, ssh.MAX_CONNECTIONS), default=None,
              help="SSH connections (masters) the transfer streams spread over: each has "
              "a cipher process of its own at both ends. Each asks for authentication "
              "once [default: the site's remote.connections, else 1].")
@click.option("--here", is_flag=True, hidden=True,
              help="Run on this machine as NODE (set when re-run there over ssh).")
def socket_open(host, node, ttl, ssh_options, connections, here):
    """Open a control socket for HOST (your agent, or your passphrase).

    \b
    Examples:
      hpcmove socket open archive.example
      hpcmove socket open --on dtn1 --ttl 30m alice@archive.example
      hpcmove socket open --connections 2 archive.example
    """
    if node.startswith("-"):
        raise click.BadParameter(f"{node!r} is not a node name", param_hint="--on")
    if not remote.valid_host(host):  # ssh would read `-oProxyCommand=...` as an option
        raise click.BadParameter(f"{host!r} is not [user@]host", param_hint="[USER@]HOST")
    site = _run(policy.load_site)
    ttl, connections = _run(ssh.settings, site, host, ttl, connections)
    if not here and not ssh.is_here(node):  # the node checks the policy there too
        sys.exit(_open_on(node, host, f"{ttl}s", ssh_options, connections))
    db.connect()
    extra = [x for o in ssh_options for x in ("-o", o)]
    row = _run(ssh.open_socket, host, ttl=f"{ttl}s", node=node, extra_options=extra,
               connections=connections, site=site)
    more = f", {connections} connections" if connections > 1 else ""
    click.echo(f"socket {row.id} for {host} on {row.node}: {os.fsdecode(row.path)} "
               f"(until {time.strftime('%Y-%m-%d %H:%M', time.localtime(row.expires))}{more})")


def _open_on(node, host, ttl, ssh_options, connections=1):
    """Run `socket open` on NODE over ssh, with a terminal for a passphrase prompt. The
    same interpreter (installs are shared between a site's nodes; a non-interactive
    shell there may not have hpcmove on its PATH) and the same database and socket
    directory settings, so the socket is recorded where `submit` looks; `--here` stops
    the far side from hopping again when its name for itself differs."""
    carried = [f"{k}={os.environ[k]}" for k in ("HPCMOVE_DB", "HPCMOVE_HOME",
                                                "HPCMOVE_SOCKET_DIR") if os.environ.get(k)]
    words = ["env", *carried, sys.executable, "-m", "hpcmove", "socket", "open", "--here",
             "--on", node, "--ttl", ttl, "--connections", str(connections),
             *[x for o in ssh_options for x in ("-o", o)], "--", host]
    tty = ["-t"] if sys.stdin.isatty() else []
    # ssh hands the remote shell one line: every word quoted
    return subprocess.run(["ssh", *tty, ssh.hop(node), "--", shlex.join(words)]).returncode


@socket_.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.option("--all", "show_all", is_flag=True, help="Include closed sockets.")
def socket_list(as_json, show_all):
    """Your control sockets, and whether each still answers.

    Shows host, node, time left and path of each.

    \b
    Examples:
      hpcmove socket list
      hpcmove socket list --json | jq '.[] | select(.state == "live") | .host'
    """
    db.connect()
    rows = [ssh.describe(r) for r in ssh.sockets(include_closed=show_all)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        more = f" (+{r['connections'] - 1})" if r["connections"] > 1 else ""
        click.echo(f"{r['id']:>4}  {r['state']:<6} {r['host']:<30} {r['node'] or '-':<10} "
                   f"{r['seconds_left'] // 60:>5} min  {r['path']}{more}")


@socket_.command("check")
@click.argument("ident", metavar="HOST|ID")
def socket_check(ident):
    """Exit 0 when the socket for HOST (or ID) answers, 1 when not.

    \b
    Examples:
      hpcmove socket check archive.example || hpcmove socket open archive.example
    """
    db.connect()
    row = _run(ssh.find, ident)
    state = ssh.describe(row)["state"]
    click.echo(f"{row.host}: {state} ({os.fsdecode(row.path)})")
    sys.exit(0 if state == "live" else 1)


@socket_.command("close")
@click.argument("ident", metavar="HOST|ID")
def socket_close(ident):
    """Stop the master for HOST (or socket ID) now and forget it.

    \b
    Examples:
      hpcmove socket close archive.example
    """
    db.connect()
    row = _run(ssh.find, ident)
    ssh.close_socket(row)
    click.echo(f"closed socket {row.id} for {row.host}")


@click.command("auth", short_help="Open the socket again for an AuthRequired job; resume it.")
@click.argument("job_id", metavar="JOB")
@click.option("--ttl", default=None, help="Lifetime of the socket (see socket open).")
@click.option("--connections", type=click.IntRange(1, ssh.MAX_CONNECTIONS), default=None,
              help="SSH connections of the socket (see socket open).")
def auth(job_id, ttl, connections):
    """Resume JOB, stopped in AuthRequired because its control socket went away.

    Opens the socket again (your agent or passphrase) unless a live one exists, then
    resubmits only the slices that are not Done.

    \b
    Examples:
      hpcmove auth hm-42
    """
    db.connect()
    job = _run(jobs.find, job_id)
    options = json.loads(job.options)
    far = options.get("remote")
    if not far:
        raise click.ClickException(f"{job.label} has no remote host")
    host, node = far["host"], far.get("node", "")
    try:
        path, node = ssh.choose(host)
    except ssh.SocketError:
        if ssh.is_here(node):
            row = _run(ssh.open_socket, host, ttl=ttl, node=node, connections=connections)
            path, node = os.fsdecode(row.path), row.node
        else:  # the tasks run there: the socket must live there too
            ttl, connections = _run(ssh.settings, _run(policy.load_site), host, ttl,
                                    connections)
            if _open_on(node, host, f"{ttl}s", (), connections):
                raise click.ClickException(f"could not open a socket for {host} on {node}")
            path, node = _run(ssh.choose, host)
    job = _run(jobs.auth, job, path, node)
    new = job[0] if isinstance(job, tuple) else job
    click.echo(f"{new.label}: resumed with socket {path}; final {new.final_id}")


def register(group):
    group.add_command(socket_)
    group.add_command(auth)
