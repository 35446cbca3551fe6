"""Toolkit packages -> OCI images tagged by a content hash of their sources.

An unchanged package keeps its tag, so it is never rebuilt (LinuxKit does the same).
A flavor's packages are merged into one toolkit image, FROM scratch, that the
flavor's Dockerfile copies in with `COPY --from=toolkit / /`.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Any

from . import docker_engine
from .config import PACKAGES_DIR, FlavorContext, build_root
from .files import write_json_atomic

log = logging.getLogger("cos.packages")

PACKAGE_REPO = "cos-pipeline/packages"
TOOLKIT_REPO = "cos-pipeline/toolkit"
FIXED_MTIME = 0  # package contexts carry no time: same sources, same tar, same tag


def package_files(name: str, packages_dir: Path = PACKAGES_DIR) -> list[Path]:
    return sorted(p for p in (packages_dir / name / "files").rglob("*") if p.is_file() or p.is_symlink())


def source_hash(name: str, packages_dir: Path = PACKAGES_DIR) -> str:
    """sha256 over each file's path, executable bit and content (not mtimes)."""
    root = packages_dir / name / "files"
    h = hashlib.sha256()
    for path in package_files(name, packages_dir):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            h.update(f"L {rel} {os.readlink(path)}\n".encode())
            continue
        h.update(f"F {rel} {_mode(path):o} {path.stat().st_size}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _mode(path: Path) -> int:
    return 0o755 if os.access(path, os.X_OK) else 0o644


def _context_tar(name: str, packages_dir: Path) -> io.BytesIO:
    """A reproducible build context: Dockerfile + files/, root-owned, fixed times."""
    root = packages_dir / name / "files"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dockerfile = b"FROM scratch\nCOPY files/ /\n"
        _add_bytes(tar, "Dockerfile", dockerfile, 0o644)
        for path in package_files(name, packages_dir):
            arcname = "files/" + path.relative_to(root).as_posix()
            info = tarfile.TarInfo(arcname)
            info.uid = info.gid = 0
            info.mtime = FIXED_MTIME
            if path.is_symlink():
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
                tar.addfile(info)
            else:
                info.size, info.mode = path.stat().st_size, _mode(path)
                with open(path, "rb") as f:
                    tar.addfile(info, f)
    buf.seek(0)
    return buf


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, FIXED_MTIME
    tar.addfile(info, io.BytesIO(data))


def state_path(name: str) -> Path:
    return build_root() / "packages" / f"{name}.json"


def build_package(name: str, packages_dir: Path = PACKAGES_DIR) -> dict[str, Any]:
    """Ensure the package image exists; record its tag and id."""
    digest = source_hash(name, packages_dir)
    tag = f"{PACKAGE_REPO}/{name}:{digest[:16]}"
    image_id = docker_engine.image_id(tag)
    if image_id:
        log.info("package %s unchanged (%s)", name, tag)
    else:
        image_id = docker_engine.build_from_tar(_context_tar(name, packages_dir), tag,
                                                labels={"org.cos-pipeline.package": name,
                                                        "org.cos-pipeline.source-sha256": digest})
    record = {"name": name, "tag": tag, "id": image_id, "source_sha256": digest}
    write_json_atomic(state_path(name), record)
    return record


def ensure_image(record: dict[str, Any], packages_dir: Path = PACKAGES_DIR) -> None:
    """Rebuild a package image someone deleted from docker (its stamp says it exists)."""
    if docker_engine.image_id(record["tag"]) is None:
        build_package(record["name"], packages_dir)


def build_toolkit(names: list[str], out: Path) -> dict[str, Any]:
    """Merge package images (in the listed order) into one toolkit image."""
    records = [json.loads(state_path(n).read_text()) for n in names]
    for rec in records:
        ensure_image(rec)
    key = hashlib.sha256("\n".join(r["tag"] for r in records).encode()).hexdigest()
    tag = f"{TOOLKIT_REPO}:{key[:16]}"
    image_id = docker_engine.image_id(tag)
    if image_id is None:
        lines = ["FROM scratch"] + [f"COPY --from={r['tag']} / /" for r in records]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            _add_bytes(tar, "Dockerfile", ("\n".join(lines) + "\n").encode(), 0o644)
        buf.seek(0)
        image_id = docker_engine.build_from_tar(buf, tag, labels={"org.cos-pipeline.packages": ",".join(names)})
    record = {"tag": tag, "id": image_id, "packages": [r["tag"] for r in records]}
    write_json_atomic(out, record)
    return record


def toolkit_stage(ctx: FlavorContext) -> dict[str, Any]:
    return build_toolkit(ctx.flavor.packages, ctx.paths.state("toolkit"))
