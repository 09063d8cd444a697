"""Rendering the batch scripts: golden files, quoting checked by running bash, strictness.

Regenerate the golden files after an intended template change with
    HPCMOVE_UPDATE_GOLDEN=1 pytest tests/test_render.py
and review the diff of tests/golden/.
"""
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import jinja2
import pytest

from hpcmove import render
from hpcmove.errors import UsageError

GOLDEN = Path(__file__).parent / "golden"
NASTY = b"/scratch/job dir/it's \"quoted\" $(touch /tmp/pwned) `touch /tmp/pwned`\nline2 \xff;x"


def golden_settings(**over):
    values = dict(label="hm-42", jobdir=NASTY, db_url="postgresql://u:p'w@db.example/hpc move",
                  python="/usr/bin/python3", partition="dtn", account="proj_1", qos="normal",
                  time="1-00:00:00", finalize_partition="short", extra=["--mem=4G"],
                  mail_types=("AUTH", "BEGIN", "END"), mail_user="ops@example.org")
    values.update(over)
    return render.ScriptSettings(**values)


def encoded(text):
    """The bytes jobdir.write_scripts writes (UTF-8 with surrogateescape)."""
    return text.encode("utf-8", "surrogateescape")


@pytest.mark.parametrize("name", ["transfer.sh", "finalize.sh"])
def test_golden(name):
    got = encoded(render.render(golden_settings(), n_tasks=5, stripe_width=3)[name])
    path = GOLDEN / name
    if os.environ.get("HPCMOVE_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_bytes(got)
    assert path.exists(), f"missing {path}; run with HPCMOVE_UPDATE_GOLDEN=1"
    assert got == path.read_bytes()


def test_shape():
    scripts = render.render(golden_settings(), n_tasks=5, stripe_width=3)
    assert set(scripts) == {"transfer.sh", "finalize.sh", "feed.sh"}
    assert "-m hpcmove.feeder" in scripts["feed.sh"]
    t, f = scripts["transfer.sh"], scripts["finalize.sh"]
    assert t.startswith("#!/bin/bash\n") and f.startswith("#!/bin/bash\n")
    assert "#SBATCH --array=0-4%3\n" in t and "--array" not in f
    assert "#SBATCH --requeue\n" in t
    assert "#SBATCH --partition=dtn\n" in t and "#SBATCH --partition=short\n" in f
    assert "#SBATCH --job-name=hpcmove-hm-42\n" in t
    assert "#SBATCH --job-name=hpcmove-hm-42-final\n" in f
    for s in (t, f):
        assert "#SBATCH --account=proj_1\n" in s and "#SBATCH --mem=4G\n" in s
        # every directive comes before the first command, or sbatch ignores it
        lines = s.splitlines()
        first_cmd = lines.index("set -eu")
        assert not any(line.startswith("#SBATCH") for line in lines[first_cmd:])
    assert " -m hpcmove.worker " in t and " -m hpcmove.finalize " in f


@pytest.mark.parametrize("types, transfer, final", [
    (("AUTH", "BEGIN", "END"), "BEGIN", "END"),
    (("AUTH", "BEGIN", "END", "FAIL"), "BEGIN", "END,FAIL"),  # ALL
    (("FAIL",), None, "FAIL"),
    (("AUTH",), None, None),  # hpcmove's own: Slurm is not asked to mail
    ((), None, None),
])
def test_mail_goes_to_the_batch_job_where_it_means_the_same(types, transfer, final):
    scripts = render.render(golden_settings(mail_types=types), n_tasks=2, stripe_width=1)
    for name, want in (("transfer.sh", transfer), ("finalize.sh", final)):
        lines = [x for x in scripts[name].splitlines() if "--mail-" in x]
        assert lines == ([f"#SBATCH --mail-type={want}", "#SBATCH --mail-user=ops@example.org"]
                         if want else []), name
    assert "--mail" not in scripts["feed.sh"]


def test_mail_user_defaults_to_slurms_own_and_is_checked():
    s = render.render(golden_settings(mail_types=("END",), mail_user=""), 1, 1)["finalize.sh"]
    assert "#SBATCH --mail-type=END\n" in s and "--mail-user" not in s
    with pytest.raises(UsageError):
        render.render(golden_settings(mail_types=("END",), mail_user="a b@c"), 1, 1)


def test_no_transfer_script_without_tasks():
    scripts = render.render(golden_settings(), n_tasks=0, stripe_width=3)
    assert set(scripts) == {"finalize.sh"}


def test_finalize_partition_defaults_to_partition():
    f = render.render(golden_settings(finalize_partition=""), 1, 1)["finalize.sh"]
    assert "#SBATCH --partition=dtn\n" in f


def test_empty_options_give_no_directives():
    s = render.ScriptSettings(label="hm-1", jobdir=b"/j", db_url="sqlite:///x", python="py")
    t = render.render(s, 2, 2)["transfer.sh"]
    sbatch = [line for line in t.splitlines() if line.startswith("#SBATCH")]
    assert sbatch == ["#SBATCH --job-name=hpcmove-hm-1", "#SBATCH --comment=hpcmove:hm-1",
                      "#SBATCH --array=0-1%2", "#SBATCH --requeue"]


# --------------------------------------------------------------------------- run it with bash

FAKE_PY = """#!/bin/sh
printf '%s\\0' "$@" > {argv}
printf '%s' "$HPCMOVE_DB" > {db}
"""


@pytest.fixture
def fake_python(tmp_path):
    bindir = tmp_path / "bin dir ('x')"
    bindir.mkdir()
    py = bindir / "python"
    argv, db = tmp_path / "argv", tmp_path / "db"
    py.write_text(FAKE_PY.format(argv=shlex.quote(str(argv)), db=shlex.quote(str(db))))
    py.chmod(0o755)
    return py, argv, db


def run_script(tmp_path, text, env):
    script = tmp_path / "script.sh"
    script.write_bytes(encoded(text))
    return subprocess.run([shutil.which("bash") or "/bin/bash", str(script)], cwd=tmp_path,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
                          capture_output=True, timeout=10)


def nasty_jobdir(tmp_path):
    marker = os.fsencode(tmp_path / "pwned")
    jobdir = (b"/x/job dir/it's \"q\" $(touch " + marker + b") `touch " + marker + b"` ${HOME}"
              b"\nline2\t\xff\xfe; touch " + marker + b" #")
    return jobdir, tmp_path / "pwned"


def test_transfer_script_passes_jobdir_byte_identical(tmp_path, fake_python):
    py, argv, db = fake_python
    jobdir, marker = nasty_jobdir(tmp_path)
    url = "sqlite:////tmp/it's $(touch " + str(marker) + ")/db"
    settings = render.ScriptSettings(label="hm-1", jobdir=jobdir, db_url=url, python=str(py))
    text = render.render(settings, n_tasks=4, stripe_width=2)["transfer.sh"]
    done = run_script(tmp_path, text, {"SLURM_ARRAY_TASK_ID": "3"})
    assert done.returncode == 0, done.stderr
    assert argv.read_bytes().split(b"\0")[:-1] == [b"-m", b"hpcmove.worker", jobdir, b"3"]
    assert db.read_bytes() == url.encode()
    assert not marker.exists()


def test_transfer_script_needs_array_task_id(tmp_path, fake_python):
    py, argv, _ = fake_python
    settings = render.ScriptSettings(label="hm-1", jobdir=b"/j", db_url="x", python=str(py))
    text = render.render(settings, n_tasks=1, stripe_width=1)["transfer.sh"]
    done = run_script(tmp_path, text, {})
    assert done.returncode != 0
    assert b"must run as an array task" in done.stderr
    assert not argv.exists()


def test_finalize_script_passes_jobdir_byte_identical(tmp_path, fake_python):
    py, argv, _ = fake_python
    jobdir, marker = nasty_jobdir(tmp_path)
    settings = render.ScriptSettings(label="hm-1", jobdir=jobdir, db_url="x", python=str(py))
    text = render.render(settings, n_tasks=0, stripe_width=2)["finalize.sh"]
    done = run_script(tmp_path, text, {})
    assert done.returncode == 0, done.stderr
    assert argv.read_bytes().split(b"\0")[:-1] == [b"-m", b"hpcmove.finalize", jobdir]
    assert not marker.exists()


# --------------------------------------------------------------------------- helpers

@pytest.mark.parametrize("value", [
    "dtn", "1-00:00:00", "afterok:12:13", "--mem=4G", "gpu:a100:2", "a,b", "node[1-4]",
    "user@host", "x+y", "50%", "/path/to/x",
])
def test_sbatch_value_accepts(value):
    assert render.sbatch_value(value) == value


@pytest.mark.parametrize("value", [
    "a b", "a\nb", "a;b", "a\tb", "$(id)", "`id`", "a'b", 'a"b', "a|b", "a&b", "", "a\\b",
    "a#b", "a>b",
])
def test_sbatch_value_refuses(value):
    with pytest.raises(UsageError):
        render.sbatch_value(value)


@pytest.mark.parametrize("value", ["dtn\n", "--mem=4G\n"])
def test_sbatch_value_refuses_trailing_newline(value):
    with pytest.raises(UsageError):
        render.sbatch_value(value)


@pytest.mark.parametrize("field, value", [
    ("partition", "dtn --wrap=x"), ("account", "a;b"), ("qos", "q\nq"),
    ("time", "$(id)"), ("extra", ["--x=1 2"]), ("finalize_partition", "s b"),
    ("label", "hm 1"),
])
def test_render_refuses_unsafe_sbatch_values(field, value):
    with pytest.raises(UsageError):
        render.render(golden_settings(**{field: value}), 2, 2)


def test_shquote():
    assert render.shquote("plain") == "plain"
    assert render.shquote("a b") == "'a b'"
    assert render.shquote(b"it's") == "'it'\"'\"'s'"
    assert encoded(render.shquote(b"\xff")) == b"'\xff'"
    assert render.shquote(5) == "5"


# --------------------------------------------------------------------------- environment

def test_search_path_overrides_packaged_templates(tmp_path):
    (tmp_path / "finalize.sh.j2").write_text(
        '{% extends "base.sh.j2" %}{% block command %}site-specific {{ jobdir | shquote }}\n'
        '{% endblock %}')
    s = render.ScriptSettings(label="hm-1", jobdir=b"/a b", db_url="x", python="py")
    scripts = render.render(s, 1, 1, search_path=[str(tmp_path)])
    assert scripts["finalize.sh"].rstrip("\n").endswith("\nsite-specific '/a b'")
    assert "hpcmove.worker" in scripts["transfer.sh"]  # packaged one still used


def test_strict_undefined(tmp_path):
    (tmp_path / "finalize.sh.j2").write_text("echo {{ no_such_variable }}\n")
    env = render.environment([str(tmp_path)])
    with pytest.raises(jinja2.UndefinedError, match="no_such_variable"):
        env.get_template("finalize.sh.j2").render(jobdir=b"/j")
    s = render.ScriptSettings(label="hm-1", jobdir=b"/j", db_url="x", python="py")
    with pytest.raises(jinja2.UndefinedError):
        render.render(s, 0, 1, search_path=[str(tmp_path)])


def test_environment_filters_and_no_autoescape(tmp_path):
    (tmp_path / "t.j2").write_text("{{ v }}|{{ v | shquote }}\n")
    env = render.environment([str(tmp_path)])
    assert env.get_template("t.j2").render(v="<a&b>") == "<a&b>|'<a&b>'\n"
    assert os.path.isfile(os.path.join(render.packaged_dir(), "transfer.sh.j2"))
