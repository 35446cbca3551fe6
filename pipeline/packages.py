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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import docker_engine
from .config import PACKAGES_DIR, FlavorContext, build_root
from .errors import PipelineError
from .files import write_json_atomic

log = logging.getLogger("cos.packages")

PACKAGE_REPO = "cos-pipeline/packages"
TOOLKIT_REPO = "cos-pipeline/toolkit"
FIXED_MTIME = 0  # package contexts carry no time: same sources, same tar, same tag


SHIP_FILE = "package.yaml"  # optional: repo directories a package ships besides files/
SKIP_PARTS = {"__pycache__"}
SKIP_SUFFIXES = (".pyc", ".pyo")


@dataclass(frozen=True)
class Source:
    path: Path      # on the build host
    arcname: str    # where it lands in the image, relative to /


def _walk(root: Path) -> list[Path]:
    """Files and symlinks under `root`, sorted, without byte-code caches (they differ per
    host and python, so they would break the content hash and reproducibility)."""
    return sorted(p for p in root.rglob("*")
                  if (p.is_file() or p.is_symlink()) and not SKIP_PARTS & set(p.relative_to(root).parts)
                  and not p.name.endswith(SKIP_SUFFIXES))


def _shipped_dirs(name: str, packages_dir: Path) -> list[tuple[Path, str]]:
    """`ship:` of packages/<name>/package.yaml: {repo directory: absolute path in the image}."""
    spec = packages_dir / name / SHIP_FILE
    if not spec.is_file():
        return []
    where = f"packages/{name}/{SHIP_FILE}"
    try:
        data = yaml.safe_load(spec.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"{where}: not valid YAML: {exc}") from None
    ship = data.get("ship", {}) if isinstance(data, dict) else None
    if not isinstance(ship, dict) or set(data) - {"ship"}:
        raise PipelineError(f"{where}: expected only 'ship: {{<repo dir>: <path in the image>}}'")
    repo = packages_dir.resolve().parent
    out = []
    for src, dest in sorted(ship.items()):
        path = (repo / str(src)).resolve()
        if not str(dest).startswith("/") or ".." in Path(str(dest)).parts:
            raise PipelineError(f"{where}: ship.{src}: '{dest}' must be an absolute path in the image")
        if repo not in path.parents or not path.is_dir():
            raise PipelineError(f"{where}: ship.{src}: no such directory in the repository",
                                "name a directory relative to the repository root, e.g. runtime")
        out.append((path, str(dest).strip("/")))
    return out


def package_sources(name: str, packages_dir: Path = PACKAGES_DIR) -> list[Source]:
    """Everything a package puts into the image: files/ at /, then the shipped repo
    directories at their destinations, sorted by destination."""
    root = packages_dir / name / "files"
    sources = [Source(p, p.relative_to(root).as_posix()) for p in _walk(root)] if root.is_dir() else []
    for src, dest in _shipped_dirs(name, packages_dir):
        sources += [Source(p, f"{dest}/{p.relative_to(src).as_posix()}") for p in _walk(src)]
    return sorted(sources, key=lambda s: s.arcname)


def package_files(name: str, packages_dir: Path = PACKAGES_DIR) -> list[Path]:
    """The host files a package is made of (doit's file_dep)."""
    spec = packages_dir / name / SHIP_FILE
    return [s.path for s in package_sources(name, packages_dir)] + ([spec] if spec.is_file() else [])


def source_hash(name: str, packages_dir: Path = PACKAGES_DIR) -> str:
    """sha256 over each file's path in the image, executable bit and content (not mtimes)."""
    h = hashlib.sha256()
    for src in package_sources(name, packages_dir):
        if src.path.is_symlink():
            h.update(f"L {src.arcname} {os.readlink(src.path)}\n".encode())
            continue
        h.update(f"F {src.arcname} {_mode(src.path):o} {src.path.stat().st_size}\n".encode())
        h.update(src.path.read_bytes())
    return h.hexdigest()


def _mode(path: Path) -> int:
    return 0o755 if os.access(path, os.X_OK) else 0o644


def _context_tar(name: str, packages_dir: Path) -> io.BytesIO:
    """A reproducible build context: Dockerfile + files/, root-owned, fixed times."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dockerfile = b"FROM scratch\nCOPY files/ /\n"
        _add_bytes(tar, "Dockerfile", dockerfile, 0o644)
        for src in package_sources(name, packages_dir):
            info = tarfile.TarInfo("files/" + src.arcname)
            info.uid = info.gid = 0
            info.mtime = FIXED_MTIME
            if src.path.is_symlink():
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(src.path)
                tar.addfile(info)
            else:
                info.size, info.mode = src.path.stat().st_size, _mode(src.path)
                with open(src.path, "rb") as f:
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
