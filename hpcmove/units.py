"""Parsing and printing sizes and durations. Pure."""
import re

from .errors import UsageError

_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text):
    """'64M', '1G', '1.5GiB', '4096' -> bytes (binary multiples, as sbatch and dd read them)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise UsageError(f"not a size: {text!r} (use e.g. 4096, 64M, 1G)")
    value = int(float(m.group(1)) * _SUFFIX[m.group(2).upper()])
    if value <= 0:
        raise UsageError(f"size must be positive: {text!r}")
    return value


def human(n):
    """Bytes as a short binary-unit string: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def parse_duration(text):
    """Slurm time syntax -> seconds: 'MM', 'MM:SS', 'HH:MM:SS', 'D-HH', 'D-HH:MM',
    'D-HH:MM:SS'. 'UNLIMITED'/'INFINITE' -> None."""
    t = str(text).strip()
    if t.upper() in ("UNLIMITED", "INFINITE", "NONE", ""):
        return None
    days = 0
    if "-" in t:
        d, t = t.split("-", 1)
        days = int(d)
        parts = [int(x) for x in t.split(":")]
        parts += [0] * (3 - len(parts))
        h, m, s = parts
    else:
        parts = [int(x) for x in t.split(":")]
        if len(parts) == 1:
            h, m, s = 0, parts[0], 0
        elif len(parts) == 2:
            h, m, s = 0, parts[0], parts[1]
        elif len(parts) == 3:
            h, m, s = parts
        else:
            raise UsageError(f"not a time: {text!r}")
    return ((days * 24 + h) * 60 + m) * 60 + s


def parse_lifetime(text):
    """'90s', '30m', '8h', '1d' (as ssh's ControlPersist), or Slurm's time syntax ->
    seconds."""
    t = str(text).strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if t and t[-1] in units:
            return int(t[:-1]) * units[t[-1]]
        return parse_duration(t) or 0
    except ValueError:
        raise UsageError(f"not a lifetime: {text!r} (e.g. 30m, 8h)") from None
