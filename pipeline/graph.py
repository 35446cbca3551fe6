"""Flavors -> doit task dicts: the only module that knows doit. No work is done
here: each action calls a stage, and our errors become doit's TaskFailed in one
place (stage_action).

Keys are content, never tags: file_deps are checked by a cached digest (DigestChecker),
stages hand each other small JSON records (ids, digests) as files, and config that
changes an output is a `config_changed` key of the task that makes it. The stages
that make files from the image (squashfs, ISO, disks, formats) are keyed on their own
code as well (code_digest): after an upgrade of cos-pipeline they are made again.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

from doit.dependency import FileChangedChecker
from doit.exceptions import TaskError, TaskFailed
from doit.tools import config_changed

from cloud import ARTIFACT_KIND
from core import env
from core.errors import HintedError

from . import artifacts, disk, efi, formats, image, iso, packages, publish, release, squashfs, version
from .config import REPO_ROOT, FlavorContext, FlavorPaths, load_all
from .files import DIGESTS

Task = dict
__all__ = ["DigestChecker", "FlavorContext", "dodo_tasks", "stage_action"]  # FlavorContext: from config


def _sde() -> str | None:
    """$SOURCE_DATE_EPOCH is part of the key of every stage whose bytes it sets."""
    return env.raw("SOURCE_DATE_EPOCH")


def stage_action(fn: Callable, *args) -> tuple:
    """A doit python-action that turns our errors (pipeline's and cloud's, both
    HintedError) into one clean failure message; every message is redacted (core.env).
    The task's command-line params (e.g. --replace) arrive as keyword arguments."""
    def action(**params):
        try:
            fn(*args, **params)
        except HintedError as exc:
            return TaskFailed(env.redact(str(exc)))
        except Exception:  # a bug: doit shows its traceback, without any secret in it
            return TaskError(env.redact(traceback.format_exc()))
        return None
    action.__name__ = action.__qualname__ = fn.__name__
    return (action, [])


def code_files(module: ModuleType, roots: tuple[str, ...] = ("pipeline", "core")) -> list[Path]:
    """The source of `module` and of every module of ours (in `roots`) that it uses,
    transitively: modules it binds, and the modules of the functions/classes it imports."""
    seen: dict[str, ModuleType] = {}
    todo = [module]
    while todo:
        m = todo.pop()
        if m.__name__ in seen:
            continue
        seen[m.__name__] = m
        for value in vars(m).values():
            dep = value if isinstance(value, ModuleType) else sys.modules.get(getattr(value, "__module__", None) or "")
            if dep is not None and dep.__name__.split(".")[0] in roots and getattr(dep, "__file__", None):
                todo.append(dep)
    return sorted(Path(m.__file__) for m in seen.values() if m.__file__)


def code_digest(module: ModuleType, roots: tuple[str, ...] = ("pipeline", "core")) -> str:
    """A stage's key on the code that makes its output (code_files, by content)."""
    h = hashlib.sha256()
    for f in code_files(module, roots):
        h.update(f"{f.parent.name}/{f.name}\0".encode() + f.read_bytes() + b"\0")
    return h.hexdigest()


# One digest per stage module per doit run (4 flavors, 3 formats each share them): the
# sources do not change while the graph is built.
_stage_code = functools.cache(code_digest)


class DigestChecker(FileChangedChecker):
    """doit file_dep checker: same mtime -> unchanged; else compare the cached fast digest
    (files.DIGESTS: a multi-GB artifact is hashed once, a `touch` costs nothing)."""

    def check_modified(self, file_path, file_stat, state):
        mtime, size, digest = state
        if file_stat.st_mtime == mtime:
            return False
        if file_stat.st_size != size:
            return True
        return DIGESTS.fast(file_path) != digest

    def get_state(self, dep, current_state):
        st = os.stat(dep)
        if current_state and current_state[0] == st.st_mtime:
            return None
        return (st.st_mtime, st.st_size, DIGESTS.fast(dep))


# ---- toolkit packages (shared by all flavors) ----

def package_tasks(names: list[str]) -> Iterator[Task]:
    yield {"basename": "packages", "name": None,
           "doc": "build the toolkit packages into content-tagged OCI images"}
    for name in names:
        yield {"basename": "packages", "name": name,
               "doc": f"package {name} -> {packages.PACKAGE_REPO}/{name}:<content hash>",
               "file_dep": packages.package_files(name),
               "targets": [packages.state_path(name)],
               "actions": [stage_action(packages.build_package, name)],
               "clean": True}


