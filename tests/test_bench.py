"""bench/run.py on tiny data, so the benchmark cannot rot (seconds, not minutes).

The real run (2 GiB, 20,000 files, a million entries) is `python bench/run.py`; its
table is in bench/README.md. Here every local group runs one counted round; peers
that are not installed are left out (--no-install), as is Slurm; the SSH groups use
the ssh testbed that tests/run brings up.
"""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_local_groups_on_tiny_data(tmp_path):
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "run.py"), "--dir", str(tmp_path),
         "--groups", "floor,big,small,ssh,sshsmall,sshpull,bigpull,million", "--size", "64K",
         "--files", "12",
         "--entries", "30",
         "--rounds", "1", "--slurm", "no", "--no-install"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for row in ("hpcmove", "cp", "rsync + rsync -c", "copy engine alone", "cp -a", "rsync -a", "create+rename floor",
                "scp", "rsync -e ssh", "ssh 'cat > f' stream", "hpcmove --engine rsync",
                "rsync -a -e ssh"):
        assert f" {row} " in out, out
    assert "peer/hpcmove" in out and "CPU s" in out
    assert "\nfloor    hpcmove " in out
    assert "\nsshpull  hpcmove " in out and "\nsshpull  rsync -a -e ssh " in out
    assert "\nbigpull  hpcmove " in out and "\nbigpull  scp " in out
    assert "million  submit 30 files" in out
    assert "status --summary" in out
    assert not os.path.exists(tmp_path / "dst")  # the bench cleans up its destination
