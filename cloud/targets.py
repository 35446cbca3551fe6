"""Typed cloud targets of a flavor. Lives in cloud/ so that cloud/ needs nothing
from pipeline/; pipeline.config embeds these models in the flavor model."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

# Names as the clouds allow them (charset and length; the clouds check the rest): a bad
# one fails when the config loads, not after the image build.
AwsRegion = Annotated[str, StringConstraints(pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]{1,2}$")]
S3Bucket = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9.-]{1,62}$")]
AwsAccount = Annotated[str, StringConstraints(pattern=r"^[0-9]{12}$")]
AzureName = Annotated[str, StringConstraints(pattern=r"^[-\w.()]{1,90}$")]     # resource group, gallery, image
AzureLocation = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]{1,40}$")]
StorageAccount = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]{1,24}$")]
Container = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{2,62}$")]
Uuid = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")]
GcpProject = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{0,62}$")]
GcsBucket = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,221}$")]
GcpName = Annotated[str, StringConstraints(pattern=r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")]
GcpLocation = Annotated[str, StringConstraints(pattern=r"^[a-z0-9-]{2,40}$")]
GcpLabelKey = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,62}$")]
GcpLabelValue = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{0,63}$")]
Feature = Annotated[str, StringConstraints(pattern=r"^[A-Z0-9_]{1,64}$")]
TagKey = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]{1,128}$")]
TagValue = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]{0,256}$")]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class AwsTarget(StrictModel):
    regions: list[AwsRegion] = Field(min_length=1, max_length=32, description="first region is where the AMI is registered; the rest get copies")
    upload: Literal["ebs-direct", "s3-import"] = "ebs-direct"
    bucket: S3Bucket | None = Field(None, description="S3 bucket, required for upload: s3-import")
    public: bool = False
    share_with_accounts: list[AwsAccount] = []
    tpm: bool = True
    imds_v2: bool = True
    volume_type: Literal["gp3", "gp2", "io1", "io2"] = "gp3"
    root_device: Literal["/dev/xvda", "/dev/sda1"] = "/dev/xvda"
    workers: int = Field(16, ge=1, le=128, description="EBS direct blocks in flight, over all processes")
    processes: int = Field(1, ge=1, le=64, description="EBS direct worker processes for uploads of 128 MiB "
                           "or more: one Python process sends ~350 MB/s per core at most; more help on idle cores")
    import_timeout_minutes: int = Field(90, ge=1, le=1440, description="deadline for ImportSnapshot (s3-import)")
    wait_minutes: int = Field(30, ge=1, le=1440, description="deadline for snapshots/images/copies to become available")
    deprecate_after_days: int | None = Field(
        None, ge=1, le=3650, description="EnableImageDeprecation on every AMI this many days after its publish "
                                         "(AWS allows up to 10 years; 2 for public AMIs)")
    tags: dict[TagKey, TagValue] = {}

    @model_validator(mode="after")
    def _bucket_for_import(self) -> AwsTarget:
        if self.upload == "s3-import" and not self.bucket:
            raise ValueError("upload: s3-import needs a bucket (the S3 bucket to stage the raw disk in)")
        return self

    @model_validator(mode="after")
    def _public_deprecation(self) -> AwsTarget:
        if self.public and self.deprecate_after_days and self.deprecate_after_days > 730:
            raise ValueError("deprecate_after_days: AWS allows at most 730 (2 years) for public AMIs")
        return self


class AzureTarget(StrictModel):
    subscription_id: Uuid | None = Field(None, description="defaults to $AZURE_SUBSCRIPTION_ID")
    resource_group: AzureName
    location: AzureLocation
    upload: Literal["page-blob", "managed-disk"] = Field(
        "page-blob", description="page-blob: storage account -> image; managed-disk: direct upload, no storage account")
    storage_account: StorageAccount | None = Field(None, description="required for upload: page-blob")
    container: Container = "cos-images"
    gallery: AzureName | None = None
    gallery_image: AzureName | None = None
    replica_locations: list[AzureLocation] = []
    workers: int = Field(8, ge=1, le=64)
    wait_minutes: int = Field(30, ge=1, le=1440)
    tags: dict[TagKey, TagValue] = {}

    @model_validator(mode="after")
    def _gallery_pair(self) -> AzureTarget:
        if bool(self.gallery) != bool(self.gallery_image):
            raise ValueError("gallery and gallery_image go together (the gallery and its image definition)")
        return self

    @model_validator(mode="after")
    def _account_for_page_blob(self) -> AzureTarget:
        if self.upload == "page-blob" and not self.storage_account:
            raise ValueError("upload: page-blob needs storage_account (the account that holds the VHD page blob); "
                             "or set upload: managed-disk to upload with no storage account")
        return self


class GcpTarget(StrictModel):
    project: GcpProject
    bucket: GcsBucket
    family: GcpName | None = None
    guest_os_features: list[Feature] = ["UEFI_COMPATIBLE", "VIRTIO_SCSI_MULTIQUEUE", "GVNIC"]
    deprecate_previous: bool = True
    storage_locations: list[GcpLocation] = []
    wait_minutes: int = Field(30, ge=1, le=1440)
    labels: dict[GcpLabelKey, GcpLabelValue] = {}

    @model_validator(mode="after")
    def _uefi(self) -> GcpTarget:
        if "UEFI_COMPATIBLE" not in self.guest_os_features:
            raise ValueError("guest_os_features must include UEFI_COMPATIBLE (the disk boots with UEFI)")
        return self


class CloudTargets(StrictModel):
    aws: AwsTarget | None = None
    azure: AzureTarget | None = None
    gcp: GcpTarget | None = None
    retention_keep: int = Field(5, ge=1, description="cloud-gc keeps this many newest images per flavor")
    retention_max_age_days: int | None = Field(None, ge=0, description="cloud-gc deletes only images also older than this")
    retention_orphan_hours: int = Field(24, ge=0, description="cloud-gc deletes leftover snapshots/blobs of stopped "
                                                              "publishes only once they are this old (0: at once)")