# ---- per flavor, one stage after another ----

def base_task(ctx: FlavorContext) -> Task:
    base = ctx.flavor.base
    return {"name": "base", "doc": f"pull {base.ref} (bootstrap it when it cannot be pulled)",
            "targets": [ctx.paths.state("base")],
            "uptodate": [config_changed(base.model_dump_json())],
            "actions": [stage_action(image.base_stage, ctx)],
            "clean": True}


def toolkit_task(ctx: FlavorContext) -> Task:
    return {"name": "toolkit", "doc": "merge the flavor's packages into one toolkit image",
            "file_dep": [packages.state_path(n) for n in ctx.flavor.packages],
            "targets": [ctx.paths.state("toolkit")],
            "uptodate": [config_changed(",".join(ctx.flavor.packages))],
            "actions": [stage_action(packages.toolkit_stage, ctx)],
            "clean": True}


def image_task(ctx: FlavorContext) -> Task:
    tag = image.image_tag(ctx.flavor, ctx.version)
    return {"name": "image", "doc": f"docker build {tag}",
            "file_dep": [*ctx.paths.context_files, ctx.paths.state("base"), ctx.paths.state("toolkit")],
            "targets": [ctx.paths.state("image")],
            "uptodate": [config_changed({"tag": tag, "build_args": ctx.flavor.image.build_args,
                                         **({"links": links} if (links := ctx.paths.context_links) else {})})],
            "actions": [stage_action(image.image_stage, ctx)],
            "clean": True}


def push_task(ctx: FlavorContext) -> Task:
    return {"name": "push", "doc": f"push the OS image to {ctx.flavor.registry}",
            "file_dep": [ctx.paths.state("image")],
            "targets": [ctx.paths.state("push")],
            "uptodate": [config_changed(ctx.flavor.registry)],
            "actions": [stage_action(image.push_stage, ctx)],
            "clean": True}


def squashfs_task(ctx: FlavorContext) -> Task:
    opts = ctx.flavor.squashfs
    b = ctx.paths.build
    return {"name": "squashfs", "doc": f"rootfs -> squashfs ({opts.compression}, {opts.block_size}), kernel, initrd",
            "file_dep": [ctx.paths.state("image")],
            "targets": [b / "rootfs.squashfs", b / "boot/vmlinuz", b / "boot/initrd"],
            "uptodate": [config_changed({"squashfs": opts.model_dump(),
                                         "sde": _sde(), "code": _stage_code(squashfs)})],
            "actions": [stage_action(squashfs.squashfs_stage, ctx)],
            "clean": True}


def _boot_inputs(ctx: FlavorContext) -> list[Path]:
    """What every bootable artifact is made from (image.json: the source date epoch)."""
    b = ctx.paths.build
    return [b / "rootfs.squashfs", b / "boot/vmlinuz", b / "boot/initrd", ctx.paths.state("image")]


def iso_task(ctx: FlavorContext) -> Task:
    out = artifacts.path(ctx, "iso")
    return {"name": "iso", "doc": f"hybrid BIOS/UEFI live ISO {out.name} (+ .sha256)",
            "file_dep": _boot_inputs(ctx),
            "targets": [out, out.with_name(out.name + ".sha256")],
            "uptodate": [config_changed({"boot": ctx.flavor.boot.model_dump(), "sde": _sde(), "code": _stage_code(iso),
                                         "grub": efi.host_grub_fingerprint(not ctx.flavor.boot.secure_boot)})],
            "actions": [stage_action(iso.iso_stage, ctx)],
            "clean": True}


def raw_task(ctx: FlavorContext) -> Task:
    out = artifacts.path(ctx, "raw")
    return {"name": "raw", "doc": f"raw GPT cOS disk {out.name} (boots to recovery)",
            "file_dep": _boot_inputs(ctx),
            "targets": [out],
            "uptodate": [config_changed({"disk": ctx.flavor.disk.model_dump(), "sde": _sde(),
                                         "secure_boot": ctx.flavor.boot.secure_boot, "code": _stage_code(disk),
                                         "grub": efi.host_grub_fingerprint(not ctx.flavor.boot.secure_boot)})],
            "actions": [stage_action(disk.raw_stage, ctx)],
            "clean": True}


