"""Every bootable artifact of a flavor (red; $COS_BOOT_FLAVOR picks another) really
boots, in QEMU under TCG (no KVM needed): the ISO under OVMF with Secure Boot enforced
(Microsoft's keys; shim -> the distro's signed GRUB -> its signed kernel) as a CD-ROM and
as a USB disk comes up live (under SeaBIOS as a CD-ROM too: tests/test_vm.py boots that
as `./dev run <flavor> --iso --bios`); the raw disk under Secure Boot OVMF and SeaBIOS
boots the recovery entry on first start with COS_GRUB/COS_OEM/COS_RECOVERY present, the
qcow2 and the Azure VHD boot the same way; every Secure Boot boot checks from inside that
the firmware says Secure Boot is on and the kernel is locked down; the raw disk with one
byte of its kernel changed is refused under Secure Boot and still boots without it, and
its second boot falls back to recovery (grubenv consumed, no deployed COS_STATE yet); the
GCE tar unpacks to the raw disk padded to a whole GiB; the ISO and raw disk rebuilt equal
the pipeline's byte for byte.
Each boot logs in as root/cos on the serial console and prints its time to login."""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import time
from pathlib import Path

import pytest

from pipeline import artifacts, disk, iso
from pipeline.files import hash_file as sha256
from tests.qemu import VM, Drive, missing_tools

pytestmark = [pytest.mark.slow]
# GRUB's error when shim refuses a kernel (Debian: "bad shim signature"), or shim's own
SB_REFUSED = r"bad shim signature|[Vv]erification failed|Access Denied|prohibited by secure boot"
BOOT_TIMEOUT = 400  # s to the login prompt; measured ~60-80 s under TCG on 2 cores


def artifact(manifest: dict, build_dir: Path, kind: str) -> Path:
    entry = next((a for a in manifest["artifacts"] if a["kind"] == kind), None)
    assert entry, f"manifest has no '{kind}' artifact: {[a['kind'] for a in manifest['artifacts']]}"
    path = build_dir / manifest["flavor"] / entry["path"]
    assert path.is_file(), path
    return path


def require(firmware: str) -> None:
    missing = missing_tools(firmware)
    if missing:
        msg = "cannot boot: missing " + ", ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)


def boot(drive: Drive, firmware: str, name: str) -> VM:
    require(firmware)
    vm = VM(drive, firmware=firmware, name=name).boot(BOOT_TIMEOUT)
    if firmware == "uefi-sb":
        check_secure_boot(vm)
    return vm


SECURE_BOOT_VAR = "/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"


def check_secure_boot(vm: VM) -> None:
    """The firmware's SecureBoot variable (4 attribute bytes, then 1 = enabled) and the
    kernel's lockdown, which Debian's kernel turns on by itself under Secure Boot."""
    value = vm.run(f"od -An -t u1 {SECURE_BOOT_VAR}").split()
    check(vm, value[-1:] == ["1"], f"SecureBoot variable: {value}")
    lockdown = vm.run("cat /sys/kernel/security/lockdown")
    check(vm, "[none]" not in lockdown and "[" in lockdown, f"kernel lockdown: {lockdown!r}")


@pytest.mark.boot
@pytest.mark.parametrize("firmware,media", [("uefi-sb", "cdrom"), ("uefi-sb", "usb")])
def test_iso_boots_live(flavor_build, build_dir, firmware, media):
    """(SeaBIOS from a CD-ROM: tests/test_vm.py boots it as `./dev run <flavor> --iso --bios`.)"""
    path = artifact(flavor_build, build_dir, "iso")
    vm = boot(Drive(path, media), firmware, f"iso-{firmware}-{media}")
    try:
        check_live(vm)
        vm.poweroff()
    finally:
        vm.stop()


def check_live(vm: VM) -> None:
    cmdline = vm.run("cat /proc/cmdline")
    check(vm, "root=live:CDLABEL=COS_LIVE" in cmdline and "rd.live.squashimg=rootfs.squashfs" in cmdline
          and "cos.mode=live" in cmdline, cmdline)
    vm.run("test -e /run/cos/live_mode")
    check(vm, vm.run("findmnt -n -o FSTYPE /") == "overlay", "/ is not the live overlay")
    check(vm, "COS_LIVE" in vm.run("lsblk -n -o LABEL"), "no COS_LIVE label")


