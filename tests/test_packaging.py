"""A plain (non-editable) install carries the templates, the engines and the entry points."""
import os
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_ships_templates_plugins_and_entry_points(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), REPO], check=True)
    (wheel,) = (tmp_path / "dist").glob("hpcmove-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for required in ("hpcmove/templates/transfer.sh.j2", "hpcmove/templates/finalize.sh.j2",
                     "hpcmove/templates/base.sh.j2", "hpcmove_plugins/copy.py",
                     "hpcmove_plugins/ssh.py", "hpcmove/backends/slurm.py"):
        assert required in names, required
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(target), str(wheel)], check=True)
    probe = (
        "import hpcmove, hpcmove.render as r, hpcmove.plugins as p;"
        "assert hpcmove.__file__.startswith(%r), hpcmove.__file__;"
        "s = r.ScriptSettings('hm-1', b'/j', 'sqlite:///x', '/usr/bin/python3');"
        "assert 'hpcmove.worker' in r.render(s, 2, 2)['transfer.sh'];"
        "assert p.engine('copy').name == 'copy';"
        "print(sorted(p.available('backend')))" % str(target))
    out = subprocess.run([sys.executable, "-c", probe], env=dict(os.environ, PYTHONPATH=str(target)),
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['drmaa', 'local', 'pyslurm', 'slurm']"
