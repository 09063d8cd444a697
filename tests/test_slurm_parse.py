"""Slurm backend: output parsing (pure) and the command lines it runs (fake runner)."""
import pytest

from hpcmove.backends import SubmitSpec, Submitted
from hpcmove.backends import slurm
from hpcmove.errors import SchedulerError


# --------------------------------------------------------------------------- pure parsing

@pytest.mark.parametrize("spec, tasks", [
    ("0", [0]),
    ("7", [7]),
    ("0-3", [0, 1, 2, 3]),
    ("0-3,7", [0, 1, 2, 3, 7]),
    ("2-5%3", [2, 3, 4, 5]),
    ("1,3,5%2", [1, 3, 5]),
    ("10-11,0", [10, 11, 0]),
])
def test_expand(spec, tasks):
    assert slurm._expand(spec) == tasks


def test_parse_rows_sacct():
    text = ("123_0|COMPLETED|dtn1\n"
            "123_1|FAILED|dtn2\n"
            "123_[2-5%3]|PENDING|\n"
            "\n"
            "124|CANCELLED by 1001|cn1\n"
            "124.batch|CANCELLED|cn1\n"
            "124.extern|COMPLETED|cn1\n"
            "125|RUNNING+|cn[1-2]\n"
            "126||\n")
    assert slurm._parse_rows(text) == [
        ("123", 0, "COMPLETED", "dtn1"),
        ("123", 1, "FAILED", "dtn2"),
        ("123", 2, "PENDING", ""),
        ("123", 3, "PENDING", ""),
        ("123", 4, "PENDING", ""),
        ("123", 5, "PENDING", ""),
        ("124", None, "CANCELLED", "cn1"),
        ("125", None, "RUNNING", "cn[1-2]"),
        ("126", None, "UNKNOWN", ""),
    ]


def test_parse_rows_short_lines_and_empty():
    assert slurm._parse_rows("") == []
    assert slurm._parse_rows("130|PENDING\n") == [("130", None, "PENDING", "")]


def test_parse_rows_ignores_steps_of_array_tasks():
    assert slurm._parse_rows("123_0|COMPLETED|dtn1\n123_0.batch|COMPLETED|dtn1\n") == [
        ("123", 0, "COMPLETED", "dtn1")]


def test_parse_squeue():
    text = ("123|0|RUNNING|dtn1\n"
            "123|2-5%3|PENDING|\n"
            "125|N/A|PENDING|\n"
            "\n"
            "126||COMPLETING|cn4\n")
    assert slurm._parse_squeue(text) == [
        ("123", 0, "RUNNING", "dtn1"),
        ("123", 2, "PENDING", ""),
        ("123", 3, "PENDING", ""),
        ("123", 4, "PENDING", ""),
        ("123", 5, "PENDING", ""),
        ("125", None, "PENDING", ""),
        ("126", None, "COMPLETING", "cn4"),
    ]


@pytest.mark.parametrize("states, overall", [
    ([], "UNKNOWN"),
    (["COMPLETED"], "COMPLETED"),
    (["COMPLETED", "COMPLETED"], "COMPLETED"),
    (["COMPLETED", "RUNNING"], "RUNNING"),
    (["FAILED", "PENDING"], "PENDING"),
    (["COMPLETED", "FAILED", "RUNNING"], "RUNNING"),
    (["COMPLETED", "FAILED"], "FAILED"),
    (["TIMEOUT", "COMPLETED"], "TIMEOUT"),
    (["COMPLETED", "CANCELLED"], "CANCELLED"),
    (["UNKNOWN", "REQUEUED"], "REQUEUED"),
    (["UNKNOWN"], "UNKNOWN"),
])
def test_overall(states, overall):
    assert slurm._overall(states) == overall


# --------------------------------------------------------------------------- fake runner

class FakeRun:
    """Stands in for slurm.run: records argv, answers from a per-command queue."""

    def __init__(self, **answers):
        self.answers = {k: list(v) for k, v in answers.items()}
        self.calls = []

    def __call__(self, command, *args):
        for a in args:
            assert isinstance(a, (str, bytes, int)), a
        argv = [command, *[a.decode() if isinstance(a, bytes) else str(a) for a in args]]
        self.calls.append(argv)
        answer = self.answers[command].pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def of(self, command):
        return [c for c in self.calls if c[0] == command]


@pytest.fixture
def fake(monkeypatch):
    def install(**answers):
        f = FakeRun(**answers)
        monkeypatch.setattr(slurm, "run", f)
        return f
    return install