def format_tasks(ctx: FlavorContext) -> list[Callable[[FlavorContext], Task]]:
    """One task per disk format (qcow2, azure-vhd, gce-tar), each from the raw disk."""
    def make(kind: str) -> Callable[[FlavorContext], Task]:
        def task(c: FlavorContext) -> Task:
            raw = artifacts.path(c, "raw")
            return {"name": kind, "doc": f"{kind} from the raw disk",
                    "file_dep": [raw, c.paths.state("image")],
                    "targets": [artifacts.path(c, kind)],
                    "uptodate": [config_changed({"sde": _sde(), "code": _stage_code(formats)})],
                    "actions": [stage_action(formats.format_stage, c, kind)],
                    "clean": True}
        return task
    return [make(kind) for kind in formats.FORMATS]


def flavor_tasks(ctx: FlavorContext) -> Iterator[Task]:
    yield {"basename": f"build-{ctx.name}", "name": None,
           "doc": f"build every artifact of flavor {ctx.name} ({ctx.flavor.description})"}
    stages: list[Callable[[FlavorContext], Task]] = [base_task, toolkit_task, image_task]
    if ctx.flavor.registry:
        stages.append(push_task)
    stages += [squashfs_task]
    stages += [iso_task, raw_task, *format_tasks(ctx)]
    for make in stages:
        yield {"basename": f"build-{ctx.name}", **make(ctx)}


# ---- publish, release, cloud-gc ----

def publish_tasks(ctx: FlavorContext) -> Iterator[Task]:
    """publish-<flavor>[:aws|:azure|:gcp]: up to date when the recorded artifact digest and
    target config equal the current ones (no cloud call at all)."""
    clouds = publish.configured(ctx.flavor)
    base = f"publish-{ctx.name}"
    yield {"basename": base, "name": None,
           "doc": f"publish {ctx.name} to its clouds ({', '.join(clouds) or 'none configured'});"
                  " COS_PUBLISH_DRY_RUN=1 shows the plan only"}
    for cloud in clouds:
        yield {"basename": base, "name": cloud,
               "doc": f"publish the {ARTIFACT_KIND[cloud]} artifact of {ctx.name} as a {cloud} image",
               "actions": [stage_action(publish.publish_stage, ctx, cloud)],
               "uptodate": [lambda c=cloud: publish.is_published(ctx, c)],
               "verbosity": 2}


def cloud_gc_tasks(ctxs: list[FlavorContext]) -> Iterator[Task]:
    yield {"basename": "cloud-gc",
           "doc": "delete cloud images beyond each flavor's retention rule (dry run; --apply deletes)",
           "actions": [stage_action(publish.gc, ctxs)],
           "params": [{"name": "apply", "long": "apply", "type": bool, "default": False,
                       "help": "really delete (default: only list what would be deleted)"}],
           "uptodate": [False], "verbosity": 2}


def release_tasks(ctx: FlavorContext) -> Iterator[Task]:
    yield {"basename": f"release-{ctx.name}",
           "doc": f"publish {ctx.name}'s artifacts to the GitHub Release v{ctx.version} "
                  "(GITHUB_TOKEN, GITHUB_REPOSITORY, GITHUB_API_URL)",
           "actions": [stage_action(release.release_stage, ctx)],
           "params": [{"name": "replace", "long": "replace", "type": bool, "default": False,
                       "help": f"overwrite release assets that differ from this build (or {release.REPLACE_ENV}=1)"}],
           "verbosity": 2}


def contexts(root: Path = REPO_ROOT) -> list[FlavorContext]:
    return [FlavorContext(f, FlavorPaths(f, root), version.resolve(f.version, root)) for f in load_all()]


def dodo_tasks() -> dict[str, Callable[[], Iterator[Task]]]:
    """`task_*` functions for dodo.py's namespace (doit discovers them by name)."""
    ctxs = contexts()
    names = sorted({p for c in ctxs for p in c.flavor.packages})
    creators: dict[str, Callable] = {"task_packages": lambda: package_tasks(names)}
    for ctx in ctxs:
        creators[f"task_build_{ctx.name}"] = (lambda c=ctx: flavor_tasks(c))
        creators[f"task_publish_{ctx.name}"] = (lambda c=ctx: publish_tasks(c))
        creators[f"task_release_{ctx.name}"] = (lambda c=ctx: release_tasks(c))
    creators["task_cloud_gc"] = lambda: cloud_gc_tasks(ctxs)
    return creators
