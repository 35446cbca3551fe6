"""The raw cOS disk (pipeline/disk.py) on small real inputs and a small layout:
GPT partitions with the configured sizes, names, types and build-derived GUIDs;
filesystems with the configured labels and derived UUIDs; grubenv on COS_OEM sends
the first boot to recovery; COS_RECOVERY holds the recovery system and the image's
menu; GRUB i386-pc is installed (boot.img in the MBR pointing at core.img in the BIOS
boot partition); the file is sparse; the same inputs give the same bytes."""
from __future__ import annotations

import json
import os
import struct

import pytest

from pipeline import disk, efi
from pipeline.config import DiskLayout, Partition
from pipeline.errors import PipelineError
from tests.synthetic import make_inputs, need_tools, run

MIB = 1024 * 1024
LAYOUT = DiskLayout(bios_boot_mib=1, efi=Partition(label="MY_GRUB", size_mib=8),
                    oem=Partition(label="MY_OEM", size_mib=8),
                    recovery=Partition(label="COS_RECOVERY", size_mib=24),
                    state=Partition(label="COS_STATE", size_mib=100),
                    persistent=Partition(label="COS_PERSISTENT", size_mib=0))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    need_tools("sgdisk", "sfdisk", "mkfs.ext4", "mkfs.vfat", "mcopy", "grub-mkimage", "rdsquashfs",
               "blkid", "debugfs")
    return make_inputs(tmp_path_factory.mktemp("disk-inputs"), payload_kib=2048)


@pytest.fixture(scope="module")
def raw(inputs, tmp_path_factory):
    return disk.build_raw(tmp_path_factory.mktemp("disk") / "disk.raw", inputs, LAYOUT)


def partitions(raw) -> list[dict]:
    return json.loads(run("sfdisk", "--json", raw))["partitiontable"]["partitions"]


