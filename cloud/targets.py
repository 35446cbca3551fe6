"""Typed cloud targets of a flavor. Lives in cloud/ so that cloud/ needs nothing
from pipeline/; pipeline.config embeds these models in the flavor model."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AwsTarget(StrictModel):
    regions: list[str] = Field(min_length=1, description="first region is where the AMI is registered; the rest get copies")
    upload: Literal["ebs-direct", "s3-import"] = "ebs-direct"
    bucket: str | None = Field(None, description="S3 bucket, required for upload: s3-import")
    public: bool = False
    share_with_accounts: list[str] = []
    tpm: bool = True
    imds_v2: bool = True
    volume_type: Literal["gp3", "gp2", "io1", "io2"] = "gp3"
    workers: int = Field(16, ge=1, le=128)
    tags: dict[str, str] = {}


class AzureTarget(StrictModel):
    subscription_id: str | None = Field(None, description="defaults to $AZURE_SUBSCRIPTION_ID")
    resource_group: str
    location: str
    storage_account: str
    container: str = "cos-images"
    gallery: str | None = None
    gallery_image: str | None = None
    replica_locations: list[str] = []
    tags: dict[str, str] = {}


class GcpTarget(StrictModel):
    project: str
    bucket: str
    family: str | None = None
    guest_os_features: list[str] = ["UEFI_COMPATIBLE", "VIRTIO_SCSI_MULTIQUEUE", "GVNIC"]
    deprecate_previous: bool = True
    storage_locations: list[str] = []
    labels: dict[str, str] = {}


class CloudTargets(StrictModel):
    aws: AwsTarget | None = None
    azure: AzureTarget | None = None
    gcp: GcpTarget | None = None
    retention_keep: int = Field(5, ge=1, description="cloud-gc keeps this many newest images per flavor")
