"""Azure: fixed VHD -> page blob (only non-zero 4 MiB ranges) -> managed image
(Hyper-V generation V2, for UEFI) -> Compute Gallery image version when configured.

Credentials: azure-identity's DefaultAzureCredential (environment, workload or managed
identity, Azure CLI...). Storage: $AZURE_STORAGE_CONNECTION_STRING when it names the
target's account, else the account's default endpoint with the same credential. ARM:
the public endpoint unless $COS_AZURE_ARM_ENDPOINT names another (sovereign clouds,
Azure Stack, tests). Nothing here prints credentials.
"""
from __future__ import annotations

import logging
import os
import re
import struct
from typing import Any

from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import BlobServiceClient, ExponentialRetry

from .base import TAG_CREATED, TAG_FLAVOR, GcItem, ImageSpec, Uploader, require_file, select_for_gc
from .disk import blocks_with_data, for_each_block, is_zero, read_block
from .errors import PublishError
from .progress import Progress
from .targets import AzureTarget

log = logging.getLogger("cos.cloud.azure")

ARM_ENDPOINT_ENV = "COS_AZURE_ARM_ENDPOINT"
CHUNK = 4 * 1024 * 1024       # largest Put Page
MIB = 1024 * 1024
META_SHA = "cos_sha256"       # set on the blob once every page is in
ARCH = {"x86_64": "x64", "arm64": "Arm64"}
VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
POLL_S = 1                    # LRO poll interval when ARM sends no Retry-After (SDK default: 30 s)


def _meta(tags: dict[str, str]) -> dict[str, str]:
    """Blob metadata names must be C# identifiers: cos-flavor -> cos_flavor."""
    return {re.sub(r"\W", "_", k): v for k, v in tags.items()}


def _azure_error(exc: Exception, what: str) -> PublishError:
    code = getattr(exc, "error_code", None) or getattr(getattr(exc, "error", None), "code", None)
    msg = getattr(exc, "message", None) or str(exc)
    hint = "check the Azure roles listed in docs/clouds.md" if code in (
        "AuthorizationFailed", "AuthorizationPermissionMismatch", "LinkedAuthorizationFailed") else None
    return PublishError(f"azure: {what} failed: {code or type(exc).__name__}: {msg.splitlines()[0] if msg else ''}", hint)


def check_fixed_vhd(path, size: int) -> None:
    """Azure takes a fixed VHD whose virtual size is a whole number of MiB."""
    with open(path, "rb") as f:
        f.seek(size - 512)
        footer = f.read(512)
    disk_type = struct.unpack(">I", footer[60:64])[0] if len(footer) == 512 else 0
    if footer[:8] != b"conectix" or disk_type != 2:
        raise PublishError(f"azure: {path} is not a fixed VHD (no 'conectix' footer of disk type 2)",
                           "make it with: qemu-img convert -O vpc -o subformat=fixed,force_size")
    if (size - 512) % MIB:
        raise PublishError(f"azure: {path}: virtual size {size - 512} is not a whole number of MiB",
                           "Azure refuses it; pad the raw disk to a MiB boundary before conversion")


