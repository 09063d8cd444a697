"""Reports, log harvesting, metrics, mail and progress, on jobs run by the real local
backend against a real SQLite database, and mail through a real SMTP server on 127.0.0.1.

The failed job is made deterministic without racing the transfer: its destination
name is an existing non-empty directory. Planning accepts an explicit (src, dst) pair,
the transfer into the spool succeeds, and finalize's rename onto the directory fails
with EISDIR every time, for root too (chmod tricks do not stop root, and changing a
source while its task runs is a race).
"""
import email
import email.policy
import io
import json
import os
import socket
import sqlite3
import stat
import sys
import time

import click
import pytest
import xxhash
from click.testing import CliRunner

from hpcmove import cli_ops, db, jobs, metrics, notify, progress, report, states
from hpcmove.errors import UsageError


@pytest.fixture
def home(tmp_path, monkeypatch):
    """HPCMOVE_HOME in tmp_path, and no site policy, user config or mail settings from
    the machine leaking in."""
    monkeypatch.setenv("HPCMOVE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HPCMOVE_POLICY", str(tmp_path / "no-policy.toml"))
    monkeypatch.setenv("HPCMOVE_CONFIG", str(tmp_path / "no-config.toml"))
    for var in ("HPCMOVE_DB", "HPCMOVE_BACKEND", "HPCMOVE_MAIL_TYPE", "HPCMOVE_MAIL_USER",
                "HPCMOVE_SENDMAIL"):
        monkeypatch.delenv(var, raising=False)
    yield tmp_path
    db.close()


def options(**extra):
    values = dict(backend="local", slice_size=64 << 10, stripe_width=2, small_file_threshold=0)
    values.update(extra)
    return jobs.SubmitOptions(**values)


def make_tree(root):
    """src/ with a 200 KiB file (4 slices) and a small one."""
    src = root / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(200 << 10))
    (src / "small.txt").write_bytes(b"hello hpcmove\n")
    (root / "dst").mkdir()
    return src, root / "dst"


def run(sources=(), dest=None, pairs=None, **extra):
    sub = jobs.submit(sources, dest, options(**extra), pairs=pairs)
    job = jobs.wait(sub.job, timeout=120)
    assert job.state in states.JOB_TERMINAL, job.state
    return job


@pytest.fixture
def done_job(home):
    src, dst = make_tree(home)
    return run([str(src) + "/"], str(dst))


@pytest.fixture
def failed_job(home):
    """big.bin goes to dst/occupied, a non-empty directory: finalize cannot place it."""
    src, dst = make_tree(home)
    (dst / "occupied" / "inside").mkdir(parents=True)
    pairs = [(os.fsencode(src / "big.bin"), os.fsencode(dst / "occupied")),
             (os.fsencode(src / "small.txt"), os.fsencode(dst / "small.txt"))]
    return run(pairs=pairs)


def logs(job):
    return os.fsdecode(report.logs_dir(job))


# --- report ------------------------------------------------------------------------

def test_report_of_a_done_job(done_job, home):
    head = report.write_report(done_job)
    data = json.loads(open(os.path.join(logs(done_job), "report.json")).read())
    assert head == {"job": data["job"], "failed": [], "failed_count": 0}
    j = data["job"]
    assert j["state"] == "Done" and j["id"] == done_job.label
    assert j["files"] == 2 and j["entries"] == 3 and j["files_by_state"] == {"Done": 3}
    assert j["bytes_done"] == j["bytes_total"] == (200 << 10) + 14
    assert j["elapsed"] >= 0 and j["rate"] > 0
    by_name = {os.path.basename(f["dst"]): f for f in data["files"]}
    big, small = by_name["big.bin"], by_name["small.txt"]
    assert big["type"] == "file" and big["size"] == 200 << 10 and big["attempts"] == 4
    assert big["hosts"] == [socket.gethostname()] and big["state"] == "Done"
    assert big["checksum"].startswith("xxh3_128-tree/65536:")
    placed = (home / "dst" / "small.txt").read_bytes()
    assert small["checksum"] == "xxh3_128:" + xxhash.xxh3_128(placed).hexdigest()
    assert small["attempts"] == 1 and small["reasons"] == []
    assert by_name["dst"]["type"] == "dir"
    text = open(os.path.join(logs(done_job), "report.txt")).read()
    assert text.splitlines()[0] == f"hpcmove {done_job.label} Done"
    assert "2 files (3 entries)" in text and "Failed files" not in text
    assert len(text.splitlines()) <= 6


