"""Base image (pull, or bootstrap when it cannot be pulled) -> the flavor's OS image."""
from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

from . import docker_engine, manifest
from .bootstrap import bootstrap_image
from .config import Flavor, FlavorContext, FlavorPaths
from .errors import PipelineError
from .files import atomic_path, write_json_atomic
from .packages import build_toolkit
from .version import head_commit

log = logging.getLogger("cos.image")


def image_tag(flavor: Flavor, version: str) -> str:
    return f"{flavor.image.repository}:{flavor.name}-{version}-{flavor.arch}"


def bootstrap_tag(flavor: Flavor) -> str:
    assert flavor.base.bootstrap is not None
    return f"cos-pipeline/bootstrap:{flavor.name}-{flavor.base.bootstrap.suite}"


def base_stage(ctx: FlavorContext) -> dict[str, Any]:
    """Pull the base image; if that fails use a local copy, else bootstrap it."""
    flavor, paths = ctx.flavor, ctx.paths
    ref = flavor.base.ref
    try:
        record = {"ref": ref, "id": docker_engine.pull(ref), "origin": "pulled"}
    except PipelineError as pull_error:
        record = _fallback_base(flavor, paths, pull_error)
    write_json_atomic(paths.state("base"), record)
    return record


def _fallback_base(flavor: Flavor, paths: FlavorPaths, pull_error: PipelineError) -> dict[str, Any]:
    ref = flavor.base.ref
    if local := docker_engine.image_id(ref):
        log.warning("%s; using the local copy of %s", pull_error.message, ref)
        return {"ref": ref, "id": local, "origin": "local"}
    if flavor.base.bootstrap is None:
        raise PipelineError(
            f"{pull_error.message}; flavor '{flavor.name}' has no base.bootstrap to make it locally",
            f"make {ref} reachable (registry access or `docker load`), or build another flavor") from None
    tag = bootstrap_tag(flavor)
    if local := docker_engine.image_id(tag):
        log.warning("%s; reusing bootstrapped base %s", pull_error.message, tag)
        return {"ref": tag, "id": local, "origin": "bootstrapped"}
    log.warning("%s; bootstrapping %s with mmdebstrap", pull_error.message, tag)
    return {"ref": tag, "id": bootstrap_image(flavor.base.bootstrap, tag, paths.build),
            "origin": "bootstrapped"}


def compose(paths: FlavorPaths) -> str:
    """The Dockerfile actually built: common head + the flavor's own + common tail.
    A flavor states only its distro's part; what every cOS image needs is written once."""
    head, tail = paths.common_dockerfiles
    return head.read_text() + paths.dockerfile.read_text() + tail.read_text()


def build_args(flavor: Flavor, version: str, base_ref: str, toolkit_tag: str) -> dict[str, str]:
    """What every flavor Dockerfile is given (tests check Dockerfiles use no other ARG)."""
    channel = flavor.upgrade
    return {**flavor.image.build_args, "BASE_IMAGE": base_ref, "TOOLKIT_IMAGE": toolkit_tag,
            "COS_FLAVOR": flavor.name, "COS_VERSION": version,
            # /etc/cos/upgrade.yaml (cos-upgrade's channel); empty: the image has none
            "COS_UPGRADE_REPOSITORY": channel.repository if channel else "",
            "COS_UPGRADE_TAGS": (channel.tags or f"{flavor.name}-*-{flavor.arch}") if channel else ""}


def image_stage(ctx: FlavorContext) -> dict[str, Any]:
    flavor, paths, version = ctx.flavor, ctx.paths, ctx.version
    base = json.loads(paths.state("base").read_text())
    toolkit = json.loads(paths.state("toolkit").read_text())
    if docker_engine.image_id(base["ref"]) != base["id"]:
        raise PipelineError(f"base image {base['ref']} changed or vanished since it was recorded",
                            f"run: doit forget build-{flavor.name}:base && doit build-{flavor.name}")
    if docker_engine.image_id(toolkit["tag"]) is None:  # deleted from docker since recorded
        build_toolkit(flavor.packages, paths.state("toolkit"))
    tag = image_tag(flavor, version)
    buildargs = build_args(flavor, version, base["ref"], toolkit["tag"])
    labels = {"org.opencontainers.image.version": version,
              "org.opencontainers.image.title": f"cOS {flavor.name}",
              "org.opencontainers.image.base.name": flavor.base.ref,
              "org.cos-pipeline.flavor": flavor.name}
    # the commit goes into a label and the manifest, never into the image's files: the image
    # task is not keyed on it, so a commit that changes nothing in the image rebuilds nothing
    commit = head_commit(paths.root)
    if commit:
        labels["org.opencontainers.image.revision"] = commit
    dockerfile = paths.build / "Dockerfile"
    with atomic_path(dockerfile) as tmp:
        tmp.write_text(compose(paths))
    image_id = docker_engine.build(paths.source, tag, buildargs, dockerfile=str(dockerfile), labels=labels)
    created = docker_engine.client().images.get(image_id).attrs["Created"]
    record = {"reference": tag, "id": image_id, "created": created,
              "source_date_epoch": _epoch(created), "base": base, "toolkit": toolkit["tag"]}
    write_json_atomic(paths.state("image"), record)
    manifest.set_fields(paths.manifest, flavor=flavor.name, version=version, arch=flavor.arch,
                        image={"reference": tag, "id": image_id, "base": base["ref"],
                               "base_id": base["id"], "commit": commit},
                        source_date_epoch=record["source_date_epoch"])
    return record


def push_stage(ctx: FlavorContext) -> dict[str, Any]:
    flavor, paths = ctx.flavor, ctx.paths
    registry = flavor.registry
    assert registry, "push task exists only when a registry is configured"
    image = json.loads(paths.state("image").read_text())
    remote = f"{registry}/{image['reference']}"
    repo, _, tag = remote.rpartition(":")
    docker_engine.client().images.get(image["id"]).tag(repo, tag)
    digest = docker_engine.push(remote)
    # the moving tag a user's `FROM` names; the same manifest, so the same digest
    latest = f"{repo}:{flavor.name}-latest-{flavor.arch}"
    docker_engine.client().images.get(image["id"]).tag(repo, latest.rpartition(":")[2])
    docker_engine.push(latest)
    record = {"reference": remote, "digest": digest, "id": image["id"], "latest": latest}
    write_json_atomic(paths.state("push"), record)
    with manifest.update(paths.manifest) as data:
        data.setdefault("image", {}).update(pushed=f"{repo}@{digest}", digest=digest)
    return record


def _epoch(created: str) -> int:
    # Docker prints RFC 3339 with nanoseconds; Python parses microseconds at most.
    head, _, frac = created.rstrip("Z").partition(".")
    return int(datetime.fromisoformat(head + "+00:00").timestamp())
