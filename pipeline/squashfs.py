"""OS image -> rootfs tar stream -> squashfs, plus the kernel and initrd beside it.

The container's filesystem is streamed (docker export) through a filter into
tar2sqfs: nothing is unpacked on the host, so ownership, modes, device nodes and
xattrs stay exactly as in the image, with no root and no path traversal risk.
The filter rejects unsafe names, clamps times to SOURCE_DATE_EPOCH and replaces
the files docker's init layer puts in every container.
"""
from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from core import env

from . import docker_engine, manifest
from .config import FlavorContext, SquashfsOptions
from .errors import PipelineError
from .files import atomic_path, file_entry
from .run import require_tool, stream

log = logging.getLogger("cos.squashfs")

BUFSIZE = 1024 * 1024
BOOT_FILES = ("boot/vmlinuz", "boot/initrd")  # fixed by packages/cos-setup's setup-image
DROP = {".dockerenv", "etc/resolv.conf"}  # docker's; the booted OS makes its own resolv.conf
HOSTS = b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


class UnsafeArchive(PipelineError):
    pass


class _ChunkReader(io.RawIOBase):
    """A file object over an iterator of byte chunks (the docker export stream)."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks: Iterator[bytes] = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n], self._buf = self._buf[:n], self._buf[n:]
        return n


def safe_name(name: str) -> str:
    """A member name relative to / with no '..'; raises on anything else."""
    clean = posixpath.normpath(name)
    if name.startswith("/") or clean == ".." or clean.startswith("../"):
        raise UnsafeArchive(f"unsafe path in the image's filesystem stream: {name!r}")
    return "" if clean == "." else clean


def filter_rootfs(src: IO[bytes] | io.RawIOBase, dst: IO[bytes], *, sde: int, hostname: str,
                  capture_dir: Path) -> dict[str, str]:
    """Copy a rootfs tar from src to dst (see module doc). Regular files under
    boot/ named vmlinuz*/initrd* are also saved into capture_dir; returns the
    symlinks found under boot/ so the caller can resolve /boot/vmlinuz and /boot/initrd."""
    replace = {"etc/hostname": f"{hostname}\n".encode(), "etc/hosts": HOSTS}
    links: dict[str, str] = {}
    with tarfile.open(fileobj=src, mode="r|", bufsize=BUFSIZE) as tin, \
            tarfile.open(fileobj=dst, mode="w|", format=tarfile.PAX_FORMAT, bufsize=BUFSIZE) as tout:
        tout.copybufsize = BUFSIZE  # type: ignore[attr-defined]  # undocumented; 1 MiB copies, not 16 KiB
        for member in tin:
            name = safe_name(member.name)
            if not name or name in DROP or (name == "dev/console" and member.isreg()):
                continue  # dev/console as a plain file is docker's bind-mount placeholder
            member.name = name
            member.mtime = min(int(member.mtime), sde)
            if member.islnk():
                member.linkname = safe_name(member.linkname)
            if name in replace:
                data = replace.pop(name)
                member.size = len(data)
                tout.addfile(member, io.BytesIO(data))
            elif member.isreg() and _is_boot_file(name):
                saved = capture_dir / name.replace("/", "_")
                with _member_data(tin, member) as f, open(saved, "wb") as out:
                    shutil.copyfileobj(f, out, BUFSIZE)
                with open(saved, "rb") as f:
                    tout.addfile(member, f)
            elif member.isreg():
                tout.addfile(member, tin.extractfile(member))
            else:
                if member.issym() and name.startswith("boot/"):
                    links[name] = member.linkname
                tout.addfile(member)
    return links


def _member_data(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    """A regular member's data (tarfile types it optional: None for other member types)."""
    data = tar.extractfile(member)
    assert data is not None, f"{member.name} is not a regular file"
    return data


def _is_boot_file(name: str) -> bool:
    base = posixpath.basename(name)
    return posixpath.dirname(name) == "boot" and base.startswith(("vmlinuz", "initrd"))


def resolve_boot_file(name: str, links: dict[str, str], capture_dir: Path) -> Path:
    seen = set()
    while name in links and name not in seen:
        seen.add(name)
        target = links[name]
        name = posixpath.normpath(target.lstrip("/") if target.startswith("/")
                                  else posixpath.join(posixpath.dirname(name), target))
    found = capture_dir / name.replace("/", "_")
    if not found.is_file():
        raise PipelineError(f"the image has no /{name} (looked for /{' and /'.join(BOOT_FILES)})",
                            "the flavor's Dockerfile must run /usr/lib/cos/setup-image after installing a kernel")
    return found


def tar2sqfs_command(opts: SquashfsOptions, out: Path, sde: int) -> list[str]:
    cmd = [require_tool("tar2sqfs"), "--quiet", "--force", "--no-skip",
           "--compressor", opts.compression, "--block-size", str(opts.block_bytes),
           "--num-jobs", str(os.cpu_count() or 1),
           "--defaults", f"uid=0,gid=0,mode=0755,mtime={sde}"]
    if opts.level is not None and opts.compression in ("zstd", "xz", "gzip"):
        cmd += ["--comp-extra", f"level={opts.level}"]
    return cmd + [str(out)]


def source_date_epoch(image: dict[str, Any]) -> int:
    """$SOURCE_DATE_EPOCH if set, else the image's creation time: the same image
    (digest) always gives the same bytes."""
    sde: int | None = env.get("SOURCE_DATE_EPOCH")
    return sde if sde is not None else int(image["source_date_epoch"])


def write_squashfs(image_id: str, opts: SquashfsOptions, sde: int, hostname: str,
                   out: Path, boot_dir: Path) -> None:
    """Stream the image's filesystem into `out`; kernel and initrd into boot_dir.
    Every output appears only when complete."""
    boot_out = {n: boot_dir / posixpath.basename(n) for n in BOOT_FILES}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".capture-") as capture, atomic_path(out) as tmp:
        capture_dir = Path(capture)
        cmd = tar2sqfs_command(opts, tmp, sde)
        log.info("docker export %s | filter | %s", image_id[:19], " ".join(cmd))

        def feed(stdin: IO[bytes]) -> dict[str, str]:
            with docker_engine.ExportedRootfs(image_id) as chunks:
                return filter_rootfs(_ChunkReader(chunks), stdin, sde=sde, hostname=hostname,
                                     capture_dir=capture_dir)

        links = stream(cmd, feed=feed)
        for name, dest in boot_out.items():
            src = resolve_boot_file(name, links, capture_dir)
            with atomic_path(dest) as part:
                shutil.copyfile(src, part)


def squashfs_stage(ctx: FlavorContext) -> dict[str, Any]:
    flavor, paths = ctx.flavor, ctx.paths
    image = json.loads(paths.state("image").read_text())
    out = paths.build / "rootfs.squashfs"
    write_squashfs(image["id"], flavor.squashfs, source_date_epoch(image), f"cos-{flavor.name}",
                   out, paths.build / "boot")
    entries = [file_entry("squashfs", out, paths.build),
               file_entry("kernel", paths.build / "boot/vmlinuz", paths.build),
               file_entry("initrd", paths.build / "boot/initrd", paths.build)]
    manifest.add_artifacts(paths.manifest, *entries)
    return {e["kind"]: e for e in entries}