def test_report_of_a_failed_job(failed_job, home):
    assert failed_job.state == "Failed"
    head = report.write_report(failed_job)
    data = report.read_json(failed_job)
    assert head["failed_count"] == 1 and head["failed"][0]["src"].endswith("big.bin")
    j = data["job"]
    assert j["state"] == "Failed" and "destination is a directory" in j["reason"]
    assert j["files_by_state"] == {"Failed": 2}
    by_name = {os.path.basename(f["src"]): f for f in data["files"]}
    blocked, other = by_name["big.bin"], by_name["small.txt"]
    assert blocked["state"] == "Failed" and blocked["checksum"] == ""
    assert any("cannot place" in r for r in blocked["reasons"])
    assert other["reasons"] == [report.COLLATERAL]
    assert blocked["bytes_done"] == 200 << 10  # copied and verified; only placing failed
    text = report.read_text(failed_job)
    assert text.splitlines()[0] == f"hpcmove {failed_job.label} Failed"
    assert "Failed files (1):" in text
    assert f"{home}/src/big.bin -> {home}/dst/occupied: " in text
    assert "small.txt" not in text  # failed only because the other did: not listed
    assert not (home / "dst" / "small.txt").exists()


def test_report_is_written_chunk_by_chunk_with_two_queries_a_chunk(home, monkeypatch):
    """The final job writes the report (a compute job chained with afterok waits for
    it): the files are read, encoded and written CHUNK at a time, never all at once, and
    the file is the same whatever the chunk."""
    src = home / "tree"
    src.mkdir()
    for i in range(40):
        (src / f"f{i:02d}").write_bytes(os.urandom(100 + i))
    (home / "dst").mkdir()
    job = run([str(src)], str(home / "dst"))
    assert job.state == "Done"
    report.write_report(job)
    whole = report.read_json(job)
    assert len(whole["files"]) == 41
    executed = []
    real = db.proxy.obj.execute_sql
    monkeypatch.setattr(db.proxy.obj, "execute_sql",
                        lambda sql, *a, **k: executed.append(sql) or real(sql, *a, **k))
    monkeypatch.setattr(report, "CHUNK", 10)
    report.write_report(job)
    chunked = report.read_json(job)
    assert chunked["files"] == whole["files"] and chunked["events"] == whole["events"]
    assert len(executed) == 3 + 5 * 2 + 1, executed  # totals, 5 chunks of 10, events


def test_non_utf8_names_survive_the_report(home):
    src = os.path.join(os.fsencode(home), b"src-\xff")
    os.mkdir(src)
    with open(os.path.join(src, b"n\xe9"), "wb") as f:
        f.write(b"data")
    (home / "dst").mkdir()
    job = run([src], str(home / "dst"))
    report.write_report(job)
    raw = open(os.path.join(logs(job), "report.json"), "rb").read()
    assert b'src-\\udcff/n\\udce9"' in raw  # as status --json writes such names
    names = [f["src"] for f in json.loads(raw)["files"]]
    assert os.fsencode(names[-1]) == os.path.join(src, b"n\xe9")


# --- log harvesting ----------------------------------------------------------------

def test_log_harvest_orders_tasks_then_finalize_and_includes_its_output(home):
    templates = home / "templates"
    templates.mkdir()
    (templates / "finalize.sh.j2").write_text(
        '{% extends "packaged/finalize.sh.j2" %}\n'
        "{% block prologue %}echo \"site prologue: finalizing {{ label }}\"{% endblock %}\n")
    src, dst = make_tree(home)
    job = run([str(src)], str(dst), template_dirs=(str(templates),))
    text = b"".join(report.harvest(job)).decode()
    headers = [line for line in text.splitlines() if line.startswith("==> ")]
    assert [h.split()[1] for h in headers] == ["transfer-0.out", "transfer-1.out", "finalize.out"]
    assert text.index("==> finalize.out <==") < text.index(f"site prologue: finalizing {job.label}")
    report.write_report(job)  # reports live in logs/ too but are not batch output
    assert b"report" not in b"".join(report.harvest(job))


