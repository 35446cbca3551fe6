"""The cloud-config `layout` step: add partitions (and grow the last) on first boot.

Contract used by the stage runner (runtime.cloudconfig): apply(spec, system) where
`spec` is the step's `layout:` mapping as parsed from YAML; it raises CosError with
one line when it cannot do what was asked, and does nothing when the layout is already
in place (idempotent: it never touches an existing partition).

    layout:
      device: {label: COS_RECOVERY}      # or {path: /dev/sda}: the disk holding it is the target
      add_partitions:
        - {fsLabel: COS_STATE, pLabel: state, size: 8192}     # MiB; filesystem: ext4 (default)
        - {fsLabel: COS_PERSISTENT, pLabel: persistent}       # no size (or 0): the rest of the disk
      expand_partition: {size: 0}        # grow the last partition (MiB; 0 = the rest) and its ext fs

`device.path` is used as given (a device of the machine, not a path under the System
root); for the host tests it may be a disk image file, whose partitions have no device
node: filesystems are then made in a temporary file and put in place by offset.

Order, so an interrupted run can be re-run: the whole plan is checked first (tools,
labels, free space, `sgdisk --pretend`), then the GPT is written, then the filesystems
made. A requested partition already present by fsLabel or pLabel is skipped, except one
that has the requested pLabel and no filesystem signature at all: that is what a run
stopped between the GPT write and mkfs leaves, and it gets its filesystem.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..system import CosError, System
from .disks import (
    MIB,
    Disk,
    Partition,
    ext_size,
    extract,
    find_partition,
    implant,
    mounts_of,
    query,
    read_disk,
    refresh,
)

log = logging.getLogger("cos.layout")

FILESYSTEMS = {"ext2": 16, "ext3": 16, "ext4": 16, "xfs": 12, "vfat": 11}   # name -> longest label
TYPE_CODES = {"vfat": "0700"}     # GPT type by filesystem; the rest are Linux data (8300)
MIN_REST_MIB = 32                 # a "rest of the disk" partition smaller than this is refused
GROW_SLACK = 4 * MIB              # an ext fs this close to its partition's size counts as grown
SPEC_KEYS = {"device", "add_partitions", "expand_partition"}
PART_KEYS = {"fsLabel", "pLabel", "size", "filesystem"}


@dataclass(frozen=True)
class NewPartition:
    fs_label: str | None
    p_label: str | None
    size_mib: int                 # 0 = the rest of the disk
    filesystem: str

    @property
    def title(self) -> str:
        return self.fs_label or self.p_label or "?"


@dataclass(frozen=True)
class Layout:
    device_label: str | None
    device_path: Path | None
    add: tuple[NewPartition, ...]
    expand_mib: int | None        # None: no expand_partition; 0: to the end of the disk


@dataclass(frozen=True)
class Planned:
    want: NewPartition
    number: int
    start: int                    # sectors
    end: int                      # first sector after it
    exists: bool                  # already in the GPT (only its filesystem is missing)


# ---- the spec -------------------------------------------------------------------------------

def _mib(value: Any, where: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CosError(f"layout: {where} must be a whole number of MiB >= 0 (0 or none = the rest), got {value!r}")
    return value


def _unknown(keys: Any, allowed: set[str], where: str) -> None:
    extra = sorted(set(keys) - allowed)
    if extra:
        raise CosError(f"layout: unknown key {extra[0]!r} in {where}", f"allowed: {', '.join(sorted(allowed))}")


def _new_partition(raw: Any, i: int) -> NewPartition:
    where = f"add_partitions[{i}]"
    if not isinstance(raw, dict):
        raise CosError(f"layout: {where} must be a mapping with fsLabel, pLabel, size, filesystem")
    _unknown(raw, PART_KEYS, where)
    fs = str(raw.get("filesystem") or "ext4").lower()
    if fs == "fat":
        fs = "vfat"
    if fs not in FILESYSTEMS:
        raise CosError(f"layout: {where}.filesystem {fs!r} is not supported", f"use one of {', '.join(FILESYSTEMS)}")
    fs_label, p_label = raw.get("fsLabel"), raw.get("pLabel")
    if not fs_label and not p_label:
        raise CosError(f"layout: {where} needs fsLabel or pLabel (how a later boot knows it exists)")
    if fs_label and len(str(fs_label)) > FILESYSTEMS[fs]:
        raise CosError(f"layout: {where}.fsLabel {fs_label!r} is longer than {FILESYSTEMS[fs]} characters ({fs})")
    if p_label and len(str(p_label)) > 36:
        raise CosError(f"layout: {where}.pLabel {p_label!r} is longer than 36 characters (GPT name)")
    return NewPartition(str(fs_label) if fs_label else None, str(p_label) if p_label else None,
                        _mib(raw.get("size"), f"{where}.size"), fs)


def parse(spec: Any) -> Layout:
    if not isinstance(spec, dict):
        raise CosError("layout: must be a mapping with device and add_partitions / expand_partition")
    _unknown(spec, SPEC_KEYS, "layout")
    device = spec.get("device")
    if not isinstance(device, dict) or len([k for k in ("label", "path") if device.get(k)]) != 1:
        raise CosError("layout: device must give exactly one of label or path", "e.g. device: {label: COS_RECOVERY}")
    _unknown(device, {"label", "path"}, "layout.device")
    raw_parts = spec.get("add_partitions") or []
    if not isinstance(raw_parts, list):
        raise CosError("layout: add_partitions must be a list")
    add = tuple(_new_partition(raw, i) for i, raw in enumerate(raw_parts))
    for i, p in enumerate(add[:-1]):
        if p.size_mib == 0:
            raise CosError(f"layout: add_partitions[{i}] ({p.title}) takes the rest of the disk but is not the last")
    expand = spec.get("expand_partition")
    if expand is not None and not isinstance(expand, dict):
        raise CosError("layout: expand_partition must be a mapping like {size: 0}")
    if expand is not None:
        _unknown(expand, {"size"}, "layout.expand_partition")
    return Layout(str(device["label"]) if device.get("label") else None,
                  Path(str(device["path"])) if device.get("path") else None, add,
                  None if expand is None else _mib(expand.get("size"), "expand_partition.size"))


# ---- planning (nothing written) -------------------------------------------------------------

def _align_up(sector: int, disk: Disk) -> int:
    step = MIB // disk.sector
    return -(-sector // step) * step


def _plan(disk: Disk, add: tuple[NewPartition, ...]) -> list[Planned]:
    used = {p.number for p in disk.partitions}
    numbers = (n for n in range(1, 129) if n not in used)
    at = max((p.end for p in disk.partitions), default=disk.first_lba)
    plan = []
    for want in add:
        have = (disk.find(want.fs_label) if want.fs_label else None) or (
            disk.find(want.p_label) if want.p_label else None)
        if have:
            if have.fs_type is None and want.fs_label and have.name == want.p_label:
                plan.append(Planned(want, have.number, have.start, have.end, exists=True))
            else:
                log.info("layout: %s is already partition %d of %s: left as it is", want.title, have.number, disk.path)
            continue
        start = _align_up(at, disk)
        free_mib = max(0, disk.usable_end - start) * disk.sector // MIB
        if want.size_mib:
            end = start + want.size_mib * MIB // disk.sector
            if end > disk.usable_end:
                raise CosError(f"layout: {want.title} ({want.size_mib} MiB) does not fit on {disk.path}: "
                               f"{free_mib} MiB free after the last partition",
                               "lower its size or give the machine a bigger disk")
        else:
            end = disk.usable_end
            if free_mib < MIN_REST_MIB:
                raise CosError(f"layout: no room for {want.title} on {disk.path}: {free_mib} MiB left "
                               f"(at least {MIN_REST_MIB} MiB needed)", "give the machine a bigger disk")
        plan.append(Planned(want, next(numbers), start, end, exists=False))
        at = end
    return plan


def _check_tools(plan: list[Planned], expand: bool) -> None:
    tools = {f"mkfs.{p.want.filesystem}" for p in plan} | ({"sfdisk"} if expand else set())
    tools |= {"sgdisk"} if any(not p.exists for p in plan) else set()
    for tool in sorted(tools):
        if shutil.which(tool) is None:
            raise CosError(f"layout: {tool} is not installed", "install it in the OS image or use filesystem ext4")


def _sgdisk_args(disk: Disk, plan: list[Planned]) -> list[str | Path]:
    args: list[str | Path] = ["sgdisk"]
    if disk.needs_relocation:
        args.append("--move-second-header")
    for p in plan:
        if p.exists:
            continue
        n = p.number
        args += [f"--new={n}:{p.start}:{p.end - 1}", f"--typecode={n}:{TYPE_CODES.get(p.want.filesystem, '8300')}"]
        if p.want.p_label:
            args.append(f"--change-name={n}:{p.want.p_label}")
    return args


# ---- writing --------------------------------------------------------------------------------

def _mkfs_args(fs: str, label: str | None, target: Path) -> list[str | Path]:
    if fs == "vfat":
        return ["mkfs.vfat", *(["-n", label] if label else []), target]
    if fs == "xfs":
        return ["mkfs.xfs", "-q", "-f", *(["-L", label] if label else []), target]
    return [f"mkfs.{fs}", "-q", "-F", *(["-L", label] if label else []), target]


def _scratch(disk: Disk, number: int) -> Path:
    """A temporary file beside a disk image (same filesystem: sparse, no copy across)."""
    return disk.path.with_name(f".{disk.path.name}.part{number}.tmp")


def _make_filesystem(system: System, disk: Disk, part: Partition, want: NewPartition) -> None:
    log.info("layout: %s filesystem %s on partition %d of %s", want.filesystem, want.fs_label or "", part.number,
             disk.path)
    if not disk.is_file:
        system.run(_mkfs_args(want.filesystem, want.fs_label, refresh(system, disk, part.number)))
        return
    tmp = _scratch(disk, part.number)
    try:
        tmp.unlink(missing_ok=True)
        if not system.dry_run:
            with open(tmp, "wb") as f:
                f.truncate(disk.nbytes(part))
        system.run(_mkfs_args(want.filesystem, want.fs_label, tmp))
        implant(system, disk, part, tmp)
    finally:
        tmp.unlink(missing_ok=True)


def _add(system: System, disk: Disk, plan: list[Planned]) -> Disk:
    if any(not p.exists for p in plan):
        args = _sgdisk_args(disk, plan)
        query(system).run([*args[:1], "--pretend", *args[1:], disk.path])  # sgdisk checks the plan first
        system.run([*args, disk.path])
        if not disk.is_file:
            refresh(system, disk, plan[-1].number)
    if system.dry_run:
        for p in plan:
            log.info("layout: would make %s %s on partition %d", p.want.filesystem, p.want.fs_label or "", p.number)
        return disk
    disk = read_disk(system, disk.path)
    for p in plan:
        part = next(q for q in disk.partitions if q.number == p.number)
        _make_filesystem(system, disk, part, p.want)
    return read_disk(system, disk.path)


def _expand(system: System, disk: Disk, size_mib: int) -> None:
    if not disk.partitions:
        raise CosError(f"layout: expand_partition: {disk.path} has no partition to grow")
    last = disk.partitions[-1]
    end = disk.usable_end if size_mib == 0 else last.start + size_mib * MIB // disk.sector
    if end > disk.usable_end:
        free = (disk.usable_end - last.start) * disk.sector // MIB
        raise CosError(f"layout: expand_partition to {size_mib} MiB does not fit: partition {last.number} "
                       f"of {disk.path} can grow to {free} MiB", "lower expand_partition.size or use 0 (the rest)")
    if end > last.end:
        log.info("layout: growing partition %d of %s to %d MiB", last.number, disk.path,
                 (end - last.start) * disk.sector // MIB)
        if disk.needs_relocation:
            system.run(["sgdisk", "--move-second-header", disk.path])
        script = f", {end - last.start}\n".encode()
        base: list[str | Path] = ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "-N", str(last.number)]
        query(system).run([*base, "--no-act", disk.path], input=script)
        system.run([*base, disk.path], input=script)
        if not disk.is_file:
            refresh(system, disk, last.number)
        if system.dry_run:
            return
        disk = read_disk(system, disk.path)
        last = next(p for p in disk.partitions if p.number == last.number)
    elif end < last.end:
        log.info("layout: partition %d of %s is already larger than %d MiB: not shrunk", last.number, disk.path,
                 size_mib)
    _grow_filesystem(system, disk, last)


def _grow_filesystem(system: System, disk: Disk, part: Partition) -> None:
    if not (part.fs_type or "").startswith("ext"):
        if part.fs_type:
            log.warning("layout: partition %d grew; its %s filesystem is not grown (only ext2/3/4 are)",
                        part.number, part.fs_type)
        return
    node = disk.path if disk.is_file else Path(part.node)
    size = ext_size(node, disk.offset(part) if disk.is_file else 0) or 0
    if disk.nbytes(part) - size < GROW_SLACK:
        return
    log.info("layout: growing the %s filesystem on partition %d to its partition's size", part.fs_type, part.number)
    if not disk.is_file:
        _resize_ext(system, node, mounted=bool(mounts_of(node)))
        return
    tmp = _scratch(disk, part.number)
    try:
        extract(system, disk, part, tmp, size=disk.nbytes(part))
        _resize_ext(system, tmp, mounted=False)
        implant(system, disk, part, tmp)
    finally:
        tmp.unlink(missing_ok=True)


def _resize_ext(system: System, target: Path, mounted: bool) -> None:
    if not mounted:  # resize2fs insists on a freshly checked filesystem when offline
        proc = system.run(["e2fsck", "-f", "-y", target], check=False)
        if proc.returncode >= 4:
            raise CosError(f"layout: e2fsck found errors it could not fix on {target} (exit {proc.returncode})",
                           f"run e2fsck -f {target} by hand")
    system.run(["resize2fs", target])


def _target(system: System, layout: Layout) -> Path:
    if layout.device_path is not None:
        if not layout.device_path.exists():
            raise CosError(f"layout: device.path {layout.device_path} does not exist")
        return layout.device_path
    assert layout.device_label is not None
    try:
        return find_partition(system, layout.device_label)[0]
    except CosError as e:
        raise CosError(f"layout: device {{label: {layout.device_label}}}: {e.message}",
                       "is this the cOS disk? check device.label, or give device.path") from None


def apply(spec: dict[str, Any], system: System) -> None:
    layout = parse(spec)
    disk = read_disk(system, _target(system, layout))
    plan = _plan(disk, layout.add)
    _check_tools(plan, layout.expand_mib is not None)
    if plan:
        disk = _add(system, disk, plan)
    if layout.expand_mib is not None:
        _expand(system, disk, layout.expand_mib)