class AzureUploader(Uploader):
    cloud = "azure"
    target: AzureTarget

    def __init__(self, target: AzureTarget, spec: ImageSpec, *, dry_run: bool | None = None, credential=None):
        super().__init__(target, spec, dry_run=dry_run)
        self._credential = credential
        self.tags = {**spec.tags, **target.tags}
        self.blob_name = f"{spec.name}.vhd"
        self.image: Any = None
        self.version: Any = None
        self.blob_created = False
        self._compute = None
        self.use_gallery = bool(target.gallery)

    # -- clients -------------------------------------------------------------------
    @property
    def credential(self):
        if self._credential is None:
            from azure.identity import DefaultAzureCredential
            self._credential = DefaultAzureCredential(exclude_interactive_browser_credential=True)
        return self._credential

    @property
    def subscription(self) -> str:
        sub = self.target.subscription_id or os.environ.get("AZURE_SUBSCRIPTION_ID")
        if not sub:
            raise PublishError("azure: no subscription id",
                               "set clouds.azure.subscription_id or $AZURE_SUBSCRIPTION_ID")
        return sub

    @property
    def compute(self):
        if self._compute is None:
            from azure.mgmt.compute import ComputeManagementClient
            kw = {"base_url": os.environ[ARM_ENDPOINT_ENV]} if os.environ.get(ARM_ENDPOINT_ENV) else {}
            self._compute = ComputeManagementClient(self.credential, self.subscription, **kw)
        return self._compute

    def blob_service(self) -> BlobServiceClient:
        # Short back-off: the SDK's default waits 15 s before the first retry of a page.
        kw = {"retry_policy": ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=8),
              "max_single_put_size": CHUNK}
        conn = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
        if conn:
            account = dict(p.split("=", 1) for p in conn.split(";") if "=" in p).get("AccountName")
            if account != self.target.storage_account:
                raise PublishError(f"azure: $AZURE_STORAGE_CONNECTION_STRING is for account {account!r}, "
                                   f"the target wants {self.target.storage_account!r}",
                                   "unset it to use the target's account with your Azure login")
            return BlobServiceClient.from_connection_string(conn, **kw)
        # The SDK fills in the public endpoint suffix for the account.
        return BlobServiceClient.from_connection_string(
            f"DefaultEndpointsProtocol=https;AccountName={self.target.storage_account}",
            credential=self.credential, **kw)

    def arm(self, what: str, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except (AzureError, HttpResponseError) as exc:
            raise _azure_error(exc, what) from exc

    # -- preflight / lookups -------------------------------------------------------
    def preflight(self) -> None:
        self.size = require_file(self.spec.disk, "azure", "azure-vhd")
        check_fixed_vhd(self.spec.disk, self.size)
        if self.spec.arch not in ARCH:
            raise PublishError(f"azure: architecture {self.spec.arch!r} is not supported (x86_64, arm64)")
        self.blob = self.blob_service().get_container_client(self.target.container).get_blob_client(self.blob_name)
        if self.target.gallery and not VERSION_RE.match(self.spec.version):
            # Gallery versions are MAJOR.MINOR.PATCH and immutable: dev builds (1.2.3-gabc) get the image only.
            log.warning("azure: version %s is not MAJOR.MINOR.PATCH: no gallery image version for this build "
                        "(the managed image is still made)", self.spec.version)
            self.use_gallery = False
        if self.use_gallery:
            t = self.target
            gimg = self.arm(f"get gallery image {t.gallery}/{t.gallery_image}", self.compute.gallery_images.get,
                            t.resource_group, t.gallery, t.gallery_image)
            want = ARCH[self.spec.arch]
            if (gimg.hyper_v_generation or "V1") != "V2" or (gimg.architecture or "x64") != want:
                raise PublishError(f"azure: gallery image {t.gallery}/{t.gallery_image} is "
                                   f"{gimg.hyper_v_generation}/{gimg.architecture}, this disk needs V2/{want}",
                                   "create an image definition with hyperVGeneration V2 and the flavor's architecture")

    def _get_image(self):
        try:
            return self.compute.images.get(self.target.resource_group, self.spec.name)
        except ResourceNotFoundError:
            return None
        except (AzureError, HttpResponseError) as exc:
            raise _azure_error(exc, f"get image {self.spec.name}") from exc

    def find_existing(self) -> bool:
        image = self._get_image()
        if image is not None and image.provisioning_state == "Succeeded":
            self.image = image
            return True
        return False

    def _blob_complete(self) -> bool:
        try:
            props = self.blob.get_blob_properties()
        except ResourceNotFoundError:
            return False
        except AzureError as exc:
            raise _azure_error(exc, f"read blob {self.blob_name}") from exc
        return props.metadata.get(META_SHA) == self.spec.disk_sha256

    def plan(self) -> list[str]:
        t = self.target
        steps = []
        if self.find_existing():
            steps.append(f"reuse image {self.image.id}")
        else:
            if self._blob_complete():
                steps.append(f"reuse uploaded blob {self.blob.url}")
            else:
                steps.append(f"upload {self.spec.disk.name} ({self.size / 1e6:.1f} MB nominal; zero 4 MiB ranges skipped) "
                             f"to page blob {self.blob.url}")
            steps.append(f"create image {self.spec.name} (HyperVGeneration V2) in {t.resource_group}/{t.location}")
        if self.use_gallery:
            steps.append(f"create gallery image version {t.gallery}/{t.gallery_image}/{self.spec.version} "
                         f"in {', '.join([t.location, *t.replica_locations])} (unless it exists)")
        return steps

    # -- upload ------------------------------------------------------------------
    def upload(self) -> None:
        if self._blob_complete():
            log.info("azure: blob %s holds this disk already; reusing it", self.blob_name)
            return
        container = self.blob_service().get_container_client(self.target.container)
        try:
            container.create_container()
        except ResourceExistsError:
            pass
        except AzureError as exc:
            raise _azure_error(exc, f"create container {self.target.container}") from exc
        meta = _meta(self.tags)
        try:
            self.blob.create_page_blob(self.size, metadata=meta, if_none_match="*")
        except ResourceExistsError:  # an unfinished upload of an earlier run: start it over
            log.info("azure: blob %s is incomplete (earlier run stopped); recreating it", self.blob_name)
            self.arm(f"recreate page blob {self.blob_name}", self.blob.create_page_blob, self.size, metadata=meta)
        except AzureError as exc:
            raise _azure_error(exc, f"create page blob {self.blob_name}") from exc
        self.blob_created = True
        self._put_pages()
        # Marks the blob as whole; a killed run's blob never gets this.
        self.arm(f"set metadata of {self.blob_name}", self.blob.set_blob_metadata,
                 {**meta, META_SHA: self.spec.disk_sha256})

    def _put_pages(self) -> None:
        fd = os.open(self.spec.disk, os.O_RDONLY)
        try:
            chunks = list(blocks_with_data(fd, self.size, CHUNK))
            self.progress = Progress(f"azure page blob {self.blob_name}", min(len(chunks) * CHUNK, self.size))

            def put(index: int) -> None:
                offset = index * CHUNK
                data = read_block(fd, index, CHUNK, self.size)[:self.size - offset]
                if is_zero(data):  # page blobs start zeroed
                    return
                self.blob.upload_page(data, offset=offset, length=len(data))
                self.progress.add(len(data))

            for_each_block(chunks, put, self.target.workers, "azure-page")
        except AzureError as exc:
            raise _azure_error(exc, f"upload pages of {self.blob_name}") from exc
        finally:
            os.close(fd)
        self.progress.done()

    # -- register / share -------------------------------------------------------------
    def register(self) -> None:
        from azure.mgmt.compute.models import Image, ImageOSDisk, ImageStorageProfile
        t = self.target
        image = Image(location=t.location, hyper_v_generation="V2", tags=self.tags,
                      storage_profile=ImageStorageProfile(os_disk=ImageOSDisk(
                          os_type="Linux", os_state="Generalized", blob_uri=self.blob.url)))
        poller = self.arm(f"create image {self.spec.name}", self.compute.images.begin_create_or_update,
                          t.resource_group, self.spec.name, image, polling_interval=POLL_S)
        self.image = self._finish(poller, f"image {self.spec.name}")
        log.info("azure: created image %s", self.image.id)

    def _finish(self, poller, what: str):
        """Wait for an ARM long-running operation with our own deadline."""
        try:
            result = poller.result(timeout=self.target.wait_minutes * 60)
        except (AzureError, HttpResponseError) as exc:
            raise _azure_error(exc, f"wait for {what}") from exc
        if not poller.done():
            raise PublishError(f"azure: {what} not done after {self.target.wait_minutes} min",
                               "raise clouds.azure.wait_minutes or look at the resource in the portal")
        return result

    def share(self) -> None:
        t = self.target
        if not self.use_gallery:
            return
        from azure.mgmt.compute.models import (GalleryArtifactVersionFullSource, GalleryImageVersion,
                                               GalleryImageVersionPublishingProfile,
                                               GalleryImageVersionStorageProfile, TargetRegion)
        ops = self.compute.gallery_image_versions
        where = f"{t.gallery}/{t.gallery_image}/{self.spec.version}"
        try:
            existing = ops.get(t.resource_group, t.gallery, t.gallery_image, self.spec.version)
        except ResourceNotFoundError:
            existing = None
        except (AzureError, HttpResponseError) as exc:
            raise _azure_error(exc, f"get gallery image version {where}") from exc
        if existing is not None and existing.provisioning_state == "Succeeded":
            source = existing.storage_profile.source.id if existing.storage_profile and existing.storage_profile.source else None
            if source and source.lower() != self.image.id.lower():
                raise PublishError(f"azure: gallery image version {where} exists with another source ({source})",
                                   "gallery versions are immutable: bump the flavor's version")
            self.version = existing
            return
        version = GalleryImageVersion(
            location=t.location, tags=self.tags,
            storage_profile=GalleryImageVersionStorageProfile(source=GalleryArtifactVersionFullSource(id=self.image.id)),
            publishing_profile=GalleryImageVersionPublishingProfile(
                target_regions=[TargetRegion(name=r) for r in [t.location, *t.replica_locations]]))
        poller = self.arm(f"create gallery image version {where}", ops.begin_create_or_update,
                          t.resource_group, t.gallery, t.gallery_image, self.spec.version, version,
                          polling_interval=POLL_S)
        self.version = self._finish(poller, f"gallery image version {where}")
        log.info("azure: created gallery image version %s", self.version.id)

    def cleanup(self, failed: bool) -> None:
        # The blob is the image's source: keep it (cloud-gc removes it with the image).
        # A half-uploaded blob of a failed run is removed.
        if failed and self.blob_created and self.image is None:
            try:
                self.blob.delete_blob()
            except AzureError as exc:
                log.warning("azure: could not delete %s: %s", self.blob_name, exc)

    def result(self) -> dict[str, Any]:
        out = {"name": self.spec.name, "images": {self.target.location: self.image.id},
               "blob": self.blob.url if hasattr(self, "blob") else None}
        if self.version is not None:
            out["gallery_image_version"] = {"id": self.version.id,
                                            "regions": [self.target.location, *self.target.replica_locations]}
        return out

    # -- cloud-gc -------------------------------------------------------------------
    def gc_candidates(self, keep: int, max_age_days: int | None) -> list[GcItem]:
        t = self.target
        images = [i for i in self.arm("list images", lambda: list(self.compute.images.list_by_resource_group(t.resource_group)))
                  if (i.tags or {}).get(TAG_FLAVOR) == self.spec.flavor]
        items: list[GcItem] = []
        for image in select_for_gc([((i.tags or {}).get(TAG_CREATED, ""), i) for i in images], keep, max_age_days):
            uri = image.storage_profile.os_disk.blob_uri if image.storage_profile and image.storage_profile.os_disk else None
            items.append(GcItem("azure", t.resource_group, image.name, (image.tags or {}).get(TAG_CREATED, ""),
                                [uri] if uri else []))
        if t.gallery:
            versions = [v for v in self.arm("list gallery image versions", lambda: list(
                self.compute.gallery_image_versions.list_by_gallery_image(t.resource_group, t.gallery, t.gallery_image)))
                if (v.tags or {}).get(TAG_FLAVOR) == self.spec.flavor]
            for v in select_for_gc([((v.tags or {}).get(TAG_CREATED, ""), v) for v in versions], keep, max_age_days):
                # versions first: they were made from the images deleted after them
                items.insert(0, GcItem("azure", f"{t.resource_group}/{t.gallery}/{t.gallery_image}", f"version:{v.name}",
                                       (v.tags or {}).get(TAG_CREATED, "")))
        return items

    def gc_delete(self, item: GcItem) -> None:
        t = self.target
        if item.image.startswith("version:"):
            self._finish(self.arm("delete gallery image version", self.compute.gallery_image_versions.begin_delete,
                                  t.resource_group, t.gallery, t.gallery_image, item.image.split(":", 1)[1],
                                  polling_interval=POLL_S),
                         f"deletion of {item.image}")
            return
        self._finish(self.arm(f"delete image {item.image}", self.compute.images.begin_delete, t.resource_group, item.image,
                               polling_interval=POLL_S),
                     f"deletion of image {item.image}")
        container = self.blob_service().get_container_client(t.container)
        for uri in item.extras:
            name = uri.rsplit(f"/{t.container}/", 1)[-1]
            try:
                container.delete_blob(name)
            except ResourceNotFoundError:
                pass
            except AzureError as exc:
                raise _azure_error(exc, f"delete blob {name}") from exc
