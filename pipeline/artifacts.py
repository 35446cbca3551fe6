"""What a build makes and how it is named: one table of artifact kinds (the manifest's
`kind`, the cOS release name, whether a release ships it zstd-compressed), the inputs
every bootable artifact is made from, and recording an artifact in the manifest.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import manifest
from .config import FlavorContext, FlavorPaths
from .errors import PipelineError
from .files import DIGESTS, discard, file_entry
from .squashfs import source_date_epoch


@dataclass(frozen=True)
class Kind:
    kind: str        # manifest artifact kind
    name_kind: str   # cOS-<name_kind>-<flavor>-<version>-<arch>.<ext>
    ext: str
    compress: bool   # the release ships it as .zst (mostly zeros: sparse disks)


# The releasable artifacts, in release order.
KINDS: dict[str, Kind] = {k.kind: k for k in (
    Kind("iso", "Seed", "iso", compress=False),
    Kind("raw", "Vanilla-RAW", "raw", compress=True),
    Kind("azure-vhd", "Vanilla-AZURE", "vhd", compress=True),
    Kind("gce-tar", "Vanilla-GCE", "tar.gz", compress=False),
    Kind("qcow2", "Vanilla-QEMU", "qcow2", compress=False),
)}


def artifact_name(kind: str, flavor: str, version: str, arch: str) -> str:
    """cOS release names: cOS-<name kind>-<flavor>-<version>-<arch>.<ext>."""
    k = KINDS[kind]
    return f"cOS-{k.name_kind}-{flavor}-{version}-{arch}.{k.ext}"


def path(ctx: FlavorContext, kind: str) -> Path:
    """Where the build writes artifact `kind` of this flavor and version."""
    return ctx.paths.build / artifact_name(kind, ctx.name, ctx.version, ctx.flavor.arch)


@dataclass(frozen=True)
class BootInputs:
    """The squashfs stage's outputs plus the two numbers that make a build reproducible:
    SOURCE_DATE_EPOCH (times) and a seed (GUIDs, UUIDs, volume ids)."""
    squashfs: Path
    kernel: Path
    initrd: Path
    sde: int
    seed: str
    # the distro whose signed EFI chain is copied out of the squashfs (pipeline/bootchain.py);
    # None: boot.secure_boot is false, the EFI GRUB is the host's unsigned grub-mkimage
    secure_boot: str | None = None

    def uuid(self, name: str) -> uuid.UUID:
        """A stable UUID per (build, purpose): the same input gives the same bytes."""
        return uuid.uuid5(uuid.NAMESPACE_URL, f"cos-pipeline:{self.seed}:{name}")


def boot_inputs(paths: FlavorPaths) -> BootInputs:
    """Inputs of a flavor as left by the squashfs stage. The epoch is the squashfs
    stage's: $SOURCE_DATE_EPOCH, else the image's creation time (the manifest's
    source_date_epoch), read from the image stage's record."""
    b = paths.build
    files = (b / "rootfs.squashfs", b / "boot/vmlinuz", b / "boot/initrd", paths.state("image"))
    for f in files:
        if not f.is_file():
            raise PipelineError(f"{f} is missing", f"run: doit build-{paths.flavor.name}:squashfs")
    sde = source_date_epoch(json.loads(files[3].read_text()))
    seed = f"{paths.flavor.name}:{DIGESTS.sha256(files[0])}"
    flavor = paths.flavor
    return BootInputs(*files[:3], sde=sde, seed=seed, secure_boot=flavor.distro if flavor.boot.secure_boot else None)


def record(paths: FlavorPaths, kind: str, out: Path, companions: tuple[str, ...] = ()) -> dict[str, Any]:
    """Add `out` to the manifest as artifact `kind` (sha256 hole-aware, cached for doit's
    checker too); delete the file it replaces (same kind, other name: names carry the
    version, so each build would otherwise leave GBs behind). `companions` are suffixes
    of files that go with it (e.g. '.sha256')."""
    entry = file_entry(kind, out, paths.build)
    old = manifest.artifact(paths.manifest, kind)
    manifest.add_artifacts(paths.manifest, entry)
    if old and old["path"] != entry["path"]:
        stale = paths.build / old["path"]
        for f in (stale, *(stale.with_name(stale.name + s) for s in companions)):
            discard(f)
    return entry
