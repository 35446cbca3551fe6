"""cos-reset for real: the CLI in a subprocess against test_deploy's scratch machine
(recovery mode, directories standing for COS_STATE / COS_OEM / COS_PERSISTENT)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from runtime.install import deploy, grubenv
from tests.runtime.test_deploy import REPO, args_for, assert_deployed, debugfs, machine, run_cli

__all__ = ["machine"]   # the fixture, used by name


def reset_cli(m: dict[str, Path], *extra: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.install.reset_cli", "--root", m["root"], "--state",
                           m["state"], "--oem", m["oem"], "--source", m["source"], "--persistent", m["persistent"],
                           *(str(a) for a in extra)], cwd=REPO, capture_output=True, text=True, timeout=300)


def deployed(machine: dict[str, Path]) -> dict[str, Path]:
    assert run_cli(*args_for(machine)).returncode == 0
    machine["persistent"] = machine["root"].parent / "persistent"
    (machine["persistent"] / ".state/home.bind/user").mkdir(parents=True)
    (machine["persistent"] / ".state/home.bind/user/data").write_text("user data")
    (machine["oem"] / "99_custom.yaml").write_text("stages: {}\n")
    (machine["state"] / deploy.ACTIVE).write_bytes(b"a broken active")   # what a reset repairs
    return machine


def test_reset_redeploys_and_wipes_persistent_keeping_oem(machine: dict[str, Path]) -> None:
    m = deployed(machine)
    oem_dir = m["root"] / "system/oem"
    oem_dir.mkdir(parents=True)
    (oem_dir / "90_after_reset.yaml").write_text(
        "stages:\n  after-reset:\n    - name: mark\n      files:\n        - path: /etc/was-reset\n"
        "          content: \"yes\"\n")
    grubenv.update(m["oem"] / "grubenv", next_entry="recovery")
    proc = reset_cli(m)
    assert proc.returncode == 0, proc.stderr
    assert_deployed(m)
    assert "tool0" in debugfs(m["state"] / deploy.ACTIVE, "ls /usr/bin")
    assert list(m["persistent"].iterdir()) == []
    assert (m["oem"] / "99_custom.yaml").exists()
    assert (m["root"] / "etc/was-reset").read_text().strip() == "yes"


def test_reset_oem_empties_it_but_keeps_grubenv(machine: dict[str, Path]) -> None:
    m = deployed(machine)
    proc = reset_cli(m, "--reset-oem")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in m["oem"].iterdir()) == ["grubenv"]
    assert grubenv.read(m["oem"] / "grubenv")["next_entry"] == "cos"


def test_reset_only_in_recovery(machine: dict[str, Path]) -> None:
    m = deployed(machine)
    (m["root"] / "run/cos/recovery_mode").unlink()
    proc = reset_cli(m)
    assert proc.returncode == 1 and "cos-reset runs only in recovery mode" in proc.stderr.splitlines()[-1]
    assert (m["persistent"] / ".state/home.bind/user/data").exists()


def test_reset_after_a_rollback_boots_active_again(machine: dict[str, Path]) -> None:
    """A rolled-back upgrade left saved_entry=fallback: after the reset every start is `cos`."""
    m = deployed(machine)
    grubenv.update(m["oem"] / "grubenv", next_entry="recovery", saved_entry="fallback", cos_trial="1",
                   cos_tried="1", cos_rollback="1")
    proc = reset_cli(m)
    assert proc.returncode == 0, proc.stderr
    env = grubenv.read(m["oem"] / "grubenv")
    assert env["next_entry"] == "cos", env
    assert not {"saved_entry", "cos_trial", "cos_tried", "cos_rollback"} & env.keys(), env
