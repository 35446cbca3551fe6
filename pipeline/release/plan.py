"""Release, step 1 (local, no network): everything to upload, made and checksummed under
build/<flavor>/release/: the ISO, qcow2 and GCE tar as they are, the raw disk and Azure
VHD compressed with zstd (cached by the source's sha256: a re-run does not recompress),
the manifest, cloud-images.json, images-<flavor>-<arch>.txt, a README and SHA256SUMS.
Files of >= 2 GiB (GitHub's limit) become parts < 2 GiB, uploaded straight from byte
ranges of the file; SHA256SUMS lists the parts and the joined file.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from core import env

from .. import manifest
from ..artifacts import KINDS, artifact_name
from ..config import FlavorContext, FlavorPaths
from ..errors import PipelineError
from ..files import CHUNK, DIGESTS, atomic_path, hash_file, write_json_atomic
from ..run import require_tool, stream
from ..version import release_tag

log = logging.getLogger("cos.release")

MIB = 1024 ** 2
GIB = 1024 ** 3
MAX_ASSET_BYTES = 2 * GIB   # GitHub refuses an asset of 2 GiB or more
MAX_ASSETS = 1000           # ... and more than 1000 assets in one release
# The disks hold mostly zeros and an already-compressed squashfs: higher levels or --long
# buy < 1 % here for 2-6x the time (2 GiB sparse raw: -3 2.8 s, -10 5.8 s, -10 --long 18.6 s).
ZSTD_ARGS = ["-3", "-T0"]
CACHE_DIR = "cache"  # under build/<flavor>/release/: compressed disks and part digests, by content
REPLACE_ENV = "COS_RELEASE_REPLACE"
LIMIT_ENV = "COS_RELEASE_MAX_ASSET_BYTES"



class ReleaseError(PipelineError):
    pass


@dataclass(frozen=True)
class Asset:
    """One release asset: bytes [offset, offset+size) of `path`."""
    name: str
    path: Path
    sha256: str
    size: int
    offset: int = 0
    derived: bool = False  # SHA256SUMS / README: made from the others, so replaced without asking


@dataclass
class Plan:
    flavor: str
    arch: str
    version: str
    assets: list[Asset]
    joined: dict[str, tuple[str, list[str]]] = field(default_factory=dict[str, Any])  # name -> (sha256, parts)
    notes: str = ""

    @property
    def tag(self) -> str:
        return release_tag(self.version)

    @property
    def key(self) -> str:
        return f"{self.flavor}-{self.arch}"


# ---------------------------------------------------------------- prepare (local)

def max_asset_bytes() -> int:
    value: int | None = env.get(LIMIT_ENV)  # checked: 2 .. MAX_ASSET_BYTES
    return MAX_ASSET_BYTES if value is None else value


def part_size(limit: int) -> int:
    """Largest part strictly under `limit`; whole MiB when the limit allows it."""
    return (limit - 1) // MIB * MIB if limit > 2 * MIB else limit - 1


def load_manifest(paths: FlavorPaths, version: str) -> dict[str, Any]:
    if not paths.manifest.is_file():
        raise ReleaseError(f"{paths.manifest} not found: nothing to release",
                           f"build first: doit build-{paths.flavor.name}")
    try:
        data = manifest.read(paths.manifest)
    except ValueError as exc:
        raise ReleaseError(f"{paths.manifest}: not valid JSON ({exc})",
                           f"rebuild: doit build-{paths.flavor.name}") from None
    if data.get("version") != version:
        raise ReleaseError(f"{paths.manifest} was built as version {data.get('version')!r}, "
                           f"but this checkout is version {version!r}",
                           f"rebuild (doit build-{paths.flavor.name}) or set COS_VERSION={data.get('version')}")
    arch = env.get("COS_ARCH")
    if arch and data.get("arch") != arch:
        raise ReleaseError(f"{paths.manifest} is for arch {data.get('arch')!r}, but COS_ARCH={arch}",
                           "build the flavor for that arch first")
    return data


def checked_artifacts(paths: FlavorPaths, data: dict[str, Any]) -> dict[str, tuple[Path, str]]:
    """kind -> (file, sha256) for every releasable kind; all problems in one error."""
    by_kind = {a["kind"]: a for a in data.get("artifacts", [])}
    missing = [k for k in KINDS if k not in by_kind]
    if missing:
        raise ReleaseError(f"{paths.manifest} has no artifact of kind {', '.join(missing)}",
                           f"build them: doit build-{paths.flavor.name}")
    out, problems = {}, []
    for kind in KINDS:
        entry = by_kind[kind]
        src = paths.build / entry["path"]
        if not src.is_file():
            problems.append(f"{kind}: {src} is missing")
        elif src.stat().st_size != entry["size"] or DIGESTS.sha256(src) != entry["sha256"]:
            problems.append(f"{kind}: {src} differs from the sha256/size in the manifest")
        else:
            out[kind] = (src, entry["sha256"])
    if problems:
        raise ReleaseError("artifacts do not match the manifest:\n  - " + "\n  - ".join(problems),
                           f"rebuild: doit build-{paths.flavor.name}")
    return out


def zstd_compressed(src: Path, src_sha: str, out: Path) -> tuple[str, int]:
    """`out` = zstd of `src`; cached by the source's sha256 in a sidecar JSON.

    Streams zstd's output through a hash on its way to disk: one pass, no re-read.
    """
    sidecar = out.with_name(out.name + ".json")
    key = {"source_sha256": src_sha, "zstd": ZSTD_ARGS}
    try:
        rec = json.loads(sidecar.read_text())
        if {k: rec.get(k) for k in key} == key and out.stat().st_size == rec["size"] \
                and DIGESTS.sha256(out) == rec["sha256"]:
            log.info("reusing %s (source unchanged)", out.name)
            return rec["sha256"], rec["size"]
    except (FileNotFoundError, ValueError, KeyError):
        pass
    cmd = [require_tool("zstd"), *ZSTD_ARGS, "-q", "-c", str(src)]
    log.info("$ %s > %s", " ".join(cmd), out.name)
    digest = hashlib.sha256()
    try:
        with atomic_path(out) as tmp, open(tmp, "wb") as sink:
            size = stream(cmd, drain=lambda pipe: _hashed_copy(pipe, sink, digest))
    except OSError as exc:  # writing the output: typically a full disk
        raise ReleaseError(f"cannot write {out}: {exc.strerror or exc}; zstd was stopped, nothing was kept",
                           f"free space on the filesystem of {out.parent} (it needs about the compressed "
                           f"size of {src.name}) and re-run") from None
    DIGESTS.remember(out, digest.hexdigest())
    write_json_atomic(sidecar, {**key, "sha256": digest.hexdigest(), "size": size})
    return digest.hexdigest(), size


def _hashed_copy(src: IO[bytes], sink: IO[bytes], digest: hashlib._Hash) -> int:
    """Copy src to sink through `digest`; returns the byte count."""
    size = 0
    while chunk := src.read(CHUNK):
        digest.update(chunk)
        sink.write(chunk)
        size += len(chunk)
    return size


def part_digests(path: Path, sha: str, size: int, part: int, cache_dir: Path) -> list[str]:
    """sha256 of each `part`-sized slice of `path`; cached by the whole file's sha256."""
    cache = cache_dir / f".parts-{sha[:16]}-{part}.json"
    try:
        cached: list[str] = json.loads(cache.read_text())
        return cached
    except (FileNotFoundError, ValueError):
        pass
    digests = []
    with open(path, "rb") as f:
        for offset in range(0, size, part):
            h, left = hashlib.sha256(), min(part, size - offset)
            while left:
                chunk = f.read(min(CHUNK, left))
                h.update(chunk)
                left -= len(chunk)
            digests.append(h.hexdigest())
    write_json_atomic(cache, digests)
    return digests


