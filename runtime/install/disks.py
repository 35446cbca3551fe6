"""Disks and partitions on the machine (or in a disk image file, for the host tests).

A partition is found by its filesystem label or its GPT name (PARTLABEL) with lsblk
(udev's view; blkid as the fallback when udev has not seen it). A disk's table is read
with `sfdisk --json`, each partition's filesystem with a low-level `blkid -p` (no cache).

A disk image file has no partition nodes: its partitions are read, extracted and put
back by offset (dd/fallocate), so no loop device is needed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
import time
from dataclasses import dataclass, replace
from pathlib import Path

from ..system import CosError, System

MIB = 1024 * 1024
GPT_ENTRIES_BYTES = 128 * 128     # the backup partition entry array (128 entries of 128 bytes)
NODE_WAIT_S = 10.0                # how long a new partition's device node may take to appear

EXT_MAGIC = 0xEF53
EXT_INCOMPAT_64BIT = 0x80


@dataclass(frozen=True)
class Partition:
    number: int
    start: int                    # in sectors
    size: int                     # in sectors
    type: str                     # GPT type GUID
    uuid: str                     # GPT partition GUID
    name: str                     # GPT name = PARTLABEL ("" when unset)
    node: str                     # /dev/sda5 on a device ("disk.img5", not a file, for an image)
    fs_type: str | None
    fs_label: str | None

    @property
    def end(self) -> int:
        """First sector after the partition."""
        return self.start + self.size


@dataclass(frozen=True)
class Disk:
    path: Path
    is_file: bool                 # a disk image file, not a block device
    sector: int                   # logical sector size in bytes
    first_lba: int
    last_lba: int                 # last usable sector as the GPT says now
    total_sectors: int
    partitions: tuple[Partition, ...]

    @property
    def usable_end(self) -> int:
        """First sector past the usable area once the backup GPT sits at the very end of
        the disk (`sgdisk -e`): more than last_lba + 1 when the disk grew after imaging."""
        backup = 1 + -(-GPT_ENTRIES_BYTES // self.sector)
        return self.total_sectors - backup

    @property
    def needs_relocation(self) -> bool:
        return self.last_lba + 1 < self.usable_end

    def find(self, label: str) -> Partition | None:
        """The partition whose filesystem label or GPT name is `label`."""
        return next((p for p in self.partitions if label in (p.fs_label, p.name)), None)

    def offset(self, part: Partition) -> int:
        return part.start * self.sector

    def nbytes(self, part: Partition) -> int:
        return part.size * self.sector


def size_bytes(path: Path) -> int:
    """Bytes of a disk device or image file (st_size is 0 for a block device)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _export(text: str) -> dict[str, str]:
    """`blkid -o export` lines KEY=VALUE."""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def query(system: System) -> System:
    """The same System for commands that only read (they run in dry-run mode too)."""
    return replace(system, dry_run=False)


def probe(system: System, path: Path, offset: int = 0, size: int | None = None) -> dict[str, str]:
    """Low-level blkid probe of a device (or of a byte range of a disk or file): TYPE,
    LABEL, ...; {} when there is no filesystem signature."""
    cmd: list[str | Path] = ["blkid", "-p", "-o", "export"]
    if offset or size is not None:
        cmd += ["-O", str(offset)] + (["-S", str(size)] if size is not None else [])
    proc = query(system).run([*cmd, path], check=False)
    if proc.returncode == 2:          # nothing found
        return {}
    if proc.returncode != 0:
        raise CosError(f"blkid could not probe {path}: {(proc.stderr or b'').decode(errors='replace').strip()}")
    return _export(proc.stdout.decode(errors="replace"))


