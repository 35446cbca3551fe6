"""The raw "vanilla" cOS disk: GPT, boots BIOS and UEFI into recovery on first start.

| # | name     | type | filesystem | content |
|---|----------|------|------------|---------|
| 1 | legacy   | EF02 | -          | GRUB i386-pc core.img (boot.img in the MBR loads it) |
| 2 | efi      | EF00 | FAT        | COS_GRUB: /EFI/BOOT/{BOOTX64.EFI,grub.cfg} (+ signed chain) |
| 3 | oem      | 8300 | ext4       | COS_OEM: /grubenv with next_entry=recovery |
| 4 | recovery | 8300 | ext4       | COS_RECOVERY: /cOS/recovery.squashfs, /boot/{vmlinuz,initrd}, /etc/cos/{grub,bootargs}.cfg |

As in cOS, COS_STATE and COS_PERSISTENT are NOT on the vanilla disk: the first boot
(recovery) lays them out with cloud-config `layout`, sized by disk.state/persistent,
so the image stays small and the partitions fit whatever disk the cloud gives.
Every GRUB (BIOS; EFI: the distro's signed one via shim, or with boot.secure_boot
false the host's) reads a stub config on COS_GRUB that loads /etc/cos/grub.cfg from
COS_STATE if a deploy wrote it there, else from COS_RECOVERY: the image's own menu
(package cos-grub), read out of the squashfs.

No mounts or loop devices: each filesystem is built as a file (mkfs.vfat + mtools,
mkfs.ext4 -d), sgdisk writes the GPT on the disk file, dd conv=notrunc,sparse puts the
partitions in place, so the disk stays sparse. GUIDs, UUIDs, hash seeds and times come
from the build inputs (artifacts.BootInputs): the same input gives the same bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import env as environ

from . import artifacts, bootchain, efi
from .config import DiskLayout, FlavorContext
from .errors import PipelineError
from .files import atomic_path
from .run import run

MIB = 1024 * 1024
SECTOR = 512
GRUB_CFG = "/etc/cos/grub.cfg"            # the image's boot menu (package cos-grub)
MENU_FILES = ("etc/cos/grub.cfg", "etc/cos/bootargs.cfg")
GRUBENV_SIZE = 1024
INSTALL_DIR = "cos/install"              # on the ISO: what cos-install writes (install_payload)

# GRUB i386-pc boot.img fields (grub/include/grub/i386/pc/boot.h), patched as grub-bios-setup does.
BPB_START, BPB_END = 0x03, 0x5A
KERNEL_SECTOR = 0x5C                      # LBA of core.img's first sector (le64)
DRIVE_CHECK = 0x66                        # jmp -> 2 nops: trust the BIOS boot drive on hard disks
MBR_CODE_END = 0x1B8                      # disk signature + partition table follow: keep them
BLOCKLIST = SECTOR - 12                   # diskboot.img's blocklist: start (le64), len, segment


@dataclass(frozen=True)
class Part:
    name: str       # GPT partition name
    type: str       # sgdisk type code
    size_mib: int
    label: str | None = None

    def __post_init__(self) -> None:
        if self.size_mib <= 0:
            raise PipelineError(f"disk.{self.name}: size_mib must be > 0 on the raw disk (got {self.size_mib})",
                                "set a size in MiB in the flavor's flavor.yaml")


def layout(disk: DiskLayout) -> list[Part]:
    return [Part("legacy", "EF02", disk.bios_boot_mib),
            Part("efi", "EF00", disk.efi.size_mib, disk.efi.label),
            Part("oem", "8300", disk.oem.size_mib, disk.oem.label),
            Part("recovery", "8300", disk.recovery.size_mib, disk.recovery.label)]


def offsets(parts: list[Part]) -> tuple[list[int], int]:
    """Start of each partition in MiB (1 MiB aligned, 1 MiB head) and the disk size in
    MiB (1 MiB tail for the backup GPT)."""
    starts, at = [], 1
    for p in parts:
        starts.append(at)
        at += p.size_mib
    return starts, at + 1


def grubenv(**entries: str) -> bytes:
    """A GRUB environment block: 1024 bytes, padded with '#'."""
    body = "# GRUB Environment Block\n" + "".join(f"{k}={v}\n" for k, v in entries.items())
    data = body.encode()
    if len(data) > GRUBENV_SIZE:
        raise PipelineError("grubenv entries exceed 1024 bytes")
    return data + b"#" * (GRUBENV_SIZE - len(data))


def _stage_file(src: Path | bytes, dest: Path, sde: int) -> None:
    """Place a file in a mkfs -d tree with a fixed mtime (mkfs.ext4 copies times)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(src, bytes):
        dest.write_bytes(src)
    else:
        shutil.copyfile(src, dest)  # a copy: the source's own mtime must not change
    os.chmod(dest, 0o644)
    os.utime(dest, (sde, sde))


