"""One uploader per cloud behind one interface (see cloud/base.py).

SDKs are imported only when a cloud is used, so `doit list` and up-to-date checks
stay fast and a missing SDK only matters for the cloud that needs it.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Uploader

CLOUDS = ("aws", "azure", "gcp")
# The build artifact each cloud takes (manifest kinds).
ARTIFACT_KIND = {"aws": "raw", "azure": "azure-vhd", "gcp": "gce-tar"}
_CLASSES = {"aws": "cloud.aws:AwsUploader", "azure": "cloud.azure:AzureUploader", "gcp": "cloud.gcp:GcpUploader"}


def uploader_class(cloud: str) -> type[Uploader]:
    module, name = _CLASSES[cloud].split(":")
    return getattr(import_module(module), name)
