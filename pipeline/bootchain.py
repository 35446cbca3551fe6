"""The Secure Boot EFI chain: the distro's signed shim, MokManager and GRUB, copied out of
the flavor's image (its squashfs, read with rdsquashfs: nothing of the image is executed).

Firmware with Microsoft's keys runs shim (signed by Microsoft) as EFI/BOOT/BOOTX64.EFI;
shim runs the GRUB named by its built-in loader name from its own directory, checking
the distro's signature; that GRUB checks the kernel through shim (the distro kernel in
the image is already signed). A signed GRUB takes no modules or config from us at build
time: it has a built-in prefix and module list, read here out of the binary, and reads
<prefix>/grub.cfg from the device it was loaded from. We put a small stub there (see
stub_config) that finds our real menu and `configfile`s it, using only built-in commands.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import PipelineError
from .run import run

ESP_DIR = "/EFI/BOOT"
SHIM_ESP = f"{ESP_DIR}/BOOTX64.EFI"   # the removable-media path the firmware boots


@dataclass(frozen=True)
class Chain:
    """Where a distro's signed chain lives in its image, and the names shim wants on the ESP."""
    package_hint: str            # what the flavor's Dockerfile must install
    shim: str
    mok_manager: str
    grub: str
    grub_cd: str | None          # the CD variant for the ISO, where the distro has one
    loader_name: str = "grubx64.efi"     # shim's built-in DEFAULT_LOADER (checked in the binary)
    mok_name: str = "mmx64.efi"          # shim's built-in MokManager name (checked in the binary)


_DEBIAN = Chain("shim-signed grub-efi-amd64-signed",
                "usr/lib/shim/shimx64.efi.signed", "usr/lib/shim/mmx64.efi.signed",
                "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed",
                "usr/lib/grub/x86_64-efi-signed/gcdx64.efi.signed")

# One row per distro. Debian's paths are checked against its packages (and by the red build);
# Ubuntu's shim-signed ships shimx64.efi.signed.latest (symlinks resolved: see resolve) and its shim package a signed
# mmx64.efi; openSUSE's from its shim-install (source_dir /usr/share/efi/<arch>); Fedora's
# from the shim-x64 / grub2-efi-x64 file lists. All are checked again at build time.
CHAINS: dict[str, Chain] = {
    "debian": _DEBIAN,
    "ubuntu": Chain(_DEBIAN.package_hint, "usr/lib/shim/shimx64.efi.signed.latest", "usr/lib/shim/mmx64.efi",
                    _DEBIAN.grub, _DEBIAN.grub_cd),
    "opensuse": Chain("shim grub2-x86_64-efi", "usr/share/efi/x86_64/shim.efi",
                      "usr/share/efi/x86_64/MokManager.efi", "usr/share/efi/x86_64/grub.efi", None,
                      loader_name="grub.efi", mok_name="MokManager.efi"),
    "fedora": Chain("shim-x64 grub2-efi-x64", "boot/efi/EFI/fedora/shimx64.efi",
                    "boot/efi/EFI/fedora/mmx64.efi", "boot/efi/EFI/fedora/grubx64.efi", None),
}

# GRUB commands (modules) our stub and menus need; a signed GRUB cannot insmod anything else.
NEEDED_MODULES = ("search_label", "search_fs_file", "configfile", "test", "normal", "linux",
                  "loopback", "loadenv", "serial", "terminal", "ext2", "fat", "iso9660",
                  "part_gpt", "part_msdos", "echo")

# grub_module_info64 / grub_module_header (grub/include/grub/kernel.h)
_MODULE_MAGIC = 0x676D696D
_OBJ_ELF, _OBJ_CONFIG, _OBJ_PREFIX = 0, 2, 3


@dataclass(frozen=True)
class GrubInfo:
    prefix: str                  # built-in $prefix without a device, e.g. /EFI/debian
    modules: frozenset[str]
    config: str                  # the built-in (early) config, '' if none


@dataclass(frozen=True)
class PeImage:
    sections: dict[str, bytes]
    signed: bool                 # has an Authenticode certificate table