def _fix_dir_times(root: Path, sde: int) -> None:
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        os.utime(d, (sde, sde))
    os.utime(root, (sde, sde))


def make_ext4(out: Path, part: Part, tree: Path, inputs: artifacts.BootInputs) -> Path:
    """ext4 from a directory, reproducible: fixed UUID, hash seed and times."""
    assert part.label is not None, f"partition {part.name} holds no filesystem"
    _fix_dir_times(tree, inputs.sde)
    env = environ.child(E2FSPROGS_FAKE_TIME=str(inputs.sde), SOURCE_DATE_EPOCH=str(inputs.sde))
    with atomic_path(out) as tmp:
        tmp.unlink()
        run(["mkfs.ext4", "-q", "-F", "-L", part.label, "-U", str(inputs.uuid(f"fs-{part.name}")),
             "-E", f"hash_seed={inputs.uuid(f'hash-{part.name}')},root_owner=0:0,nodiscard",
             "-m", "0", "-d", tree, tmp, f"{part.size_mib}M"], env=env, stdout=subprocess.DEVNULL)
        _pin_metadata(tmp, tree, inputs.sde, env)
    return out


def _pin_metadata(image: Path, tree: Path, sde: int, env: dict[str, Any]) -> None:
    """mkfs.ext4 -d (e2fsprogs 1.47.0) copies each file's atime, ctime and owner from the
    staging tree; ctime cannot be set on the host, and an unprivileged CI runner would
    leave its own uid: set them with debugfs (root-owned, times = SOURCE_DATE_EPOCH)."""
    paths = ["/"] + sorted("/" + str(p.relative_to(tree)) for p in tree.rglob("*"))
    fields = (("ctime", f"@{sde}"), ("atime", f"@{sde}"), ("uid", "0"), ("gid", "0"))
    script = "".join(f'sif "{p}" {field} {value}\n' for p in paths for field, value in fields)
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as cmds:
        cmds.write(script)
        cmds.flush()
        run(["debugfs", "-w", "-f", cmds.name, image], env=env, stdout=subprocess.DEVNULL)


def read_menu(squashfs: Path, dest: Path) -> None:
    """Copy the image's /etc/cos/{grub,bootargs}.cfg out of the squashfs into `dest`."""
    for name in MENU_FILES:
        proc = run(["rdsquashfs", "-c", f"/{name}", squashfs], capture=True, check=False)
        if proc.returncode != 0:
            raise PipelineError(f"{squashfs.name} has no /{name}",
                                "add package cos-grub to the flavor's packages (it ships the boot menu)")
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(proc.stdout)