def check(vm: VM, ok: bool, what: str) -> None:
    """Assert with the serial console's tail in the message."""
    if not ok:
        raise vm.fail(what)


def check_recovery(vm: VM) -> None:
    cmdline = vm.run("cat /proc/cmdline")
    check(vm, "root=live:LABEL=COS_RECOVERY" in cmdline and "cos.mode=recovery" in cmdline, cmdline)
    vm.run("test -e /run/cos/recovery_mode")
    # lsblk reads labels from udev's database: wait until udev has probed every device
    vm.run("udevadm settle --timeout=120")
    labels = vm.run("lsblk -n -o LABEL").split()
    check(vm, {"COS_GRUB", "COS_OEM", "COS_RECOVERY"} <= set(labels), f"lsblk labels: {labels}")
    blkid = vm.run("blkid")
    for needed in ('LABEL="COS_GRUB"', 'TYPE="vfat"', 'LABEL="COS_OEM"', 'LABEL="COS_RECOVERY"'):
        check(vm, needed in blkid, f"blkid lacks {needed}:\n{blkid}")
    check(vm, vm.run("findmnt -n -o FSTYPE /") == "overlay", "/ is not the live overlay")


@pytest.mark.boot
@pytest.mark.parametrize("firmware", ["uefi-sb", "bios"])
def test_raw_disk_boots_recovery_first(flavor_build, build_dir, firmware):
    path = artifact(flavor_build, build_dir, "raw")
    vm = boot(Drive(path), firmware, f"raw-{firmware}")
    try:
        check_recovery(vm)
        vm.poweroff()
    finally:
        vm.stop()


