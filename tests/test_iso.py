"""The hybrid ISO (pipeline/iso.py) on small real inputs: xorriso reports a BIOS and
a UEFI El Torito image, the MBR carries GRUB's hybrid boot code and the ESP as
partition 2 (type 0xef, holding BOOTX64.EFI), the volume is labelled COS_LIVE, the
live kernel line is in grub.cfg, and the same inputs give byte-identical ISOs."""
from __future__ import annotations

import json
import re

import pytest

from pipeline import efi, iso
from tests.synthetic import make_inputs, need_tools, run

CMDLINE = "console=tty1 console=ttyS0,115200"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    need_tools("xorriso", "grub-mkimage", "mkfs.vfat", "mcopy", "sfdisk", "blkid", "osirrox")
    return make_inputs(tmp_path_factory.mktemp("iso-inputs"))


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("iso") / "cOS-Seed-t-1.0-x86_64.iso"
    return iso.build_iso(out, inputs, label="COS_LIVE", cmdline=CMDLINE, title="cOS test")


def test_el_torito_has_bios_and_uefi_boot_images(built):
    report = run("xorriso", "-indev", built, "-report_el_torito", "plain", merge=True)
    assert re.search(r"El Torito boot img :\s+1\s+BIOS\s+y\s+none", report), report
    assert re.search(r"El Torito boot img :\s+2\s+UEFI\s+y\s+none", report), report
    assert "/boot/grub/i386-pc/eltorito.img" in report
    assert "Volume id    : 'COS_LIVE'" in report


def test_hybrid_mbr_with_esp_partition(built):
    mbr = built.read_bytes()[:512]
    assert mbr[510:512] == b"\x55\xaa"
    hybrid = efi.bios_file("boot_hybrid.img").read_bytes()
    assert mbr[:0x1b0] != b"\0" * 0x1b0 and mbr[0x5a:0x1b0] == hybrid[0x5a:0x1b0]  # GRUB's code
    table = json.loads(run("sfdisk", "--json", built))["partitiontable"]
    assert table["label"] == "dos"
    esp = next(p for p in table["partitions"] if p["type"] == "ef")
    assert esp["start"] * 512 + esp["size"] * 512 <= built.stat().st_size
    listing = run("mdir", "-i", f"{built}@@{esp['start'] * 512}", "-b", "::/EFI/BOOT")
    assert "BOOTX64.EFI" in listing.upper()


def test_volume_label_and_tree(built, inputs, tmp_path):
    assert "LABEL=COS_LIVE" in run("blkid", "-p", "-o", "export", built)
    for name, src in [("rootfs.squashfs", inputs.squashfs), ("boot/vmlinuz", inputs.kernel),
                      ("boot/initrd", inputs.initrd)]:
        run("osirrox", "-indev", built, "-extract", f"/{name}", tmp_path / "x", merge=True)
        assert (tmp_path / "x").read_bytes() == src.read_bytes(), name
        (tmp_path / "x").unlink()
    run("osirrox", "-indev", built, "-extract", "/boot/grub/grub.cfg", tmp_path / "grub.cfg",
        merge=True)
    cfg = (tmp_path / "grub.cfg").read_text()
    assert ("linux /boot/vmlinuz root=live:CDLABEL=COS_LIVE rd.live.dir=/ rd.live.squashimg=rootfs.squashfs "
            f"rd.live.overlay.overlayfs=1 cos.mode=live {CMDLINE}") in cfg
    assert "serial --unit=0 --speed=115200" in cfg and "terminal_output serial console" in cfg


def test_reproducible_and_epoch_sensitive(inputs, built, tmp_path):
    """Also when built in a directory with other permissions (pytest's are 0700, a build
    tree's 0755): xorriso gave implicit ISO directories their disk parents' modes."""
    opened = tmp_path / "open"
    opened.mkdir()
    opened.chmod(0o755)
    again = iso.build_iso(opened / "again.iso", inputs, label="COS_LIVE", cmdline=CMDLINE, title="cOS test")
    assert again.read_bytes() == built.read_bytes()
    later = make_inputs(tmp_path / "later", sde=inputs.sde + 3600)
    other = iso.build_iso(tmp_path / "other.iso", later, label="COS_LIVE", cmdline=CMDLINE, title="cOS test")
    assert other.read_bytes() != built.read_bytes()


def test_sha256_file_verifies(built):
    sums = iso.write_sha256(built)
    assert sums.name == built.name + ".sha256"
    assert run("sha256sum", "-c", sums.name, cwd=built.parent).strip() == f"{built.name}: OK"


def test_failed_build_leaves_no_output(inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(iso, "ELTORITO_PATH", "no/such/../../../../escape.img")
    with pytest.raises(Exception):  # noqa: B017 (whatever fails, nothing may be left)
        iso.build_iso(tmp_path / "bad.iso", inputs, label="COS_LIVE", cmdline="", title="t")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_install_payload_on_the_iso(inputs, tmp_path):
    """With the flavor's disk layout the ISO carries /cos/install for cos-install: the
    partition table and the raw disk's COS_GRUB image (trailing zeros cut) and BIOS GRUB."""
    from pipeline.config import DiskLayout, Partition

    disk = DiskLayout(bios_boot_mib=1, efi=Partition(label="COS_GRUB", size_mib=8),
                      oem=Partition(label="COS_OEM", size_mib=8), recovery=Partition(label="COS_RECOVERY", size_mib=24),
                      state=Partition(label="COS_STATE", size_mib=100),
                      persistent=Partition(label="COS_PERSISTENT", size_mib=0))
    out = iso.build_iso(tmp_path / "i.iso", inputs, label="COS_LIVE", cmdline=CMDLINE, title="t", disk=disk)
    run("osirrox", "-indev", out, "-extract", "/cos/install", tmp_path / "install", merge=True)
    manifest = json.loads((tmp_path / "install/install.json").read_text())
    assert [(p["name"], p["size_mib"], p["label"]) for p in manifest["partitions"]] == [
        ("legacy", 1, None), ("efi", 8, "COS_GRUB"), ("oem", 8, "COS_OEM"), ("recovery", 24, "COS_RECOVERY"),
        ("state", 100, "COS_STATE"), ("persistent", 0, "COS_PERSISTENT")]
    assert manifest["efi_image_size"] == 8 * 1024 * 1024
    esp = (tmp_path / "install/efi.img").read_bytes()
    assert 0 < len(esp) < 8 * 1024 * 1024 and "LABEL=COS_GRUB" in run("blkid", "-p", "-o", "export",
                                                                       tmp_path / "install/efi.img")
    assert (tmp_path / "install/boot.img").read_bytes() == efi.bios_file("boot.img").read_bytes()
    assert sorted(p.name for p in (tmp_path / "install").iterdir()) == ["boot.img", "core.img", "efi.img",
                                                                          "install.json"]
