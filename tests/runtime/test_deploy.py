"""cos-deploy for real: the CLI in a subprocess against a scratch root, real directories
standing for COS_STATE and COS_OEM, and a real source tree; the images are checked with
e2label, debugfs and e2fsck (no mounts)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.install import deploy, grubenv
from runtime.system import CosError

REPO = Path(__file__).resolve().parents[2]
MENU_SRC = REPO / "packages/cos-grub/files/etc/cos"


def sh(*cmd: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], check=check, capture_output=True, text=True)


def cli(*args: str | Path, **kw: object) -> list[str]:
    return [sys.executable, "-m", "runtime.install.cli", *(str(a) for a in args)]


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args), cwd=REPO, capture_output=True, text=True, timeout=300)


def make_source(path: Path, data_mib: int = 4) -> Path:
    """A small root tree with what mkfs.ext4 -d must keep: the boot menu, hard links, a file
    capability, a symlink, an owner, a large sparse file (/var/log/lastlog style)."""
    (path / "etc/cos").mkdir(parents=True)
    for name in ("grub.cfg", "bootargs.cfg"):
        (path / "etc/cos" / name).write_bytes((MENU_SRC / name).read_bytes())
    (path / "usr/bin").mkdir(parents=True)
    for i in range(data_mib):
        (path / f"usr/bin/tool{i}").write_bytes(os.urandom(1024 * 1024))
    os.link(path / "usr/bin/tool0", path / "usr/bin/tool0-hardlink")
    os.symlink("tool0", path / "usr/bin/tool0-symlink")
    (path / "usr/bin/pinger").write_bytes(b"\x7fELF not really")
    if sh("setcap", "cap_net_raw+ep", path / "usr/bin/pinger", check=False).returncode != 0:
        pytest.skip("setcap cannot set file capabilities here")
    (path / "home/user").mkdir(parents=True)
    os.chown(path / "home/user", 1000, 1000)
    (path / "var/log").mkdir(parents=True)
    with open(path / "var/log/lastlog", "wb") as f:
        f.truncate(64 * 1024 ** 3)   # 64 GiB apparent, nothing allocated
    return path


@pytest.fixture
def machine(tmp_path: Path) -> dict[str, Path]:
    root, state, oem = tmp_path / "root", tmp_path / "state", tmp_path / "oem"
    (root / "run/cos").mkdir(parents=True)
    (root / "run/cos/recovery_mode").touch()
    state.mkdir()
    oem.mkdir()
    (oem / "grubenv").write_bytes(grubenv.encode({"next_entry": "recovery", "brand": "kept"}))
    return {"root": root, "state": state, "oem": oem, "source": make_source(tmp_path / "source")}


def args_for(m: dict[str, Path]) -> list[str | Path]:
    return ["--no-verify", "--no-cosign", "--root", m["root"], "--state", m["state"], "--oem", m["oem"],
            "--source", m["source"]]


def debugfs(image: Path, request: str) -> str:
    return sh("debugfs", "-R", request, image).stdout


def inode_of(image: Path, path: str) -> int:
    return int(sh("debugfs", "-R", f"stat {path}", image).stdout.split("Inode:")[1].split()[0])


def assert_deployed(m: dict[str, Path]) -> None:
    state = m["state"]
    active, passive = state / deploy.ACTIVE, state / deploy.PASSIVE
    assert sh("e2label", active).stdout.strip() == "COS_ACTIVE"
    assert sh("e2label", passive).stdout.strip() == "COS_PASSIVE"
    for img in (active, passive):
        sh("e2fsck", "-fn", img)
        assert img.stat().st_blocks * 512 < img.stat().st_size - 128 * 1024 ** 2, "the image is not sparse"
        assert "tool3" in debugfs(img, "ls -l /usr/bin")
        assert debugfs(img, "cat /etc/cos/grub.cfg").encode() == (MENU_SRC / "grub.cfg").read_bytes()
    uuids = {sh("blkid", "-p", "-s", "UUID", "-o", "value", img).stdout.strip() for img in (active, passive)}
    assert len(uuids) == 2
    for name in deploy.MENU:
        assert (state / name).read_bytes() == (m["source"] / name).read_bytes()
    assert not (state / deploy.TRANSITION).exists() and not (state / deploy.PASSIVE_TMP).exists()
    assert not (state / deploy.INCOMPLETE).exists()
    assert len((m["oem"] / "grubenv").read_bytes()) == 1024
    assert grubenv.read(m["oem"] / "grubenv") == {"next_entry": "cos", "brand": "kept"}


def test_happy_path(machine: dict[str, Path]) -> None:
    proc = run_cli(*args_for(machine))
    assert proc.returncode == 0, proc.stderr
    assert_deployed(machine)
    active = machine["state"] / deploy.ACTIVE
    # hard links stay hard links, capabilities and owners are kept, the sparse file stays sparse
    assert inode_of(active, "/usr/bin/tool0") == inode_of(active, "/usr/bin/tool0-hardlink")
    assert "Links: 2" in debugfs(active, "stat /usr/bin/tool0")
    assert "security.capability (20)" in debugfs(active, "ea_list /usr/bin/pinger")
    assert "User:  1000   Group:  1000" in debugfs(active, "stat /home/user")
    assert "Fast link dest: \"tool0\"" in debugfs(active, "stat /usr/bin/tool0-symlink")
    assert active.stat().st_size < 2 * 1024 ** 3     # sized by the allocated bytes, not the sparse 64 GiB
    assert f"Size: {64 * 1024 ** 3}" in debugfs(active, "stat /var/log/lastlog")
    if shutil.which("grub-fstest"):   # GRUB's own ext4 driver reads both images (what `loopback` does)
        for img in (active, machine["state"] / deploy.PASSIVE):
            menu = sh("grub-fstest", img, "cat", "/etc/cos/grub.cfg").stdout.encode()
            assert menu == (MENU_SRC / "grub.cfg").read_bytes()
            assert "tool0-hardlink" in sh("grub-fstest", img, "ls", "/usr/bin").stdout
    if not runner_present():
        assert "after-deploy skipped" in proc.stderr
    assert "after-deploy stage failed" not in proc.stderr


def runner_present() -> bool:
    try:
        from runtime import cloudconfig
    except ImportError:
        return False
    return hasattr(cloudconfig, "run_stage")


def test_default_source_is_the_recovery_squashfs_in_the_root(machine: dict[str, Path]) -> None:
    (machine["root"] / "run/rootfsbase").parent.mkdir(parents=True, exist_ok=True)
    machine["source"].rename(machine["root"] / "run/rootfsbase")
    proc = run_cli("--root", machine["root"], "--state", machine["state"], "--oem", machine["oem"])
    assert proc.returncode == 0, proc.stderr
    machine["source"] = machine["root"] / "run/rootfsbase"
    assert_deployed(machine)


@pytest.mark.skipif(not runner_present(), reason="the cloud-config runner (runtime.cloudconfig.run_stage) is not here")
def test_runs_the_after_deploy_stage(machine: dict[str, Path]) -> None:
    oem_dir = machine["root"] / "system/oem"
    oem_dir.mkdir(parents=True)
    (oem_dir / "90_after_deploy.yaml").write_text(
        "stages:\n  after-deploy:\n    - name: mark\n      files:\n        - path: /etc/deployed\n"
        "          content: yes\n")
    proc = run_cli(*args_for(machine))
    assert proc.returncode == 0, proc.stderr
    assert (machine["root"] / "etc/deployed").read_text().strip() == "yes"


def test_outside_recovery_mode(machine: dict[str, Path]) -> None:
    (machine["root"] / "run/cos/recovery_mode").unlink()
    proc = run_cli(*args_for(machine))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("cos-deploy: error: cos-deploy runs only in recovery mode")
    assert list(machine["state"].iterdir()) == []


def test_without_cos_state(machine: dict[str, Path]) -> None:
    """No --state: the partition is looked for among this machine's block devices; there is none."""
    proc = run_cli("--root", machine["root"], "--oem", machine["oem"], "--source", machine["source"])
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("cos-deploy: error:")]
    assert errors == [proc.stderr.strip().splitlines()[-1]]
    assert "no partition with the filesystem label or PARTLABEL COS_STATE on this machine" in errors[0]
    assert "`layout` step" in errors[0]