def probe(raw, part: dict) -> dict:
    out = run("blkid", "-p", "-o", "export", "-O", str(part["start"] * 512), raw)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_gpt_layout_follows_the_config(raw, inputs):
    table = json.loads(run("sfdisk", "--json", raw))["partitiontable"]
    assert table["label"] == "gpt"
    assert table["id"].lower() == str(inputs.uuid("disk"))
    parts = table["partitions"]
    assert [p["name"] for p in parts] == ["legacy", "efi", "oem", "recovery"]
    assert [p["type"] for p in parts] == ["21686148-6449-6E6F-744E-656564454649",  # BIOS boot
                                          "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",  # ESP
                                          "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
                                          "0FC63DAF-8483-4772-8E79-3D69D8477DE4"]
    assert [p["size"] * 512 // MIB for p in parts] == [1, 8, 8, 24]
    assert parts[0]["start"] == 2048 and all(p["start"] % 2048 == 0 for p in parts)
    assert [p["uuid"].lower() for p in parts] == [str(inputs.uuid(f"part-{n}"))
                                                  for n in ("legacy", "efi", "oem", "recovery")]
    assert raw.stat().st_size == (1 + 1 + 8 + 8 + 24 + 1) * MIB
    assert "No problems found" in run("sgdisk", "-v", raw)


def test_filesystems_labels_and_uuids(raw, inputs):
    parts = partitions(raw)
    esp, oem, rec = (probe(raw, p) for p in parts[1:])
    assert (esp["TYPE"], esp["LABEL"]) == ("vfat", "MY_GRUB")
    assert (oem["TYPE"], oem["LABEL"], oem["UUID"]) == ("ext4", "MY_OEM", str(inputs.uuid("fs-oem")))
    assert (rec["TYPE"], rec["LABEL"], rec["UUID"]) == ("ext4", "COS_RECOVERY", str(inputs.uuid("fs-recovery")))
    listing = run("mdir", "-i", f"{raw}@@{parts[1]['start'] * 512}", "-b", "::/EFI/BOOT")
    assert "BOOTX64.EFI" in listing.upper()


def test_every_grub_reads_the_stub_that_needs_the_menu_file_on_state(raw, tmp_path):
    """The BIOS core.img and the unsigned EFI GRUB find COS_GRUB and read its stub; the stub
    takes COS_STATE only when its /etc/cos/grub.cfg is there (a laid-out, never deployed
    COS_STATE used to stop at grub>), else COS_RECOVERY's menu. grub-script-check: valid."""
    esp = f"{raw}@@{partitions(raw)[1]['start'] * 512}"
    efi_bin, stub = tmp_path / "BOOTX64.EFI", tmp_path / "grub.cfg"
    run("mcopy", "-i", esp, "::/EFI/BOOT/BOOTX64.EFI", efi_bin)
    run("mcopy", "-i", esp, "::/EFI/BOOT/grub.cfg", stub)
    data = efi_bin.read_bytes()  # (core.img is compressed: its config is the same early_config)
    assert b"search --no-floppy --label --set=root MY_GRUB\n" in data
    assert b"configfile ($root)/EFI/BOOT/grub.cfg" in data
    lines = stub.read_text().splitlines()
    assert lines[0] == "search --no-floppy --label --set=root COS_RECOVERY"
    assert lines[1] == "if search --no-floppy --label --set=cos_state COS_STATE; then"
    assert lines[2].strip() == 'if [ -f "(${cos_state})/etc/cos/grub.cfg" ]; then set root="${cos_state}"; fi'
    assert lines[-1] == "configfile ($root)/etc/cos/grub.cfg"
    run("grub-script-check", stub)


def _cat(raw, part: dict, path: str) -> bytes:
    import subprocess
    proc = subprocess.run(["debugfs", "-R", f"cat {path}", f"{raw}?offset={part['start'] * 512}"],
                          capture_output=True, check=True)
    return proc.stdout


def test_first_boot_goes_to_recovery(raw):
    env = _cat(raw, partitions(raw)[2], "/grubenv")
    assert len(env) == 1024
    assert env.startswith(b"# GRUB Environment Block\nnext_entry=recovery\n")
    assert env.rstrip(b"#").endswith(b"\n")


def test_recovery_partition_content(raw, inputs):
    rec = partitions(raw)[3]
    assert _cat(raw, rec, "/cOS/recovery.squashfs") == inputs.squashfs.read_bytes()
    assert _cat(raw, rec, "/boot/vmlinuz") == inputs.kernel.read_bytes()
    assert _cat(raw, rec, "/boot/initrd") == inputs.initrd.read_bytes()
    menu = _cat(raw, rec, "/etc/cos/grub.cfg").decode()
    assert 'menuentry "cOS recovery" --id recovery' in menu and "save_env" in menu
    assert b"baseargs" in _cat(raw, rec, "/etc/cos/bootargs.cfg")


def test_bios_grub_installed(raw):
    data = raw.read_bytes()
    boot = efi.bios_file("boot.img").read_bytes()
    mbr = data[:512]
    assert mbr[:3] == boot[:3] and mbr[0x5a:0x5c] == boot[0x5a:0x5c]    # GRUB's boot code
    assert mbr[0x68:0x1b8] == boot[0x68:0x1b8]
    assert struct.unpack_from("<Q", mbr, 0x5c)[0] == 2048               # core.img's sector
    assert mbr[0x66:0x68] == b"\x90\x90"
    assert mbr[0x1c2] == 0xEE and mbr[510:] == b"\x55\xaa"              # protective MBR kept
    core = data[2048 * 512:]
    start, length, segment = struct.unpack_from("<QHH", core, 500)
    assert (start, segment) == (2049, 0x820) and 0 < length < 2048
    assert core[512:512 * (length + 1)].rstrip(b"\0")                  # the rest of core.img follows


def test_sparse_on_disk(raw):
    st = raw.stat()
    assert st.st_blocks * 512 < st.st_size / 2


def test_reproducible(raw, inputs, tmp_path):
    again = disk.build_raw(tmp_path / "again.raw", inputs, LAYOUT)
    assert again.read_bytes() == raw.read_bytes()


def test_recovery_too_small_is_a_clear_error(inputs, tmp_path):
    small = LAYOUT.model_copy(update={"recovery": Partition(label="COS_RECOVERY", size_mib=2)})
    with pytest.raises(PipelineError, match=r"disk\.recovery\.size_mib=2 is too small"):
        disk.build_raw(tmp_path / "small.raw", inputs, small)
    assert list(tmp_path.iterdir()) == []


def test_image_without_boot_menu_is_a_clear_error(tmp_path):
    bare = make_inputs(tmp_path / "in", with_menu=False)
    with pytest.raises(PipelineError, match="cos-grub"):
        disk.build_raw(tmp_path / "bare.raw", bare, LAYOUT)
    assert not (tmp_path / "bare.raw").exists()


def test_ext4_files_are_root_owned_whoever_staged_them(inputs, tmp_path):
    """An unprivileged runner stages files as itself; the filesystem must not keep its uid."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file").write_bytes(b"x")
    for p in (tree / "sub", tree / "sub" / "file"):
        os.chown(p, 1234, 1234)
    part = disk.layout(LAYOUT)[2]
    image = disk.make_ext4(tmp_path / "fs.img", part, tree, inputs)
    for path in ("/sub", "/sub/file"):
        out = run("debugfs", "-R", f"stat {path}", image)
        assert "User:     0   Group:     0" in out, out
