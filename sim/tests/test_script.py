"""scripts/ec2sim itself, on a fresh clone: a copy of the script in a scratch repo whose
python3 and venv are stubs that say which one ran (no simulator, no network)."""
import os
import shutil
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SYSTEM_PY = """#!/bin/sh
# The system python3: `-m venv DIR` makes a stub venv, anything else says who ran.
if [ "$1" = -m ] && [ "$2" = venv ]; then
  mkdir -p "$3/bin"
  printf '#!/bin/sh\\n[ "$1" = -c ] && exit 1\\necho "venv-python $*"\\n' > "$3/bin/python"
  printf '#!/bin/sh\\nexit 0\\n' > "$3/bin/pip"
  chmod +x "$3/bin/python" "$3/bin/pip"
  exit 0
fi
echo "system-python $*"
"""


def fresh_clone(tmp_path):
    root = tmp_path / "clone"
    (root / "scripts").mkdir(parents=True)
    (root / "sim").mkdir()
    shutil.copy(os.path.join(REPO, "scripts", "ec2sim"), root / "scripts" / "ec2sim")
    shutil.copy(os.path.join(REPO, "sim", "requirements.txt"), root / "sim" / "requirements.txt")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python3").write_text(SYSTEM_PY)
    (bindir / "python3").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}",
               EC2SIM_STATE_DIR=str(tmp_path / "state"), EC2SIM_NAME="fresh")
    return root, env


def test_first_up_on_fresh_clone_runs_the_venv_python(tmp_path):
    root, env = fresh_clone(tmp_path)
    r = subprocess.run([str(root / "scripts" / "ec2sim"), "up"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "venv-python -m ec2sim up"
    assert os.access(root / ".venv" / "bin" / "python", os.X_OK)


def test_status_on_fresh_clone_makes_no_venv(tmp_path):
    root, env = fresh_clone(tmp_path)
    r = subprocess.run([str(root / "scripts" / "ec2sim"), "status"], capture_output=True,
                       text=True, env=env)
    assert r.stdout.split()[:3] == ["system-python", "-I", "-S"]
    assert not (root / ".venv").exists()
