"""The control-socket helper: SSH ControlMaster sockets that batch jobs reuse, so no one
has to type a passphrase on a data-transfer node.

`hpcmove socket open HOST` runs `ssh -M` once, interactively (your agent or your
passphrase), on the node where the transfer tasks will run. The master stays up for
--ttl (ControlPersist) and every transfer session is multiplexed over its one
authenticated connection. hpcmove records where the socket is and until when; it never
sees or stores a key, passphrase or password.

The trade-off (as the ffv FAQ puts it): while the socket lives, anything running as you
on that node can reach HOST as you without a credential. So sockets live in a directory
only you can enter (0700, on the node's local /run or /tmp, never a shared file
system), each socket is 0600, the default lifetime is short, and `hpcmove socket close`
ends it at once.
"""
import functools
import getpass
import glob
import hashlib
import os
import re
import socket as socketlib
import stat
import subprocess
import time

from . import db, policy, remote
from .errors import UsageError
from .units import parse_lifetime

DEFAULT_TTL = "1h"  # short: a live socket opens the host without a credential
# AES-GCM runs on the CPU's AES instructions: on the order of twice chacha20's rate on
# one core, and a control master's single connection is one core's worth of cipher.
CIPHERS = "^aes128-gcm@openssh.com,aes256-gcm@openssh.com"


class SocketError(UsageError):
    """A control socket is missing, dead, or not safe to use."""


