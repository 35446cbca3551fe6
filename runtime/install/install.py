"""cos-install: from the live ISO onto an empty disk, the full cOS layout, booting BIOS and UEFI.

    cos-install [--config FILE] [--force] [--strict] DEVICE

The bootloader pieces are not re-derived here: the pipeline puts on the ISO, under
/cos/install/, exactly what pipeline/disk.py puts on the raw disk (install.json with the
partition table, the COS_GRUB FAT image, GRUB i386-pc core.img and boot.img). The steps:

  1. checks, nothing written: live mode; the payload; DEVICE exists, is not mounted, is
     empty-looking (no partition table or filesystem signature) and big enough;
  2. the GPT with the vanilla partitions (legacy, efi, oem, recovery), sgdisk;
  3. BIOS: boot.img in the MBR pointing at core.img in the legacy partition;
  4. COS_GRUB: the FAT image, written by offset;
  5. COS_OEM: grubenv (next_entry=recovery) and --config FILE as /99_custom.yaml;
  6. COS_RECOVERY: the medium's rootfs.squashfs as cOS/recovery.squashfs, its kernel,
     initrd and the image's boot menu (ext4 filled with debugfs: no mount needed);
  7. COS_STATE and COS_PERSISTENT: the cloud-config `layout` step's code;
  8. active and passive on COS_STATE: cos-deploy's code, from the live system's squashfs
     (sets next_entry=cos);
  9. the `after-install` stage, then sync.

A disk stopped anywhere before step 8 completes has next_entry=recovery or no boot
menu at all; a re-run refuses it as not empty: `--force` starts over (zaps the table).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..system import CosError, System
from . import deploy, grubenv, layout
from .disks import MIB, Disk, Partition, implant, is_image_file, probe, query, read_disk, refresh, size_bytes

log = logging.getLogger("cos.install")

LIVE_SENTINEL = "/run/cos/live_mode"
MEDIUM = Path("/run/initramfs/live")         # where dmsquash-live mounts the ISO
PAYLOAD = "cos/install"
MANIFEST = "install.json"
SQUASHFS, KERNEL, INITRD = "rootfs.squashfs", "boot/vmlinuz", "boot/initrd"
CUSTOM_CONFIG = "99_custom.yaml"               # as cOS's installer named it
MOUNTS = "/run/cos/install"
SECTOR = 512
VANILLA = ("legacy", "efi", "oem", "recovery")
ADDED = ("state", "persistent")

# GRUB i386-pc boot.img fields (grub/include/grub/i386/pc/boot.h), patched as grub-bios-setup
# does; the same idea as pipeline/disk.py's install_bios_grub (runtime cannot import pipeline).
BPB_START, BPB_END = 0x03, 0x5A
KERNEL_SECTOR = 0x5C
DRIVE_CHECK = 0x66
MBR_CODE_END = 0x1B8
BLOCKLIST = SECTOR - 12


@dataclass(frozen=True)
class PartSpec:
    name: str           # GPT name: legacy, efi, oem, recovery, state, persistent
    type: str           # sgdisk type code
    size_mib: int       # 0: the rest of the disk (persistent only)
    label: str | None   # filesystem label


@dataclass(frozen=True)
class Payload:
    parts: dict[str, PartSpec]
    efi_image: Path
    efi_size: int       # bytes of the FAT filesystem (the file has its trailing zeros cut)
    core: Path
    boot: Path
    squashfs: Path
    kernel: Path
    initrd: Path
    source: Path        # the system's root tree (the live squashfs): boot menu, what is deployed

    @property
    def vanilla_mib(self) -> int:
        return sum(self.parts[n].size_mib for n in VANILLA)

    @property
    def min_mib(self) -> int:
        """1 MiB head, the partitions, the smallest rest-of-disk partition, 1 MiB tail."""
        added = sum(self.parts[n].size_mib or layout.MIN_REST_MIB for n in ADDED)
        return 1 + self.vanilla_mib + added + 1


@dataclass(frozen=True)
class Options:
    device: Path
    config: Path | None = None
    force: bool = False
    strict: bool = False
    medium: Path | None = None      # the live medium; None: /run/initramfs/live in the root
    source: Path | None = None      # the tree to deploy; None: /run/rootfsbase in the root
    state: Path | None = None       # tests: directories standing for COS_STATE / COS_OEM at deploy
    oem: Path | None = None


# ---- checks (nothing written) ---------------------------------------------------------------

def check_live(system: System, force: bool) -> None:
    if not system.path(LIVE_SENTINEL).exists() and not force:
        raise CosError(f"cos-install runs from the live medium ({LIVE_SENTINEL} is missing)",
                       "boot the cOS ISO, or pass --force to install from this system's medium anyway")


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise CosError(f"the live medium has no {what} ({path})",
                       "boot a cOS ISO built with cos-install support (pipeline/iso.py puts /cos/install on it)")
    return path


def _part(raw: object, i: int, where: Path) -> PartSpec:
    try:
        assert isinstance(raw, dict)
        spec = PartSpec(str(raw["name"]), str(raw["type"]), int(raw["size_mib"]),
                        str(raw["label"]) if raw.get("label") else None)
    except (AssertionError, KeyError, TypeError, ValueError):
        raise CosError(f"{where}: partitions[{i}] is not {{name, type, size_mib, label}}",
                       "the ISO is damaged or from another cOS version") from None
    return spec


def read_payload(medium: Path, source: Path) -> Payload:
    directory = medium / PAYLOAD
    manifest = _need(directory / MANIFEST, "install payload")
    try:
        data = json.loads(manifest.read_text())
        parts = {p.name: p for p in (_part(r, i, manifest) for i, r in enumerate(data["partitions"]))}
        efi_image, efi_size = directory / str(data["efi_image"]), int(data["efi_image_size"])
        core, boot = directory / str(data["bios_core"]), directory / str(data["bios_boot"])
    except (ValueError, KeyError, TypeError) as e:
        raise CosError(f"{manifest} is not a cos-install manifest ({e})",
                       "the ISO is damaged or from another cOS version") from None
    missing = [n for n in (*VANILLA, *ADDED) if n not in parts]
    if missing:
        raise CosError(f"{manifest} lacks the partitions {', '.join(missing)}")
    for name in deploy.MENU:
        _need(source / name, f"boot menu /{name} in the system tree")
    return Payload(parts, _need(efi_image, "COS_GRUB image"), efi_size, _need(core, "GRUB core.img"),
                   _need(boot, "GRUB boot.img"), _need(medium / SQUASHFS, "root squashfs"),
                   _need(medium / KERNEL, "kernel"), _need(medium / INITRD, "initrd"), source)


def check_config(config: Path | None) -> None:
    """--config must be a cloud-config the runner can read: refused now, not on the first boot."""
    if config is None:
        return
    from ..cloudconfig.sources import read_file  # late: loads yaml

    if not config.is_file():
        raise CosError(f"--config {config} does not exist")
    doc = read_file(config, str(config))
    if doc is not None and doc.errors:
        raise CosError(f"--config {config}: {doc.errors[0]}", "fix the file (a yip document or #cloud-config)")


def _mounted_below(system: System, device: Path) -> list[str]:
    proc = query(system).run(["lsblk", "-nro", "MOUNTPOINT", device], check=False)
    return [m for m in proc.stdout.decode(errors="replace").split() if m]


def check_device(system: System, device: Path, payload: Payload, force: bool) -> bool:
    """DEVICE usable: exists, not in use, empty-looking (unless --force), big enough.
    Returns whether it is a disk image file (the host tests) rather than a block device."""
    is_file = is_image_file(device, "name the target disk, e.g. /dev/vda (see lsblk)")
    if not is_file and _mounted_below(system, device):
        raise CosError(f"{device} is in use (mounted: {', '.join(_mounted_below(system, device))})",
                       "is it the live medium or the running system? name another disk")
    found = probe(system, device)
    if found and not force:
        what = f"a {found['PTTYPE']} partition table" if "PTTYPE" in found else f"a {found.get('TYPE', '?')} signature"
        raise CosError(f"{device} is not empty: it has {what}",
                       f"cos-install --force {device} overwrites it (everything on it is lost)")
    size_mib = size_bytes(device) // MIB
    if size_mib < payload.min_mib:
        raise CosError(f"{device} has {size_mib} MiB, cos-install needs at least {payload.min_mib} MiB "
                       f"(COS_STATE alone takes {payload.parts['state'].size_mib} MiB)",
                       "use a bigger disk")
    return is_file


# ---- writing the disk -----------------------------------------------------------------------

def write_gpt(system: System, device: Path, payload: Payload) -> Disk:
    """A fresh GPT with the vanilla partitions, 1 MiB aligned from 1 MiB (as pipeline/disk.py);
    GUIDs random: each installed disk is its own."""
    cmd: list[str | Path] = ["sgdisk", "--zap-all", device]
    system.run(cmd)
    cmd, at = ["sgdisk", "--clear"], 1
    for n, name in enumerate(VANILLA, 1):
        p = payload.parts[name]
        cmd += [f"--new={n}:{at * MIB // SECTOR}:{(at + p.size_mib) * MIB // SECTOR - 1}",
                f"--typecode={n}:{p.type}", f"--change-name={n}:{p.name}"]
        at += p.size_mib
    system.run([*cmd, device])
    disk = read_disk(system, device)
    if not disk.is_file:
        refresh(system, disk, len(VANILLA))
    return disk


def partition(disk: Disk, name: str) -> Partition:
    found = next((p for p in disk.partitions if p.name == name), None)
    if found is None:
        raise CosError(f"partition {name} is missing on {disk.path} after writing its table",
                       "re-run cos-install --force")
    return found


def install_bios(device: Path, core: bytes, boot: bytes, start_lba: int, max_bytes: int) -> None:
    """What grub-bios-setup does: core.img into the BIOS boot partition, its blocklist
    pointing at its own second sector, boot.img's code into the MBR (the disk signature and
    the protective partition table stay)."""
    core_img = bytearray(core)
    if len(core_img) > max_bytes:
        raise CosError(f"GRUB core.img is {len(core_img)} bytes, the BIOS boot partition only {max_bytes}")
    start, length, _ = struct.unpack_from("<QHH", core_img, BLOCKLIST)
    if start != 2 or length != -(-len(core_img) // SECTOR) - 1:
        raise CosError(f"unexpected GRUB core.img blocklist ({start}, {length})", "the ISO's core.img is damaged")
    struct.pack_into("<Q", core_img, BLOCKLIST, start_lba + 1)
    with open(device, "r+b") as f:
        mbr = bytearray(f.read(SECTOR))
        new = bytearray(boot[:MBR_CODE_END]) + mbr[MBR_CODE_END:]
        new[BPB_START:BPB_END] = mbr[BPB_START:BPB_END]
        struct.pack_into("<Q", new, KERNEL_SECTOR, start_lba)
        new[DRIVE_CHECK:DRIVE_CHECK + 2] = b"\x90\x90"
        f.seek(0)
        f.write(new)
        f.seek(start_lba * SECTOR)
        f.write(core_img)
        f.flush()
        os.fsync(f.fileno())


def write_at(device: Path, offset: int, src: Path, length: int) -> None:
    """`src` at `offset`, zeros after it up to `length` bytes (no old bytes under the new filesystem)."""
    if src.stat().st_size > length:
        raise CosError(f"{src.name} ({src.stat().st_size} bytes) does not fit its {length}-byte partition")
    chunk = 4 * MIB
    with open(src, "rb") as fin, open(device, "r+b") as f:
        f.seek(offset)
        written = 0
        while data := fin.read(chunk):
            f.write(data)
            written += len(data)
        zeros = bytes(chunk)
        while written < length:
            n = min(chunk, length - written)
            f.write(zeros[:n])
            written += n
        f.flush()
        os.fsync(f.fileno())


def _debugfs_size(system: System, target: Path, path: str) -> int | None:
    out = query(system).run(["debugfs", "-R", f"stat {path}", target], check=False).stdout.decode(errors="replace")
    for line in out.splitlines():
        if "Size:" in line and "User:" in line:
            return int(line.rsplit("Size:", 1)[1].split()[0])
    return None


def fill_ext4(system: System, target: Path, label: str, size: int, files: dict[str, Path]) -> None:
    """A fresh ext4 on `target` (a partition node or a scratch file) holding `files`
    ({'/cOS/recovery.squashfs': source}), written with debugfs: no mount, the same on a
    device as on a disk image file. debugfs exits 0 on failed commands: each file's size is
    read back."""
    system.run(["mkfs.ext4", "-q", "-F", "-L", label, "-E", "nodiscard", target, f"{size // 1024}k"])
    dirs = sorted({str(p) for dest in files for p in Path(dest).parents if str(p) != "/"})
    script = [f"mkdir {d}" for d in dirs] + [f"write {src} {dest}" for dest, src in sorted(files.items())]
    with tempfile.NamedTemporaryFile("w", suffix=".debugfs") as cmds:
        cmds.write("\n".join(script) + "\n")
        cmds.flush()
        system.run(["debugfs", "-w", "-f", cmds.name, target])
    for dest, src in files.items():
        if _debugfs_size(system, target, dest) != src.stat().st_size:
            raise CosError(f"debugfs could not write {dest} into {label} ({target})",
                           "is the partition big enough? re-run cos-install --force")


def make_filesystem(system: System, disk: Disk, part: Partition, label: str, files: dict[str, Path]) -> None:
    log.info("%s: ext4 with %s", label, ", ".join(sorted(files)) or "nothing")
    if not disk.is_file:
        fill_ext4(system, Path(part.node), label, disk.nbytes(part), files)
        return
    scratch = disk.path.with_name(f".{disk.path.name}.{part.name}.tmp")
    try:
        scratch.unlink(missing_ok=True)
        with open(scratch, "wb") as f:
            f.truncate(disk.nbytes(part))
        fill_ext4(system, scratch, label, disk.nbytes(part), files)
        implant(system, disk, part, scratch)
    finally:
        scratch.unlink(missing_ok=True)


def check_recovery_fits(payload: Payload, part: Partition, disk: Disk) -> None:
    content = sum(p.stat().st_size for p in (payload.squashfs, payload.kernel, payload.initrd))
    if content > disk.nbytes(part) * 0.9:
        raise CosError(f"COS_RECOVERY ({disk.nbytes(part) // MIB} MiB) is too small for {content // MIB} MiB "
                       "of recovery system", "the flavor's disk.recovery.size_mib must grow: rebuild the ISO")


def write_boot_partitions(system: System, disk: Disk, payload: Payload, config: Path | None, work: Path) -> None:
    legacy, esp = partition(disk, "legacy"), partition(disk, "efi")
    oem, recovery = partition(disk, "oem"), partition(disk, "recovery")
    check_recovery_fits(payload, recovery, disk)
    log.info("BIOS: GRUB boot.img in the MBR, core.img at sector %d", legacy.start)
    install_bios(disk.path, payload.core.read_bytes(), payload.boot.read_bytes(), legacy.start, disk.nbytes(legacy))
    log.info("COS_GRUB: the ESP image from the medium (%d MiB)", payload.efi_size // MIB)
    if payload.efi_size > disk.nbytes(esp):
        raise CosError(f"the ESP image ({payload.efi_size} bytes) is larger than partition efi ({disk.nbytes(esp)})")
    write_at(disk.path, disk.offset(esp), payload.efi_image, disk.nbytes(esp))

    (work / "grubenv").write_bytes(grubenv.encode({"next_entry": "recovery"}))
    oem_files = {f"/{deploy.GRUBENV}": work / "grubenv"}
    if config is not None:
        oem_files[f"/{CUSTOM_CONFIG}"] = config
    make_filesystem(system, disk, oem, _label(payload, "oem"), oem_files)

    rec_files = {"/cOS/recovery.squashfs": payload.squashfs, "/boot/vmlinuz": payload.kernel,
                 "/boot/initrd": payload.initrd}
    rec_files |= {f"/{name}": payload.source / name for name in deploy.MENU}
    make_filesystem(system, disk, recovery, _label(payload, "recovery"), rec_files)


def _label(payload: Payload, name: str) -> str:
    label = payload.parts[name].label
    if not label:
        raise CosError(f"the install manifest gives partition {name} no filesystem label")
    return label


def add_state_and_persistent(system: System, device: Path, payload: Payload) -> Disk:
    """COS_STATE and COS_PERSISTENT after the vanilla partitions: the `layout` step's code."""
    adds = [{"fsLabel": _label(payload, n), "pLabel": n, "size": payload.parts[n].size_mib} for n in ADDED]
    layout.apply({"device": {"path": str(device)}, "add_partitions": adds}, system)
    return read_disk(system, device)


