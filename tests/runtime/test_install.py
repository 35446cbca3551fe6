"""cos-install for real on a disk image file (real sgdisk, mkfs.ext4, debugfs, grub-mkimage
output; no mounts): the live medium is the pipeline's own install payload
(pipeline/disk.py install_payload) beside a synthetic squashfs, kernel and initrd, so the
installed disk's BIOS GRUB and COS_GRUB are compared byte for byte with the raw disk that
pipeline/disk.py builds from the same inputs. COS_STATE/COS_OEM are stand-in directories
at the deploy step (the only step that needs a mount). Each refusal: one line, exit 1,
the disk unchanged."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import disk as raw_disk
from pipeline.config import DiskLayout, Partition
from runtime.install import grubenv
from tests.synthetic import make_inputs, need_tools

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
LAYOUT = DiskLayout(bios_boot_mib=1, efi=Partition(label="COS_GRUB", size_mib=8),
                    oem=Partition(label="COS_OEM", size_mib=8),
                    recovery=Partition(label="COS_RECOVERY", size_mib=24),
                    state=Partition(label="COS_STATE", size_mib=40),
                    persistent=Partition(label="COS_PERSISTENT", size_mib=0))
DISK_MIB = 128
CONFIG = """\
name: "custom"
stages:
  boot:
    - files:
        - path: /etc/installed-by-test
          content: "yes"
"""
AFTER_INSTALL = """\
stages:
  after-install:
    - files:
        - path: /run/after-install-ran
          content: "ran"
"""


def sh(*cmd: str | Path) -> str:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The raw disk and the live medium, both from the same synthetic inputs."""
    need_tools("sgdisk", "sfdisk", "mkfs.ext4", "mkfs.vfat", "mcopy", "grub-mkimage", "debugfs", "blkid")
    base = tmp_path_factory.mktemp("install-inputs")
    inputs = make_inputs(base, payload_kib=1024)
    medium = base / "medium"
    raw_disk.install_payload(inputs, LAYOUT, medium / "cos/install")
    shutil.copyfile(inputs.squashfs, medium / "rootfs.squashfs")
    (medium / "boot").mkdir()
    shutil.copyfile(inputs.kernel, medium / "boot/vmlinuz")
    shutil.copyfile(inputs.initrd, medium / "boot/initrd")
    return {"raw": raw_disk.build_raw(base / "disk.raw", inputs, LAYOUT), "medium": medium,
            "source": base / "tree", "squashfs": inputs.squashfs}


@pytest.fixture
def machine(tmp_path: Path, built: dict[str, Path]) -> dict[str, Path]:
    root, state, oem = tmp_path / "root", tmp_path / "state", tmp_path / "oem"
    for d in (root / "run/cos", root / "system/oem", state, oem):
        d.mkdir(parents=True)
    (root / "run/cos/live_mode").touch()
    (root / "system/oem/10_after.yaml").write_text(AFTER_INSTALL)
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    target = tmp_path / "target.img"
    with open(target, "wb") as f:
        f.truncate(DISK_MIB * MIB)
    medium = tmp_path / "medium"
    shutil.copytree(built["medium"], medium)
    return {**built, "root": root, "state": state, "oem": oem, "config": tmp_path / "cfg.yaml",
            "target": target, "medium": medium}


def cos_install(m: dict[str, Path], *extra: str | Path, config: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "runtime.install.install_cli", "--root", m["root"], "--medium", m["medium"],
           "--source", m["source"], "--state", m["state"], "--oem", m["oem"],
           *(["--config", m["config"]] if config else []), *extra, m["target"]]
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=REPO)


def parts(image: Path) -> dict[str, dict]:
    table = json.loads(sh("sfdisk", "--json", image))["partitiontable"]
    return {p["name"]: p for p in table["partitions"]}


def region(image: Path, part: dict) -> bytes:
    with open(image, "rb") as f:
        f.seek(part["start"] * 512)
        return f.read(part["size"] * 512)


def fs_file(image: Path, part: dict, path: str, tmp: Path) -> bytes:
    fs = tmp / f"part-{part['name']}.img"
    fs.write_bytes(region(image, part))
    out = tmp / "out"
    sh("debugfs", "-R", f"dump {path} {out}", fs)
    return out.read_bytes()