def test_source_without_boot_menu(machine: dict[str, Path]) -> None:
    (machine["source"] / "etc/cos/grub.cfg").unlink()
    proc = run_cli(*args_for(machine))
    assert proc.returncode == 1 and "has no boot menu" in proc.stderr and "cos-grub" in proc.stderr
    assert list(machine["state"].iterdir()) == []


@pytest.fixture
def small_state(tmp_path: Path) -> Iterator[Path]:
    """A real 200 MiB filesystem (tmpfs) as COS_STATE."""
    where = tmp_path / "small-state"
    where.mkdir()
    if sh("mount", "-t", "tmpfs", "-o", "size=200M", "tmpfs", where, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield where
    finally:
        sh("umount", where)


def test_without_space(machine: dict[str, Path], small_state: Path) -> None:
    machine["state"] = small_state
    proc = run_cli(*args_for(machine))
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert "COS_STATE has 200 MiB for the images, cos-deploy needs" in line and "layout step" in line
    assert list(small_state.iterdir()) == []


def test_refuses_a_second_deploy_unless_forced(machine: dict[str, Path]) -> None:
    assert run_cli(*args_for(machine)).returncode == 0
    before = (machine["state"] / deploy.ACTIVE).stat().st_ino
    proc = run_cli(*args_for(machine))
    assert proc.returncode == 1 and "already holds a deployed system" in proc.stderr and "--force" in proc.stderr
    assert (machine["state"] / deploy.ACTIVE).stat().st_ino == before
    (machine["oem"] / "grubenv").write_bytes(grubenv.encode({"brand": "kept"}))
    assert run_cli(*args_for(machine), "--force").returncode == 0
    assert (machine["state"] / deploy.ACTIVE).stat().st_ino != before
    assert_deployed(machine)


@pytest.mark.parametrize(("moment", "whole_group"), [(deploy.TRANSITION, True), (deploy.PASSIVE_TMP, True),
                                                    (deploy.TRANSITION, False)])
def test_killed_midway_then_rerun(machine: dict[str, Path], tmp_path: Path, moment: str, whole_group: bool) -> None:
    """kill -9 while mkfs writes transition.img, or while passive.img is copied: of the CLI
    and its children (a power cut), or of the CLI alone (its mkfs goes on writing, the
    re-run starts at once). Nothing half-made is in place, the grubenv still boots
    recovery, and a plain re-run (no --force) completes the deploy."""
    source = machine["source"]
    for i in range(4, 120):   # enough data that mkfs and the copy take a while
        (source / f"usr/bin/tool{i}").write_bytes(os.urandom(1024 * 1024))
    proc = subprocess.Popen(cli(*args_for(machine)), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watched = machine["state"] / moment
    deadline = time.monotonic() + 120
    while not watched.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert proc.poll() is None, f"the deploy ended before {moment} was seen"
    if whole_group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.kill()
    assert proc.wait() == -signal.SIGKILL

    state = machine["state"]
    assert grubenv.read(machine["oem"] / "grubenv")["next_entry"] == "recovery"
    assert (state / deploy.INCOMPLETE).exists()
    if moment == deploy.TRANSITION:
        assert not (state / deploy.ACTIVE).exists()
    else:   # active is complete and valid, passive not there yet
        sh("e2fsck", "-fn", state / deploy.ACTIVE)
        assert not (state / deploy.PASSIVE).exists()

    proc2 = run_cli(*args_for(machine))
    assert proc2.returncode == 0, proc2.stderr
    assert "left by an interrupted deploy" in proc2.stderr
    assert_deployed(machine)
    try:   # the orphaned mkfs of the CLI-only kill, if it still runs
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_grubenv_matches_grub_editenv(tmp_path: Path) -> None:
    env = tmp_path / "grubenv"
    if sh("grub-editenv", env, "create", check=False).returncode != 0:
        pytest.skip("grub-editenv is not installed")
    sh("grub-editenv", env, "set", "saved_entry=recovery", "odd=a\\b")
    assert grubenv.read(env) == {"saved_entry": "recovery", "odd": "a\\b"}
    grubenv.update(env, next_entry="cos", saved_entry=None)
    assert sorted(sh("grub-editenv", env, "list").stdout.splitlines()) == ["next_entry=cos", "odd=a\\b"]
    assert len(env.read_bytes()) == 1024


def test_grubenv_rejects_a_broken_block(tmp_path: Path) -> None:
    env = tmp_path / "grubenv"
    env.write_bytes(b"next_entry=cos\n")
    with pytest.raises(CosError, match="is not a GRUB environment block"):
        grubenv.update(env, next_entry="cos")
    with pytest.raises(CosError, match="take 1"):
        grubenv.encode({"k": "x" * 1100})


def test_reboot_only_after_success_and_never_from_a_scratch_root(machine: dict[str, Path]) -> None:
    proc = run_cli(*args_for(machine), "--reboot")
    assert proc.returncode == 0, proc.stderr
    assert f"not running reboot: {machine['root']} is a scratch root" in proc.stderr
    (machine["root"] / "run/cos/recovery_mode").unlink()
    proc = run_cli(*args_for(machine), "--poweroff", "--force")
    assert proc.returncode == 1 and "poweroff" not in proc.stderr