def split(name: str, path: Path, sha: str, size: int, limit: int, cache_dir: Path) -> list[Asset]:
    if size < limit:
        return [Asset(name, path, sha, size)]
    part = part_size(limit)
    digests = part_digests(path, sha, size, part, cache_dir)
    return [Asset(f"{name}.part{i:03d}", path, d, min(part, size - i * part), i * part)
            for i, d in enumerate(digests)]


def write_if_changed(path: Path, text: str) -> Path:
    if not path.is_file() or path.read_text() != text:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return path


def small_asset(name: str, path: Path, derived: bool = False) -> Asset:
    return Asset(name, path, hash_file(path), path.stat().st_size, derived=derived)


def image_reference(data: dict[str, Any]) -> str:
    image = data.get("image") or {}
    return image.get("pushed") or image.get("reference") or ""


def prepare(ctx: FlavorContext, limit: int | None = None) -> Plan:
    """Everything to upload, made and checksummed under build/<flavor>/release/."""
    flavor, paths, version = ctx.flavor, ctx.paths, ctx.version
    limit = limit or max_asset_bytes()
    data = load_manifest(paths, version)
    arch = data.get("arch") or flavor.arch
    out_dir = paths.build / "release"
    plan = Plan(flavor.name, arch, version, [])
    for kind, (src, src_sha) in checked_artifacts(paths, data).items():
        name = artifact_name(kind, flavor.name, version, arch)
        if KINDS[kind].compress:
            name += ".zst"
            # named by content, not version: a new commit with the same disk reuses it
            path = out_dir / CACHE_DIR / f"{src_sha[:32]}.zst"
            sha, size = zstd_compressed(src, src_sha, path)
        else:
            path, sha, size = src, src_sha, src.stat().st_size
        assets = split(name, path, sha, size, limit, out_dir / CACHE_DIR)
        if len(assets) > 1:
            plan.joined[name] = (sha, [a.name for a in assets])
        plan.assets += assets

    key = plan.key
    meta = {f"manifest-{key}.json": paths.manifest,
            f"cloud-images-{key}.json": paths.build / "cloud-images.json"}
    for name, src in meta.items():
        if src.is_file():  # copied: the uploaded bytes are the bytes that were hashed
            plan.assets.append(small_asset(name, write_if_changed(out_dir / name, src.read_text())))
    ref = image_reference(data)
    plan.assets.append(small_asset(f"images-{key}.txt", write_if_changed(out_dir / f"images-{key}.txt", ref + "\n")))
    cloud = _read_json(paths.build / "cloud-images.json")
    plan.notes = release_notes(plan, data, cloud)
    readme = out_dir / f"README-{key}.md"
    plan.assets.append(small_asset(readme.name, write_if_changed(readme, plan.notes), derived=True))
    if len(plan.assets) + 1 > MAX_ASSETS:
        raise ReleaseError(f"{flavor.name} would need {len(plan.assets) + 1} release assets; GitHub allows at "
                           f"most {MAX_ASSETS} per release (large files are split in parts < {limit} bytes)",
                           f"raise {LIMIT_ENV} (at most {MAX_ASSET_BYTES}) or shrink the artifacts")
    sums = out_dir / f"SHA256SUMS-{key}"
    plan.assets.append(small_asset(sums.name, write_if_changed(sums, sha256sums(plan)), derived=True))
    prune_cache(out_dir / CACHE_DIR, plan)
    return plan


