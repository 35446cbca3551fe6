"""Cloud and hypervisor formats made from the raw disk, one small class per format
(as kiwi does): qcow2, Azure's fixed VHD, GCE's disk.raw in a gzip'd tar.
AWS imports the raw disk itself (manifest kind `raw`).

Every format is reproducible: qcow2 has no dates; the VHD footer's timestamp and
UUID are rewritten from SOURCE_DATE_EPOCH and the build seed (qemu-img puts the
current time and a random UUID there); the tar is made with fixed owners and dates
and gzip -n.
"""
from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from . import artifacts
from .config import FlavorContext
from .errors import PipelineError
from .files import atomic_path
from .run import run

MIB = 1024 * 1024
GIB = 1024 * MIB
VHD_EPOCH = 946684800  # VHD timestamps count seconds from 2000-01-01 00:00:00 UTC
VHD_FOOTER = 512


def round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def sparse_copy_padded(src: Path, dest: Path, size: int) -> None:
    """A sparse copy of `src` grown (with a hole) to `size` bytes."""
    if src.stat().st_size > size:
        raise PipelineError(f"{src.name} is larger than the {size} bytes asked for")
    run(["cp", "--sparse=always", "--reflink=auto", src, dest])
    os.truncate(dest, size)


class DiskFormat:
    """One output format of the raw disk."""
    kind: ClassVar[str]        # artifact kind (its name: artifacts.KINDS)

    def convert(self, raw: Path, out: Path, inputs: artifacts.BootInputs) -> Path:
        raise NotImplementedError


class Qcow2(DiskFormat):
    kind = "qcow2"

    def convert(self, raw: Path, out: Path, inputs: artifacts.BootInputs) -> Path:
        with atomic_path(out) as tmp:
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, tmp])
        return out


class AzureVhd(DiskFormat):
    """Fixed VHD: the raw bytes (virtual size a whole MiB) + a 512-byte footer."""
    kind = "azure-vhd"

    def convert(self, raw: Path, out: Path, inputs: artifacts.BootInputs) -> Path:
        size = raw.stat().st_size
        with atomic_path(out) as tmp, tempfile.TemporaryDirectory(dir=out.parent, prefix=".vhd-") as work:
            src = raw
            if size % MIB:  # Azure takes whole MiB only
                src = Path(work) / "padded.raw"
                sparse_copy_padded(raw, src, round_up(size, MIB))
            run(["qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size",
                 src, tmp])
            fix_vhd_footer(tmp, inputs.sde, inputs.uuid("azure-vhd").bytes)
        return out


def vhd_checksum(footer: bytes) -> int:
    return ~sum(footer[:64] + b"\0\0\0\0" + footer[68:]) & 0xFFFFFFFF


def read_vhd_footer(path: Path) -> dict[str, Any]:
    """The fields of a fixed VHD's footer that matter to clouds; raises if invalid."""
    with open(path, "rb") as f:
        f.seek(-VHD_FOOTER, os.SEEK_END)
        footer = f.read(VHD_FOOTER)
    if footer[:8] != b"conectix":
        raise PipelineError(f"{path.name}: no VHD footer (cookie {footer[:8]!r})")
    (timestamp,) = struct.unpack_from(">I", footer, 24)
    original, current = struct.unpack_from(">QQ", footer, 40)
    disk_type, checksum = struct.unpack_from(">II", footer, 60)
    return {"timestamp": timestamp + VHD_EPOCH, "original_size": original, "current_size": current,
            "disk_type": disk_type, "checksum_ok": checksum == vhd_checksum(footer),
            "uuid": footer[68:84].hex(), "creator": footer[28:32].decode(errors="replace")}


def fix_vhd_footer(path: Path, sde: int, unique_id: bytes) -> None:
    """Set the footer's timestamp and UUID from the build and recompute its checksum."""
    with open(path, "r+b") as f:
        f.seek(-VHD_FOOTER, os.SEEK_END)
        pos = f.tell()
        footer = bytearray(f.read(VHD_FOOTER))
        if footer[:8] != b"conectix":
            raise PipelineError(f"{path.name}: qemu-img wrote no VHD footer")
        struct.pack_into(">I", footer, 24, max(sde - VHD_EPOCH, 0))
        footer[68:84] = unique_id
        struct.pack_into(">I", footer, 64, vhd_checksum(bytes(footer)))
        f.seek(pos)
        f.write(footer)


class GceTar(DiskFormat):
    """disk.raw (a whole GiB) in a gzip'd oldgnu tar, sparse (GCE's image import)."""
    kind = "gce-tar"
    member = "disk.raw"

    def convert(self, raw: Path, out: Path, inputs: artifacts.BootInputs) -> Path:
        with atomic_path(out) as tmp, tempfile.TemporaryDirectory(dir=out.parent, prefix=".gce-") as work:
            disk = Path(work) / self.member
            sparse_copy_padded(raw, disk, round_up(raw.stat().st_size, GIB))
            os.chmod(disk, 0o644)
            run(["tar", "--sort=name", f"--mtime=@{inputs.sde}", "--owner=0", "--group=0",
                 "--numeric-owner", "--format=oldgnu", "--sparse", "--use-compress-program=gzip -n",
                 "-C", work, "-cf", tmp, self.member])
        return out


FORMATS: dict[str, DiskFormat] = {f.kind: f for f in (Qcow2(), AzureVhd(), GceTar())}


def format_stage(ctx: FlavorContext, kind: str) -> dict[str, Any]:
    fmt, raw = FORMATS[kind], artifacts.path(ctx, "raw")
    if not raw.is_file():
        raise PipelineError(f"{raw} is missing", f"run: doit build-{ctx.name}:raw")
    out = fmt.convert(raw, artifacts.path(ctx, kind), artifacts.boot_inputs(ctx.paths))
    return artifacts.record(ctx.paths, kind, out)
