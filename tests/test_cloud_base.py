"""What the three clouds share, on real files: hole detection (SEEK_DATA/SEEK_HOLE) finds
exactly the blocks that hold data, image names stay valid and keep the content digest,
the retention rule picks the right images, and bad targets are refused with the field
named when the flavor is loaded."""
from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cloud.base import ImageSpec, select_for_gc
from cloud.disk import blocks_with_data, data_extents
from pipeline.errors import ConfigError
from tests.servers.disks import RAW_SIZE, make_raw, nonzero_ranges
from tests.servers.fixtures import make_flavor


def test_blocks_with_data_are_the_written_blocks(tmp_path):
    raw = make_raw(tmp_path / "disk.raw")
    fd = os.open(raw, os.O_RDONLY)
    try:
        extents = list(data_extents(fd, RAW_SIZE))
        blocks = list(blocks_with_data(fd, RAW_SIZE, 512 * 1024))
    finally:
        os.close(fd)
    assert sum(e - s for s, e in extents) < RAW_SIZE // 4  # holes are not data
    assert len(blocks) == len(set(blocks)) and blocks == sorted(blocks)
    nonzero = nonzero_ranges(raw, 512 * 1024)
    assert set(nonzero) <= set(blocks)  # every block with data is found ...
    assert len(blocks) - len(nonzero) <= 8  # ... plus only the allocated all-zero region


def test_a_file_that_is_one_hole_has_no_blocks(tmp_path):
    empty = tmp_path / "empty.raw"
    with open(empty, "wb") as f:
        f.truncate(8 * 1024 * 1024)
    fd = os.open(empty, os.O_RDONLY)
    try:
        assert list(blocks_with_data(fd, 8 * 1024 * 1024, 512 * 1024)) == []
    finally:
        os.close(fd)


@pytest.mark.parametrize("version", ["0.1.0", "12.34.56-rc.1+build.20261125.abcdef0123456789"])
def test_image_names_are_valid_everywhere_and_keep_the_digest(version):
    spec = ImageSpec("orange", version, "x86_64", Path("x"), "0123456789abcdef" * 4)
    assert len(spec.name) <= 63 and spec.name.endswith("-0123456789ab")
    assert all(c.islower() or c.isdigit() or c == "-" for c in spec.name) and spec.name[0].isalpha()
    assert ImageSpec("orange", version, "x86_64", Path("y"), "f" * 64).name != spec.name


def test_retention_keeps_newest_and_respects_max_age():
    now = datetime(2026, 11, 25, tzinfo=UTC)
    images = [((now - timedelta(days=d)).strftime("%Y%m%dt%H%M%Sz"), f"img{d}") for d in (1, 40, 3, 90, 10)]
    assert select_for_gc(images, keep=2, max_age_days=None, now=now) == ["img10", "img40", "img90"]
    assert select_for_gc(images, keep=2, max_age_days=30, now=now) == ["img40", "img90"]
    iso = [("2026-11-01T10:00:00.000-07:00", "a"), ("2026-11-02T10:00:00Z", "b")]
    assert select_for_gc(iso, keep=1, max_age_days=None) == ["a"]


@pytest.mark.parametrize("clouds, message", [
    ({"aws": {"regions": ["eu-west-1"], "upload": "s3-import"}}, "needs a bucket"),
    ({"aws": {"regions": []}}, "regions"),
    ({"gcp": {"project": "p", "bucket": "b", "guest_os_features": ["GVNIC"]}}, "UEFI_COMPATIBLE"),
    ({"azure": {"resource_group": "g", "location": "l", "storage_account": "s", "gallery": "x"}}, "gallery_image"),
    ({"aws": {"regions": ["eu-west-1"], "bukcet": "b"}}, "extra"),
])
def test_bad_targets_are_refused(clouds, message):
    from pydantic import ValidationError
    with pytest.raises((ValidationError, ConfigError), match=message):
        make_flavor(clouds)


def test_missing_or_changed_artifact_is_a_clear_error(tmp_path, monkeypatch):
    import json

    from pipeline import publish
    from pipeline.config import FlavorContext
    from pipeline.errors import PipelineError
    from tests.servers.fixtures import flavor_paths
    monkeypatch.setenv("COS_BUILD_DIR", str(tmp_path / "build"))
    flavor = make_flavor({"gcp": {"project": "p", "bucket": "b"}}, name="missing")
    paths = flavor_paths(flavor)
    data = json.loads(paths.manifest.read_text())
    paths.manifest.write_text(json.dumps({**data, "artifacts": [a for a in data["artifacts"] if a["kind"] != "gce-tar"]}))
    with pytest.raises(PipelineError, match="no 'gce-tar' artifact.*\n.*doit build-missing"):
        publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "gcp")
    paths.manifest.write_text(json.dumps(data))
    with open(paths.build / "disk.tar.gz", "ab") as f:
        f.write(b"changed")
    with pytest.raises(PipelineError, match="differs from the manifest"):
        publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "gcp")
    with pytest.raises(PipelineError, match="no clouds.aws target"):
        publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "aws")
