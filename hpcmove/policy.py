"""Site policy and user configuration, with the source of every value.

Layers, lowest first: built-in defaults < site policy [defaults] < user config
< HPCMOVE_* environment < command-line flags. The site's [limits] then clamp or
refuse what the layers asked for, and keys the site lists in limits.locked take
the site's value whatever a user says. Loading files is the only I/O here;
`resolve` is pure.
"""
import fnmatch
import os
import tomllib
from dataclasses import dataclass, field

from .errors import UsageError
from .units import parse_lifetime, parse_size

POLICY_PATH = "/etc/hpcmove/policy.toml"


class PolicyError(UsageError):
    """The policy file is broken, or a request breaks one of its rules."""


_size = parse_size


def _size0(v):
    return 0 if str(v).strip() in ("0", "") else parse_size(v)


def _int(v):
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError(f"expected a whole number, got {v!r}")
    return int(v)


def _str(v):
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


def _bool(v):
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("1", "true", "yes", "on"):
        return True
    if str(v).lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {v!r}")


def _choice(*options):
    def conv(v):
        if v not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {v!r}")
        return v
    return conv


@dataclass(frozen=True)
class Key:
    name: str
    convert: object
    default: object
    help: str
    cap: str = ""  # the [limits] key that caps it


KEYS = {k.name: k for k in [
    Key("backend", _choice("", "slurm", "local", "drmaa", "pyslurm"), "", "batch backend ('' = Slurm if sbatch answers)"),
    Key("partition", _str, "", "partition of the transfer array"),
    Key("finalize_partition", _str, "", "partition of the finalize job ('' = partition)"),
    Key("account", _str, "", "account for both jobs"),
    Key("qos", _str, "", "QOS for both jobs"),
    Key("time", _str, "", "time limit per task (sbatch -t)"),
    Key("stripe_width", _int, 0, "array tasks running at once (0 = 4 on Slurm, or the "
        "partition's CPUs if fewer; cores locally)",
        cap="max_stripe_width,max_running_tasks_per_user"),
    Key("slice_size", _size, 256 << 20, "files larger than this are cut into slices",
        cap="max_slice_size"),
    Key("bwlimit", _size0, 0, "bytes per second per task (0 = unlimited)", cap="max_bwlimit"),
    Key("small_file_threshold", _size0, 0, "files up to this size are never sliced (0 = off)"),
    Key("retries", _int, 3, "attempts per slice for transient I/O errors", cap="max_retries"),
    Key("retry_backoff", _int, 1, "seconds before the first retry (doubles each time)"),
    Key("checksum", _choice("xxh3_128"), "xxh3_128", "checksum algorithm"),
    Key("engine", _str, "copy", "transfer engine plugin (see `hpcmove plugins`)"),
    Key("skip_existing", _bool, False, "leave files already at the destination (same size "
        "and checksum), as rsync and FDT do"),
    Key("rate", _size, 200 << 20, "assumed bytes/s per task, to fit tasks in the time limit"),
    Key("mail_user", _str, "", "where job mail goes"),
    Key("mail_type", _str, "", "BEGIN, END, FAIL, AUTH (comma list)"),
]}

LIMIT_KEYS = {
    "max_stripe_width": _int, "max_running_tasks_per_user": _int, "max_slice_size": _size,
    "max_bwlimit": _size0, "max_bwlimit_per_user": _size0, "max_retries": _int, "on_exceed": _choice("clamp", "refuse"),
    "locked": list,
}
SECTIONS = {"defaults", "limits", "paths", "remote", "size_table", "templates"}


@dataclass
class Value:
    value: object
    source: str  # e.g. "built-in", "site /etc/hpcmove/policy.toml", "HPCMOVE_QOS", "--qos"


@dataclass
class Site:
    """The site policy file, checked."""

    path: str = ""
    defaults: dict = field(default_factory=dict)
    limits: dict = field(default_factory=dict)
    allowed_roots: list = field(default_factory=list)  # empty: no restriction
    allowed_hosts: list = field(default_factory=list)
    socket_ttl: str = ""  # `socket open`'s default lifetime ('' = hpcmove's, 1h)
    max_socket_ttl: int = 0  # seconds a control socket may live at most (0 = no cap)
    socket_connections: int = 0  # `socket open`'s default connections (0 = 1)
    size_table: list = field(default_factory=list)  # [(min_size, slice_size, stripe_width)]
    template_dir: str = "/etc/hpcmove/templates"
    locked_templates: list = field(default_factory=list)

    @property
    def locked(self):
        return set(self.limits.get("locked", []))

    @property
    def width_cap(self):
        caps = [self.limits.get(k) for k in ("max_stripe_width", "max_running_tasks_per_user")]
        return min((c for c in caps if c), default=0)