def install_bios_grub(disk: Path, core: Path, start_lba: int, max_bytes: int) -> None:
    """What grub-bios-setup does, on a file: core.img into the BIOS boot partition,
    its blocklist pointing at itself, boot.img into the MBR's code area."""
    core_img = bytearray(core.read_bytes())
    if len(core_img) > max_bytes:
        raise PipelineError(f"GRUB core.img is {len(core_img)} bytes, the BIOS boot partition only {max_bytes}",
                            "raise disk.bios_boot_mib in the flavor's flavor.yaml")
    start, length, segment = struct.unpack_from("<QHH", core_img, BLOCKLIST)
    if start != 2 or length != -(-len(core_img) // SECTOR) - 1:
        raise PipelineError(f"unexpected GRUB core.img blocklist ({start}, {length}) in {core}",
                            "the host's grub-mkimage is not the i386-pc one this code knows")
    struct.pack_into("<Q", core_img, BLOCKLIST, start_lba + 1)  # the rest follows diskboot
    boot = efi.bios_file("boot.img").read_bytes()
    with open(disk, "r+b") as f:
        mbr = bytearray(f.read(SECTOR))
        new = bytearray(boot[:MBR_CODE_END]) + mbr[MBR_CODE_END:]
        new[BPB_START:BPB_END] = mbr[BPB_START:BPB_END]
        struct.pack_into("<Q", new, KERNEL_SECTOR, start_lba)
        new[DRIVE_CHECK:DRIVE_CHECK + 2] = b"\x90\x90"
        f.seek(0)
        f.write(new)
        f.seek(start_lba * SECTOR)
        f.write(core_img)


def sgdisk_command(disk: Path, parts: list[Part], starts: list[int], inputs: artifacts.BootInputs) -> list[str]:
    cmd = ["sgdisk", "--clear", f"--disk-guid={inputs.uuid('disk')}"]
    for n, (p, start) in enumerate(zip(parts, starts), 1):
        cmd += [f"--new={n}:{start * MIB // SECTOR}:{(start + p.size_mib) * MIB // SECTOR - 1}",
                f"--typecode={n}:{p.type}", f"--change-name={n}:{p.name}",
                f"--partition-guid={n}:{inputs.uuid(f'part-{p.name}')}"]
    return cmd + [str(disk)]


def esp_files(inputs: artifacts.BootInputs, disk: DiskLayout, w: Path) -> dict[str, Path]:
    """COS_GRUB's files, and core.img in `w`. Every GRUB ends in the same stub config
    (bootchain.stub_config: COS_STATE's menu if deployed, else COS_RECOVERY's): the signed
    one reads it at its prefix, the host-made BIOS (and unsigned EFI) ones find COS_GRUB
    and read it at STUB_ESP."""
    stub = bootchain.stub_config(GRUB_CFG, disk.recovery.label, disk.state.label)
    early = efi.early_config([disk.efi.label], bootchain.STUB_ESP)
    efi.bios_core_image(w / "core.img", early)
    if inputs.secure_boot:
        return bootchain.signed_esp(inputs.squashfs, inputs.secure_boot, w, stub)
    (w / "stub.cfg").write_text(stub)
    return {bootchain.SHIM_ESP: efi.efi_image(w / "BOOTX64.EFI", early), bootchain.STUB_ESP: w / "stub.cfg"}


def make_esp(inputs: artifacts.BootInputs, disk: DiskLayout, w: Path) -> Path:
    """The COS_GRUB FAT image (w/efi.img, the partition's size) and GRUB's BIOS core.img
    (w/core.img): the raw disk's bootloader, also shipped on the ISO for cos-install."""
    spec = efi.FatSpec(disk.efi.label, efi.fat_volume_id(inputs.seed + ":esp"), disk.efi.size_mib * MIB)
    return efi.make_fat(w / "efi.img", spec, esp_files(inputs, disk, w), inputs.sde)


def _trimmed_copy(src: Path, dest: Path) -> int:
    """`src` without its trailing zero sectors (a 64 MiB FAT holds a few MiB): the ISO does
    not store holes; cos-install writes zeros up to the full size. Returns that size."""
    data = src.read_bytes()
    end = -(-len(data.rstrip(b"\0")) // SECTOR) * SECTOR
    dest.write_bytes(data[:end])
    return len(data)


def install_payload(inputs: artifacts.BootInputs, disk: DiskLayout, dest: Path) -> dict[str, Path]:
    """What cos-install (runtime/install/install.py) writes onto a disk besides the medium's
    squashfs, kernel and initrd, in `dest`: the raw disk's COS_GRUB image and BIOS GRUB,
    and install.json with the partition table (names, types, sizes, labels). Returns
    {path on the ISO: file}."""
    dest.mkdir(parents=True, exist_ok=True)
    w = dest / ".work"
    w.mkdir()
    efi_size = _trimmed_copy(make_esp(inputs, disk, w), dest / "efi.img")
    shutil.copyfile(w / "core.img", dest / "core.img")
    shutil.copyfile(efi.bios_file("boot.img"), dest / "boot.img")
    shutil.rmtree(w)
    parts = [*layout(disk), Part("state", "8300", disk.state.size_mib, disk.state.label)]
    table = [{"name": p.name, "type": p.type, "size_mib": p.size_mib, "label": p.label} for p in parts]
    table.append({"name": "persistent", "type": "8300", "size_mib": disk.persistent.size_mib,
                  "label": disk.persistent.label})
    manifest = {"format": 1, "partitions": table, "efi_image": "efi.img", "efi_image_size": efi_size,
                "bios_core": "core.img", "bios_boot": "boot.img"}
    (dest / "install.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return {f"/{INSTALL_DIR}/{p.name}": p for p in sorted(dest.iterdir())}


def build_raw(out: Path, inputs: artifacts.BootInputs, disk: DiskLayout) -> Path:
    parts = layout(disk)
    starts, total_mib = offsets(parts)
    legacy, esp, oem, recovery = parts
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".raw-") as work:
        w = Path(work)
        files = {esp.name: make_esp(inputs, disk, w)}

        oem_tree = w / "oem"
        _stage_file(grubenv(next_entry="recovery"), oem_tree / "grubenv", inputs.sde)
        files[oem.name] = make_ext4(w / "oem.img", oem, oem_tree, inputs)

        rec_tree = w / "recovery"
        read_menu(inputs.squashfs, rec_tree)
        for name in MENU_FILES:
            os.utime(rec_tree / name, (inputs.sde, inputs.sde))
        _stage_file(inputs.squashfs, rec_tree / "cOS/recovery.squashfs", inputs.sde)
        _stage_file(inputs.kernel, rec_tree / "boot/vmlinuz", inputs.sde)
        _stage_file(inputs.initrd, rec_tree / "boot/initrd", inputs.sde)
        content = sum(p.stat().st_size for p in rec_tree.rglob("*") if p.is_file())
        if content > recovery.size_mib * MIB * 0.9:
            raise PipelineError(f"disk.recovery.size_mib={recovery.size_mib} is too small for "
                                f"{content // MIB} MiB of recovery system",
                                f"set disk.recovery.size_mib to at least {content * 12 // 10 // MIB} in flavor.yaml")
        files[recovery.name] = make_ext4(w / "recovery.img", recovery, rec_tree, inputs)

        with atomic_path(out) as tmp:
            os.truncate(tmp, total_mib * MIB)
            run(sgdisk_command(tmp, parts, starts, inputs), stdout=subprocess.DEVNULL)
            for p, start in zip(parts, starts):
                if p.name in files:
                    run(["dd", f"if={files[p.name]}", f"of={tmp}", "bs=1M", f"seek={start}",
                         "conv=notrunc,sparse", "status=none"])
            install_bios_grub(tmp, w / "core.img", starts[0] * MIB // SECTOR, legacy.size_mib * MIB)
    return out


def raw_stage(ctx: FlavorContext) -> dict[str, Any]:
    out = artifacts.path(ctx, "raw")
    build_raw(out, artifacts.boot_inputs(ctx.paths), ctx.flavor.disk)
    return artifacts.record(ctx.paths, "raw", out)