def test_log_key_puts_slurm_arrays_and_feeders_in_submission_order():
    names = [b"finalize-130.out", b"transfer-128_10.out", b"feed-129.out", b"transfer-128_2.out",
             b"transfer-131_0.out", b"other.out"]
    assert sorted(names, key=report._log_key) == [
        b"transfer-128_2.out", b"transfer-128_10.out", b"feed-129.out", b"transfer-131_0.out",
        b"finalize-130.out", b"other.out"]


# --- metrics -----------------------------------------------------------------------

def parse(text):
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_parse_and_match_the_database(home):
    (home / "a").mkdir()
    done_src, done_dst = make_tree(home / "a")
    done = run([str(done_src)], str(done_dst))
    (home / "b").mkdir()
    src, dst = make_tree(home / "b")
    (dst / "occupied" / "x").mkdir(parents=True)
    failed = run(pairs=[(os.fsencode(src / "big.bin"), os.fsencode(dst / "occupied"))])
    assert (done.state, failed.state) == ("Done", "Failed")
    text = metrics.prometheus_text()
    assert "# HELP hpcmove_jobs " in text and "# TYPE hpcmove_bytes_total counter" in text
    m = parse(text)
    con = sqlite3.connect(os.path.join(home, "home", "hpcmove.db"))
    moved = con.execute("SELECT SUM(length) FROM slice WHERE state = 'Done'").fetchone()[0]
    host, host_bytes, host_seconds = con.execute(
        "SELECT host, SUM(length), SUM(seconds) FROM slice WHERE state = 'Done' "
        "GROUP BY host").fetchone()
    assert m[("hpcmove_jobs", (("state", "Done"),))] == 1
    assert m[("hpcmove_jobs", (("state", "Failed"),))] == 1
    assert m[("hpcmove_jobs", (("state", "Active"),))] == 0
    assert m[("hpcmove_bytes_total", ())] == moved == 2 * ((200 << 10) + 14) - 14
    assert m[("hpcmove_host_bytes_total", (("host", host),))] == host_bytes
    assert m[("hpcmove_host_seconds_total", (("host", host),))] == pytest.approx(host_seconds)
    assert m[("hpcmove_failures_total", (("reason", "placement"),))] == 1
    assert sum(v for (name, _), v in m.items() if name == "hpcmove_failures_total") == 1
    assert m[("hpcmove_job_failures_total", (("reason", "placement"),))] == 1


def _job_row(reason="", state="Failed"):
    return db.Job.create(token=os.urandom(6).hex(), owner="u", backend="local", jobdir=b"/x",
                         stripe_width=1, slice_size=1, n_tasks=1, bytes_total=0, state=state,
                         reason=reason)


@pytest.mark.parametrize("reason, label", [
    ("/a/b: Permission denied: /a/b", "permission"),
    ("/a/b: no space left on device (ENOSPC) writing /s/0", "no_space"),
    ("/a/b: Disk quota exceeded: /s/0", "no_space"),
    ("/a/b: source changed during transfer: /a/b", "source_changed"),
    ("/a/b: source vanished during transfer: /a/b (No such file or directory)", "source_changed"),
    ("/a/b: verification failed: destination slice at offset 0 differs", "verification"),
    ("/a/b: slice at offset 0 was not copied: transfer task 3 ended TIMEOUT on dtn2",
     "task_died"),
    ("/d/x: cannot place: destination is a directory", "placement"),
    ("something nobody foresaw", "other"),
])
def test_failure_reasons_are_classed_in_sql(home, reason, label):
    db.connect()
    job = _job_row(reason)
    for i, r in enumerate([reason, report.COLLATERAL]):
        db.File.create(job=job, index=i, kind="file", src=b"/a", dst=b"/b", spool=b"/s",
                       state="Failed", reason=r)
    m = parse(metrics.prometheus_text())
    files = {dict(k[1])["reason"]: v for k, v in m.items() if k[0] == "hpcmove_failures_total"}
    assert files == {x: (1 if x == label else 0) for x in metrics.FAILURE_LABELS}
    assert m[("hpcmove_job_failures_total", (("reason", label),))] == 1