def _check_keys(table, allowed, where, path):
    for k in table:
        if k not in allowed:
            raise PolicyError(f"{path}: unknown key {where}{k} (known: {', '.join(sorted(allowed))})")


def _convert(key, value, where, path):
    try:
        return KEYS[key].convert(value)
    except (ValueError, UsageError) as e:
        raise PolicyError(f"{path}: {where}{key}: {e}") from None


def parse_site(data, path):
    """A Site from parsed TOML; every key and type checked, errors name the key."""
    _check_keys(data, SECTIONS, "", path)
    site = Site(path=path)
    defaults = data.get("defaults", {})
    _check_keys(defaults, KEYS, "defaults.", path)
    site.defaults = {k: _convert(k, v, "defaults.", path) for k, v in defaults.items()}
    limits = data.get("limits", {})
    _check_keys(limits, LIMIT_KEYS, "limits.", path)
    for k, v in limits.items():
        try:
            site.limits[k] = LIMIT_KEYS[k](v)
        except (ValueError, TypeError, UsageError) as e:
            raise PolicyError(f"{path}: limits.{k}: {e}") from None
    for k in site.limits.get("locked", []):
        if k not in KEYS:
            raise PolicyError(f"{path}: limits.locked names unknown key {k!r}")
    paths = data.get("paths", {})
    _check_keys(paths, {"allowed_roots"}, "paths.", path)
    site.allowed_roots = [os.path.realpath(_str(p)) for p in paths.get("allowed_roots", [])]
    _parse_remote(site, data.get("remote", {}), path)
    for i, row in enumerate(data.get("size_table", [])):
        _check_keys(row, {"min_size", "slice_size", "stripe_width"}, f"size_table[{i}].", path)
        try:
            site.size_table.append((_size0(row.get("min_size", 0)), parse_size(row["slice_size"]),
                                    _int(row.get("stripe_width", 0))))
        except (KeyError, ValueError, UsageError) as e:
            raise PolicyError(f"{path}: size_table[{i}]: {e}") from None
    site.size_table.sort()
    templates = data.get("templates", {})
    _check_keys(templates, {"site_dir", "locked"}, "templates.", path)
    site.template_dir = templates.get("site_dir", site.template_dir)
    site.locked_templates = list(templates.get("locked", []))
    return site


REMOTE_KEYS = {"allowed_hosts", "socket_ttl", "max_socket_ttl", "connections"}


def _parse_remote(site, remote, path):
    _check_keys(remote, REMOTE_KEYS, "remote.", path)

    def get(key, convert, default):
        try:
            return convert(remote.get(key, default))
        except (ValueError, TypeError, UsageError) as e:
            raise PolicyError(f"{path}: remote.{key}: {e}") from None

    site.allowed_hosts = get("allowed_hosts", lambda v: [_str(h) for h in v], [])
    site.socket_ttl = remote.get("socket_ttl", "")
    ttl = get("socket_ttl", _lifetime, "")
    if "socket_ttl" in remote and ttl <= 0:
        raise PolicyError(f"{path}: remote.socket_ttl must be positive")
    site.max_socket_ttl = get("max_socket_ttl", _lifetime, "")
    if site.max_socket_ttl and ttl > site.max_socket_ttl:
        raise PolicyError(f"{path}: remote.socket_ttl is above remote.max_socket_ttl")
    site.socket_connections = get("connections", _int, 0)
    if not 0 <= site.socket_connections <= 9:
        raise PolicyError(f"{path}: remote.connections must be 1 to 9")


def _lifetime(v):
    return parse_lifetime(_str(v))


def _read_toml(path):
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{path}: {e}") from None
    except OSError as e:
        raise PolicyError(f"cannot read {path}: {e.strerror}") from None


