"""The live ISO: hybrid BIOS + UEFI, CD-ROM or USB stick, made by xorriso.

Layout (as cOS): ISO 9660 labelled COS_LIVE holding /rootfs.squashfs, /boot/vmlinuz,
/boot/initrd and /boot/grub/grub.cfg, and /cos/install: the raw disk's COS_GRUB image,
BIOS GRUB and partition table, for `cos-install` (runtime/install/install.py). BIOS boots GRUB i386-pc from El Torito
(cdboot) or, on a stick, from boot_hybrid.img in the MBR; UEFI boots the FAT ESP
appended as MBR partition 2 (type 0xef), which is also the El Torito EFI image.
Both GRUBs find the volume by label and read the same grub.cfg. With Secure Boot
(the default) the ESP holds the distro's signed shim and CD GRUB out of the image
(pipeline/bootchain.py) and a stub config at that GRUB's prefix that does the same.

Files are grafted from where they are (no staging copy). xorriso takes
SOURCE_DATE_EPOCH for every date and the volume UUID, so the bytes are reproducible.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from core import env as environ

from . import artifacts, bootchain, efi
from . import disk as raw_disk
from .config import DiskLayout, FlavorContext
from .files import DIGESTS, atomic_path
from .run import run

ELTORITO_PATH = "boot/grub/i386-pc/eltorito.img"
GRUB_CFG = "/boot/grub/grub.cfg"


def live_cmdline(label: str, extra: str) -> str:
    """dracut dmsquash-live: the squashfs at the ISO's root, an overlayfs on top
    (without rd.live.overlay.overlayfs=1 Debian's dracut 059 ends in the emergency shell)."""
    return (f"root=live:CDLABEL={label} rd.live.dir=/ rd.live.squashimg=rootfs.squashfs "
            f"rd.live.overlay.overlayfs=1 cos.mode=live {extra}").strip()


def grub_menu(title: str, cmdline: str, timeout: int = 2) -> str:
    return "\n".join([
        f"set timeout={timeout}",
        "serial --unit=0 --speed=115200",
        "terminal_input serial console",
        "terminal_output serial console",
        f'menuentry "{title}" --id live {{',
        f"    linux /boot/vmlinuz {cmdline}",
        "    initrd /boot/initrd",
        "}", ""])


def xorriso_command(out: Path, label: str, grafts: dict[str, Path], esp: Path, sde: int) -> list[str]:
    """xorriso (mkisofs emulation): El Torito BIOS + EFI, hybrid MBR, appended ESP.
    SOURCE_DATE_EPOCH sets the volume dates and UUID, not the files' dates: those are
    set with the native -volume_date all_file_dates before switching to mkisofs. -r, not
    -R: Rock Ridge modes and owners are rationalized (dirs 0555, files 0444), because
    xorriso gives the implicit directories of a graft (/boot, /cos) the modes of the
    source's disk parents, so the ISO differed with the build directory's permissions."""
    return ["xorriso", "-volume_date", "all_file_dates", f"={sde}",
            "-as", "mkisofs", "-quiet", "-o", str(out), "-iso-level", "3", "-r", "-J",
            "-joliet-long", "-V", label, "-graft-points",
            "-b", ELTORITO_PATH, "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table",
            "--grub2-boot-info", "--grub2-mbr", str(efi.bios_file("boot_hybrid.img")),
            "-partition_offset", "16", "--mbr-force-bootable",
            "-append_partition", "2", "0xef", str(esp),
            "-eltorito-alt-boot", "-e", "--interval:appended_partition_2:all::", "-no-emul-boot",
            *[f"{dest}={src}" for dest, src in sorted(grafts.items())]]


def build_iso(out: Path, inputs: artifacts.BootInputs, *, label: str, cmdline: str, title: str,
              disk: DiskLayout | None = None) -> Path:
    """Write the hybrid ISO to `out` (atomically). With `disk`, /cos/install holds what
    cos-install puts on a disk (pipeline/disk.py's install_payload)."""
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".iso-") as work:
        w = Path(work)
        early = efi.early_config([label], GRUB_CFG)
        efi.eltorito_image(w / "eltorito.img", early)
        if inputs.secure_boot:  # the distro's signed shim + CD GRUB, which reads the stub from the ESP
            esp_files = bootchain.signed_esp(inputs.squashfs, inputs.secure_boot, w,
                                             bootchain.stub_config(GRUB_CFG, label), cd=True)
        else:
            esp_files = {bootchain.SHIM_ESP: efi.efi_image(w / "BOOTX64.EFI", early)}
        efi.make_fat(w / "esp.img", efi.FatSpec("COS_ESP", efi.fat_volume_id(inputs.seed + ":iso-esp")),
                     esp_files, inputs.sde)
        (w / "grub.cfg").write_text(grub_menu(title, live_cmdline(label, cmdline)))
        grafts = {"/rootfs.squashfs": inputs.squashfs, "/boot/vmlinuz": inputs.kernel,
                  "/boot/initrd": inputs.initrd, GRUB_CFG: w / "grub.cfg",
                  "/" + ELTORITO_PATH: w / "eltorito.img"}
        if disk is not None:
            grafts |= raw_disk.install_payload(inputs, disk, w / "install")
        env = environ.child(SOURCE_DATE_EPOCH=str(inputs.sde))
        with atomic_path(out) as tmp:
            tmp.unlink()  # xorriso refuses to overwrite a non-ISO file
            run(xorriso_command(tmp, label, grafts, w / "esp.img", inputs.sde), env=env)
    return out


def write_sha256(path: Path) -> Path:
    """`<name>.sha256` beside the file, in sha256sum's format."""
    sums = path.with_name(path.name + ".sha256")
    with atomic_path(sums) as tmp:
        tmp.write_text(f"{DIGESTS.sha256(path)}  {path.name}\n")
    return sums


def iso_stage(ctx: FlavorContext) -> dict[str, Any]:
    flavor, paths, version = ctx.flavor, ctx.paths, ctx.version
    out = artifacts.path(ctx, "iso")
    build_iso(out, artifacts.boot_inputs(paths), label=flavor.boot.live_label, cmdline=flavor.boot.cmdline,
              title=f"cOS {flavor.name} {version} (live)", disk=flavor.disk)
    write_sha256(out)  # before the manifest lists the ISO; its digest is cached for the entry
    return artifacts.record(paths, "iso", out, companions=(".sha256",))
