"""GRUB boot images (EFI and BIOS) and FAT filesystems, made without mounting.

Secure Boot (boot.secure_boot, the default) replaces the EFI GRUB by the distro's signed
shim + GRUB copied out of the image (pipeline/bootchain.py); BIOS always uses the host's.

Which GRUB (BIOS, and EFI without Secure Boot): the HOST's (Debian grub-efi-amd64-bin / grub-pc-bin under
/usr/lib/grub). grub-mkimage and the modules it links must come from the same GRUB
build, and the only grub-mkimage we can run is the host's: running the image's own
(e.g. green's grub2-mkimage from /usr/share/grub2) would mean executing the OS
image's binaries at build time. Our images need nothing distro-specific from
GRUB: a small embedded config finds the partition by label and hands over to a
plain grub.cfg. The modules are embedded, so nothing is read from a $prefix.

grub-mkimage writes no timestamps, and mkfs.vfat --invariant / -i plus mtools'
SOURCE_DATE_EPOCH make FAT images byte-identical for the same input.
"""
from __future__ import annotations

import functools
import hashlib
import subprocess
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from core import env as environ

from .errors import PipelineError
from .files import atomic_path
from .run import run

GRUB_LIB = Path(environ.get("COS_GRUB_LIB") or "/usr/lib/grub")
EFI_TARGET = "x86_64-efi"
BIOS_TARGET = "i386-pc"
ELTORITO_TARGET = "i386-pc-eltorito"

# Everything the cOS menus use (search by label, ext4/iso9660/FAT, grubenv, serial,
# loopback for active.img); embedded so no module directory is needed at boot.
COMMON_MODULES = ["part_gpt", "part_msdos", "fat", "iso9660", "ext2", "search", "search_label",
                  "search_fs_uuid", "search_fs_file", "normal", "configfile", "linux", "echo",
                  "test", "loadenv", "loopback", "serial", "terminal", "gzio", "xzio", "sleep",
                  "ls", "cat", "halt", "reboot", "all_video"]
EFI_MODULES = COMMON_MODULES + ["efi_gop"]
BIOS_MODULES = COMMON_MODULES + ["biosdisk"]

MIB = 1024 * 1024


def grub_dir(target: str) -> Path:
    platform = BIOS_TARGET if target == ELTORITO_TARGET else target
    path = GRUB_LIB / platform
    if not (path / "moddep.lst").is_file():
        package = "grub-pc-bin" if platform == BIOS_TARGET else "grub-efi-amd64-bin"
        raise PipelineError(f"no GRUB modules for {platform} in {path}",
                            f"install them: apt-get install {package}")
    return path


@functools.cache  # read once per process, not once per task of every flavor
def host_grub_fingerprint(efi: bool = True) -> str:
    """Identifies the host's GRUB build (modinfo.sh carries its package version and build
    options): a doit key of the ISO and disk tasks, so a host GRUB upgrade re-makes them.
    `efi` False: i386-pc only (Secure Boot takes the EFI GRUB from the image, keyed on it).
    Never raises: `doit list` must work on a machine without GRUB."""
    digest = hashlib.sha256()
    for platform in (EFI_TARGET, BIOS_TARGET) if efi else (BIOS_TARGET,):
        try:
            digest.update((GRUB_LIB / platform / "modinfo.sh").read_bytes())
        except OSError:
            digest.update(f"{platform} missing".encode())
    return digest.hexdigest()[:16]


def early_config(labels: list[str], config: str) -> str:
    """The config embedded in core images: make the filesystem labelled with the first
    of `labels` found the root, then load `config` from it. The embedded config runs
    before normal.mod's script parser (no `if`), so fallbacks are plain searches in
    reverse order of preference: a later hit overrides an earlier one."""
    lines = [f"search --no-floppy --label --set=root {label}" for label in reversed(labels)]
    lines += [f"set prefix=($root){Path(config).parent}", f"configfile ($root){config}", ""]
    return "\n".join(lines)


def grub_image(out: Path, target: str, early_cfg: str, modules: list[str]) -> Path:
    """grub-mkimage for one platform with `early_cfg` embedded (atomic write)."""
    directory = grub_dir(target)
    with atomic_path(out) as tmp, tempfile.NamedTemporaryFile("w", suffix=".cfg") as cfg:
        cfg.write(early_cfg)
        cfg.flush()
        run(["grub-mkimage", "-O", target, "-d", directory, "-c", cfg.name, "-p", "/boot/grub",
             "-o", tmp, *modules])
    return out


def efi_image(out: Path, early_cfg: str) -> Path:
    return grub_image(out, EFI_TARGET, early_cfg, EFI_MODULES)


def bios_core_image(out: Path, early_cfg: str) -> Path:
    """core.img for a disk: diskboot.img + kernel, loaded by boot.img from the MBR."""
    return grub_image(out, BIOS_TARGET, early_cfg, BIOS_MODULES)


def eltorito_image(out: Path, early_cfg: str) -> Path:
    """cdboot.img + core, the El Torito no-emulation boot image of the ISO."""
    return grub_image(out, ELTORITO_TARGET, early_cfg, BIOS_MODULES)


def bios_file(name: str) -> Path:
    """A file shipped with GRUB i386-pc (boot.img, boot_hybrid.img)."""
    path = grub_dir(BIOS_TARGET) / name
    if not path.is_file():
        raise PipelineError(f"GRUB file {path} is missing", "reinstall grub-pc-bin")
    return path


def fat_volume_id(seed: str) -> str:
    """A FAT volume id (8 hex digits) derived from a seed: same build, same id."""
    return uuid.uuid5(uuid.NAMESPACE_URL, seed).hex[:8]


@dataclass(frozen=True)
class FatSpec:
    label: str
    volume_id: str              # 8 hex digits
    size_bytes: int | None = None  # None: fit the content (rounded up to 4 MiB, as cOS did)


def fat_size(files: Mapping[str, Path], min_slack: int = MIB) -> int:
    """Content + FAT overhead, rounded up to a whole 4 MiB."""
    content = sum(-(-p.stat().st_size // 4096) * 4096 for p in files.values())
    need = content + min_slack + content // 16
    return -(-need // (4 * MIB)) * 4 * MIB


def make_fat(out: Path, spec: FatSpec, files: Mapping[str, Path], sde: int) -> Path:
    """A FAT image holding `files` ({'/EFI/BOOT/BOOTX64.EFI': source}), no mounts:
    mkfs.vfat on a file, then mtools. Times come from SOURCE_DATE_EPOCH."""
    size = spec.size_bytes or fat_size(files)
    if size % 1024:
        raise PipelineError(f"FAT image {out.name}: size {size} is not a whole KiB")
    env = environ.child(SOURCE_DATE_EPOCH=str(sde), TZ="UTC")
    with atomic_path(out) as tmp:
        tmp.unlink()
        run(["mkfs.vfat", "-C", "--invariant", "-i", spec.volume_id, "-n", spec.label,
             tmp, str(size // 1024)], env=env, stdout=subprocess.DEVNULL)
        dirs = sorted({str(Path(dest).parent) for dest in files} - {"/"})
        needed: list[str] = []
        for d in dirs:
            parts = Path(d).parts[1:]
            needed += ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if needed:
            run(["mmd", "-i", tmp, *[f"::{d}" for d in dict.fromkeys(needed)]], env=env)
        for dest, src in sorted(files.items()):
            run(["mcopy", "-i", tmp, src, f"::{dest}"], env=env)
    return out