def fail(command="x", code=1):
    return SchedulerError([command], code, "", "boom")


def opt(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, argv
    return values[0]


def test_poll_many_ids_one_squeue_one_sacct(fake):
    f = fake(squeue=["100|0|RUNNING|dtn1\n100|1-3%2|PENDING|\n101|N/A|PENDING|\n"],
             sacct=["102|COMPLETED|cn1\n102.batch|COMPLETED|cn1\n"
                    "103_0|FAILED|cn2\n103_1|COMPLETED|cn2\n"])
    ids = ["100", "101", "102", "103", "104"]
    assert slurm.SlurmBackend().poll(ids) == {
        "100": "RUNNING", "101": "PENDING", "102": "COMPLETED", "103": "FAILED",
        "104": "UNKNOWN"}
    assert len(f.of("squeue")) == 1 and len(f.of("sacct")) == 1
    assert opt(f.of("squeue")[0], "jobs") == "100,101,102,103,104"
    assert opt(f.of("squeue")[0], "format") == "%F|%K|%T|%N"
    assert "--array" in f.of("squeue")[0]
    sacct = f.of("sacct")[0]
    assert opt(sacct, "jobs") == "102,103,104"  # only the ids squeue did not know
    assert "--parsable2" in sacct and opt(sacct, "format") == "JobID,State,NodeList"


def test_poll_all_known_to_squeue_skips_sacct(fake):
    f = fake(squeue=["7|N/A|RUNNING|n1\n8|0-1|PENDING|\n"])
    assert slurm.SlurmBackend().poll([7, 8, None, ""]) == {"7": "RUNNING", "8": "PENDING"}
    assert [c[0] for c in f.calls] == ["squeue"]


def test_poll_squeue_refuses_then_sacct_for_all(fake):
    f = fake(squeue=[fail("squeue")], sacct=["7|COMPLETED|n1\n8|TIMEOUT|n2\n"])
    assert slurm.SlurmBackend().poll(["7", "8"]) == {"7": "COMPLETED", "8": "TIMEOUT"}
    assert opt(f.of("sacct")[0], "jobs") == "7,8"
    assert len(f.calls) == 2


def test_poll_without_accounting(fake):
    fake(squeue=["7|N/A|RUNNING|n1\n"], sacct=[fail("sacct")])
    assert slurm.SlurmBackend().poll(["7", "8"]) == {"7": "RUNNING", "8": "UNKNOWN"}


def test_poll_nothing_runs_nothing(fake):
    f = fake()
    assert slurm.SlurmBackend().poll([]) == {}
    assert f.calls == []


def test_task_states(fake):
    fake(squeue=["100|0|RUNNING|dtn1\n100|1-2|PENDING|\n"])
    assert slurm.SlurmBackend().task_states("100") == {
        0: ("RUNNING", "dtn1"), 1: ("PENDING", ""), 2: ("PENDING", "")}


def test_cancel(fake):
    f = fake(scancel=[""])
    slurm.SlurmBackend().cancel(["5", None, 6])
    assert f.calls == [["scancel", "5", "6"]]
    slurm.SlurmBackend().cancel([None])
    assert len(f.calls) == 1


def spec(dependency="", transfer=True):
    scripts = {"finalize.sh": b"/j/finalize.sh"}
    if transfer:
        scripts["transfer.sh"] = b"/j/transfer.sh"
    return SubmitSpec(b"/j", scripts, 3, 2, dependency,
                      logs={"transfer": b"/j/logs/transfer-%A_%a.out",
                            "finalize": b"/j/logs/finalize-%j.out"})


CONFIG = "MaxArraySize            = 1001\nMaxJobCount = 10000\n"


def test_submit_chain(fake):
    f = fake(sbatch=["500\n", "501;cluster\n"], scontrol=[CONFIG])
    assert slurm.SlurmBackend().submit(spec("afterok:77")) == Submitted("500", "501")
    array, final = f.of("sbatch")
    assert array == ["sbatch", "--parsable", "--array=0-2%2", "--export=ALL,HPCMOVE_TASK_OFFSET=0",
                     "--output=/j/logs/transfer-%A_%a.out",
                     "--dependency=afterok:77", "--kill-on-invalid-dep=yes", "/j/transfer.sh"]
    # the finalize job waits for the array whatever its outcome, not for the user's dependency
    assert final == ["sbatch", "--parsable", "--export=ALL", "--dependency=afterany:500",
                     "--output=/j/logs/finalize-%j.out", "/j/finalize.sh"]


def test_submit_without_user_dependency(fake):
    f = fake(sbatch=["500", "501"], scontrol=[CONFIG])
    slurm.SlurmBackend().submit(spec())
    f.calls = f.of("sbatch")
    assert not any("--kill-on-invalid-dep" in a for a in f.calls[0])
    assert not any(a.startswith("--dependency") for a in f.calls[0])
    assert opt(f.calls[1], "dependency") == "afterany:500"


def test_submit_without_transfer_script(fake):
    f = fake(sbatch=["501\n"])
    assert slurm.SlurmBackend().submit(spec("afterok:77", transfer=False)) == \
        Submitted(None, "501")
    assert f.calls == [["sbatch", "--parsable", "--export=ALL", "--output=/j/logs/finalize-%j.out",
                        "--dependency=afterok:77", "--kill-on-invalid-dep=yes",
                        "/j/finalize.sh"]]


def test_submit_finalize_failure_cancels_array(fake):
    error = fail("sbatch")
    f = fake(sbatch=["500\n", error], scancel=[""], scontrol=[CONFIG])
    with pytest.raises(SchedulerError) as info:
        slurm.SlurmBackend().submit(spec())
    assert info.value is error
    assert [c[0] for c in f.calls] == ["scontrol", "sbatch", "sbatch", "scancel"]
    assert f.calls[3] == ["scancel", "500"]


def test_submit_array_failure_submits_nothing_else(fake):
    f = fake(sbatch=[fail("sbatch")], scontrol=[CONFIG])
    with pytest.raises(SchedulerError):
        slurm.SlurmBackend().submit(spec())
    assert len(f.of("sbatch")) == 1 and not f.of("scancel")


def test_more_tasks_than_max_array_size_are_fed_in_chunks(fake):
    f = fake(scontrol=["MaxArraySize = 2\n", "", ""], sbatch=["600", "601", "602"])
    s = spec()
    s.scripts["feed.sh"] = b"/j/feed.sh"
    s.logs["feed"] = b"/j/logs/feed-%j.out"
    assert slurm.SlurmBackend().submit(s) == Submitted("601@0,feed:602", "600")
    final, array, feeder = f.of("sbatch")
    assert "--hold" in final and final[-1] == "/j/finalize.sh"
    assert "--array=0-1%2" in array and "--export=ALL,HPCMOVE_TASK_OFFSET=0" in array
    assert feeder[-4:] == ["/j/feed.sh", "1", "2", "600"]
    assert "--dependency=afterany:601" in feeder
    assert f.of("scontrol")[1] == ["scontrol", "update", "JobId=600",
                                   "Dependency=afterany:601:602"]
    assert f.of("scontrol")[2] == ["scontrol", "release", "600"]


def test_task_states_of_a_fed_job_add_each_chunk_offset(fake):
    fake(squeue=["700|0-1|COMPLETED|dtn1\n710|0|FAILED|dtn2\n"])
    assert slurm.SlurmBackend().task_states("700@0,710@2,feed:711") == {
        0: ("COMPLETED", "dtn1"), 1: ("COMPLETED", "dtn1"), 2: ("FAILED", "dtn2")}


# --------------------------------------------------------------------------- run() itself

def test_run_returns_stdout():
    assert slurm.run("printf", "%s|", "a b", b"c", 3) == "a b|c|3|"


def test_run_failure_carries_exit_code_and_output():
    with pytest.raises(SchedulerError) as info:
        slurm.run("sh", "-c", "echo out; echo err >&2; exit 3")
    e = info.value
    assert (e.exit_code, e.stdout, e.stderr) == (3, "out\n", "err\n")
    assert e.command == ["sh", "-c", "echo out; echo err >&2; exit 3"]
    assert "exit 3" in str(e) and "err" in str(e)


def test_run_missing_command():
    with pytest.raises(SchedulerError) as info:
        slurm.run("hpcmove-no-such-command-xyz", "--version")
    assert info.value.exit_code == 127
    assert "command not found" in str(info.value)


def test_run_non_utf8_argument_is_a_clear_error(tmp_path):
    # sh cannot pass non-UTF-8 bytes; hpcmove keeps such bytes off batch command lines
    # (job dirs must be UTF-8) and any that slip through fail cleanly, running nothing
    marker = tmp_path / "ran"
    with pytest.raises(SchedulerError, match="cannot start sh"):
        slurm.run("sh", "-c", f"touch {marker}", "sh", b"a\xffb")
    assert not marker.exists()