def test_label_values_are_escaped(home):
    db.connect()
    job = _job_row(state="Done")
    f = db.File.create(job=job, index=0, kind="file", src=b"/a", dst=b"/b", spool=b"/s")
    db.Slice.create(job=job, file=f, index=0, offset=0, length=5, task=0, state="Done",
                    host='dtn"1\\x\n', seconds=2.5)
    m = parse(metrics.prometheus_text())
    assert m[("hpcmove_host_bytes_total", (("host", 'dtn"1\\x\n'),))] == 5
    assert m[("hpcmove_host_seconds_total", (("host", 'dtn"1\\x\n'),))] == 2.5


# --- mail --------------------------------------------------------------------------

@pytest.fixture
def smtp(tmp_path, monkeypatch):
    """A real SMTP server on 127.0.0.1 and a sendmail-compatible script that delivers to
    it; HPCMOVE_SENDMAIL points at the script. Yields the list of received messages."""
    from aiosmtpd.controller import Controller

    class Sink:
        def __init__(self):
            self.messages = []

        async def handle_DATA(self, server, session, envelope):
            self.messages.append((list(envelope.rcpt_tos), email.message_from_bytes(
                envelope.content, policy=email.policy.default)))
            return "250 OK"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sink = Sink()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    script = tmp_path / "fake-sendmail"
    script.write_text(f"""#!{sys.executable}
import email, email.policy, smtplib, sys
open({str(tmp_path / "sendmail-argv")!r}, "w").write(" ".join(sys.argv[1:]))
msg = email.message_from_binary_file(sys.stdin.buffer, policy=email.policy.default)
with smtplib.SMTP("127.0.0.1", {port}, timeout=30) as smtp:
    smtp.send_message(msg)
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("HPCMOVE_SENDMAIL", str(script))
    yield sink.messages
    controller.stop()


def test_end_mail_reaches_the_smtp_server(done_job, smtp, home):
    assert notify.notify(done_job, notify.END, to="ops@localhost", types="END")
    (rcpt, msg), = smtp
    assert rcpt == ["ops@localhost"]
    assert msg["Subject"] == f"hpcmove {done_job.label} Done: 2 files, 200.0 KiB"
    body = msg.get_content()
    assert f"hpcmove {done_job.label} Done" in body and "2 files (3 entries)" in body
    assert (home / "sendmail-argv").read_text() == "-t -oi"


def test_finalize_hook_writes_the_report_and_mails_the_failure(failed_job, smtp, monkeypatch):
    monkeypatch.setenv("HPCMOVE_MAIL_TYPE", "fail")
    monkeypatch.setenv("HPCMOVE_MAIL_USER", "someone@localhost")
    batch_log = io.StringIO()
    notify.job_ended(failed_job, stream=batch_log)
    assert batch_log.getvalue() == report.read_text(failed_job)
    (rcpt, msg), = smtp
    assert rcpt == ["someone@localhost"]
    assert msg["Subject"].startswith(f"hpcmove {failed_job.label} Failed: 2 files")
    assert "cannot place" in msg.get_content()
    assert report.read_text(failed_job) in msg.get_content().replace("\r\n", "\n")


def test_begin_mail_once_when_the_first_task_starts(home, smtp):
    """Two array tasks start; only the one that moves the job to Active mails, and a job
    that becomes Active again (retry, resume) does not mail BEGIN twice."""
    src, dst = make_tree(home)
    job = run([str(src)], str(dst), mail_type="BEGIN", mail_user="ops@localhost")
    assert job.state == "Done" and job.n_tasks == 2
    (rcpt, msg), = smtp  # BEGIN only: END was not asked for
    assert rcpt == ["ops@localhost"] and msg["X-Hpcmove-Job"] == f"{job.label} BEGIN"
    assert msg["Subject"].startswith(f"hpcmove {job.label} ")
    began = [e for e in db.Event.select().where(db.Event.job == job.id)
             if e.kind == "began"]
    assert len(began) == 1
    notify.job_began(job)  # as a task of a retried job would
    assert len(smtp) == 1


def test_begin_and_end_mail_with_all(home, smtp):
    src, dst = make_tree(home)
    run([str(src)], str(dst), mail_type="ALL")
    deadline = time.monotonic() + 60  # END is mailed just after finalize records Done
    while len(smtp) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(m["X-Hpcmove-Job"].split()[1] for _rcpt, m in smtp) == ["BEGIN", "END"]


@pytest.mark.parametrize("types, event, sent", [
    ("NONE", notify.END, False), ("", notify.FAIL, False), ("BEGIN", notify.END, False),
    ("END", notify.FAIL, True),  # as sbatch: END covers however the job ended
    ("FAIL", notify.END, False), ("ALL", notify.BEGIN, True), ("begin,auth", notify.AUTH, True),
])
def test_mail_types_decide_what_is_sent(done_job, smtp, types, event, sent):
    assert notify.notify(done_job, event, to="ops@localhost", types=types) is sent
    assert len(smtp) == int(sent)


@pytest.mark.parametrize("text, expected", [
    ("ALL", {"BEGIN", "END", "FAIL", "AUTH"}), ("none", set()), ("", set()),
    ("END, fail", {"END", "FAIL"}),
])
def test_mail_types_parse_like_sbatch(text, expected):
    assert notify.parse_mail_types(text) == expected


@pytest.mark.parametrize("text", ["END,TIME_LIMIT", "BOGUS", "NONE,END", "ALL,END"])
def test_unknown_mail_type_is_a_clear_error(text):
    with pytest.raises(UsageError, match="unknown mail type .* \\(use NONE, ALL or a comma"):
        notify.parse_mail_types(text)


def test_a_broken_mta_is_an_event_not_a_failed_finalize(done_job, monkeypatch, capsys):
    monkeypatch.setenv("HPCMOVE_SENDMAIL", "/bin/false")
    with pytest.raises(notify.MailError, match="/bin/false exited 1"):
        notify.notify(done_job, notify.END, to="ops@localhost", types="END")
    monkeypatch.setenv("HPCMOVE_MAIL_TYPE", "END")
    notify.job_ended(done_job)  # must not raise
    assert "mail failed" in capsys.readouterr().err
    assert report.read_text(done_job) is not None  # the report was still written
    kinds = [e.message for e in db.Event.select().where(db.Event.job == done_job.id)]
    assert any(m.startswith("mail failed: /bin/false exited 1") for m in kinds)


# --- progress and status levels -----------------------------------------------------

def test_plain_progress_ends_with_the_terminal_state_and_polls_slurm_rarely(home, monkeypatch):
    src, dst = make_tree(home)
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    calls = []
    real_refresh = jobs.refresh
    monkeypatch.setattr(jobs, "refresh", lambda js: calls.append(1) or real_refresh(js))
    sub = jobs.submit([str(src)], str(dst), options(slice_size=1 << 20, bwlimit=2 << 20))
    out = io.StringIO()
    job = progress.watch(sub.job.id, out, tty=False, interval=0.05, refresh_every=3600, every=0)
    lines = out.getvalue().splitlines()
    assert job.state == "Done"
    assert lines[-1].endswith(f"{job.label} Done: 3 Done; 3.0 MiB/3.0 MiB (100%)")
    assert any(f"{job.label} Active:" in line and "ETA" in line for line in lines[:-1])
    assert len(calls) == 1  # the batch system was asked once; the database many times


def test_watching_stops_on_hold_which_waits_for_a_person(home):
    db.connect()
    held = _job_row(reason="source changed; fix it and retry", state="Hold")
    out = io.StringIO()
    assert progress.watch(held.id, out, tty=False, interval=0.01).state == "Hold"
    assert out.getvalue().splitlines()[-1].endswith(
        f"{held.label} Hold: no entries; 0 B/0 B (100%); source changed; fix it and retry")


def test_rich_progress_on_a_terminal_ends_with_the_terminal_state(done_job):
    out = io.StringIO()
    job = progress.watch(done_job.id, out, tty=True, interval=0.05)
    assert job.state == "Done"
    assert f"{done_job.label} Done" in out.getvalue()
    assert "\x1b[" in out.getvalue()  # drawn as a live terminal display


def test_status_summary_and_file_listing(failed_job, home):
    summary = list(progress.summary_lines(failed_job))
    assert summary[0].startswith(f"{failed_job.label} Failed: ")
    assert summary[2].split() == ["Failed", "2", "200.0", "KiB"]
    listing = list(progress.file_lines(failed_job))
    assert len(listing) == 2
    assert listing[0].startswith("Failed") and "cannot place" in listing[0]
    assert f"{home}/src/small.txt -> {home}/dst/small.txt" in listing[1]


# --- commands ----------------------------------------------------------------------

@pytest.fixture
def group():
    return cli_ops.register(click.Group("hpcmove"))


@pytest.mark.parametrize("name", ["log", "metrics", "watch", "report", "completion"])
def test_every_command_has_help_with_an_example(group, name):
    result = CliRunner().invoke(group, [name, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and f"hpcmove {name}" in result.output


def test_commands_on_a_failed_job(failed_job, group):
    runner = CliRunner()
    result = runner.invoke(group, ["report", failed_job.label])
    assert result.exit_code == 0 and result.output.startswith(f"hpcmove {failed_job.label} Failed")
    assert os.path.exists(os.path.join(logs(failed_job), "report.json"))  # written if missing
    as_json = json.loads(runner.invoke(group, ["report", "--json", failed_job.label]).output)
    assert as_json["job"]["state"] == "Failed"
    result = runner.invoke(group, ["log", failed_job.label])
    assert result.exit_code == 0 and "==> finalize.out" in result.output
    result = runner.invoke(group, ["watch", "--plain", failed_job.label])
    assert result.exit_code == 1 and f"{failed_job.label} Failed" in result.output
    result = runner.invoke(group, ["metrics"])
    assert result.exit_code == 0
    assert parse(result.output)[("hpcmove_jobs", (("state", "Failed"),))] == 1


def test_watch_exits_zero_when_done(done_job, group):
    result = CliRunner().invoke(group, ["watch", done_job.label])
    assert result.exit_code == 0 and f"{done_job.label} Done" in result.output


@pytest.mark.parametrize("name", ["log", "report", "watch"])
def test_unknown_job_is_a_clear_error(home, group, name):
    result = CliRunner().invoke(group, [name, "hm-99"])
    assert result.exit_code == 1 and "no job hm-99" in result.output
    assert "Traceback" not in result.output


class _SlowToDie:
    """A batch system that ends the jobs only at the `dies_at`-th cancel (or never)."""

    def __init__(self, dies_at):
        self.dies_at, self.cancels = dies_at, 0

    def cancel(self, ids):
        self.cancels += 1

    def wait_gone(self, ids, timeout):
        if self.dies_at and self.cancels >= self.dies_at:
            return True
        time.sleep(timeout)
        return False


def test_cancel_is_sent_again_while_batch_jobs_stay_and_gives_up_at_the_timeout():
    slow = _SlowToDie(dies_at=3)
    slow.cancel(["1"])  # as jobs.cancel does first
    assert jobs._gone_after_cancel(slow, ["1", "2"], timeout=5, again=0.01)
    assert slow.cancels == 3
    never = _SlowToDie(dies_at=0)
    started = time.monotonic()
    assert not jobs._gone_after_cancel(never, ["1"], timeout=0.2, again=0.05)
    assert 0.2 <= time.monotonic() - started < 2 and 3 <= never.cancels <= 5
