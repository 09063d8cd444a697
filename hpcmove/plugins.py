"""Backends and transfer engines, found through entry points and imported only when chosen.

Groups: `hpcmove.backends` (submit/poll/cancel on a batch system) and `hpcmove.engines`
(move the bytes of one slice). A plugin that fails to import is reported, not fatal.
"""
import logging
from functools import cache
from importlib.metadata import entry_points

from hpcmove_plugins.copy import SliceWork  # noqa: F401  (the engines' work item)

from .errors import PluginError

log = logging.getLogger(__name__)
GROUPS = {"backend": "hpcmove.backends", "engine": "hpcmove.engines"}


def available(kind):
    """{name: entry point} of every installed plugin of `kind`."""
    return {ep.name: ep for ep in entry_points(group=GROUPS[kind])}


@cache
def load(kind, name):
    eps = available(kind)
    if name not in eps:
        raise PluginError(f"unknown {kind} {name!r}; installed: {', '.join(sorted(eps)) or 'none'}")
    try:
        return eps[name].load()
    except Exception as e:  # a broken plugin must not take the others down
        raise PluginError(f"{kind} {name!r} cannot be loaded: {e}") from e


def status(kind):
    """[(name, importable, why)] for `hpcmove plugins`."""
    rows = []
    for name in sorted(available(kind)):
        try:
            load(kind, name)
            rows.append((name, True, ""))
        except PluginError as e:
            log.info("%s", e)
            rows.append((name, False, str(e.__cause__ or e)))
    return rows


def engine(name):
    return load("engine", name)()


def make_engine(options):
    """The transfer engine for a job's recorded options (a dict)."""
    cls = load("engine", options.get("engine") or "copy")
    return cls.from_options(options) if hasattr(cls, "from_options") else \
        cls(bwlimit=options.get("bwlimit", 0))


def backend(name):
    return load("backend", name)()