def label(image: Path, part: dict) -> str:
    return sh("blkid", "-p", "-o", "value", "-s", "LABEL", "-O", str(part["start"] * 512), image).strip()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_installs_the_full_layout(machine: dict[str, Path], tmp_path: Path) -> None:
    proc = cos_install(machine)
    assert proc.returncode == 0, proc.stderr
    disk, raw = machine["target"], machine["raw"]
    got, want = parts(disk), parts(raw)
    assert list(got) == ["legacy", "efi", "oem", "recovery", "state", "persistent"]
    for name in ("legacy", "efi", "oem", "recovery"):
        assert (got[name]["start"], got[name]["size"], got[name]["type"]) == \
               (want[name]["start"], want[name]["size"], want[name]["type"]), name
    assert got["state"]["size"] * 512 == 40 * MIB
    assert got["persistent"]["start"] + got["persistent"]["size"] > (DISK_MIB - 2) * 2048   # the rest
    assert got["efi"]["uuid"] != want["efi"]["uuid"]          # each installed disk has its own GUIDs

    # the bootloader is the raw disk's, byte for byte: MBR code, core.img, the whole ESP
    d, r = disk.read_bytes(), raw.read_bytes()
    assert d[:0x1B8] == r[:0x1B8] and d[510:512] == b"\x55\xaa"
    assert region(disk, got["legacy"]) == region(raw, want["legacy"])
    assert region(disk, got["efi"]) == region(raw, want["efi"])
    assert struct.unpack_from("<Q", d, 0x5C)[0] == 2048

    assert [label(disk, got[n]) for n in ("efi", "oem", "recovery", "state", "persistent")] == \
           ["COS_GRUB", "COS_OEM", "COS_RECOVERY", "COS_STATE", "COS_PERSISTENT"]
    assert grubenv.parse(fs_file(disk, got["oem"], "/grubenv", tmp_path)) == {"next_entry": "recovery"}
    assert fs_file(disk, got["oem"], "/99_custom.yaml", tmp_path).decode() == CONFIG
    assert fs_file(disk, got["recovery"], "/cOS/recovery.squashfs", tmp_path) == machine["squashfs"].read_bytes()
    assert fs_file(disk, got["recovery"], "/boot/vmlinuz", tmp_path) == (machine["medium"] / "boot/vmlinuz").read_bytes()
    assert fs_file(disk, got["recovery"], "/etc/cos/grub.cfg", tmp_path) == \
           (machine["source"] / "etc/cos/grub.cfg").read_bytes()
    sh("e2fsck", "-fn", tmp_path / "part-recovery.img")

    # deploy (into the stand-in directories) and the after-install stage
    assert (machine["state"] / "cOS/active.img").is_file() and (machine["state"] / "cOS/passive.img").is_file()
    assert grubenv.read(machine["oem"] / "grubenv")["next_entry"] == "cos"
    assert (machine["root"] / "run/after-install-ran").read_text() == "ran"


def _refused(m: dict[str, Path], proc: subprocess.CompletedProcess[str], before: str, words: str) -> None:
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("cos-install: error:")]
    assert len(errors) == 1 and words in errors[0], proc.stderr
    assert digest(m["target"]) == before
    assert not list(m["target"].parent.glob(".target.img.*"))


def test_refuses_a_disk_that_is_not_empty_unless_forced(machine: dict[str, Path], tmp_path: Path) -> None:
    assert cos_install(machine).returncode == 0
    before = digest(machine["target"])
    _refused(machine, cos_install(machine), before, "is not empty: it has a gpt partition table")
    proc = cos_install(machine, "--force", config=False)     # starts over: a fresh COS_OEM, no custom config
    assert proc.returncode == 0, proc.stderr
    oem = parts(machine["target"])["oem"]
    fs_file(machine["target"], oem, "/grubenv", tmp_path)
    assert "99_custom.yaml" not in sh("debugfs", "-R", "ls /", tmp_path / "part-oem.img")


def test_refuses_a_too_small_disk(machine: dict[str, Path]) -> None:
    with open(machine["target"], "r+b") as f:
        f.truncate(60 * MIB)
    _refused(machine, cos_install(machine), digest(machine["target"]), "needs at least")


def test_refuses_without_the_payload(machine: dict[str, Path]) -> None:
    (machine["medium"] / "cos/install/core.img").unlink()
    _refused(machine, cos_install(machine), digest(machine["target"]), "has no GRUB core.img")


def test_refuses_outside_the_live_system(machine: dict[str, Path]) -> None:
    (machine["root"] / "run/cos/live_mode").unlink()
    _refused(machine, cos_install(machine), digest(machine["target"]), "runs from the live medium")


def test_refuses_a_broken_config(machine: dict[str, Path]) -> None:
    machine["config"].write_text("stages: [not, a, mapping\n")
    _refused(machine, cos_install(machine), digest(machine["target"]), "--config")


def test_refuses_a_missing_device(machine: dict[str, Path]) -> None:
    machine["target"].unlink()
    proc = cos_install(machine)
    assert proc.returncode == 1 and "does not exist" in proc.stderr and not machine["target"].exists()