def policy_path(env=os.environ):
    return env.get("HPCMOVE_POLICY", POLICY_PATH)


def user_config_path(env=os.environ):
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return env.get("HPCMOVE_CONFIG", os.path.join(base, "hpcmove", "config.toml"))


def load_site(env=os.environ):
    path = policy_path(env)
    if not os.path.exists(path):
        return Site(path="")
    return parse_site(_read_toml(path), path)


def load_user(env=os.environ):
    path = user_config_path(env)
    if not os.path.exists(path):
        return {}, path
    data = _read_toml(path)
    data = data.get("defaults", data)
    _check_keys(data, KEYS, "", path)
    return {k: _convert(k, v, "", path) for k, v in data.items()}, path


@dataclass
class Effective:
    values: dict  # name -> Value
    site: Site
    notes: list = field(default_factory=list)  # what clamping did

    def __getitem__(self, name):
        return self.values[name].value

    def as_dict(self):
        return {k: {"value": v.value, "source": v.source} for k, v in self.values.items()}


def resolve(site, user, user_path, env, cli):
    """Effective settings from the layers (see module doc). `cli` maps key -> (value, flag)
    for flags the user gave. Pure."""
    values = {k: Value(key.default, "built-in") for k, key in KEYS.items()}
    site_src = f"site {site.path}"
    for k, v in site.defaults.items():
        values[k] = Value(v, site_src)
    layers = [(k, v, f"user {user_path}") for k, v in user.items()]
    for k in KEYS:
        name = f"HPCMOVE_{k.upper()}"
        if env.get(name) not in (None, ""):
            layers.append((k, _convert(k, env[name], f"{name}=", "environment"), name))
    layers += [(k, v, flag) for k, (v, flag) in cli.items()]
    for k, v, source in layers:
        if k in site.locked:
            if v != values[k].value:
                raise PolicyError(f"{k} is locked by the site policy {site.path} "
                                  f"(it is {values[k].value!r}; {source} asked for {v!r})")
            continue
        values[k] = Value(v, source)
    eff = Effective(values, site)
    _apply_limits(eff, site)
    return eff


def _apply_limits(eff, site):
    mode = site.limits.get("on_exceed", "clamp")
    for name, key in KEYS.items():
        for cap_key in key.cap.split(","):
            _apply_cap(eff, site, mode, name, cap_key)


def _apply_cap(eff, site, mode, name, cap_key):
    cap = site.limits.get(cap_key) if cap_key else None
    if cap:
        v = eff.values[name]
        # bwlimit 0 means unlimited: over any cap (stripe_width 0, the backend's default,
        # is capped where the default is known: SubmitOptions.width_cap)
        over = v.value > cap or (name == "bwlimit" and v.value == 0)
        if not over:
            return
        if mode == "refuse" and v.value != 0:
            raise PolicyError(f"{name} {v.value} is over the site limit limits.{cap_key} = {cap} "
                              f"in {site.path} (from {v.source})")
        if v.value != 0:
            eff.notes.append(f"{name} {v.value} clamped to limits.{cap_key} = {cap} ({site.path})")
        eff.values[name] = Value(cap, f"{v.source}, capped by limits.{cap_key} in {site.path}")


def check_path(site, path, what):
    """Refuse a local path outside the allowed roots (after resolving '..' and symlinks)."""
    if not site.allowed_roots:
        return
    real = os.path.realpath(os.fsencode(path))
    for root in site.allowed_roots:
        r = os.fsencode(root)
        if real == r or real.startswith(r.rstrip(b"/") + b"/"):
            return
    raise PolicyError(f"{what} {os.fsdecode(path)} (resolves to {os.fsdecode(real)}) is outside "
                      f"paths.allowed_roots {site.allowed_roots} of {site.path}")


def check_host(site, host):
    if site.allowed_hosts and not any(fnmatch.fnmatch(host, p) for p in site.allowed_hosts):
        raise PolicyError(f"remote host {host} is not in remote.allowed_hosts "
                          f"{site.allowed_hosts} of {site.path}")


def size_row(site, size):
    """(slice_size, stripe_width) of the size-table row for a file of `size`, or None."""
    row = None
    for min_size, slice_size, width in site.size_table:
        if size >= min_size:
            row = (slice_size, width)
    return row