def parse_pe(data: bytes, what: str) -> PeImage:
    """Sections and signature presence of a PE32+ image (just enough of the format)."""
    if data[:2] != b"MZ":
        raise PipelineError(f"{what} is not an EFI (PE) binary")
    pe = struct.unpack_from("<I", data, 0x3C)[0]
    if data[pe:pe + 4] != b"PE\0\0" or struct.unpack_from("<H", data, pe + 24)[0] != 0x20B:
        raise PipelineError(f"{what} is not a PE32+ EFI binary")
    nsections, = struct.unpack_from("<H", data, pe + 6)
    opt_size, = struct.unpack_from("<H", data, pe + 20)
    opt = pe + 24
    _cert_offset, cert_size = struct.unpack_from("<II", data, opt + 112 + 4 * 8)  # data dir 4: security
    sections = {}
    for i in range(nsections):
        name, _vsize, _vaddr, raw_size, raw_ptr = struct.unpack_from("<8sIIII", data, opt + opt_size + 40 * i)
        sections[name.rstrip(b"\0").decode(errors="replace")] = data[raw_ptr:raw_ptr + raw_size]
    return PeImage(sections, signed=cert_size > 0)


def _elf_modname(elf: bytes) -> str | None:
    """A GRUB module's name: its ELF64 `.modname` section."""
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    for name_off, _type, _flags, _addr, offset, size in headers:
        end = elf.index(b"\0", strtab + name_off)
        if elf[strtab + name_off:end] == b".modname":
            return elf[offset:offset + size].rstrip(b"\0").decode()
    return None


def read_grub(data: bytes, what: str) -> GrubInfo:
    """Prefix, built-in modules and embedded config of a GRUB EFI image (its `mods` section)."""
    mods = parse_pe(data, what).sections.get("mods")
    if not mods or struct.unpack_from("<I", mods)[0] != _MODULE_MAGIC:
        raise PipelineError(f"{what} is not a GRUB EFI image (no module section)")
    _magic, _pad, at, size = struct.unpack_from("<IIQQ", mods)
    prefix, config, names = "", "", set()
    while at + 8 <= min(size, len(mods)):
        kind, length = struct.unpack_from("<II", mods, at)
        body = mods[at + 8:at + length]
        if kind == _OBJ_ELF:
            names.add(_elf_modname(body) or "")
        elif kind == _OBJ_PREFIX:
            prefix = body.rstrip(b"\0").decode()
        elif kind == _OBJ_CONFIG:
            config = body.rstrip(b"\0").decode()
        at += max(length, 8)
    prefix = re.sub(r"^\([^)]*\)", "", prefix)  # '(,gpt2)/EFI/x': the device is where GRUB was loaded from
    if not prefix.startswith("/"):
        raise PipelineError(f"{what}: GRUB has no built-in prefix (got {prefix!r}); cannot place its config")
    return GrubInfo(prefix.rstrip("/") or "/", frozenset(names - {""}), config)


def require_modules(info: GrubInfo, what: str, needed: tuple[str, ...] = NEEDED_MODULES) -> None:
    missing = sorted(set(needed) - info.modules)
    if missing:
        raise PipelineError(f"{what}: the signed GRUB lacks built-in modules {', '.join(missing)}",
                            "our menus need them and a signed GRUB loads no others; set boot.secure_boot: false")


def shim_names(data: bytes) -> set[str]:
    """EFI file names shim carries as UTF-16 strings ('\\grubx64.efi', '\\mmx64.efi', ...)."""
    text = data.decode("utf-16-le", errors="replace") + data[1:].decode("utf-16-le", errors="replace")
    return set(re.findall(r"\\([A-Za-z0-9_]+\.efi)", text))


def _link_target(squashfs: Path, path: str) -> str | None:
    """The target of `path` if it is a symlink in the image (rdsquashfs -s), else None."""
    proc = run(["rdsquashfs", "-s", path, squashfs], capture=True, check=False)
    if proc.returncode != 0 or b"Inode type: symbolic link" not in proc.stdout:
        return None
    for line in proc.stdout.decode(errors="replace").splitlines():
        if line.startswith("Link target: "):
            return line.removeprefix("Link target: ")
    return None


def resolve(squashfs: Path, inner: str, hops: int = 40) -> str:
    """`inner` with every symlink in it resolved inside the image, as the kernel would under
    a chroot (rdsquashfs follows none: Ubuntu's shim is a link to .latest, /lib to usr/lib)."""
    done: list[str] = []
    todo = [p for p in inner.split("/") if p]
    while todo:
        part = todo.pop(0)
        if part == "..":
            done = done[:-1]
            continue
        if part == ".":
            continue
        target = _link_target(squashfs, "/" + "/".join([*done, part]))
        if target is None:
            done.append(part)
            continue
        hops -= 1
        if hops < 0:
            raise PipelineError(f"{squashfs.name}: /{inner} has too many levels of symbolic links")
        done = [] if target.startswith("/") else done
        todo = [p for p in target.split("/") if p] + todo
    return "/".join(done)


