"""AWS: raw GPT disk -> EBS snapshot -> AMI (UEFI, ENA, IMDSv2, TPM, Secure Boot) -> copies/sharing.

Secure Boot: RegisterImage carries UefiData, a UEFI variable store in AWS's format with
Microsoft's PK/KEK/db enrolled and Secure Boot on (made by virt-firmware), so the
instance's firmware runs the distro's Microsoft-signed shim and nothing unsigned.

Default upload is the EBS direct API (seconds, parallel 512 KiB blocks); S3 multipart
+ ImportSnapshot is the fallback (minutes). Endpoints and credentials come from boto3's
standard chain (AWS_ENDPOINT_URL[_EC2|_EBS|_S3], profiles, instance roles).
"""
from __future__ import annotations

import base64
import functools
import hashlib
import logging
import os
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError
from virt.firmware.efi import efivar
from virt.firmware.varstore.aws import AwsVarStore

from . import ebs_direct
from .aws_client import aws_error, client_config
from .base import TAG_FLAVOR, TAG_IMAGE, GcItem, ImageSpec, Uploader, require_file, select_for_gc, wait_until
from .disk import blocks_with_data, data_extents
from .errors import PublishError
from .progress import Progress
from .targets import AwsTarget

log = logging.getLogger("cos.cloud.aws")

GIB = 1024 ** 3
TAG_UPLOADED = "cos-uploaded"  # set on a snapshot once all its blocks are in
ARCH = {"x86_64": "x86_64", "arm64": "arm64"}


@functools.cache
def uefi_data() -> str:
    """AWS UefiData (base64): Microsoft's PK and KEKs, Microsoft's db (Windows and the
    third-party UEFI CA that signs shim, 2011 and 2023), Secure Boot on. The same bytes
    on every run (virt-firmware writes no times), so re-runs register the same AMI."""
    store = efivar.EfiVarList()
    store.enroll_platform_microsoft(ms_kek="all")
    store.add_microsoft_keys(ms_db="all")
    store.enable_secureboot()
    return AwsVarStore.base64_varstore(store).decode()


def deprecate_at(days: int, now: datetime | None = None) -> datetime:
    """now + days in UTC, whole minutes: EC2 takes YYYY-MM-DDTHH:MM:SSZ and rounds seconds."""
    now = now or datetime.now(UTC)
    return (now.astimezone(UTC) + timedelta(days=days)).replace(second=0, microsecond=0)


def _tags(d: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in sorted(d.items())]


