"""EBS direct upload against a server that checks what real EBS checks (tests/servers/ebs.py):
every block's SHA-256, the data length, ChangedBlocksCount and the linear aggregate
checksum at CompleteSnapshot; moto checks none of these. Also the multi-process path
(`processes: 2`): the blocks read back equal the disk, holes and zero blocks are not sent,
and a block refused inside a worker process fails the publish with a clear error and
removes the snapshot."""
from __future__ import annotations

import json
import os

import pytest

from cloud import ebs_direct
from cloud.errors import PublishError
from pipeline import publish
from pipeline.config import FlavorContext, FlavorPaths
from pipeline.files import hash_file
from tests.servers.aws import snapshot_bytes
from tests.servers.disks import nonzero_ranges
from tests.servers.ebs import EbsServer
from tests.servers.fixtures import aws, cloud_build_dir, flavor_paths, make_flavor, moto_server, server_logs  # noqa: F401

BLOCK = ebs_direct.BLOCK
MIB = 1024 * 1024


@pytest.fixture
def ebs(aws, server_logs, monkeypatch):
    """The checking EBS server in front of moto; EC2/STS still go to moto through the proxy."""
    server = EbsServer(server_logs, aws.moto.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_EBS", server.url)
    yield server
    server.close()


def big_build(flavor) -> FlavorPaths:
    """A raw disk with more data than ebs_direct.MULTIPROCESS_MIN, so workers really start:
    data, a hole, an all-zero allocated stretch, data at the end."""
    paths = FlavorPaths(flavor)
    paths.build.mkdir(parents=True, exist_ok=True)
    raw = paths.build / "disk.raw"
    data = ebs_direct.MULTIPROCESS_MIN + 8 * MIB
    with open(raw, "wb") as f:
        f.truncate(data + 64 * MIB)
        f.write(os.urandom(data))
        f.seek(data + 16 * MIB)
        f.write(bytes(4 * MIB))
        f.seek(data + 64 * MIB - 4096)
        f.write(os.urandom(4096))
    art = {"kind": "raw", "path": raw.name, "sha256": hash_file(raw), "size": raw.stat().st_size}
    paths.manifest.write_text(json.dumps({"schema": 1, "flavor": flavor.name, "version": "0.1.0",
                                          "arch": "x86_64", "artifacts": [art]}))
    return paths


def test_in_process_upload_passes_every_checksum(ebs, aws, cloud_build_dir):
    flavor = make_flavor({"aws": {"regions": ["us-east-1"], "workers": 4}}, name="ebscheck")
    paths = flavor_paths(flavor)
    result = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "aws")
    disk = paths.build / "disk.raw"
    stats = ebs.faults()
    assert stats["bad_checksums"] == 0 and stats["put_blocks"] == len(nonzero_ranges(disk, BLOCK))
    # CompleteSnapshot passed the server's aggregate check, so moto saw it complete
    snap = aws.moto.client("ec2").describe_snapshots(SnapshotIds=[result["snapshot"]])["Snapshots"][0]
    assert snap["State"] == "completed"
    assert snapshot_bytes(ebs, result["snapshot"], disk.stat().st_size) == disk.read_bytes()


def test_two_worker_processes_upload_exactly_the_data_blocks(ebs, aws, cloud_build_dir):
    flavor = make_flavor({"aws": {"regions": ["us-east-1"], "workers": 8, "processes": 2}}, name="ebsmp")
    paths = big_build(flavor)
    disk = paths.build / "disk.raw"
    result = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "aws")

    wanted = nonzero_ranges(disk, BLOCK)
    stats = ebs.faults()
    assert stats["bad_checksums"] == 0 and stats["put_blocks"] == len(wanted)
    assert result["upload"]["bytes_sent"] == len(wanted) * BLOCK
    assert result["upload"]["requests"] == len(wanted)
    assert snapshot_bytes(ebs, result["snapshot"], disk.stat().st_size) == disk.read_bytes()
    (register,) = aws.actions("RegisterImage")  # moto swaps in a snapshot of its own: check the wire
    assert register.form["BlockDeviceMapping.1.Ebs.SnapshotId"] == result["snapshot"]


def test_block_refused_in_a_worker_process_fails_cleanly(ebs, aws, cloud_build_dir):
    flavor = make_flavor({"aws": {"regions": ["us-east-1"], "workers": 4, "processes": 2}}, name="ebsfail")
    paths = big_build(flavor)
    ebs.faults(block_status=400, count=1, after=40)   # a 400 is not retried by botocore
    with pytest.raises(PublishError) as err:
        publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "aws")
    assert "PutSnapshotBlock" in str(err.value) and "injected fault" in str(err.value)
    # the half-written snapshot is gone, no image was registered, nothing recorded as published
    ec2 = aws.moto.client("ec2")
    snaps = ec2.describe_snapshots(OwnerIds=["self"], Filters=[{"Name": "tag:cos-flavor", "Values": ["ebsfail"]}])
    assert snaps["Snapshots"] == []
    assert ec2.describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": ["cos-ebsfail-*"]}])["Images"] == []
    assert not publish.is_published(FlavorContext(flavor, paths, "0.1.0"), "aws")
