"""Rendering: job settings -> batch script text, from the Jinja2 templates.

Pure: no subprocess, no database. StrictUndefined makes a missing value an error,
`shquote` quotes anything bound for the shell, and `sbatch_value` refuses values
that could break out of an #SBATCH line.
"""
import os
import re
import shlex
from dataclasses import dataclass, field
from importlib import resources

import jinja2

from .errors import UsageError

# What may stand in an #SBATCH value: Slurm names, times, lists, dependency specs.
_SBATCH_SAFE = re.compile(r"^[A-Za-z0-9_.:,@+=%/\[\]-]+$")

# hpcmove's mail events that Slurm mails alike, by the batch job that carries them: an
# array mails once as a whole, BEGIN when its first task starts, which is when the
# hpcmove job begins; the final job ends, or fails, when the hpcmove job does. AUTH
# is hpcmove's own and never passed on.
SLURM_MAIL = {"transfer": ("BEGIN",), "finalize": ("END", "FAIL")}


def shquote(value):
    """Quote one value for bash. Bytes paths keep non-UTF-8 bytes (surrogateescape)."""
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    return shlex.quote(str(value))


def sbatch_value(value):
    text = str(value)
    if not _SBATCH_SAFE.fullmatch(text):
        raise UsageError(f"value not allowed in a batch directive: {text!r}")
    return text


def packaged_dir():
    return str(resources.files("hpcmove.templates"))


def environment(search_path=()):
    """Template environment: directories in `search_path` first (user, then site), then
    the packaged ones, which stay reachable as 'packaged/NAME' so an override can
    `{% extends "packaged/transfer.sh.j2" %}` and replace only a block (e.g. prologue)."""
    packaged = jinja2.FileSystemLoader(packaged_dir())
    loader = jinja2.ChoiceLoader([jinja2.FileSystemLoader(list(search_path)), packaged,
                                  jinja2.PrefixLoader({"packaged": packaged})])
    env = jinja2.Environment(loader=loader, undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    env.filters["shquote"] = shquote
    env.filters["sbatch_value"] = sbatch_value
    return env


@dataclass
class ScriptSettings:
    """Everything the templates see, besides the plan's shape."""

    label: str
    jobdir: bytes
    db_url: str
    python: str
    partition: str = ""
    account: str = ""
    qos: str = ""
    time: str = ""
    finalize_partition: str = ""
    extra: list = field(default_factory=list)  # further "--opt=value" strings
    mail_types: tuple = ()  # hpcmove's events (notify.parse_mail_types), for Slurm's mail
    mail_user: str = ""


def sbatch_options(settings, partition, role=""):
    """The #SBATCH options of one batch job; `role` ('transfer', 'finalize') picks the
    mail events Slurm sends for it (SLURM_MAIL)."""
    pairs = [("partition", partition), ("account", settings.account),
             ("qos", settings.qos), ("time", settings.time)]
    mail = [t for t in SLURM_MAIL.get(role, ()) if t in settings.mail_types]
    if mail:
        pairs += [("mail-type", ",".join(mail)), ("mail-user", settings.mail_user)]
    options = [f"--{k}={sbatch_value(v)}" for k, v in pairs if v]
    return options + [sbatch_value(x) for x in settings.extra]


def overridden(names, search_path=()):
    """Does a user or site directory in `search_path` replace any of the templates
    `names`? (Then a rendered script may run commands hpcmove did not write.)"""
    return any(os.path.isfile(os.path.join(d, n)) for d in search_path for n in names)


def render(settings, n_tasks, stripe_width, search_path=()):
    """Both scripts of a job as {'transfer.sh': text, 'finalize.sh': text}.
    A job with nothing to copy (only directories and links) has no transfer script."""
    env = environment(search_path)
    common = dict(label=settings.label, jobdir=settings.jobdir, db_url=settings.db_url,
                  python=settings.python)
    scripts = {}
    if n_tasks:
        scripts["transfer.sh"] = env.get_template("transfer.sh.j2").render(
            common, purpose="transfer array task", job_name=f"hpcmove-{settings.label}",
            n_tasks=n_tasks, stripe_width=stripe_width,
            sbatch_options=sbatch_options(settings, settings.partition, "transfer"))
        # used only when the backend must feed the array in chunks
        scripts["feed.sh"] = env.get_template("feed.sh.j2").render(
            common, purpose="feeder of the next transfer array chunk",
            job_name=f"hpcmove-{settings.label}-feed",
            sbatch_options=sbatch_options(settings, settings.finalize_partition or settings.partition))
    scripts["finalize.sh"] = env.get_template("finalize.sh.j2").render(
        common, purpose="finalize (verify, rename into place)",
        job_name=f"hpcmove-{settings.label}-final",
        sbatch_options=sbatch_options(settings, settings.finalize_partition or settings.partition,
                                      "finalize"))
    return scripts