class AwsUploader(Uploader):
    cloud = "aws"
    target: AwsTarget

    def __init__(self, target: AwsTarget, spec: ImageSpec, *, dry_run: bool | None = None,
                 session: boto3.Session | None = None):
        super().__init__(target, spec, dry_run=dry_run)
        self.session = session or boto3.Session()
        self.region = target.regions[0]
        self._clients: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self.tags = {**spec.tags, **target.tags}
        self.snapshot_id: str | None = None
        self.image_id: str | None = None
        self.images: dict[str, str] = {}
        self.s3_key: str | None = None

    def client(self, service: str, region: str | None = None):
        key = (service, region or self.region)
        with self._lock:
            if key not in self._clients:
                self._clients[key] = self.session.client(service, region_name=key[1],
                                                         config=client_config(self.target.workers))
            return self._clients[key]

    def call(self, service: str, op: str, region: str | None = None, **kw) -> dict:
        try:
            return getattr(self.client(service, region), op)(**kw)
        except (ClientError, BotoCoreError) as exc:
            raise aws_error(exc, f"{op} in {region or self.region}") from exc

    # -- preflight / lookups ---------------------------------------------------------
    def preflight(self) -> None:
        self.size = require_file(self.spec.disk, "aws", "raw")
        if self.size % 512:
            raise PublishError(f"aws: {self.spec.disk}: size {self.size} is not a multiple of 512 bytes",
                               "the raw disk must be whole sectors")
        if self.spec.arch not in ARCH:
            raise PublishError(f"aws: architecture {self.spec.arch!r} is not supported (x86_64, arm64)")
        self.call("sts", "get_caller_identity")  # credentials work (never printed)
        if self.target.upload == "s3-import":
            self.call("s3", "head_bucket", Bucket=self.target.bucket)

    def _image_by_name(self, region: str) -> dict | None:
        images = self.call("ec2", "describe_images", region, Owners=["self"],
                           Filters=[{"Name": "name", "Values": [self.spec.name]}])["Images"]
        live = [i for i in images if i.get("State") in ("available", "pending")]
        return sorted(live, key=lambda i: i.get("CreationDate", ""))[0] if live else None

    def find_existing(self) -> bool:
        image = self._image_by_name(self.region)
        if image:
            self.image_id = image["ImageId"]
            self.images[self.region] = self.image_id
            if image["State"] == "pending" and not self.dry_run:  # an earlier run stopped after RegisterImage
                self._wait_available(self.region, self.image_id)
            mappings = image.get("BlockDeviceMappings") or []
            self.snapshot_id = next((m["Ebs"]["SnapshotId"] for m in mappings if m.get("Ebs", {}).get("SnapshotId")), None)
        return image is not None

    def _our_snapshots(self) -> list[dict]:
        return self.call("ec2", "describe_snapshots", OwnerIds=["self"],
                         Filters=[{"Name": f"tag:{TAG_IMAGE}", "Values": [self.spec.name]}])["Snapshots"]

    def plan(self) -> list[str]:
        if self.find_existing():
            steps = [f"reuse {self.image_id} ({self.spec.name}) in {self.region}"]
        else:
            data = sum(e - s for s, e in self._extents())
            done = self._uploaded_snapshot()
            steps = [f"reuse uploaded snapshot {done}" if done else
                     f"upload {self.spec.disk.name} ({data / 1e6:.1f} MB of data, {self.size / 1e6:.1f} MB nominal) "
                     f"via {self.target.upload} to a new snapshot in {self.region}",
                     f"register {self.spec.name} (uefi, {self.spec.arch}, ena, imds {'v2.0' if self.target.imds_v2 else 'v1'}"
                     f"{', tpm v2.0' if self.target.tpm else ''}"
                     f"{', secure boot: UefiData with Microsoft keys' if self.spec.secure_boot else ''}) in {self.region}"]
        for region in self.target.regions[1:]:
            found = self._image_by_name(region)
            steps.append(f"reuse copy {found['ImageId']} in {region}" if found else f"copy to {region}")
        if self.target.public:
            steps.append("grant public launch permission")
        if self.target.share_with_accounts:
            steps.append(f"share with accounts {', '.join(self.target.share_with_accounts)}")
        if self.target.deprecate_after_days:
            steps.append(f"deprecate the AMIs at {deprecate_at(self.target.deprecate_after_days):%Y-%m-%dT%H:%MZ} "
                         f"(in {self.target.deprecate_after_days} days; AMIs that have a deprecation time keep it)")
        return steps

    def _extents(self) -> list[tuple[int, int]]:
        fd = os.open(self.spec.disk, os.O_RDONLY)
        try:
            return list(data_extents(fd, self.size))
        finally:
            os.close(fd)

    # -- upload ------------------------------------------------------------------------
    def _uploaded_snapshot(self) -> str | None:
        """A complete snapshot of this disk from an earlier run that stopped before RegisterImage."""
        for snap in self._our_snapshots():
            tags = {t["Key"]: t["Value"] for t in snap.get("Tags", [])}
            if snap["State"] == "completed" and tags.get(TAG_UPLOADED) == self.spec.disk_sha256[:16]:
                return snap["SnapshotId"]
        return None

    def upload(self) -> None:
        self.snapshot_id = self._uploaded_snapshot()
        if self.snapshot_id:
            log.info("aws: snapshot %s of %s exists; reusing it", self.snapshot_id, self.spec.name)
            return
        for snap in self._our_snapshots():
            # a killed earlier run's unfinished snapshot: remove it (it can never complete)
            log.info("aws: removing unfinished snapshot %s (%s) of an earlier run", snap["SnapshotId"], snap["State"])
            try:
                self.client("ec2").delete_snapshot(SnapshotId=snap["SnapshotId"])
            except ClientError as exc:
                log.warning("aws: could not delete %s (cloud-gc removes it after clouds.retention_orphan_hours): %s", snap["SnapshotId"], exc)
        if self.target.upload == "ebs-direct":
            self._upload_ebs_direct()
        else:
            self._upload_s3_import()
        wait_until(self._snapshot_completed, f"snapshot {self.snapshot_id} to complete",
                   self.target.wait_minutes * 60)
        # Marks the snapshot as whole: a killed run's snapshot never gets this tag.
        self.call("ec2", "create_tags", Resources=[self.snapshot_id],
                  Tags=[{"Key": TAG_UPLOADED, "Value": self.spec.disk_sha256[:16]}])

    def _snapshot_completed(self) -> bool:
        snap = self.call("ec2", "describe_snapshots", SnapshotIds=[self.snapshot_id])["Snapshots"][0]
        if snap["State"] == "error":
            raise PublishError(f"aws: snapshot {self.snapshot_id} ended in state error: {snap.get('StateMessage', '')}")
        return snap["State"] == "completed"

    def _upload_ebs_direct(self) -> None:
        fd = os.open(self.spec.disk, os.O_RDONLY)
        try:
            indexes = list(blocks_with_data(fd, self.size, ebs_direct.BLOCK))
        finally:
            os.close(fd)
        started = self.call("ebs", "start_snapshot", VolumeSize=max(1, -(-self.size // GIB)),
                            ClientToken=str(uuid.uuid4()),  # makes botocore's retries of this call safe
                            Description=f"{self.spec.name} ({self.spec.description})"[:255],
                            Tags=_tags(self.tags), Timeout=60)
        self.snapshot_id = started["SnapshotId"]
        self.created.append(f"snapshot:{self.snapshot_id}")
        creds = self.session.get_credentials().get_frozen_credentials()
        processes = self.target.processes
        job = ebs_direct.Job(
            path=str(self.spec.disk), size=self.size, snapshot_id=self.snapshot_id, region=self.region,
            endpoint_url=self.client("ebs").meta.endpoint_url, credentials=(creds.access_key, creds.secret_key, creds.token),
            threads=max(1, -(-self.target.workers // processes)),
            # All-zero blocks read back as zeros from an unencrypted snapshot without a
            # parent, so skipping them is safe there; for encrypted ones only holes are skipped.
            skip_zero=not started.get("KmsKeyArn"))
        self.progress = Progress(f"aws ebs-direct {self.snapshot_id}", len(indexes) * ebs_direct.BLOCK)
        digests = ebs_direct.upload_blocks(job, indexes, processes, self.progress.add, client=self.client("ebs"))
        self.progress.done()
        ordered = b"".join(digests[i] for i in sorted(digests))
        self.call("ebs", "complete_snapshot", SnapshotId=self.snapshot_id, ChangedBlocksCount=len(digests),
                  Checksum=base64.b64encode(hashlib.sha256(ordered).digest()).decode(),
                  ChecksumAlgorithm="SHA256", ChecksumAggregationMethod="LINEAR")

    def _upload_s3_import(self) -> None:
        bucket = self.target.bucket
        self.s3_key = f"cos-import/{self.spec.name}.raw"
        self.progress = Progress(f"aws s3 s3://{bucket}/{self.s3_key}", self.size)
        try:
            self.client("s3").upload_file(
                str(self.spec.disk), bucket, self.s3_key, Callback=self.progress.add,
                Config=TransferConfig(multipart_chunksize=64 * 1024 * 1024, max_concurrency=self.target.workers),
                ExtraArgs={"Tagging": urlencode(sorted(self.tags.items()))})
        except (ClientError, BotoCoreError, boto3.exceptions.S3UploadFailedError) as exc:
            raise aws_error(exc, f"upload to s3://{bucket}/{self.s3_key}") from exc
        self.progress.done()
        task = self.call("ec2", "import_snapshot", ClientToken=self.spec.token("import", str(time.time())),
                         Description=self.spec.name,
                         DiskContainer={"Format": "RAW", "UserBucket": {"S3Bucket": bucket, "S3Key": self.s3_key}},
                         TagSpecifications=[{"ResourceType": "import-snapshot-task", "Tags": _tags(self.tags)}])
        task_id = task["ImportTaskId"]
        last: list[tuple[str, str] | str] = [""]

        def finished() -> str | None:
            detail = self.call("ec2", "describe_import_snapshot_tasks", ImportTaskIds=[task_id]
                               )["ImportSnapshotTasks"][0]["SnapshotTaskDetail"]
            status, message = detail.get("Status"), detail.get("StatusMessage", "")
            if (status, message) != last[0]:
                log.info("aws: import %s: %s %s %s", task_id, status, message, detail.get("Progress", ""))
                last[0] = (status, message)
            if status == "completed":
                return detail["SnapshotId"]
            if status in ("deleting", "deleted") or "error" in message.lower():
                raise PublishError(f"aws: ImportSnapshot {task_id} failed: {status}: {message}",
                                   "check the vmimport service role and the S3 object (docs/clouds.md)")
            return None

        try:
            self.snapshot_id = wait_until(finished, f"ImportSnapshot {task_id}",
                                          self.target.import_timeout_minutes * 60, interval_s=15)
        except TimeoutError:
            try:  # our deadline, not AWS's: stop the task so it does not finish unseen
                self.client("ec2").cancel_import_task(ImportTaskId=task_id)
            except (ClientError, BotoCoreError) as exc:
                log.warning("aws: could not cancel %s: %s", task_id, exc)
            raise PublishError(f"aws: ImportSnapshot {task_id} did not finish within "
                               f"{self.target.import_timeout_minutes} min (last: {last[0]})",
                               "raise import_timeout_minutes, or use upload: ebs-direct") from None
        self.created.append(f"snapshot:{self.snapshot_id}")
        self.call("ec2", "create_tags", Resources=[self.snapshot_id], Tags=_tags(self.tags))  # import drops them

    # -- register / share ---------------------------------------------------------------
    def register_params(self) -> dict[str, Any]:
        t = self.target
        params: dict[str, Any] = dict(
            Name=self.spec.name, Description=(self.spec.description or self.spec.name)[:255],
            Architecture=ARCH[self.spec.arch], VirtualizationType="hvm", BootMode="uefi",
            RootDeviceName=t.root_device, EnaSupport=True, SriovNetSupport="simple",
            BlockDeviceMappings=[{"DeviceName": t.root_device,
                                  "Ebs": {"SnapshotId": self.snapshot_id, "VolumeType": t.volume_type,
                                          "DeleteOnTermination": True}}],
            TagSpecifications=[{"ResourceType": "image", "Tags": _tags(self.tags)}])
        if t.imds_v2:
            params["ImdsSupport"] = "v2.0"
        if t.tpm:  # NitroTPM needs BootMode uefi (set above)
            params["TpmSupport"] = "v2.0"
        if self.spec.secure_boot:
            params["UefiData"] = uefi_data()
        return params

    def register(self) -> None:
        try:
            self.image_id = self.client("ec2").register_image(**self.register_params())["ImageId"]
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "InvalidAMIName.Duplicate" or not self.find_existing():
                raise aws_error(exc, f"RegisterImage {self.spec.name}") from exc
        assert self.image_id is not None  # registered, or found by find_existing()
        self.images[self.region] = self.image_id
        self._wait_available(self.region, self.image_id)
        log.info("aws: registered %s as %s in %s", self.spec.name, self.image_id, self.region)

    def _wait_available(self, region: str, image_id: str) -> None:
        def available() -> bool:
            image = self.call("ec2", "describe_images", region, ImageIds=[image_id])["Images"][0]
            if image["State"] in ("failed", "error", "invalid"):
                raise PublishError(f"aws: image {image_id} in {region} is {image['State']}: "
                                   f"{image.get('StateReason', {}).get('Message', '')}")
            return image["State"] == "available"
        wait_until(available, f"image {image_id} in {region}", self.target.wait_minutes * 60, interval_s=10)

    def share(self) -> None:
        others = self.target.regions[1:]
        if others:
            with ThreadPoolExecutor(len(others), thread_name_prefix="aws-copy") as pool:
                for region, image_id in zip(others, pool.map(self._copy_to, others)):
                    self.images[region] = image_id
        perms = ([{"Group": "all"}] if self.target.public else []) + \
            [{"UserId": a} for a in self.target.share_with_accounts]
        if perms:
            for region, image_id in self.images.items():  # Add is idempotent
                self.call("ec2", "modify_image_attribute", region, ImageId=image_id,
                          LaunchPermission={"Add": perms})
        if self.target.deprecate_after_days:
            self._deprecate(deprecate_at(self.target.deprecate_after_days))

    def _deprecate(self, at: datetime) -> None:
        """EnableImageDeprecation on every AMI of this publish. An AMI that already shows a
        DeprecationTime keeps it: a re-run changes nothing, and re-publishing the same
        content later does not push its end of life further out."""
        for region, image_id in self.images.items():
            image = self.call("ec2", "describe_images", region, ImageIds=[image_id])["Images"][0]
            if image.get("DeprecationTime"):
                log.info("aws: %s in %s already deprecates at %s", image_id, region, image["DeprecationTime"])
                continue
            self.call("ec2", "enable_image_deprecation", region, ImageId=image_id, DeprecateAt=at)
            log.info("aws: %s in %s deprecates at %s", image_id, region, at.isoformat())

    def _copy_to(self, region: str) -> str:
        found = self._image_by_name(region)
        if found:
            image_id = found["ImageId"]
        else:
            image_id = self.call("ec2", "copy_image", region, Name=self.spec.name, SourceImageId=self.image_id,
                                 SourceRegion=self.region, Description=self.spec.description or self.spec.name,
                                 ClientToken=self.spec.token("copy", region), CopyImageTags=True)["ImageId"]
            log.info("aws: copying %s to %s as %s", self.image_id, region, image_id)
        self._wait_available(region, image_id)
        return image_id

    def cleanup(self, failed: bool) -> None:
        if self.s3_key:
            try:
                self.client("s3").delete_object(Bucket=self.target.bucket, Key=self.s3_key)
            except ClientError as exc:
                log.warning("aws: could not delete staging object %s: %s", self.s3_key, exc)
        if failed and self.snapshot_id and not self.image_id and f"snapshot:{self.snapshot_id}" in self.created:
            log.info("aws: removing snapshot %s of the failed publish", self.snapshot_id)
            self.client("ec2").delete_snapshot(SnapshotId=self.snapshot_id)
            self.created.remove(f"snapshot:{self.snapshot_id}")

    def result(self) -> dict[str, Any]:
        return {"name": self.spec.name, "images": dict(self.images), "snapshot": self.snapshot_id,
                "region": self.region}

    # -- cloud-gc -------------------------------------------------------------------
    def gc_candidates(self, keep: int, max_age_days: int | None) -> list[GcItem]:
        items = []
        for region in self.target.regions:
            images = [i for i in self.call("ec2", "describe_images", region, Owners=["self"],
                                           Filters=[{"Name": "name", "Values": [f"cos-{self.spec.flavor}-*"]}])["Images"]
                      if self._is_ours(i)]
            items += self._orphan_snapshots(region, images)
            for image in select_for_gc([(i.get("CreationDate", ""), i) for i in images], keep, max_age_days):
                snaps = [m["Ebs"]["SnapshotId"] for m in image.get("BlockDeviceMappings") or []
                         if m.get("Ebs", {}).get("SnapshotId")]
                tagged = self.call("ec2", "describe_snapshots", region, OwnerIds=["self"],
                                   Filters=[{"Name": f"tag:{TAG_IMAGE}", "Values": [image["Name"]]}])["Snapshots"]
                snaps += [s["SnapshotId"] for s in tagged if s["SnapshotId"] not in snaps]
                items.append(GcItem("aws", region, image["ImageId"], image.get("CreationDate", ""), snaps))
        return items

    def _is_ours(self, image: dict) -> bool:
        """This flavor's image: by its tag, or by its name when the tag is missing."""
        tags = {t["Key"]: t["Value"] for t in image.get("Tags") or []}
        if TAG_FLAVOR in tags:
            return tags[TAG_FLAVOR] == self.spec.flavor
        return re.match(rf"cos-{re.escape(self.spec.flavor)}-[0-9]", image.get("Name", "")) is not None

    def _orphan_snapshots(self, region: str, images: list[dict]) -> list[GcItem]:
        """Snapshots of this flavor left by stopped/failed runs: no image uses them (by name
        tag or by block device mapping), and older than orphan_hours (so that a publish
        running right now is not disturbed)."""
        snaps = self.call("ec2", "describe_snapshots", region, OwnerIds=["self"],
                          Filters=[{"Name": f"tag:{TAG_FLAVOR}", "Values": [self.spec.flavor]}])["Snapshots"]
        names = {i["Name"] for i in images}
        used = {m["Ebs"]["SnapshotId"] for i in images for m in i.get("BlockDeviceMappings") or []
                if m.get("Ebs", {}).get("SnapshotId")}
        cutoff = datetime.now(UTC) - timedelta(hours=self.orphan_hours)
        out = []
        for snap in snaps:
            tags = {t["Key"]: t["Value"] for t in snap.get("Tags", [])}
            if tags.get(TAG_IMAGE) not in names and snap["SnapshotId"] not in used and snap["StartTime"] <= cutoff:
                out.append(GcItem("aws", region, f"snapshot:{snap['SnapshotId']}", snap["StartTime"].isoformat(),
                                  [f"orphan of {tags.get(TAG_IMAGE)} ({snap['State']})"]))
        return out

    def gc_delete(self, item: GcItem) -> None:
        if item.image.startswith("snapshot:"):
            self.call("ec2", "delete_snapshot", item.where, SnapshotId=item.image.split(":", 1)[1])
            return
        self.call("ec2", "deregister_image", item.where, ImageId=item.image)
        for snap in item.extras:
            try:
                self.client("ec2", item.where).delete_snapshot(SnapshotId=snap)
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "InvalidSnapshot.NotFound":
                    raise aws_error(exc, f"DeleteSnapshot {snap} in {item.where}") from exc

