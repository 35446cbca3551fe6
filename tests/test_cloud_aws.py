"""AWS publishing against moto's real HTTP server (via AWS_ENDPOINT_URL, through a
recording/fault-injecting proxy): EBS direct upload whose blocks read back equal the
disk and skip holes/zero blocks, the RegisterImage request actually sent (UEFI, ENA,
arch, IMDSv2, TPM, block device mapping, tags), idempotent re-runs, copies to a second
region, launch permissions, the S3 + ImportSnapshot fallback, retries of throttling and
5xx answers, cleanup on failure, a killed-then-rerun publish, dry run, EnableImageDeprecation
on every AMI (set once), and cloud-gc (images beyond the rule; orphan snapshots of stopped
publishes once older than clouds.retention_orphan_hours, never another flavor's or a live
image's)."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import boto3
import pytest
from virt.firmware.varstore.aws import AwsVarStore

from cloud import aws as aws_cloud
from cloud.aws import deprecate_at
from cloud.errors import PublishError
from pipeline import publish
from pipeline.config import FlavorContext
from tests.servers.aws import ImageDeprecations, snapshot_bytes
from tests.servers.disks import nonzero_ranges
from tests.servers.fixtures import (  # noqa: F401
    aws,
    cloud_build_dir,
    flavor_paths,
    kill_publish_midway,
    make_flavor,
    moto_server,
    server_logs,
)
from tests.servers.proxy import EC2_THROTTLE, JSON_THROTTLE, SERVER_ERROR, Reply

BLOCK = 512 * 1024
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def aws_flavor(name="awstest", arch="x86_64", **target):
    return make_flavor({"aws": {"regions": ["us-east-1", "eu-west-1"], "workers": 8, **target}}, name=name, arch=arch)


def images_named(moto, region, name):
    return moto.client("ec2", region).describe_images(Owners=["self"], Filters=[{"Name": "name", "Values": [name]}])["Images"]


def test_ebs_direct_publish_registers_uefi_image_and_copies(aws, cloud_build_dir):
    flavor = aws_flavor()
    paths = flavor_paths(flavor)
    result = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "aws")
    disk = paths.build / "disk.raw"

    # blocks sent: exactly the 512 KiB blocks that hold non-zero data
    sent = sorted(int(r.path.split("/blocks/")[1].split("?")[0]) for r in aws.ebs_calls("") if "/blocks/" in r.path and r.method == "PUT")
    assert sent == nonzero_ranges(disk, BLOCK)
    assert result["upload"]["bytes_sent"] == len(sent) * BLOCK < disk.stat().st_size // 4
    start = aws.proxy.seen(lambda r: r.method == "POST" and r.path.split("?")[0] == "/snapshots")
    assert len(start) == 1 and json.loads(start[0].body)["VolumeSize"] == 1

    # the snapshot reads back equal to the disk
    assert snapshot_bytes(aws.moto, result["snapshot"], disk.stat().st_size) == disk.read_bytes()

    # what RegisterImage really carried (moto drops these fields)
    (reg,) = aws.actions("RegisterImage")
    form = reg.form
    assert form["BootMode"] == "uefi" and form["Architecture"] == "x86_64"
    assert form["EnaSupport"] == "true" and form["SriovNetSupport"] == "simple"
    assert form["ImdsSupport"] == "v2.0" and form["TpmSupport"] == "v2.0"
    assert form["VirtualizationType"] == "hvm" and form["RootDeviceName"] == "/dev/xvda"
    # Secure Boot: the UEFI variable store sent is virt-firmware's, with Microsoft's keys and SB on
    assert form["UefiData"] == aws_cloud.uefi_data()
    (cloud_build_dir / "uefi-data").write_text(form["UefiData"])
    store = AwsVarStore(str(cloud_build_dir / "uefi-data")).get_varlist()  # virt-firmware reads it back
    assert {"PK", "KEK", "db", "dbx"} <= set(store) and store["SecureBootEnable"].data == b"\x01"
    db = " ".join(str(c.x509.subject) for c in store["db"].sigdb if c.x509)
    assert "Microsoft Corporation UEFI CA 2011" in db  # the CA that signs the distros' shim
    assert form["BlockDeviceMapping.1.DeviceName"] == "/dev/xvda"
    assert form["BlockDeviceMapping.1.Ebs.SnapshotId"] == result["snapshot"]
    assert form["BlockDeviceMapping.1.Ebs.VolumeType"] == "gp3"
    assert form["TagSpecification.1.ResourceType"] == "image"
    tags = {form[k]: form[k[:-3] + "Value"] for k in form if k.startswith("TagSpecification.1.Tag.") and k.endswith(".Key")}
    assert tags["cos-flavor"] == "awstest" and tags["cos-image"] == result["name"]

    # registered in the first region, copied to the second
    assert set(result["images"]) == {"us-east-1", "eu-west-1"}
    for region, image_id in result["images"].items():
        (img,) = images_named(aws.moto, region, result["name"])
        assert img["ImageId"] == image_id
    (copy,) = aws.actions("CopyImage")
    assert copy.form["SourceImageId"] == result["images"]["us-east-1"] and copy.form["ClientToken"]

    # recorded for later stages
    recorded = json.loads((paths.build / "cloud-images.json").read_text())["aws"]
    assert recorded["images"] == result["images"] and recorded["artifact_sha256"]
    manifest = json.loads(paths.manifest.read_text())
    assert manifest["cloud_images"]["aws"]["images"] == result["images"]
    assert publish.is_published(FlavorContext(flavor, paths, "0.1.0"), "aws")

    # re-run: nothing new is created
    before = len(aws.proxy.requests)
    again = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "aws")
    new = aws.proxy.requests[before:]
    assert again["images"] == result["images"]
    writes = [r.action or r.path for r in new if r.action not in ("DescribeImages", "GetCallerIdentity", "DescribeSnapshots")]
    assert writes == []
    for region in ("us-east-1", "eu-west-1"):
        assert len(images_named(aws.moto, region, result["name"])) == 1


def test_arm64_public_and_shared(aws, cloud_build_dir):
    flavor = aws_flavor(name="armtest", arch="arm64", regions=["us-west-2"], public=True,
                        share_with_accounts=["111122223333"], tpm=False)
    paths = flavor_paths(flavor)
    result = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "aws")
    form = aws.actions("RegisterImage")[0].form
    assert form["Architecture"] == "arm64" and "TpmSupport" not in form
    ec2 = aws.moto.client("ec2", "us-west-2")
    perms = ec2.describe_image_attribute(ImageId=result["images"]["us-west-2"], Attribute="launchPermission")["LaunchPermissions"]
    assert {"Group": "all"} in perms and {"UserId": "111122223333"} in perms


def test_s3_import_fallback(aws, cloud_build_dir):
    aws.moto.client("s3").create_bucket(Bucket="cos-staging")
    flavor = aws_flavor(name="importtest", regions=["us-east-1"], upload="s3-import", bucket="cos-staging")
    paths = flavor_paths(flavor)
    result = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "aws")
    (imp,) = aws.actions("ImportSnapshot")
    assert imp.form["DiskContainer.Format"] == "RAW" and imp.form["DiskContainer.UserBucket.S3Bucket"] == "cos-staging"
    assert len(aws.actions("DescribeImportSnapshotTasks")) >= 3  # polled until complete
    disk = paths.build / "disk.raw"
    assert snapshot_bytes(aws.moto, result["snapshot"], disk.stat().st_size) == disk.read_bytes()
    assert aws.actions("RegisterImage")[0].form["BlockDeviceMapping.1.Ebs.SnapshotId"] == result["snapshot"]
    # the staging object is removed
    assert aws.moto.client("s3").list_objects_v2(Bucket="cos-staging").get("KeyCount") == 0


def test_s3_import_failure_surfaces_status_message_and_cleans_up(aws, cloud_build_dir):
    aws.moto.client("s3").create_bucket(Bucket="cos-staging")
    flavor = aws_flavor(name="corrupt", regions=["us-east-1"], upload="s3-import", bucket="cos-staging")
    paths = flavor_paths(flavor)
    with pytest.raises(PublishError, match="Disk validation failed"):
        publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "aws")
    assert aws.moto.client("s3").list_objects_v2(Bucket="cos-staging").get("KeyCount") == 0
    assert aws.actions("RegisterImage") == []


def test_throttling_5xx_and_not_yet_visible_snapshot_are_retried(aws, cloud_build_dir):
    is_put = lambda r: r.method == "PUT" and "/blocks/" in r.path  # noqa: E731
    not_yet = Reply(404, b'{"message": "The snapshot does not exist"}',
                    {"Content-Type": "application/json", "x-amzn-ErrorType": "ResourceNotFoundException"})
    faults = [aws.proxy.inject(is_put, 2, not_yet),  # right after StartSnapshot
              aws.proxy.inject(is_put, 3, JSON_THROTTLE),
              aws.proxy.inject(is_put, 2, SERVER_ERROR),
              aws.proxy.inject(lambda r: "/snapshots/completion/" in r.path, 1, SERVER_ERROR),
              aws.proxy.inject(lambda r: r.action == "RegisterImage", 2, EC2_THROTTLE),
              aws.proxy.inject(lambda r: r.action == "DescribeImages", 2, EC2_THROTTLE),
              aws.proxy.inject(lambda r: r.action == "CopyImage", 1, EC2_THROTTLE)]
    flavor = aws_flavor(name="faulty")
    paths = flavor_paths(flavor)
    result = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "aws")
    assert all(f.hits == f.times for f in faults)
    disk = paths.build / "disk.raw"
    assert snapshot_bytes(aws.moto, result["snapshot"], disk.stat().st_size) == disk.read_bytes()
    for region in ("us-east-1", "eu-west-1"):
        assert len(images_named(aws.moto, region, result["name"])) == 1


def test_failed_upload_removes_its_snapshot(aws, cloud_build_dir):
    aws.proxy.inject(lambda r: "/snapshots/completion/" in r.path, 1000,
                     Reply(400, b'{"message": "checksum mismatch (injected)"}',
                           {"Content-Type": "application/json", "x-amzn-ErrorType": "ValidationException"}))
    flavor = aws_flavor(name="failing", regions=["us-east-1"])
    paths = flavor_paths(flavor)
    with pytest.raises(PublishError, match="ValidationException"):
        publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "aws")
    started = json.loads(aws.proxy.seen(lambda r: r.path.split("?")[0] == "/snapshots")[0].body)
    assert started["ClientToken"]
    snaps = aws.moto.client("ec2").describe_snapshots(OwnerIds=["self"])["Snapshots"]
    assert [s for s in snaps if any(t["Key"] == "cos-flavor" for t in s.get("Tags", []))] == []
    assert not (paths.build / "cloud-images.json").exists()


def test_dry_run_changes_nothing(aws, cloud_build_dir, monkeypatch):
    monkeypatch.setenv("COS_PUBLISH_DRY_RUN", "1")
    flavor = aws_flavor(name="plan")
    paths = flavor_paths(flavor)
    result = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "aws")
    assert result["dry_run"] and any("upload disk.raw" in s for s in result["plan"])
    assert any("secure boot: UefiData with Microsoft keys" in s for s in result["plan"])
    assert any("copy to eu-west-1" in s for s in result["plan"])
    assert {r.action for r in aws.proxy.requests} <= {"GetCallerIdentity", "DescribeImages", "DescribeSnapshots"}
    assert not (paths.build / "cloud-images.json").exists()


@pytest.mark.slow
def test_killed_publish_then_rerun_gives_one_image(aws, cloud_build_dir):
    clouds = {"aws": {"regions": ["us-east-1", "eu-west-1"], "workers": 2}}
    flavor = make_flavor(clouds, name="killed")
    paths = flavor_paths(flavor)
    is_put = lambda r: r.method == "PUT" and "/blocks/" in r.path  # noqa: E731
    kill_publish_midway(aws.proxy, "aws", clouds, "killed", is_put, after=3, delay_s=0.3)
    assert aws.actions("RegisterImage") == []

    result = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "aws")
    for region in ("us-east-1", "eu-west-1"):
        assert len(images_named(aws.moto, region, result["name"])) == 1
    disk = paths.build / "disk.raw"
    assert snapshot_bytes(aws.moto, result["snapshot"], disk.stat().st_size) == disk.read_bytes()
    # the killed run's unfinished snapshot is gone; only the image's snapshot is left
    snaps = aws.moto.client("ec2").describe_snapshots(
        OwnerIds=["self"], Filters=[{"Name": "tag:cos-image", "Values": [result["name"]]}])["Snapshots"]
    assert [s["SnapshotId"] for s in snaps] == [result["snapshot"]]


def test_gc_keeps_newest_and_is_dry_run_by_default(aws, cloud_build_dir):
    flavor = aws_flavor(name="gctest", regions=["us-east-1"])
    names = []
    for seed in (1, 2, 3):
        paths = flavor_paths(flavor, seed=seed)
        names.append(publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "aws")["name"])
        time.sleep(1.1)  # distinct creation times
    ctx = FlavorContext(make_flavor({"aws": {"regions": ["us-east-1"]}, "retention_keep": 1}, name="gctest"),
                        paths, "0.1.0")
    ec2 = aws.moto.client("ec2")
    items = publish.gc([ctx])
    assert len(items) == 2
    assert all(len(images_named(aws.moto, "us-east-1", n)) == 1 for n in names)  # dry run: all still there
    publish.gc([ctx], apply=True)
    assert [len(images_named(aws.moto, "us-east-1", n)) for n in names] == [0, 0, 1]
    left = ec2.describe_snapshots(OwnerIds=["self"], Filters=[{"Name": "tag:cos-flavor", "Values": ["gctest"]}])["Snapshots"]
    assert len(left) == 1


def test_tasks_only_for_configured_clouds(aws, cloud_build_dir):
    from pipeline.config import FlavorContext
    from pipeline.graph import publish_tasks
    flavor = aws_flavor(name="tasks")
    paths = flavor_paths(flavor)
    ctx = FlavorContext(flavor, paths, "0.1.0")
    tasks = list(publish_tasks(ctx))
    assert [t.get("name") for t in tasks] == [None, "aws"]
    assert all(t["basename"] == "publish-tasks" for t in tasks)
    uptodate = tasks[1]["uptodate"][0]
    assert uptodate() is False
    publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "aws")
    assert uptodate() is True
    assert [t.get("name") for t in publish_tasks(FlavorContext(make_flavor({}, name="none"), paths, "0.1.0"))] == [None]


def run_dodo(*args, env):
    dodo = os.path.join(REPO, "tests", "servers", "publish_dodo.py")
    return subprocess.run([sys.executable, "-m", "doit", "-f", dodo, "--dir", REPO, *args],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=300)


def test_doit_publish_task_then_up_to_date(aws, cloud_build_dir):
    clouds = {"aws": {"regions": ["us-east-1"], "workers": 4}}
    flavor_paths(make_flavor(clouds, name="doitpub"))
    env = {"COS_TEST_FLAVOR": "doitpub", "COS_TEST_CLOUDS": json.dumps(clouds)}

    plan = run_dodo("publish-doitpub", env={**env, "COS_PUBLISH_DRY_RUN": "1"})
    assert plan.returncode == 0, plan.stderr
    assert "aws plan: upload disk.raw" in plan.stderr and aws.actions("RegisterImage") == []

    first = run_dodo("publish-doitpub", env=env)
    assert first.returncode == 0, first.stderr
    assert ".  publish-doitpub:aws" in first.stdout
    assert "MB/s" in first.stderr  # upload progress with throughput
    assert len(aws.actions("RegisterImage")) == 1

    before = len(aws.proxy.requests)
    second = run_dodo("publish-doitpub", env=env)
    assert "-- publish-doitpub:aws" in second.stdout  # up to date: no cloud call at all
    assert len(aws.proxy.requests) == before

    gc = run_dodo("cloud-gc", env=env)
    assert gc.returncode == 0 and "dry run, 0 image(s)" in gc.stderr


def _region_of(req) -> str:
    return req.headers["authorization"].split("Credential=")[1].split("/")[2]


def test_every_ami_gets_a_deprecation_time_once(aws, cloud_build_dir, monkeypatch):
    deprecations = ImageDeprecations(aws.moto, aws.proxy.forward)  # moto lacks EnableImageDeprecation
    aws.proxy.handlers.append(deprecations)
    flavor = aws_flavor(name="deprecated", deprecate_after_days=30)
    paths = flavor_paths(flavor)

    monkeypatch.setenv("COS_PUBLISH_DRY_RUN", "1")
    plan = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "aws")["plan"]
    (step,) = [s for s in plan if s.startswith("deprecate the AMIs at ")]
    planned = datetime.strptime(step.split(" at ")[1].split(" ")[0], "%Y-%m-%dT%H:%MZ").replace(tzinfo=UTC)
    assert abs(planned - (datetime.now(UTC) + timedelta(days=30))) < timedelta(minutes=2)
    assert aws.actions("EnableImageDeprecation") == []
    monkeypatch.delenv("COS_PUBLISH_DRY_RUN")

    before = datetime.now(UTC)
    result = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "aws")
    after = datetime.now(UTC)
    sent = aws.actions("EnableImageDeprecation")
    # one call per AMI, in the AMI's own region, after the copy exists
    assert {_region_of(r): r.form["ImageId"] for r in sent} == result["images"] and len(sent) == 2
    for req in sent:
        text = req.form["DeprecateAt"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:00Z", text), text  # UTC, whole minutes
        at = datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert before + timedelta(days=30, minutes=-1) < at <= after + timedelta(days=30)
    first_copy = next(i for i, r in enumerate(aws.proxy.requests) if r.action == "CopyImage")
    assert aws.proxy.requests.index(sent[0]) > first_copy
    # EC2 (here: moto + the handler) reports it on the image, as the product reads it
    ec2 = boto3.client("ec2", region_name="eu-west-1")  # via AWS_ENDPOINT_URL -> proxy
    (img,) = ec2.describe_images(ImageIds=[result["images"]["eu-west-1"]])["Images"]
    assert img["DeprecationTime"] == deprecations.times[result["images"]["eu-west-1"]]

    # re-run: the AMIs already have a deprecation time, which is kept (no write at all)
    again = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "aws")
    assert again["images"] == result["images"] and len(aws.actions("EnableImageDeprecation")) == 2


def test_deprecation_limits_are_checked_when_the_flavor_loads():
    from pydantic import ValidationError
    with pytest.raises(ValidationError, match="730"):
        aws_flavor(public=True, deprecate_after_days=800)
    with pytest.raises(ValidationError, match="deprecate_after_days"):
        aws_flavor(deprecate_after_days=0)
    assert deprecate_at(1, datetime(2026, 11, 26, 23, 59, 59, 999, tzinfo=UTC)) == \
        datetime(2026, 11, 27, 23, 59, tzinfo=UTC)


def _snapshot_ids(moto, flavor: str) -> set[str]:
    snaps = moto.client("ec2").describe_snapshots(
        OwnerIds=["self"], Filters=[{"Name": "tag:cos-flavor", "Values": [flavor]}])["Snapshots"]
    return {s["SnapshotId"] for s in snaps}


def test_gc_deletes_orphan_snapshots_once_old_enough(aws, cloud_build_dir):
    """moto cannot age a snapshot: the age rule is checked with the default (24 h: nothing
    fresh is touched) and with clouds.retention_orphan_hours: 0 (everything orphaned goes)."""
    flavor = aws_flavor(name="orphans", regions=["us-east-1"])
    paths = flavor_paths(flavor)
    live = publish.publish_stage(FlavorContext(flavor, paths, "0.1.0"), "aws")  # its snapshot backs a live image
    ebs = aws.moto.client("ebs")

    def tags(flavor_name: str, image: str, **extra) -> list[dict]:
        return [{"Key": k, "Value": v} for k, v in {"cos-flavor": flavor_name, "cos-image": image, **extra}.items()]

    # a killed publish: StartSnapshot with the flavor's tags, never completed
    killed = ebs.start_snapshot(VolumeSize=1, Tags=tags("orphans", "cos-orphans-0.2.0-x86_64-aaaaaaaaaaaa"))["SnapshotId"]
    # a publish that finished its upload but stopped before RegisterImage
    done = ebs.start_snapshot(VolumeSize=1, Tags=tags("orphans", "cos-orphans-0.3.0-x86_64-bbbbbbbbbbbb",
                                                       **{"cos-uploaded": "b" * 16}))["SnapshotId"]
    block = b"\1" * BLOCK
    ebs.put_snapshot_block(SnapshotId=done, BlockIndex=0, BlockData=block, DataLength=BLOCK, ChecksumAlgorithm="SHA256",
                           Checksum=base64.b64encode(hashlib.sha256(block).digest()).decode())
    ebs.complete_snapshot(SnapshotId=done, ChangedBlocksCount=1)
    # another flavor's leftover, just as orphaned
    other = ebs.start_snapshot(VolumeSize=1, Tags=tags("otherflavor", "cos-otherflavor-0.1.0-x86_64-cccccccccccc"))["SnapshotId"]
    everything = _snapshot_ids(aws.moto, "orphans") | {other}
    assert everything == {live["snapshot"], killed, done, other}

    default = FlavorContext(make_flavor({"aws": {"regions": ["us-east-1"]}}, name="orphans"), paths, "0.1.0")
    assert publish.gc([default]) == []
    assert publish.gc([default], apply=True) == []
    assert _snapshot_ids(aws.moto, "orphans") | {other} == everything  # nothing fresh is touched

    at_once = FlavorContext(make_flavor({"aws": {"regions": ["us-east-1"]}, "retention_orphan_hours": 0},
                                        name="orphans"), paths, "0.1.0")
    listed = publish.gc([at_once])
    assert sorted(i.image for i in listed) == sorted([f"snapshot:{killed}", f"snapshot:{done}"])
    assert any("cos-orphans-0.2.0" in e for i in listed for e in i.extras)
    assert _snapshot_ids(aws.moto, "orphans") | {other} == everything  # dry run
    assert aws.actions("DeleteSnapshot") == [] and aws.actions("DeregisterImage") == []

    publish.gc([at_once], apply=True)
    assert _snapshot_ids(aws.moto, "orphans") == {live["snapshot"]}
    assert _snapshot_ids(aws.moto, "otherflavor") == {other}
    assert len(images_named(aws.moto, "us-east-1", live["name"])) == 1
    assert publish.gc([at_once]) == []
