"""Release, step 2 (network): create the release if missing, compare with the assets
already there (size + sha256, from the asset's digest or the release's SHA256SUMS),
upload what is missing, refuse to touch a changed asset unless asked (--replace /
COS_RELEASE_REPLACE=1). release_stage runs both steps for `doit release-<flavor>`.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from core import env

from ..config import FlavorContext
from ..files import write_json_atomic
from ..version import head_commit, is_tagged_release, release_tag
from .github import ReleasesClient, Settings
from .plan import LIMIT_ENV, MAX_ASSETS, REPLACE_ENV, Asset, Plan, ReleaseError, load_manifest, prepare

log = logging.getLogger("cos.release")


def merge_section(body: str, key: str, section: str) -> str:
    start, end = f"<!-- cos-release:{key} -->", f"<!-- /cos-release:{key} -->"
    block = f"{start}\n{section.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if pattern.search(body or ""):
        return pattern.sub(lambda _: block, body, count=1)
    return (body or "").rstrip() + "\n\n" + block + "\n"


def remote_digests(gh: ReleasesClient, plan: Plan, remote: dict[str, dict[str, Any]]) -> dict[str, str]:
    """sha256 of each remote asset: its `digest` field, else our SHA256SUMS on the release."""
    out = {n: a["digest"].split(":", 1)[1] for n, a in remote.items()
           if str(a.get("digest") or "").startswith("sha256:")}
    sums = remote.get(f"SHA256SUMS-{plan.key}")
    if sums and any(n not in out for n in remote):
        text = gh.download(sums)
        out.setdefault(sums["name"], hashlib.sha256(text).hexdigest())
        for line in text.decode(errors="replace").splitlines():
            sha, _, name = line.partition("  ")
            out.setdefault(name.strip(), sha.strip())
    return out


@dataclass
class Diff:
    upload: list[Asset] = field(default_factory=list)
    replace: list[tuple[Asset, dict[str, Any]]] = field(default_factory=list)
    same: list[Asset] = field(default_factory=list)
    broken: list[dict[str, Any]] = field(default_factory=list)   # half-made by an interrupted run


def compare(plan: Plan, remote: dict[str, dict[str, Any]], digests: dict[str, str]) -> Diff:
    diff = Diff()
    ours = {a.name for a in plan.assets}
    for name, asset in remote.items():
        stale_tmp = name.endswith(".replacing") and name[: -len(".replacing")] in ours
        if asset.get("state", "uploaded") != "uploaded" or stale_tmp:
            diff.broken.append(asset)
    broken = {a["name"] for a in diff.broken}
    for a in plan.assets:
        r = remote.get(a.name)
        if r is None or a.name in broken:
            diff.upload.append(a)
        elif r["size"] == a.size and digests.get(a.name) == a.sha256:
            diff.same.append(a)
        else:
            diff.replace.append((a, r))
    return diff


def publish(plan: Plan, gh: ReleasesClient, *, replace: bool = False, target: str | None = None) -> dict[str, Any]:
    """Make the release match `plan`; `target` is the commit a missing tag is created at."""
    header = f"cOS {plan.version}\n\nFiles per flavor and arch below; each has its README and SHA256SUMS."
    rel, created = gh.ensure_release(plan.tag, name=f"cOS {plan.version}",
                                     body=merge_section(header, plan.key, plan.notes),
                                     prerelease=not is_tagged_release(plan.version), target=target)
    remote = {a["name"]: a for a in gh.assets(rel)}
    diff = compare(plan, remote, remote_digests(gh, plan, remote))

    total = len(set(remote) | {a.name for a in plan.assets})
    if total > MAX_ASSETS:
        raise ReleaseError(f"release {plan.tag} would hold {total} assets; GitHub allows at most {MAX_ASSETS}",
                           "delete unused assets from the release, or raise the part size "
                           f"({LIMIT_ENV}) so large files split into fewer parts")
    changed = [a for a, _ in diff.replace if not a.derived]
    if changed and not replace:
        names = ", ".join(a.name for a in changed)
        raise ReleaseError(f"release {plan.tag} already has a different {names} (size or sha256 differs "
                           "from the local build); nothing was uploaded",
                           f"to overwrite: doit release-{plan.flavor} --replace (or {REPLACE_ENV}=1); "
                           "or release a new version")

    for half in diff.broken:
        log.info("deleting incomplete asset %s left by an interrupted upload", half["name"])
        gh.delete_asset(half)
    order = sorted(diff.upload + [a for a, _ in diff.replace], key=lambda a: a.derived)  # sums last
    old = {a.name: r for a, r in diff.replace}
    for asset in order:
        if asset.name in old:
            _replace(gh, rel, asset, old[asset.name])
        else:
            gh.upload(rel, asset.name, asset.path, asset.offset, asset.size, sha256=asset.sha256)
    _update_notes(gh, rel, plan)
    result = {"tag": plan.tag, "release_id": rel["id"], "created": created,
              "uploaded": [a.name for a in diff.upload], "replaced": sorted(old),
              "unchanged": [a.name for a in diff.same]}
    log.info("release %s: %d uploaded, %d replaced, %d unchanged", plan.tag,
             len(result["uploaded"]), len(result["replaced"]), len(result["unchanged"]))
    return result


def _replace(gh: ReleasesClient, rel: dict[str, Any], asset: Asset, old: dict[str, Any]) -> None:
    """Upload under a temporary name, then swap: the old file stays until the new one is whole."""
    tmp = gh.upload(rel, f"{asset.name}.replacing", asset.path, asset.offset, asset.size, sha256=asset.sha256)
    gh.delete_asset(old)
    gh.rename_asset(tmp, asset.name)
    log.info("replaced %s", asset.name)


def _update_notes(gh: ReleasesClient, rel: dict[str, Any], plan: Plan, attempts: int = 3) -> None:
    """Put our section in the notes; re-read to catch a concurrent edit by another matrix job."""
    for attempt in range(attempts + 1):
        current = gh.get_release(rel["id"]).get("body") or ""
        body = merge_section(current, plan.key, plan.notes)
        if body == current:
            return
        if attempt < attempts:
            gh.update_release(rel["id"], body=body)
    raise ReleaseError(f"release notes of {plan.tag} keep changing under us",
                       f"re-run doit release-{plan.flavor} when the other release jobs are done")



def release_stage(ctx: FlavorContext, *, replace: bool = False, limit: int | None = None) -> dict[str, Any]:
    """`doit release-<flavor>`: prepare locally, then make the release match."""
    paths, version = ctx.paths, ctx.version
    replace = replace or _env_flag(REPLACE_ENV)
    settings = Settings.from_env()
    load_manifest(paths, version)  # cheap checks first: the build is there and of this version
    with ReleasesClient(settings) as gh:
        gh.check_repository()  # the API answers, the token works, the repository exists: before any compression
        gh.release_by_tag(release_tag(version))
        plan = prepare(ctx, limit)
        result = publish(plan, gh, replace=replace, target=head_commit(paths.root))
    write_json_atomic(paths.state("release"), {**result, "assets": {a.name: a.sha256 for a in plan.assets}})
    return result


def _env_flag(name: str) -> bool:
    return env.flag(name)
