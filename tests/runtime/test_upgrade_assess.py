"""Boot assessment on the host: cos-boot-assess (the CLI in a subprocess) against a scratch
root and directories standing for COS_STATE and COS_OEM; the grub.cfg side is checked by
GRUB's own parser (grub-script-check) and, end to end, by the QEMU test."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.install import grubenv
from runtime.upgrade import source

REPO = Path(__file__).resolve().parents[2]
GRUB_CFG = REPO / "packages/cos-grub/files/etc/cos/grub.cfg"
DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def machine(tmp_path: Path) -> dict[str, Path]:
    root, state, oem = tmp_path / "root", tmp_path / "state", tmp_path / "oem"
    (root / "run/cos").mkdir(parents=True)
    (state / "cOS").mkdir(parents=True)
    (state / "cOS/active.json").write_text(json.dumps({"image": "reg/cos/red:red-0.2.0-amd64", "digest": DIGEST}))
    oem.mkdir()
    return {"root": root, "state": state, "oem": oem}


def assess(m: dict[str, Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.upgrade.assess", "--root", m["root"], "--state",
                           m["state"], "--oem", m["oem"]], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_a_trial_that_reaches_multi_user_is_marked_good(machine: dict[str, Path]) -> None:
    (machine["root"] / "run/cos/active_mode").touch()
    (machine["oem"] / "grubenv").write_bytes(grubenv.encode({"cos_trial": "1", "cos_tried": "1", "brand": "x"}))
    proc = assess(machine)
    assert proc.returncode == 0, proc.stderr
    assert "marked good" in proc.stderr
    assert grubenv.read(machine["oem"] / "grubenv") == {"brand": "x"}
    assert not (machine["root"] / "run/cos/upgrade_rolled_back").exists()


def test_a_rollback_is_reported_and_the_image_recorded(machine: dict[str, Path]) -> None:
    (machine["root"] / "run/cos/passive_mode").touch()
    (machine["oem"] / "grubenv").write_bytes(grubenv.encode({"cos_rollback": "1", "saved_entry": "fallback"}))
    (machine["state"] / source.FAILED).write_text(json.dumps({"digests": ["sha256:" + "00" * 32]}))
    proc = assess(machine)
    assert proc.returncode == 0, proc.stderr
    assert f"the upgrade to reg/cos/red:red-0.2.0-amd64 ({DIGEST}) was rolled back" in proc.stderr
    assert DIGEST in (machine["root"] / "run/cos/upgrade_rolled_back").read_text()
    assert json.loads((machine["state"] / source.FAILED).read_text())["digests"] == ["sha256:" + "00" * 32, DIGEST]
    assert grubenv.read(machine["oem"] / "grubenv") == {"saved_entry": "fallback"}   # passive stays the default
    assert assess(machine).returncode == 0 and "rolled back" not in assess(machine).stderr   # reported once


def test_nothing_to_assess_outside_a_trial(machine: dict[str, Path]) -> None:
    (machine["root"] / "run/cos/active_mode").touch()
    (machine["oem"] / "grubenv").write_bytes(grubenv.encode({"brand": "x"}))
    proc = assess(machine)
    assert proc.returncode == 0 and "marked good" not in proc.stderr
    assert grubenv.read(machine["oem"] / "grubenv") == {"brand": "x"}


def test_grub_cfg_counts_trials_with_plain_grub_commands() -> None:
    text = GRUB_CFG.read_text()
    if shutil.which("grub-script-check"):
        subprocess.run(["grub-script-check", str(GRUB_CFG)], check=True)
    assert "save_env -f (${oem_blk})/grubenv cos_tried" in text
    assert "set saved_entry=fallback" in text
    assert "insmod" not in text   # signed GRUB cannot load modules: only built-in commands
    assert "cos.mode=active ${cos_trial_args}" in text and "cos.mode=passive ${cos_rollback_args}" in text