@contextmanager
def mounted_partition(system: System, part: Partition, name: str) -> Iterator[Path]:
    """A partition of the new disk by its node (not its label: the machine may hold another
    cOS disk with the same labels), mounted under /run/cos/install."""
    target = system.path(f"{MOUNTS}/{name}")
    target.mkdir(parents=True, exist_ok=True)
    system.run(["mount", "-o", "rw", part.node, target])
    try:
        yield target
    finally:
        system.run(["umount", target], check=False)


@contextmanager
def _dir_or_mount(system: System, given: Path | None, disk: Disk, name: str) -> Iterator[Path]:
    if given is not None:
        with deploy.given_dir(given, f"--{name}") as d:
            yield d
        return
    if disk.is_file:
        raise CosError(f"{disk.path} is a disk image file: its {name} partition cannot be mounted to deploy",
                       f"give --{name} DIR (host tests), or install onto a block device")
    with mounted_partition(system, partition(disk, name), name) as d:
        yield d


def deploy_active(system: System, opts: Options, disk: Disk, payload: Payload) -> None:
    with _dir_or_mount(system, opts.state, disk, "state") as state, \
            _dir_or_mount(system, opts.oem, disk, "oem") as oem:
        deploy.deploy_system(system, deploy.Options(source=payload.source, state=state, oem=oem, force=True),
                             stage=None)
        os.sync()