def add_empty_state(disk: Path, label: str = "COS_STATE", mib: int = 64) -> None:
    """Give the disk a COS_STATE as a `layout` would before any deploy: an empty ext4
    (no /etc/cos/grub.cfg, no /cOS/active.img), made as a file and put in place; no mounts."""
    subprocess.run(["truncate", "-s", f"+{mib + 2}M", disk], check=True)
    subprocess.run(["sgdisk", "-e", "--new=0:0:0", "--typecode=0:8300", "--change-name=0:state", disk],
                   check=True, capture_output=True)
    part = json.loads(subprocess.run(["sfdisk", "--json", disk], capture_output=True, text=True,
                                     check=True).stdout)["partitiontable"]["partitions"][-1]
    fs = disk.with_name("state.img")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", label, fs, f"{part['size'] // 2048}M"], check=True)
    subprocess.run(["dd", f"if={fs}", f"of={disk}", "bs=512", f"seek={part['start']}", "conv=notrunc,sparse",
                    "status=none"], check=True)
    fs.unlink()


@pytest.mark.boot
@pytest.mark.parametrize("kind,fmt,firmware", [("qcow2", "qcow2", "uefi"), ("azure-vhd", "vpc", "bios")])
def test_disk_formats_boot_recovery(flavor_build, build_dir, kind, fmt, firmware):
    path = artifact(flavor_build, build_dir, kind)
    vm = boot(Drive(path, format=fmt), firmware, f"{kind}-{firmware}")
    try:
        check_recovery(vm)
        vm.poweroff()
    finally:
        vm.stop()


def tamper_kernel(raw: Path, dest: Path) -> int:
    """A sparse copy of the raw disk with one byte of COS_RECOVERY's /boot/vmlinuz (the
    kernel GRUB loads) changed in place, no mount: debugfs maps the file's first block.
    The byte is PE header padding after the section table: covered by the Authenticode
    hash, never executed, so only the signature check can notice. Returns its offset."""
    subprocess.run(["cp", "--sparse=always", raw, dest], check=True)
    part = json.loads(subprocess.run(["sfdisk", "--json", dest], capture_output=True, text=True,
                                     check=True).stdout)["partitiontable"]["partitions"][3]
    fs = f"{dest}?offset={part['start'] * 512}"
    block = int(debugfs(fs, "bmap /boot/vmlinuz 0"))
    size = int(re.search(r"Block size:\s+(\d+)", debugfs(fs, "stats"))[1])  # type: ignore[index]
    with open(dest, "r+b") as f:
        start = part["start"] * 512 + block * size
        f.seek(start)
        head = f.read(0x200)
        pe = struct.unpack_from("<I", head, 0x3C)[0]
        nsections, opt_size = struct.unpack_from("<H", head, pe + 6)[0], struct.unpack_from("<H", head, pe + 20)[0]
        offset = pe + 24 + opt_size + 40 * nsections + 16
        assert head[:2] == b"MZ" and offset < 0x1F1 and head[offset] == 0xFF, "unexpected kernel header"
        f.seek(start + offset)
        f.write(b"\xfe")
    return offset


def debugfs(fs: str, request: str) -> str:
    return subprocess.run(["debugfs", "-R", request, fs], capture_output=True, text=True, check=True).stdout


@pytest.mark.boot
def test_tampered_kernel_is_refused_under_secure_boot_only_and_second_boot_falls_back(flavor_build, build_dir,
                                                                                      tmp_path):
    """The negative case: the signature check is real. The raw disk with one kernel byte
    changed: Secure Boot refuses to run it (GRUB asks shim to verify it; on a snapshot, so
    the disk is as built after it); without Secure Boot the very same disk boots recovery.
    That disk (a COS_STATE laid out but never deployed: no menu on it) then shows the
    second boot: the first cleared next_entry in COS_OEM's grubenv, so the default entry
    (cos) fails and GRUB falls back to recovery; GRUB's stub must still take COS_RECOVERY's
    menu (searching by label alone stopped at grub> there). One disk for both: the byte
    changed is one the kernel never runs, and each boot is a TCG minute and a half."""
    disk_copy = tmp_path / "tampered.raw"
    tamper_kernel(artifact(flavor_build, build_dir, "raw"), disk_copy)
    add_empty_state(disk_copy)
    require("uefi-sb")
    vm = VM(Drive(disk_copy), firmware="uefi-sb", name="raw-tampered-sb").start()
    try:
        vm.expect(SB_REFUSED, BOOT_TIMEOUT, fail_on=r"login: |Linux version")
        time.sleep(10)  # the fallback entries run the same kernel: still nothing may start
        check(vm, "Linux version" not in vm.text() and "login: " not in vm.text(), "the tampered kernel ran")
    finally:
        vm.stop()
    for n in (1, 2):
        vm = boot(Drive(disk_copy, snapshot=False), "uefi", f"raw-tampered-nosb-boot{n}")
        try:
            check_recovery(vm)
            console = vm.text()
            vm.poweroff()
        finally:
            vm.stop()
        fell_back = "Falling back to" in console
        assert fell_back == (n == 2), f"boot {n}: fallback {'expected' if n == 2 else 'unexpected'}"


def test_gce_tar_is_the_raw_disk_padded(flavor_build, build_dir, tmp_path):
    raw = artifact(flavor_build, build_dir, "raw")
    tar = artifact(flavor_build, build_dir, "gce-tar")
    subprocess.run(["tar", "-xzSf", tar, "-C", tmp_path], check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.raw"]
    unpacked = tmp_path / "disk.raw"
    size = unpacked.stat().st_size
    assert size % (1024 ** 3) == 0 and raw.stat().st_size <= size < raw.stat().st_size + 1024 ** 3
    assert unpacked.stat().st_blocks * 512 < size / 2  # unpacked sparse too
    with open(raw, "rb") as a, open(unpacked, "rb") as b:
        while chunk := a.read(16 << 20):
            assert b.read(len(chunk)) == chunk
        while tail := b.read(64 << 20):
            assert tail.count(0) == len(tail)



def test_iso_and_raw_rebuild_byte_identical(flavor_build, flavor_paths, build_dir, tmp_path):
    """A rebuild from the same inputs, with the stages' own arguments, equals the
    pipeline's ISO and raw disk byte for byte (the pipeline's build is the first one)."""
    inputs = artifacts.boot_inputs(flavor_paths)
    flavor = flavor_paths.flavor
    iso.build_iso(tmp_path / "live.iso", inputs, label=flavor.boot.live_label, cmdline=flavor.boot.cmdline,
                  title=f"cOS {flavor.name} {flavor_build['version']} (live)", disk=flavor.disk)
    disk.build_raw(tmp_path / "disk.raw", inputs, flavor.disk)
    assert sha256(tmp_path / "live.iso") == sha256(artifact(flavor_build, build_dir, "iso"))
    assert sha256(tmp_path / "disk.raw") == sha256(artifact(flavor_build, build_dir, "raw"))
