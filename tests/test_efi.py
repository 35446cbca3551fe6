"""GRUB images and FAT filesystems (pipeline/efi.py), built with the real tools:
the EFI binary is a PE image carrying our embedded config, the BIOS core.img has the
blocklist the disk stage patches, and a FAT image holds exactly the files given,
with the label and volume id asked for, byte-identical when built twice."""
from __future__ import annotations

import struct

import pytest

from pipeline import efi
from pipeline.errors import PipelineError
from tests.synthetic import SDE, need_tools, run


@pytest.fixture(autouse=True)
def _tools():
    need_tools("grub-mkimage", "mkfs.vfat", "mcopy", "mmd", "mdir", "blkid")


def test_early_config_prefers_the_first_label_and_has_no_script_syntax():
    cfg = efi.early_config(["COS_STATE", "COS_RECOVERY"], "/etc/cos/grub.cfg")
    lines = cfg.splitlines()
    # the last search wins, so the preferred label is searched last
    assert lines[0].endswith("COS_RECOVERY") and lines[1].endswith("COS_STATE")
    assert "configfile ($root)/etc/cos/grub.cfg" in lines
    assert not any(line.split()[0] in ("if", "fi", "then") for line in lines if line)


def test_efi_image_is_pe32_plus_with_embedded_config(tmp_path):
    cfg = efi.early_config(["COS_LIVE"], "/boot/grub/grub.cfg")
    out = efi.efi_image(tmp_path / "BOOTX64.EFI", cfg)
    data = out.read_bytes()
    assert data[:2] == b"MZ"
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    assert data[pe:pe + 4] == b"PE\0\0"
    assert struct.unpack_from("<H", data, pe + 4)[0] == 0x8664      # machine: x86-64
    assert struct.unpack_from("<H", data, pe + 24)[0] == 0x20B      # optional header: PE32+
    assert b"search --no-floppy --label --set=root COS_LIVE" in data
    assert list(tmp_path.iterdir()) == [out]                        # no temporary left behind


def test_bios_core_image_blocklist_and_reproducibility(tmp_path):
    cfg = efi.early_config(["COS_RECOVERY"], "/etc/cos/grub.cfg")
    a = efi.bios_core_image(tmp_path / "a.img", cfg).read_bytes()
    b = efi.bios_core_image(tmp_path / "b.img", cfg).read_bytes()
    assert a == b
    start, length, segment = struct.unpack_from("<QHH", a, 512 - 12)
    assert (start, segment) == (2, 0x820)
    assert length == -(-len(a) // 512) - 1
    assert len(a) < 1024 * 1024  # fits a 1 MiB BIOS boot partition


def test_eltorito_image_starts_with_cdboot(tmp_path):
    out = efi.eltorito_image(tmp_path / "eltorito.img", efi.early_config(["COS_LIVE"], "/boot/grub/grub.cfg"))
    cdboot = (efi.grub_dir(efi.BIOS_TARGET) / "cdboot.img").read_bytes()
    assert out.read_bytes()[:len(cdboot)] == cdboot


def test_make_fat_holds_files_with_label_and_volume_id(tmp_path):
    src = tmp_path / "payload.bin"
    src.write_bytes(b"x" * 5000)
    spec = efi.FatSpec("COS_GRUB", "1234abcd")
    img = efi.make_fat(tmp_path / "esp.img", spec, {"/EFI/BOOT/BOOTX64.EFI": src}, SDE)
    assert img.stat().st_size % (4 * 1024 * 1024) == 0
    probe = run("blkid", "-p", "-o", "export", img)
    assert "LABEL=COS_GRUB" in probe and "UUID=1234-ABCD" in probe.upper() and "TYPE=vfat" in probe
    listing = run("mdir", "-i", img, "-b", "::/EFI/BOOT")
    assert "BOOTX64.EFI" in listing.upper()
    back = tmp_path / "back.bin"
    run("mcopy", "-i", img, "::/EFI/BOOT/BOOTX64.EFI", back)
    assert back.read_bytes() == src.read_bytes()


def test_make_fat_is_reproducible_and_follows_the_epoch(tmp_path):
    src = tmp_path / "f"
    src.write_bytes(b"data")
    spec = efi.FatSpec("ESP", "0000beef", 8 * 1024 * 1024)
    one = efi.make_fat(tmp_path / "1.img", spec, {"/a/b/f": src}, SDE).read_bytes()
    two = efi.make_fat(tmp_path / "2.img", spec, {"/a/b/f": src}, SDE).read_bytes()
    other = efi.make_fat(tmp_path / "3.img", spec, {"/a/b/f": src}, SDE + 86400 * 3).read_bytes()
    assert one == two
    assert one != other
    assert len(one) == 8 * 1024 * 1024


def test_missing_grub_modules_name_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(efi, "GRUB_LIB", tmp_path)
    with pytest.raises(PipelineError, match="grub-efi-amd64-bin"):
        efi.efi_image(tmp_path / "x.efi", "")
    with pytest.raises(PipelineError, match="grub-pc-bin"):
        efi.bios_core_image(tmp_path / "core.img", "")
    assert not (tmp_path / "x.efi").exists()