def read_file(squashfs: Path, inner: str, dest: Path, chain: Chain) -> Path:
    """One file of the image, copied out of its squashfs (rdsquashfs -c writes it to stdout)."""
    proc = run(["rdsquashfs", "-c", f"/{resolve(squashfs, inner)}", squashfs], capture=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise PipelineError(f"{squashfs.name} has no /{inner} (Secure Boot chain)",
                            f"install {chain.package_hint} in the flavor's Dockerfile, "
                            "or set boot.secure_boot: false in its flavor.yaml")
    dest.write_bytes(proc.stdout)
    return dest


@dataclass(frozen=True)
class EspChain:
    files: dict[str, Path]       # ESP path -> extracted file
    config_path: str             # where the signed GRUB reads its config on the ESP


def extract(squashfs: Path, distro: str, dest: Path, *, cd: bool = False) -> EspChain:
    """Copy the distro's signed chain out of the image into `dest` and check it: every
    binary signed, shim naming the loader and MokManager we install, GRUB having the
    modules our menus use. `cd`: the ISO's GRUB (the CD variant where there is one)."""
    chain = CHAINS.get(distro)
    if chain is None:
        raise PipelineError(f"no Secure Boot chain known for distro {distro!r}",
                            f"known: {', '.join(sorted(CHAINS))}; or set boot.secure_boot: false")
    grub_src = chain.grub_cd if cd and chain.grub_cd else chain.grub
    parts = {SHIM_ESP: chain.shim, f"{ESP_DIR}/{chain.mok_name}": chain.mok_manager,
             f"{ESP_DIR}/{chain.loader_name}": grub_src}
    files = {}
    for esp_path, inner in parts.items():
        out = read_file(squashfs, inner, dest / Path(inner).name, chain)
        if not parse_pe(out.read_bytes(), f"/{inner}").signed:
            raise PipelineError(f"/{inner} in {squashfs.name} is not signed",
                                f"install the distro's signed package ({chain.package_hint})")
        files[esp_path] = out
    names = shim_names(files[SHIM_ESP].read_bytes())
    for wanted in (chain.loader_name, chain.mok_name):
        if wanted not in names:
            raise PipelineError(f"/{chain.shim} does not load {wanted} (it names {sorted(names)})",
                                f"fix pipeline/bootchain.py CHAINS[{distro!r}]")
    grub = read_grub(files[f"{ESP_DIR}/{chain.loader_name}"].read_bytes(), f"/{grub_src}")
    require_modules(grub, f"/{grub_src}")
    return EspChain(files, f"{grub.prefix}/grub.cfg".replace("//", "/"))


def stub_config(menu: str, recovery_label: str, state_label: str | None = None) -> str:
    """The config a GRUB reads first: make the filesystem holding our menu the root and
    `configfile` it. With `state_label`: the installed system's menu on COS_STATE only if
    that FILE is there (a COS_STATE laid out but never deployed has none, and searching
    by label alone stopped at `grub>`), else recovery's. Normal-mode script, built-in
    commands only (search, test, configfile)."""
    lines = [f"search --no-floppy --label --set=root {recovery_label}"]
    if state_label:
        lines += [f"if search --no-floppy --label --set=cos_state {state_label}; then",
                  f'    if [ -f "(${{cos_state}}){menu}" ]; then set root="${{cos_state}}"; fi',
                  "fi"]
    lines += [f"set prefix=($root){Path(menu).parent}", f"configfile ($root){menu}", ""]
    return "\n".join(lines)


STUB_ESP = f"{ESP_DIR}/grub.cfg"  # $cmdpath/grub.cfg: Debian's GRUB falls back to it; our BIOS/unsigned GRUBs read it


def signed_esp(squashfs: Path, distro: str, work: Path, stub: str, *, cd: bool = False) -> dict[str, Path]:
    """The ESP's files on the Secure Boot path: the chain, and `stub` where its GRUB reads
    its config (also at STUB_ESP, where the host-made BIOS GRUB of the disk reads it)."""
    chain = extract(squashfs, distro, work, cd=cd)
    (work / "stub.cfg").write_text(stub)
    return {**chain.files, chain.config_path: work / "stub.cfg", STUB_ESP: work / "stub.cfg"}
