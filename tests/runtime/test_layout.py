"""The cloud-config `layout` step, for real: sgdisk/sfdisk/mkfs on disk image files that
look like the vanilla cOS disk (no loop devices, no mounts). Checked with sfdisk --json,
blkid -p, e2label and e2fsck on the partitions read back out of the image."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.install import layout
from runtime.install.disks import MIB, read_disk
from runtime.system import CosError, System

LINUX_DATA = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
VANILLA = [("legacy", "EF02", 1, None), ("efi", "EF00", 4, None), ("oem", "8300", 8, "COS_OEM"),
           ("recovery", "8300", 24, "COS_RECOVERY")]


def sh(*cmd: str | Path, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, input=input)


def make_vanilla(path: Path, tmp: Path, grow_to_mib: int, recovery_label: str = "COS_RECOVERY") -> Path:
    """A small disk like pipeline/disk.py's: GPT, ext4 COS_OEM and COS_RECOVERY with files,
    then grown to `grow_to_mib` as a cloud volume bigger than the image is (the backup GPT
    is then no longer at the end)."""
    at, args = 1, ["sgdisk", "--clear"]
    for n, (name, code, mib, _) in enumerate(VANILLA, 1):
        args += [f"--new={n}:{at * 2048}:{(at + mib) * 2048 - 1}", f"--typecode={n}:{code}",
                 f"--change-name={n}:{name}"]
        at += mib
    with open(path, "wb") as f:
        f.truncate((at + 1) * MIB)
    sh(*args, path)
    at = 1
    for name, _, mib, label in VANILLA:
        if label:
            tree = tmp / f"tree-{name}"
            (tree / "cOS").mkdir(parents=True)
            (tree / "cOS" / "recovery.squashfs").write_bytes(b"squash" * 1000)
            img = tmp / f"{name}.img"
            sh("mkfs.ext4", "-q", "-L", recovery_label if name == "recovery" else label, "-d", tree, img, f"{mib}M")
            sh("dd", f"if={img}", f"of={path}", "bs=1M", f"seek={at}", "conv=notrunc,sparse", "status=none")
        at += mib
    with open(path, "r+b") as f:
        f.truncate(grow_to_mib * MIB)
    return path


def table(disk: Path) -> dict[str, Any]:
    t: dict[str, Any] = json.loads(sh("sfdisk", "--json", disk).stdout)["partitiontable"]
    return t


def part_file(disk: Path, number: int, dest: Path) -> Path:
    p = next(p for p in table(disk)["partitions"] if p["node"].endswith(str(number)))
    sh("dd", f"if={disk}", f"of={dest}", "bs=512", f"skip={p['start']}", f"count={p['size']}", "conv=sparse",
       "status=none")
    return dest


def blkid(path: Path) -> dict[str, str]:
    out = sh("blkid", "-p", "-o", "export", path).stdout.decode()
    return dict(line.split("=", 1) for line in out.splitlines())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


STEP = {"device": {"label": "COS_RECOVERY"},
        "add_partitions": [{"fsLabel": "COS_STATE", "size": 64, "pLabel": "state"},
                           {"fsLabel": "COS_PERSISTENT", "pLabel": "persistent"}]}


def spec_for(disk: Path, **extra: object) -> dict[str, Any]:
    return {"device": {"path": str(disk)}, "add_partitions": STEP["add_partitions"], **extra}


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return make_vanilla(tmp_path / "disk.raw", tmp_path, grow_to_mib=200)


def test_adds_state_and_the_rest_as_persistent(disk: Path, tmp_path: Path) -> None:
    before = {n: digest(part_file(disk, n, tmp_path / f"before{n}")) for n in (3, 4)}
    layout.apply(spec_for(disk), System(root=tmp_path))

    t = table(disk)
    parts = {p["name"]: p for p in t["partitions"]}
    assert [p["name"] for p in t["partitions"]] == ["legacy", "efi", "oem", "recovery", "state", "persistent"]
    state, persistent = parts["state"], parts["persistent"]
    assert state["size"] == 64 * 2048 and state["start"] % 2048 == 0 and state["type"] == LINUX_DATA
    assert state["start"] == parts["recovery"]["start"] + parts["recovery"]["size"]
    # the backup GPT was moved to the end of the grown disk and persistent takes all the rest
    assert t["lastlba"] == 200 * 2048 - 34
    assert persistent["start"] == state["start"] + state["size"]
    assert persistent["start"] + persistent["size"] - 1 == t["lastlba"]
    sh("sgdisk", "--verify", disk)

    for n, label in ((5, "COS_STATE"), (6, "COS_PERSISTENT")):
        img = part_file(disk, n, tmp_path / f"p{n}.img")
        assert blkid(img)["TYPE"] == "ext4" and blkid(img)["LABEL"] == label
        assert sh("e2label", img).stdout.decode().strip() == label
        sh("e2fsck", "-fn", img)
    # the existing partitions were not touched
    assert {n: digest(part_file(disk, n, tmp_path / f"after{n}")) for n in (3, 4)} == before


def test_a_rerun_changes_nothing(disk: Path, tmp_path: Path) -> None:
    layout.apply(spec_for(disk), System(root=tmp_path))
    once = digest(disk)
    layout.apply(spec_for(disk), System(root=tmp_path))
    assert digest(disk) == once


def test_existing_labels_are_skipped_and_never_touched(disk: Path, tmp_path: Path) -> None:
    spec = {"device": {"path": str(disk)}, "add_partitions": [{"fsLabel": "COS_OEM", "size": 8, "pLabel": "x"},
                                                              {"fsLabel": "COS_STATE", "size": 16}]}
    before = digest(part_file(disk, 3, tmp_path / "oem-before"))
    layout.apply(spec, System(root=tmp_path))
    names = [p.get("name", "") for p in table(disk)["partitions"]]
    assert len(names) == 5 and "x" not in names
    assert digest(part_file(disk, 3, tmp_path / "oem-after")) == before
    assert blkid(part_file(disk, 5, tmp_path / "p5"))["LABEL"] == "COS_STATE"


def test_finishes_a_partition_left_without_filesystem(disk: Path, tmp_path: Path) -> None:
    """A run stopped between the GPT write and mkfs: the next boot makes the filesystem."""
    sh("sgdisk", "-e", "--new=5:0:+64M", "--change-name=5:state", disk)
    layout.apply(spec_for(disk), System(root=tmp_path))
    assert len(table(disk)["partitions"]) == 6
    assert blkid(part_file(disk, 5, tmp_path / "p5"))["LABEL"] == "COS_STATE"


def test_other_filesystem(disk: Path, tmp_path: Path) -> None:
    spec = {"device": {"path": str(disk)}, "add_partitions": [{"fsLabel": "DATA", "size": 40, "filesystem": "vfat"}]}
    layout.apply(spec, System(root=tmp_path))
    p = table(disk)["partitions"][4]
    assert p["type"] == "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" and p["size"] == 40 * 2048
    info = blkid(part_file(disk, 5, tmp_path / "p5"))
    assert info["TYPE"] == "vfat" and info["LABEL"] == "DATA"


def test_a_size_that_does_not_fit_writes_nothing(disk: Path, tmp_path: Path) -> None:
    before = digest(disk)
    spec = {"device": {"path": str(disk)}, "add_partitions": [{"fsLabel": "COS_STATE", "size": 100},
                                                              {"fsLabel": "COS_PERSISTENT", "size": 100}]}
    with pytest.raises(CosError, match=r"COS_PERSISTENT \(100 MiB\) does not fit on .*: 61 MiB free"):
        layout.apply(spec, System(root=tmp_path))
    assert digest(disk) == before


def test_no_room_for_the_rest(tmp_path: Path) -> None:
    disk = make_vanilla(tmp_path / "small.raw", tmp_path, grow_to_mib=120)  # 17 MiB after STATE
    with pytest.raises(CosError, match="no room for COS_PERSISTENT"):
        layout.apply(spec_for(disk), System(root=tmp_path))


def test_missing_device(tmp_path: Path) -> None:
    with pytest.raises(CosError, match=r"device.path .*nope.raw does not exist"):
        layout.apply({"device": {"path": str(tmp_path / "nope.raw")}, "add_partitions": []}, System(root=tmp_path))
    # by label, among this machine's real block devices (none carries this label)
    with pytest.raises(CosError, match="no partition with the filesystem label or PARTLABEL COS_TEST_NO_SUCH"):
        layout.apply({"device": {"label": "COS_TEST_NO_SUCH"}, "add_partitions": []}, System(root=tmp_path))


def test_not_a_gpt_disk(tmp_path: Path) -> None:
    raw = tmp_path / "blank.raw"
    raw.write_bytes(b"\0" * MIB)
    with pytest.raises(CosError, match="has no partition table"):
        layout.apply({"device": {"path": str(raw)}, "add_partitions": []}, System(root=tmp_path))


@pytest.mark.parametrize(("spec", "message"), [
    ({"device": {"label": "X"}, "add_partition": []}, "unknown key 'add_partition' in layout"),
    ({"device": {"label": "X", "path": "/dev/sda"}}, "exactly one of label or path"),
    ({"device": {"label": "X"}, "add_partitions": [{"pLabel": "a"}, {"pLabel": "b"}]}, "rest of the disk but is not"),
    ({"device": {"label": "X"}, "add_partitions": [{"fsLabel": "A", "size": -1}]}, "size must be a whole number"),
    ({"device": {"label": "X"}, "add_partitions": [{"size": 5}]}, "needs fsLabel or pLabel"),
    ({"device": {"label": "X"}, "add_partitions": [{"fsLabel": "A", "filesystem": "zfs"}]}, "'zfs' is not supported"),
    ({"device": {"label": "X"}, "add_partitions": [{"fsLabel": "A" * 17}]}, "longer than 16 characters"),
])
def test_bad_specs(spec: dict[str, Any], message: str, tmp_path: Path) -> None:
    with pytest.raises(CosError, match=message):
        layout.apply(spec, System(root=tmp_path))


def test_expand_partition_grows_the_last_one_and_its_filesystem(disk: Path, tmp_path: Path) -> None:
    spec = {"device": {"path": str(disk)},
            "add_partitions": [{"fsLabel": "COS_PERSISTENT", "size": 40, "pLabel": "persistent"}]}
    layout.apply(spec, System(root=tmp_path))
    (tmp_path / "keep").write_bytes(b"persistent data")
    p5 = part_file(disk, 5, tmp_path / "p5-before")
    sh("debugfs", "-w", "-R", f"write {tmp_path / 'keep'} keep", p5)
    offset = table(disk)["partitions"][4]["start"] * 512
    sh("dd", f"if={p5}", f"of={disk}", "bs=1M", f"seek={offset}", "oflag=seek_bytes", "conv=notrunc", "status=none")
    with open(disk, "r+b") as f:   # the cloud volume grows again after first boot
        f.truncate(300 * MIB)
    layout.apply({**spec, "expand_partition": {"size": 0}}, System(root=tmp_path))
    t = table(disk)
    last = t["partitions"][-1]
    assert last["name"] == "persistent" and last["start"] + last["size"] - 1 == t["lastlba"] == 300 * 2048 - 34
    img = part_file(disk, 5, tmp_path / "p5")
    sh("e2fsck", "-fn", img)
    blocks = int(next(line.split(":")[1] for line in sh("dumpe2fs", "-h", img).stdout.decode().splitlines()
                      if line.startswith("Block count")))
    block_size = int(next(line.split(":")[1] for line in sh("dumpe2fs", "-h", img).stdout.decode().splitlines()
                          if line.startswith("Block size")))
    assert blocks * block_size > 250 * MIB
    assert blkid(img)["LABEL"] == "COS_PERSISTENT"
    assert sh("debugfs", "-R", "cat /keep", img).stdout == b"persistent data"
    once = digest(disk)
    layout.apply({**spec, "expand_partition": {"size": 0}}, System(root=tmp_path))
    assert digest(disk) == once


def test_expand_to_a_size_that_does_not_fit(disk: Path, tmp_path: Path) -> None:
    with pytest.raises(CosError, match="expand_partition to 5000 MiB does not fit"):
        layout.apply({"device": {"path": str(disk)}, "expand_partition": {"size": 5000}}, System(root=tmp_path))


def test_read_disk_sees_labels_in_an_image(disk: Path, tmp_path: Path) -> None:
    d = read_disk(System(root=tmp_path), disk)
    rec = d.find("COS_RECOVERY")
    assert rec is not None and rec.name == "recovery" and rec.fs_type == "ext4" and d.find("oem") == d.find("COS_OEM")
    assert d.needs_relocation


def test_dry_run_prints_and_writes_nothing(disk: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    before = digest(disk)
    with caplog.at_level("INFO", logger="cos"):
        layout.apply(spec_for(disk, expand_partition={"size": 0}), System(root=tmp_path, dry_run=True))
    assert digest(disk) == before
    assert "--new=5:" in caplog.text and "would make ext4 COS_STATE on partition 5" in caplog.text


@pytest.fixture
def loop_disk(tmp_path: Path) -> Iterator[tuple[Path, Path, str]]:
    """The vanilla disk as a real block device (a loop device, nothing mounted), its
    labels unique to this test: other tests on this machine look labels up too."""
    tag = os.urandom(3).hex().upper()
    image = make_vanilla(tmp_path / "disk.raw", tmp_path, grow_to_mib=200, recovery_label=f"REC{tag}")
    proc = subprocess.run(["losetup", "--find", "--show", "--partscan", str(image)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"no loop device here: {proc.stderr.strip()}")
    device = Path(proc.stdout.strip())
    try:
        sh("partx", "-u", device)   # the partitions a booted kernel would know (--partscan may not here)
        yield image, device, tag
    finally:
        subprocess.run(["losetup", "--detach", str(device)], check=True)


def test_on_a_block_device_found_by_label(loop_disk: tuple[Path, Path, str], tmp_path: Path) -> None:
    """The path the machine takes: lsblk finds the disk by label, sgdisk writes its GPT,
    partx tells the kernel, mkfs runs on the new partition nodes."""
    image, device, tag = loop_disk
    spec = {"device": {"label": f"REC{tag}"},
            "add_partitions": [{"fsLabel": f"ST{tag}", "size": 64, "pLabel": f"state{tag}"},
                               {"fsLabel": f"PE{tag}", "pLabel": f"persistent{tag}"}],
            "expand_partition": {"size": 0}}
    layout.apply(spec, System())
    d = read_disk(System(), device)
    state, persistent = d.find(f"ST{tag}"), d.find(f"PE{tag}")
    assert state is not None and persistent is not None
    assert Path(state.node).is_block_device() and state.fs_type == "ext4" and state.name == f"state{tag}"
    assert state.size == 64 * 2048 and persistent.end == d.last_lba + 1 == 200 * 2048 - 33
    assert blkid(Path(persistent.node))["LABEL"] == f"PE{tag}"
    sh("e2fsck", "-fn", persistent.node)
    sh("blockdev", "--flushbufs", device)
    once = digest(image)
    layout.apply(spec, System())
    sh("blockdev", "--flushbufs", device)
    assert digest(image) == once