def is_image_file(path: Path, missing_hint: str) -> bool:
    """True for a disk image file (what host tests use), False for a block device; a path
    that is neither, or missing, is refused (`missing_hint` says what to check)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CosError(f"disk {path} does not exist", missing_hint) from None
    is_file = stat.S_ISREG(st.st_mode)
    if not is_file and not stat.S_ISBLK(st.st_mode):
        raise CosError(f"{path} is neither a block device nor a disk image file")
    return is_file


def read_disk(system: System, path: Path) -> Disk:
    """The GPT of a disk device or image file, with each partition's filesystem."""
    is_file = is_image_file(path, "check device.path in the layout step")
    proc = query(system).run(["sfdisk", "--json", path], check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise CosError(f"{path} has no partition table sfdisk can read",
                       "the layout step works on a GPT disk such as the cOS vanilla disk")
    table = json.loads(proc.stdout)["partitiontable"]
    if table.get("label") != "gpt":
        raise CosError(f"{path} has a {table.get('label')} partition table, not GPT",
                       "the layout step works on a GPT disk such as the cOS vanilla disk")
    sector = int(table.get("sectorsize", 512))
    parts = []
    for raw in table.get("partitions", []):
        number = _partition_number(str(raw["node"]), str(table["device"]))
        start, size = int(raw["start"]), int(raw["size"])
        # a device's partition through its node; by offset in an image file, or on a disk
        # whose kernel has not seen the partition yet (no node)
        node = Path(raw["node"])
        on_node = not is_file and node.exists()
        fs = probe(system, node) if on_node else probe(system, path, start * sector, size * sector)
        parts.append(Partition(number, start, size, str(raw["type"]), str(raw.get("uuid", "")),
                               str(raw.get("name", "")), str(raw["node"]), fs.get("TYPE"), fs.get("LABEL")))
    return Disk(path, is_file, sector, int(table["firstlba"]), int(table["lastlba"]),
                size_bytes(path) // sector, tuple(sorted(parts, key=lambda p: p.start)))


def _partition_number(node: str, device: str) -> int:
    """sfdisk names partition N of /dev/sda "/dev/sdaN", of /dev/nvme0n1 "/dev/nvme0n1pN"."""
    tail = node[len(device):] if node.startswith(device) else node
    match = re.search(r"(\d+)$", tail)
    if not match:
        raise CosError(f"cannot tell the partition number of {node} on {device}")
    return int(match.group(1))


def find_partition(system: System, label: str) -> tuple[Path, Path]:
    """(disk, partition node) of the partition whose filesystem label or PARTLABEL is
    `label`, among the machine's block devices."""
    found = _lsblk_find(system, label) or _blkid_find(system, label)
    if not found:
        raise CosError(f"no partition with the filesystem label or PARTLABEL {label}")
    if len(found) > 1:
        nodes = ", ".join(str(n) for _, n in found)
        raise CosError(f"label {label} is on more than one partition ({nodes})", "name the disk with device.path")
    return found[0]


def _lsblk_find(system: System, label: str) -> list[tuple[Path, Path]]:
    proc = query(system).run(["lsblk", "--json", "--paths", "-o", "NAME,PKNAME,TYPE,LABEL,PARTLABEL"], check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    found: list[tuple[Path, Path]] = []

    def walk(devices: list[dict[str, object]]) -> None:
        for dev in devices:
            if dev.get("type") == "part" and label in (dev.get("label"), dev.get("partlabel")) and dev.get("pkname"):
                found.append((Path(str(dev["pkname"])), Path(str(dev["name"]))))
            walk(dev.get("children", []))  # type: ignore[arg-type]

    walk(json.loads(proc.stdout).get("blockdevices", []))
    return found


def _blkid_find(system: System, label: str) -> list[tuple[Path, Path]]:
    nodes: set[str] = set()
    for tag in ("LABEL", "PARTLABEL"):
        proc = query(system).run(["blkid", "-o", "device", "-t", f"{tag}={label}"], check=False)
        nodes.update(proc.stdout.decode().split())
    found = []
    for node in sorted(nodes):
        parent = query(system).run(["lsblk", "-ndo", "PKNAME", "--paths", node], check=False).stdout.decode().strip()
        if parent:
            found.append((Path(parent), Path(node)))
    return found


def refresh(system: System, disk: Disk, number: int) -> Path:
    """After a table change on a block device: tell the kernel (partx works while other
    partitions of the disk are mounted, where a full re-read fails), let udev settle, and
    return partition `number`'s node once it exists."""
    system.run(["partx", "-u", disk.path])   # adds new partitions, resizes changed ones
    if shutil.which("udevadm"):
        system.run(["udevadm", "settle"], check=False)
    if system.dry_run:
        return Path(f"{disk.path}{number}")
    node = Path(next(p.node for p in read_disk(system, disk.path).partitions if p.number == number))
    deadline = time.monotonic() + NODE_WAIT_S
    while not node.exists():
        if time.monotonic() > deadline:
            raise CosError(f"{node} did not appear after the partition table of {disk.path} changed",
                           "is udev running? try: partx -u " + str(disk.path))
        time.sleep(0.1)
    return node


def extract(system: System, disk: Disk, part: Partition, dest: Path, size: int | None = None) -> Path:
    """Copy one partition of an image file into `dest` (sparse), optionally sized `size` bytes."""
    system.run(["dd", f"if={disk.path}", f"of={dest}", "bs=1M", f"skip={disk.offset(part)}",
                f"count={disk.nbytes(part)}", "iflag=skip_bytes,count_bytes", "conv=sparse", "status=none"])
    if size is not None and not system.dry_run:
        os.truncate(dest, size)
    return dest


def implant(system: System, disk: Disk, part: Partition, src: Path) -> None:
    """Put a filesystem file into a partition of an image file. The range is zeroed first
    (punching a hole keeps the file sparse): dd conv=sparse skips the new file's zeros and
    must not leave old bytes under them."""
    length = disk.nbytes(part)
    if not system.dry_run and src.stat().st_size > length:
        raise CosError(f"{src.name} ({src.stat().st_size} bytes) is larger than partition {part.number} ({length})")
    system.run(["fallocate", "--punch-hole", "--offset", str(disk.offset(part)), "--length", str(length), disk.path])
    system.run(["dd", f"if={src}", f"of={disk.path}", "bs=1M", f"seek={disk.offset(part)}",
                "oflag=seek_bytes", "conv=notrunc,sparse,fsync", "status=none"])


def ext_size(path: Path, offset: int = 0) -> int | None:
    """Size in bytes of the ext2/3/4 filesystem at `offset` of a device or file, from
    its superblock; None when there is none."""
    with open(path, "rb") as f:
        f.seek(offset + 1024)
        sb = f.read(1024)
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 0x38)[0] != EXT_MAGIC:
        return None
    blocks = int(struct.unpack_from("<I", sb, 0x4)[0])
    if struct.unpack_from("<I", sb, 0x60)[0] & EXT_INCOMPAT_64BIT:
        blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
    return blocks << (10 + int(struct.unpack_from("<I", sb, 0x18)[0]))


def mounts_of(node: Path) -> list[tuple[Path, bool]]:
    """Where a block device is mounted: (mount point, read-only) from /proc/self/mounts."""
    real = str(node.resolve())
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 4 and fields[0] == real:
                target = fields[1].encode().decode("unicode_escape")   # \040 for a space
                found.append((Path(target), "ro" in fields[3].split(",")))
    return found
