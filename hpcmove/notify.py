"""Job mail through the local MTA, the way sbatch --mail-type/--mail-user do it.

Mail goes through `sendmail -t` (message on stdin, recipients from its headers),
because every HPC node that can send mail has one and it needs no SMTP settings in
hpcmove. HPCMOVE_SENDMAIL names another program with the same interface (msmtp,
a site wrapper). Which events mail is sent for comes from the job's options or the
policy keys mail_type / mail_user; the default is none, like sbatch.
"""
import json
import os
import shutil
import subprocess
import sys
from email.message import EmailMessage

from . import db, policy, states
# `report` (and the job machinery it reads through) is imported where mail is written:
# every array task imports this module for job_began, and starts ~45 ms sooner without.
from .errors import HpcmoveError, UsageError
from .units import human

BEGIN, END, FAIL, AUTH = "BEGIN", "END", "FAIL", "AUTH"
EVENTS = (BEGIN, END, FAIL, AUTH)
SENDMAIL_TIMEOUT = 60  # seconds; a hung MTA must not hold the finalize job
SENDMAIL_DIRS = "/usr/sbin:/usr/lib"  # where sendmail lives when batch PATHs omit it


class MailError(HpcmoveError):
    """The mail program could not be run or refused the message."""


def parse_mail_types(text):
    """sbatch's spelling: 'END', 'BEGIN,END', 'ALL', 'NONE' or '' (case-insensitive).
    Returns a frozenset of EVENTS; an unknown type is a UsageError naming the valid ones."""
    words = [w.strip().upper() for w in str(text or "").split(",") if w.strip()]
    if words in ([], ["NONE"]):
        return frozenset()
    if words == ["ALL"]:
        return frozenset(EVENTS)
    bad = [w for w in words if w not in EVENTS]
    if bad:
        raise UsageError(f"unknown mail type {', '.join(bad)} in {text!r} (use NONE, ALL or a "
                         f"comma list of {', '.join(EVENTS)})")
    return frozenset(words)


def wanted(types, event):
    """As sbatch: END mails when the job ends however it ends, so it covers FAIL too."""
    return event in types or (event == FAIL and END in types)


def event_for(job):
    if job.state == states.AUTH:
        return AUTH
    return FAIL if job.state == states.FAILED else END


def settings(job, env=os.environ):
    """(recipient, types): what the job was submitted with, else (nothing asked at
    submit) the effective policy now (site, user config, HPCMOVE_MAIL_*). The recipient
    defaults to the job's owner, delivered locally, as Slurm does."""
    options = json.loads(job.options or "{}")
    if options.get("mail_type"):
        user, types = options.get("mail_user", ""), options["mail_type"]
    else:
        site = policy.load_site(env)
        config, path = policy.load_user(env)
        eff = policy.resolve(site, config, path, env, {})
        user, types = eff["mail_user"], eff["mail_type"]
    return user or job.owner, parse_mail_types(types)


def subject(job, data, event):
    if event == AUTH:
        return f"hpcmove {job.label} needs authentication"
    j = data["job"]
    return f"hpcmove {job.label} {j['state']}: {j['files']} files, {human(j['bytes_total'])}"


def compose(job, event, to, data, message=""):
    """The mail: subject as above, body = the text report (after `message`, if any)."""
    msg = EmailMessage()
    msg["To"] = to
    msg["Subject"] = subject(job, data, event)
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies
    msg["X-Hpcmove-Job"] = f"{job.label} {event}"
    from . import report
    body = (message + "\n\n" if message else "") + report.text(data)
    # paths that are not UTF-8 carry surrogates; show them as U+FFFD in mail
    msg.set_content(body.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
    return msg


def sendmail_program(env=os.environ):
    chosen = env.get("HPCMOVE_SENDMAIL")
    if chosen:
        return chosen
    path = env.get("PATH", "") + os.pathsep + SENDMAIL_DIRS
    return shutil.which("sendmail", path=path) or "sendmail"


def send(msg, env=os.environ):
    """Hand `msg` to the MTA: `sendmail -t -oi` (-oi: a line with one '.' is text)."""
    argv = [sendmail_program(env), "-t", "-oi"]
    try:
        done = subprocess.run(argv, input=msg.as_bytes(), capture_output=True,
                              timeout=SENDMAIL_TIMEOUT, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MailError(f"cannot send mail with {argv[0]}: {e}") from e
    if done.returncode != 0:
        raise MailError(f"{argv[0]} exited {done.returncode} sending mail: "
                        f"{done.stderr.decode(errors='replace').strip()}")


def notify(job, event, *, to=None, types=None, data=None, message="", env=os.environ):
    """Mail `event` about `job` if its mail types want it; True when mail was sent.
    `to`/`types` override the job's settings; `data` is a report.head() to reuse."""
    if event not in EVENTS:
        raise UsageError(f"unknown mail event {event!r} (one of {', '.join(EVENTS)})")
    if to is None or types is None:
        default_to, default_types = settings(job, env)
        to = default_to if to is None else to
        types = default_types if types is None else parse_mail_types(types)
    elif isinstance(types, str):
        types = parse_mail_types(types)
    if not wanted(types, event):
        return False
    from . import report
    send(compose(job, event, to, data or report.head(job), message), env)
    return True


def _never_raise(job_id, what, action):
    """Hooks run inside batch jobs: a broken MTA or report must not change the job's exit
    status, so failures are recorded as events and printed to the batch log instead."""
    try:
        action()
    except Exception as e:  # noqa: BLE001 - see docstring
        print(f"hpcmove: {what} failed: {e}", file=sys.stderr)
        try:
            db.event(job_id, "notify", f"{what} failed: {e}")
        except Exception:  # noqa: BLE001
            pass


def job_ended(job, stream=None):
    """The finalize hook: write the report (and copy its text to `stream`, e.g. the
    finalize job's stdout, so its batch log says how the job ended), then mail END or
    FAIL as the job asked. Each step is attempted even when the other failed."""
    job_id = getattr(job, "id", job)
    current = db.Job.get_by_id(job_id)
    written = []
    from . import report
    _never_raise(job_id, "report", lambda: written.append(report.write_report(current)))
    if stream is not None and written:
        stream.write(report.text(written[0]))
        stream.flush()
    _never_raise(job_id, "mail", lambda: notify(current, event_for(current),
                                                data=written[0] if written else None))


def job_began(job):
    """The hook for the array task that moved the job to Active: mail BEGIN, once per
    job. A job that retry or resume makes Active again began long before: no mail."""
    job_id = getattr(job, "id", job)

    def begin():
        if db.Event.select().where(db.Event.job == job_id, db.Event.kind == "began").exists():
            return
        db.event(job_id, "began", "the first transfer task started")
        notify(db.Job.get_by_id(job_id), BEGIN)

    _never_raise(job_id, "mail", begin)