def check_tools(is_file: bool) -> None:
    """Every tool before the first write: a missing one must not leave half a disk."""
    needed = ("sgdisk", "sfdisk", "mkfs.ext4", "debugfs", "blkid", "lsblk", "tune2fs", "cp")
    for tool in needed + (() if is_file else ("partx", "mount", "umount")):
        if shutil.which(tool) is None:
            raise CosError(f"required tool '{tool}' is not installed", "install it in the OS image")


def install(system: System, opts: Options) -> None:
    check_live(system, opts.force)
    medium = opts.medium or system.path(MEDIUM)
    payload = read_payload(medium, opts.source or system.path(deploy.DEFAULT_SOURCE))
    check_config(opts.config)
    is_file = check_device(system, opts.device, payload, opts.force)
    check_tools(is_file)
    log.info("installing onto %s (%d MiB)", opts.device, size_bytes(opts.device) // MIB)
    disk = write_gpt(system, opts.device, payload)
    with tempfile.TemporaryDirectory(prefix="cos-install.") as work:
        write_boot_partitions(system, disk, payload, opts.config, Path(work))
    disk = add_state_and_persistent(system, opts.device, payload)
    deploy_active(system, opts, disk, payload)
    log.info("installed: %s boots (BIOS and UEFI) into the cOS active system", opts.device)
    deploy.run_after(system, "after-install", opts.strict)
    os.sync()
