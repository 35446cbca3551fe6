"""Cloud publishing (issue 4): the stages of publish-<flavor>[:aws|:azure|:gcp] and cloud-gc.

Each subtask takes one artifact of the flavor's manifest (raw / azure-vhd / gce-tar),
publishes it with cloud/'s uploader and records the ids in build/<flavor>/cloud-images.json
and the manifest. A task is up to date when the recorded artifact digest and target
config equal the current ones (no cloud call at all); otherwise the uploader's own
describe-first logic makes a re-run reuse what exists. COS_PUBLISH_DRY_RUN=1 prints
the plan and changes nothing.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cloud import ARTIFACT_KIND, CLOUDS, uploader_class
from cloud.base import ImageSpec, dry_run_from_env

from . import manifest
from .config import Flavor, FlavorContext, FlavorPaths
from .errors import PipelineError
from .files import DIGESTS, write_json_atomic

log = logging.getLogger("cos.publish")
RESULTS = "cloud-images.json"


def results_path(paths: FlavorPaths) -> Path:
    return paths.build / RESULTS


def read_results(paths: FlavorPaths) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(results_path(paths).read_text())
        return data
    except (FileNotFoundError, ValueError):
        return {}


def configured(flavor: Flavor) -> list[str]:
    return [c for c in CLOUDS if getattr(flavor.clouds, c) is not None]


def target_digest(flavor: Flavor, cloud: str) -> str:
    return hashlib.sha256(getattr(flavor.clouds, cloud).model_dump_json().encode()).hexdigest()[:16]


def image_spec(ctx: FlavorContext, cloud: str, verify: bool = True) -> ImageSpec:
    flavor, paths, version = ctx.flavor, ctx.paths, ctx.version
    kind = ARTIFACT_KIND[cloud]
    art = manifest.artifact(paths.manifest, kind)
    if art is None:
        raise PipelineError(f"{paths.manifest}: no '{kind}' artifact to publish to {cloud}",
                            f"build it first: doit build-{flavor.name}")
    disk = paths.build / art["path"]
    if not disk.is_file():
        raise PipelineError(f"{disk}: listed in the manifest as '{kind}' but missing",
                            f"rebuild: doit build-{flavor.name}")
    if verify and DIGESTS.sha256(disk) != art["sha256"]:
        raise PipelineError(f"{disk}: content differs from the manifest's sha256 {art['sha256'][:12]}",
                            f"rebuild: doit build-{flavor.name}")
    return ImageSpec(flavor=flavor.name, version=version, arch=flavor.arch, disk=disk, disk_sha256=art["sha256"],
                     secure_boot=flavor.boot.secure_boot,
                     description=f"{flavor.description} {version} ({flavor.arch})")


@contextlib.contextmanager
def _locked_results(paths: FlavorPaths) -> Iterator[dict[str, Any]]:
    path = results_path(paths)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # :aws, :azure, :gcp may run in parallel
        data = read_results(paths)
        yield data
        write_json_atomic(path, data)


def publish_stage(ctx: FlavorContext, cloud: str, dry_run: bool | None = None) -> dict[str, Any]:
    """Publish one flavor to one cloud; record ids unless it is a dry run."""
    flavor, paths = ctx.flavor, ctx.paths
    target = getattr(flavor.clouds, cloud)
    if target is None:
        raise PipelineError(f"flavor {flavor.name}: no clouds.{cloud} target configured",
                            f"add clouds.{cloud} to flavors/{flavor.name}/flavor.yaml (see cloud/targets.py)")
    spec = image_spec(ctx, cloud)
    uploader = uploader_class(cloud)(target, spec, dry_run=dry_run)
    result = uploader.publish()
    if result.get("dry_run"):
        return result
    result.update(artifact_sha256=spec.disk_sha256, target=target_digest(flavor, cloud),
                  published=datetime.now(UTC).isoformat(timespec="seconds"))
    with _locked_results(paths) as data:
        data[cloud] = result
    with manifest.update(paths.manifest) as data:
        data.setdefault("cloud_images", {})[cloud] = {"name": result["name"], "images": result["images"]}
    log.info("%s: %s -> %s", cloud, result["name"], result["images"])
    return result


def is_published(ctx: FlavorContext, cloud: str) -> bool:
    """doit uptodate: same artifact digest and same target config as the recorded publish."""
    flavor, paths = ctx.flavor, ctx.paths
    if dry_run_from_env():
        return False
    done = read_results(paths).get(cloud) or {}
    art = manifest.artifact(paths.manifest, ARTIFACT_KIND[cloud]) or {}
    return bool(done) and done.get("artifact_sha256") == art.get("sha256") \
        and done.get("target") == target_digest(flavor, cloud)


def gc(ctxs: list[FlavorContext], apply: bool = False) -> list[Any]:
    """Delete images beyond each flavor's retention rule (dry run unless apply)."""
    items = []
    for ctx in ctxs:
        clouds = ctx.flavor.clouds
        for cloud in configured(ctx.flavor):
            spec = ImageSpec(flavor=ctx.name, version=ctx.version, arch=ctx.flavor.arch,
                             disk=Path("-"), disk_sha256="0" * 64)
            uploader = uploader_class(cloud)(getattr(clouds, cloud), spec, dry_run=not apply)
            items += uploader.gc(clouds.retention_keep, clouds.retention_max_age_days, dry_run=not apply,
                                 orphan_hours=clouds.retention_orphan_hours)
    if not apply:
        log.info("cloud-gc: dry run, %d image(s) would be deleted; run `doit cloud-gc --apply` to delete", len(items))
    return items
