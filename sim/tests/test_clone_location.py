"""The simulator wherever its clone lives: a CI clone under /tmp once booted no helper at all,
because an instance's private /tmp hid the simulator's own files (its power shim) from the
instance's boot script."""
import os
import shutil
import uuid

import conftest

REPO = conftest.REPO


def test_a_simulator_cloned_under_tmp_boots_its_helpers(tmp_path, monkeypatch):
    assert str(tmp_path).startswith("/tmp/"), tmp_path
    clone = tmp_path / "clone"
    shutil.copytree(os.path.join(REPO, "sim"), clone / "sim",
                    ignore=shutil.ignore_patterns("__pycache__", "tests"))
    (clone / "scripts").mkdir()
    shutil.copy(os.path.join(REPO, "scripts", "ec2sim"), clone / "scripts" / "ec2sim")
    # The venv is the real one (a link, as if made there), so nothing is installed.
    os.symlink(os.path.join(REPO, ".venv"), clone / ".venv")
    state = tmp_path / "state"
    monkeypatch.setattr(conftest, "EC2SIM", str(clone / "scripts" / "ec2sim"))
    monkeypatch.setenv("EC2SIM_STATE_DIR", str(state))
    name = f"t{uuid.uuid4().hex[:8]}"
    s = conftest.Sim(name, str(tmp_path), {"EC2SIM_STATE_DIR": str(state)})
    try:
        inst = s.launch()
        r = s.ssh(inst, "readlink -f /sbin/poweroff; head -c 2 /sbin/poweroff")
        assert r.stdout.splitlines()[-1] == "#!", r.stdout
    finally:
        s.run("down")
    assert not any(name in l for l in open("/proc/mounts"))