def prune_cache(cache: Path, plan: Plan) -> None:
    """Drop compressed disks and part digests of earlier builds: each is GBs / useless now."""
    keep = {a.path.name for a in plan.assets} | {a.path.name + ".json" for a in plan.assets}
    keep |= {f".parts-{sha[:16]}-" for sha, _ in plan.joined.values()}
    for f in cache.glob("*"):
        if f.name not in keep and not any(f.name.startswith(k) for k in keep if k.startswith(".parts-")):
            log.info("removing stale release cache %s", f.name)
            f.unlink(missing_ok=True)


def sha256sums(plan: Plan) -> str:
    """Every asset and every joined file (check with `sha256sum -c --ignore-missing`)."""
    rows = {a.name: a.sha256 for a in plan.assets}
    rows.update({name: sha for name, (sha, _) in plan.joined.items()})
    return "".join(f"{sha}  {name}\n" for name, sha in sorted(rows.items()))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise ReleaseError(f"{path}: not valid JSON ({exc})", "re-run the publish task that writes it") from None


def _leaves(data: object, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Flatten nested cloud ids ({'aws': {'us-east-1': 'ami-1'}}) to ('aws.us-east-1', 'ami-1')."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, str(data)


def release_notes(plan: Plan, data: dict[str, Any], cloud: dict[str, Any]) -> str:
    image = data.get("image") or {}
    lines = [f"### {plan.flavor} ({plan.arch}) {plan.version}", "",
             f"- flavor: `{plan.flavor}`, version `{plan.version}`, arch `{plan.arch}`",
             f"- OS image: `{image_reference(data)}`",
             f"- image digest: `{image.get('digest') or image.get('id', '')}`"]
    if image.get("commit"):
        lines.append(f"- built from commit `{image['commit']}`")
    if cloud:
        lines += ["- cloud images:"] + [f"  - {k}: `{v}`" for k, v in _leaves(cloud)]
    lines += ["", "| file | bytes | sha256 |", "|---|---:|---|"]
    lines += [f"| {a.name} | {a.size} | `{a.sha256}` |" for a in plan.assets]
    lines += ["", f"Verify: `sha256sum -c --ignore-missing SHA256SUMS-{plan.key}`.",
              "Decompress a `.zst` disk (keeps it sparse): `zstd -d --sparse FILE.zst`."]
    for name, (_, parts) in plan.joined.items():
        lines += [f"`{name}` is split in {len(parts)} parts (GitHub limits assets to < 2 GiB); "
                  f"join them: `cat {name}.part* > {name}`"]
    return "\n".join(lines) + "\n"