def socket_dir(env=os.environ):
    """The user's socket directory, node-local: $HPCMOVE_SOCKET_DIR, else
    $XDG_RUNTIME_DIR/hpcmove, else /tmp/hpcmove-<uid>. Created 0700; refused when it
    is not ours or others can enter it."""
    path = env.get("HPCMOVE_SOCKET_DIR") or (
        os.path.join(env["XDG_RUNTIME_DIR"], "hpcmove") if env.get("XDG_RUNTIME_DIR")
        else f"/tmp/hpcmove-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    check_private_dir(path)
    return path


def check_private_dir(path):
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise SocketError(f"socket directory {path} is not a directory owned by you: refused")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise SocketError(f"socket directory {path} is open to others "
                          f"(mode {stat.S_IMODE(st.st_mode):04o}; must be 0700): refused")


def check_socket(path):
    """A socket that is ours, 0600 or tighter, in a private directory; else SocketError."""
    path = os.fsdecode(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise SocketError(f"no control socket at {path}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketError(f"{path} is not a socket: refused")
    if st.st_uid != os.getuid():
        raise SocketError(f"control socket {path} is owned by uid {st.st_uid}, not you "
                          f"({os.getuid()}): refused")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise SocketError(f"control socket {path} is open to others "
                          f"(mode {stat.S_IMODE(st.st_mode):04o}): refused")
    check_private_dir(os.path.dirname(path) or ".")
    return path


# A Unix socket's path holds 107 bytes, and ssh first binds a temporary name 17 bytes
# longer than the socket's; a further connection's socket adds ".N".
MAX_PATH = 107 - 17 - 2
MAX_CONNECTIONS = 9


def connection_paths(path, count=MAX_CONNECTIONS):
    """The sockets of a socket's connections: PATH, then PATH.2 ... PATH.count. Each is a
    master of its own: streams spread over them get a cipher process each at both ends
    (one connection's streams share one)."""
    return [path] + [f"{path}.{k}" for k in range(2, count + 1)]


def further_connections(path):
    """The further connections of the socket at `path` that exist now (not checked)."""
    return [p for p in connection_paths(os.fsdecode(path))[1:] if os.path.exists(p)]


def socket_path(host, directory):
    """Short and distinct per host; SocketError when the directory leaves no room."""
    digest = hashlib.sha256(host.encode()).hexdigest()[:10]
    safe = "".join(c if c.isalnum() or c in ".-_@" else "_" for c in host)[:24]
    path = os.path.join(directory, f"{safe}-{digest}.sock")
    if len(os.fsencode(path)) > MAX_PATH:
        raise SocketError(f"socket path {path} is too long for a Unix socket "
                          f"({len(os.fsencode(path))} bytes, at most {MAX_PATH}): set "
                          "HPCMOVE_SOCKET_DIR to a shorter directory")
    return path


alive = remote.master_alive


def this_node():
    return os.environ.get("SLURMD_NODENAME") or socketlib.gethostname()


@functools.lru_cache(maxsize=None)
def _slurm_host(node):
    """Slurm's NodeHostName for NODE ('' when Slurm does not know it): the machine."""
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("NodeHostName", "")


@functools.lru_cache(maxsize=None)
def _my_names():
    """This machine's names (getfqdn may ask the resolver: once per process)."""
    name = socketlib.gethostname()
    return {name, name.split(".")[0], socketlib.getfqdn(), "localhost"}


def is_here(node):
    """True when NODE (a Slurm node name or a host name) is this machine."""
    if not node or node == this_node():
        return True
    return (_slurm_host(node) or node) in _my_names()


def hop(node):
    """The machine to reach over ssh for a socket kept on NODE ('' when that is this
    one). Sockets are node-local: a login node talks through the node's own ssh, as
    `socket open --on` does, by Slurm's host name for the node when Slurm has one."""
    if is_here(node):
        return ""
    return _slurm_host(node) or node


parse_ttl = parse_lifetime


def cipher_options(chosen, builtin, cpu_has_aes):
    """`-o Ciphers=...` putting AES-GCM first, or nothing: only on a CPU with AES
    instructions (elsewhere chacha20, ssh's first choice, is faster), and only when the
    ciphers ssh would offer for the host (`chosen`, from `ssh -G` with the user's options
    and config) are ssh's built-in list: a user's or site's own choice stands."""
    if not cpu_has_aes or not chosen or chosen != builtin:
        return []
    return ["-o", f"Ciphers={CIPHERS}"]


def _ciphers(argv):
    """The `ciphers` line of `ssh -G` for these options and host ('' if ssh will not
    say)."""
    try:
        out = subprocess.run(["ssh", "-G", *argv], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    found = re.search(r"^ciphers (\S+)$", out, re.M)
    return found.group(1) if found else ""


def _cpu_has_aes():
    try:
        with open("/proc/cpuinfo") as f:
            return bool(re.search(r"^(flags|Features)\s*:.*\baes\b", f.read(), re.M))
    except OSError:
        return False


def preferred_ciphers(host, extra_options=()):
    """cipher_options for `host` with these options, as ssh -G and this CPU say."""
    return cipher_options(_ciphers([*extra_options, "--", host]),
                          _ciphers(["-F", "/dev/null", "--", "x"]), _cpu_has_aes())


def master_argv(path, host, seconds, extra_options=(), prefer=None):
    """ssh's words for a control master: the user's options first (ssh keeps the first
    value it is given for an option), then hpcmove's defaults (`prefer`: the cipher
    option, asked of ssh when not given)."""
    if prefer is None:
        prefer = preferred_ciphers(host, extra_options)
    return ["ssh", "-M", "-S", path, *extra_options, "-o", f"ControlPersist={seconds}",
            *prefer, "-o", "Compression=no", "-o", "ServerAliveInterval=30", "-f", "-N",
            "--", host]


# Ends a master at its TTL, however busy: ssh's ControlPersist only counts idle time, so
# a socket that transfers keep using would outlive the lifetime its owner chose. Wakes
# every 30 s, leaves once the master is gone, and ends only the process that
# `ssh -O check` named when the socket was opened (and only while it is still an ssh).
_WATCH = r"""
pid=$1 path=$2 host=$3 until=$4
while kill -0 "$pid" 2>/dev/null; do
    now=$(date +%s)
    if [ "$now" -ge "$until" ]; then
        case $(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null) in
            ssh*) ;;
            *) exit 0 ;;
        esac
        ssh -S "$path" -O exit -- "$host" >/dev/null 2>&1
        sleep 2
        kill -0 "$pid" 2>/dev/null && kill "$pid"
        exit 0
    fi
    left=$((until - now))
    sleep $((left < 30 ? left : 30))
done
"""


def master_pid(path, host):
    """The pid `ssh -O check` names for the master behind `path` (None if none)."""
    done = subprocess.run(["ssh", "-S", path, "-O", "check", "--", host],
                          capture_output=True, text=True)
    found = re.search(r"\(pid=(\d+)\)", done.stderr + done.stdout)
    return int(found.group(1)) if found else None


def watch_ttl(path, host, until):
    """Start the detached watcher that ends the master behind `path` at `until`."""
    pid = master_pid(path, host)
    if pid is None:
        return
    subprocess.Popen(["sh", "-c", _WATCH, "hpcmove-socket-ttl", str(pid), path, host,
                      str(int(until))], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)


def _start_master(path, host, seconds, extra_options, prefer, run):
    """One master at `path` (interactive), ended at the TTL by its watcher."""
    if os.path.lexists(path):
        os.unlink(path)  # a stale socket left by a master that died
    old = os.umask(0o077)
    try:
        done = run(master_argv(path, host, seconds, extra_options, prefer))
    finally:
        os.umask(old)
    if done.returncode != 0 or not os.path.exists(path):
        raise SocketError(f"ssh could not open a control master for {host} "
                          f"(exit {done.returncode})")
    check_socket(path)
    watch_ttl(path, host, time.time() + seconds)


def settings(site, host, ttl=None, connections=None):
    """(TTL in seconds, connections) for a socket to `host` under the site policy: the
    user's choice, else the site's [remote] socket_ttl and connections, else hpcmove's;
    a host outside remote.allowed_hosts or a TTL above remote.max_socket_ttl is
    refused (a live socket opens the host to anything running as the user there)."""
    if not remote.valid_host(host):
        raise UsageError(f"not [user@]host: {host!r}")
    policy.check_host(site, host.rpartition("@")[2])
    seconds = parse_ttl(ttl or site.socket_ttl or DEFAULT_TTL)
    if seconds <= 0:
        raise UsageError("--ttl must be positive")
    if site.max_socket_ttl and seconds > site.max_socket_ttl:
        raise policy.PolicyError(
            f"a socket may live at most {site.max_socket_ttl // 60} min at this site "
            f"(remote.max_socket_ttl in {site.path}); asked for {seconds // 60} min")
    connections = connections or site.socket_connections or 1
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise UsageError(f"--connections must be 1 to {MAX_CONNECTIONS}")
    return seconds, connections


def open_socket(host, ttl=None, node="", extra_options=(), run=subprocess.run,
                connections=None, site=None):
    """Start ControlMasters for `host` here (interactive: agent or passphrase, once per
    connection) and record the socket; TTL and connections as `settings` says. Returns
    the db.ControlSocket row."""
    seconds, connections = settings(policy.load_site() if site is None else site, host,
                                    ttl, connections)
    path = socket_path(host, socket_dir())
    if os.path.lexists(path) and alive(path, host):
        check_socket(path)
        raise SocketError(f"a control socket for {host} is already open at {path}; "
                          f"`hpcmove socket close {host}` first")
    _end_masters(host, further_connections(path))  # left by an earlier socket at this path
    prefer = preferred_ciphers(host, extra_options)
    for each in connection_paths(path, connections):
        try:
            _start_master(each, host, seconds, extra_options, prefer, run)
        except SocketError:
            _end_masters(host, connection_paths(path, connections))
            raise
    now = time.time()
    db.ControlSocket.update(closed=True).where(
        db.ControlSocket.owner == getpass.getuser(), db.ControlSocket.path == os.fsencode(path),
        db.ControlSocket.closed == False).execute()  # noqa: E712 (peewee expression)
    # '' = the host it was opened on, outside any batch system (no pinning)
    node = node or os.environ.get("SLURMD_NODENAME", "")
    return db.ControlSocket.create(owner=getpass.getuser(), host=host, node=node,
                                   path=os.fsencode(path), opened=now, expires=now + seconds)


def sockets(include_closed=False):
    query = db.ControlSocket.select().where(db.ControlSocket.owner == getpass.getuser())
    if not include_closed:
        query = query.where(db.ControlSocket.closed == False)  # noqa: E712
    return list(query.order_by(db.ControlSocket.id))


def describe(row, check=True):
    """A dict for `socket list` (--json fields are these)."""
    now = time.time()
    try:
        live = bool(check and not row.closed and row.expires > now and answers(row))
        state = "closed" if row.closed else ("live" if live else "gone")
    except remote.Unreachable:
        state = "unreachable"  # its node cannot be asked from here
    # further connections are seen where the socket is kept (1 when that is elsewhere)
    more = [] if hop(row.node) or state != "live" else further_connections(row.path)
    return {"id": row.id, "host": row.host, "node": row.node, "path": os.fsdecode(row.path),
            "opened": row.opened, "expires": row.expires,
            "seconds_left": max(0, int(row.expires - now)), "state": state,
            "connections": 1 + len(more)}


def find(ident):
    """A socket row by id or host (the newest open one)."""
    rows = [r for r in sockets() if str(r.id) == str(ident) or r.host == ident]
    if not rows:
        raise SocketError(f"no open control socket for {ident}; `hpcmove socket open {ident}`")
    return rows[-1]


def answers(row):
    """The recorded socket's master answers (asked on its node when that is another
    machine: a login node cannot see a DTN's sockets)."""
    via = hop(row.node)
    if via:
        return alive(row.path, row.host, via)
    return os.path.exists(row.path) and alive(row.path, row.host)


def _end_masters(host, paths, via=""):
    """`ssh -O exit` the masters behind `paths` (on `via`: each that exists there), and
    remove what is left here: the socket files and their session slots (remote.Slots)."""
    if via:
        script = 'h=$1; shift; for s; do [ -e "$s" ] && ssh -S "$s" -O exit -- "$h"; done'
        subprocess.run(remote.through(via, ["sh", "-c", script, "sh", host, *paths]),
                       capture_output=True)
        return
    for path in paths:
        if os.path.exists(path):
            subprocess.run(["ssh", "-S", path, "-O", "exit", "--", host], capture_output=True)
        for left in glob.glob(glob.escape(path) + ".slot[0-9]*") + (
                [path] if os.path.lexists(path) else []):
            os.unlink(left)


def close_socket(row):
    _end_masters(row.host, connection_paths(os.fsdecode(row.path)), hop(row.node))
    db.ControlSocket.update(closed=True).where(db.ControlSocket.id == row.id).execute()


def choose(host, explicit=""):
    """(socket path, node) for a transfer to `host`: the one named with -S, or the newest
    live socket recorded for the host. The socket must be ours and private."""
    if explicit:
        path = check_socket(os.path.abspath(explicit))
        if not alive(path, host):
            raise SocketError(f"control socket {path} does not answer for {host}")
        row = db.ControlSocket.get_or_none(db.ControlSocket.path == os.fsencode(path),
                                           db.ControlSocket.closed == False)  # noqa: E712
        return path, (row.node if row else "")
    unreachable = []
    for row in reversed(sockets()):
        if row.host != host or row.expires <= time.time():
            continue
        try:
            if not answers(row):
                continue
        except remote.Unreachable as e:
            unreachable.append(str(e))
            continue
        # one kept on another node was checked there, by `socket open`
        return (os.fsdecode(row.path) if hop(row.node) else check_socket(row.path)), row.node
    if unreachable:
        raise SocketError(f"no control socket for {host} that can be used from here: "
                          f"{unreachable[0]}")
    raise SocketError(f"no live control socket for {host}: run `hpcmove socket open {host}` "
                      "(on the data-transfer node, with --on NODE) first, then submit")
