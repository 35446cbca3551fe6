"""Azure: fixed VHD -> page blob in a storage account (upload: page-blob, the default) or
a managed disk made for direct upload (upload: managed-disk, no storage account) ->
managed image (Hyper-V generation V2, for UEFI) -> Compute Gallery image version when
configured. A Secure Boot disk (the default) needs a gallery image definition that
declares SecurityType TrustedLaunchSupported, so Trusted Launch VMs (Secure Boot, vTPM)
start from it: checked before anything is uploaded. Either way only the VHD's non-zero 4 MiB ranges are written (page blobs and
upload disks start zeroed).

Credentials: azure-identity's DefaultAzureCredential (environment, workload or managed
identity, Azure CLI...). Storage: $AZURE_STORAGE_CONNECTION_STRING when it names the
target's account, else the account's default endpoint with the same credential. A
managed disk is written through the SAS URL its write access grant returns. ARM: the
public endpoint unless $COS_AZURE_ARM_ENDPOINT names another (sovereign clouds, Azure
Stack, tests). Nothing here prints credentials or SAS URLs.
"""
from __future__ import annotations

import logging
import os
import re
import struct
from abc import ABC, abstractmethod
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

from azure.core.exceptions import AzureError, HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import BlobClient, BlobServiceClient, ExponentialRetry

from core import env

from .base import (
    TAG_CREATED,
    TAG_FLAVOR,
    TAG_IMAGE,
    GcItem,
    ImageSpec,
    Uploader,
    _as_datetime,
    require_file,
    select_for_gc,
)
from .disk import blocks_with_data, for_each_block, is_zero, read_block
from .errors import PublishError
from .progress import Progress
from .targets import AzureTarget

log = logging.getLogger("cos.cloud.azure")

ARM_ENDPOINT_ENV = "COS_AZURE_ARM_ENDPOINT"
CHUNK = 4 * 1024 * 1024       # largest Put Page
MIB = 1024 * 1024
META_UPLOADED = "cos_uploaded"  # the artifact sha256, set on the blob once every page is in
META_FLAVOR = "cos_flavor"    # TAG_FLAVOR / TAG_IMAGE as blob metadata names (see _meta)
META_IMAGE = "cos_image"
TAG_UPLOADED = "cos-uploaded"  # set on a managed disk once every page is in and access is revoked
MIN_UPLOAD_BYTES = 20 * MIB + 512  # smallest upload_size_bytes ARM takes (20 MiB + footer)
SAS_SECONDS = 6 * 3600        # write access lifetime; revoked as soon as the pages are in
ACTIVE_SAS = ("ActiveUpload", "ActiveSAS", "ActiveSASFrozen")  # states that need endGetAccess first
ARCH = {"x86_64": "x64", "arm64": "Arm64"}
VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
DISK_ID_RE = re.compile(r"/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.Compute/disks/(?P<name>[^/]+)$", re.I)
# Gallery image definition SecurityType values whose versions can run as Trusted Launch
# (Secure Boot + vTPM) VMs; a definition without the feature is Standard only.
TRUSTED_LAUNCH = ("TrustedLaunchSupported", "TrustedLaunch", "TrustedLaunchAndConfidentialVmSupported")
POLL_S = 1                    # LRO poll interval when ARM sends no Retry-After (SDK default: 30 s)


def security_type(gallery_image: Any) -> str | None:
    """The SecurityType feature of a gallery image definition (None: not declared)."""
    return next((f.value for f in gallery_image.features or [] if f.name == "SecurityType"), None)


def _meta(tags: dict[str, str]) -> dict[str, str]:
    """Blob metadata names must be C# identifiers: cos-flavor -> cos_flavor."""
    return {re.sub(r"\W", "_", k): v for k, v in tags.items()}


def _image_source(image) -> str | None:
    """An image's source: a page blob URL or a managed disk id, whichever path made it."""
    os_disk = image.storage_profile.os_disk if image.storage_profile else None
    if os_disk is None:
        return None
    return os_disk.blob_uri or (os_disk.managed_disk.id if os_disk.managed_disk else None)


def _blob_path(url: str) -> str:
    """A blob URL's path, unquoted; compared by suffix (/container/name), since the host
    and the account's place (host or first path part, as in Azurite) vary."""
    return unquote(urlsplit(url).path)


def _blob_kw() -> dict[str, Any]:
    # Short back-off: the SDK's default waits 15 s before the first retry of a page.
    return {"retry_policy": ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=8),
            "max_single_put_size": CHUNK}


def _state(disk) -> str | None:
    """A disk's diskState as plain text (the SDK may give a str enum)."""
    state = disk.disk_state
    return getattr(state, "value", state)


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
        self.image: Any = None
        self.version: Any = None
        self._compute = None
        self.use_gallery = bool(target.gallery)
        self.source: DiskSource = (ManagedDiskSource if target.upload == "managed-disk" else PageBlobSource)(self)

    # -- clients -------------------------------------------------------------------
    @property
    def credential(self):
        if self._credential is None:
            from azure.identity import DefaultAzureCredential
            self._credential = DefaultAzureCredential(exclude_interactive_browser_credential=True)
        return self._credential

    @property
    def subscription(self) -> str:
        sub = self.target.subscription_id or env.get("AZURE_SUBSCRIPTION_ID")
        if not sub:
            raise PublishError("azure: no subscription id",
                               "set clouds.azure.subscription_id or $AZURE_SUBSCRIPTION_ID")
        return sub

    @property
    def compute(self):
        if self._compute is None:
            from azure.mgmt.compute import ComputeManagementClient
            kw = {"base_url": arm} if (arm := env.get(ARM_ENDPOINT_ENV)) else {}
            self._compute = ComputeManagementClient(self.credential, self.subscription, **kw)
        return self._compute

    def blob_service(self) -> BlobServiceClient:
        conn = env.get("AZURE_STORAGE_CONNECTION_STRING")
        if conn:
            account = dict(p.split("=", 1) for p in conn.split(";") if "=" in p).get("AccountName")
            if account != self.target.storage_account:
                raise PublishError(f"azure: $AZURE_STORAGE_CONNECTION_STRING is for account {account!r}, "
                                   f"the target wants {self.target.storage_account!r}",
                                   "unset it to use the target's account with your Azure login")
            return BlobServiceClient.from_connection_string(conn, **_blob_kw())
        # The SDK fills in the public endpoint suffix for the account.
        return BlobServiceClient.from_connection_string(
            f"DefaultEndpointsProtocol=https;AccountName={self.target.storage_account}",
            credential=self.credential, **_blob_kw())

    def arm(self, what: str, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except (AzureError, HttpResponseError) as exc:
            raise _azure_error(exc, what) from exc

    def arm_wait(self, what: str, fn, *args, **kw):
        """Start an ARM long-running operation and wait for it with our own deadline."""
        return self._finish(self.arm(what, fn, *args, polling_interval=POLL_S, **kw), what)

    # -- preflight / lookups -------------------------------------------------------
    def preflight(self) -> None:
        self.size = require_file(self.spec.disk, "azure", "azure-vhd")
        check_fixed_vhd(self.spec.disk, self.size)
        if self.spec.arch not in ARCH:
            raise PublishError(f"azure: architecture {self.spec.arch!r} is not supported (x86_64, arm64)")
        self.source.preflight()
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
            security = security_type(gimg)
            if self.spec.secure_boot and security not in TRUSTED_LAUNCH:
                raise PublishError(f"azure: gallery image {t.gallery}/{t.gallery_image} has SecurityType "
                                   f"{security or '(none: Standard)'}; this Secure Boot disk needs TrustedLaunchSupported",
                                   "create the image definition with the feature SecurityType=TrustedLaunchSupported "
                                   "(definitions are immutable: make a new one), or set boot.secure_boot: false")

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

    def plan(self) -> list[str]:
        t = self.target
        steps = []
        if self.find_existing():
            steps.append(f"reuse image {self.image.id}")
        else:
            steps += self.source.plan()
            steps.append(f"create image {self.spec.name} (HyperVGeneration V2) from the {self.source.kind} "
                         f"in {t.resource_group}/{t.location}")
        if self.use_gallery:
            trusted = " (SecurityType TrustedLaunchSupported: Secure Boot, vTPM)" if self.spec.secure_boot else ""
            steps.append(f"create gallery image version {t.gallery}/{t.gallery_image}{trusted}/{self.spec.version} "
                         f"in {', '.join([t.location, *t.replica_locations])} (unless it exists)")
        return steps

    # -- upload ------------------------------------------------------------------
    def upload(self) -> None:
        self.source.upload()

    def write_pages(self, blob: BlobClient, label: str) -> None:
        """Write the VHD's non-zero 4 MiB ranges to a page blob of its size (a storage
        account blob or a managed disk's upload SAS); zero ranges stay zero."""
        fd = os.open(self.spec.disk, os.O_RDONLY)
        try:
            chunks = list(blocks_with_data(fd, self.size, CHUNK))
            progress = self.progress = Progress(label, min(len(chunks) * CHUNK, self.size))

            def put(index: int) -> None:
                offset = index * CHUNK
                data = read_block(fd, index, CHUNK, self.size)[:self.size - offset]
                if is_zero(data):
                    return
                blob.upload_page(data, offset=offset, length=len(data))
                progress.add(len(data))

            for_each_block(chunks, put, self.target.workers, "azure-page")
        except AzureError as exc:
            raise _azure_error(exc, f"upload pages of {label}") from exc
        finally:
            os.close(fd)
        self.progress.done()

    # -- register / share -------------------------------------------------------------
    def register(self) -> None:
        from azure.mgmt.compute.models import Image, ImageOSDisk, ImageStorageProfile
        t = self.target
        # the SDK accepts the flattened properties at runtime; its stubs list only `properties`
        image = Image(location=t.location, hyper_v_generation="V2", tags=self.tags,  # type: ignore[call-overload]
                      storage_profile=ImageStorageProfile(os_disk=ImageOSDisk(
                          os_type="Linux", os_state="Generalized", **self.source.image_os_disk())))
        self.image = self.arm_wait(f"create image {self.spec.name}", self.compute.images.begin_create_or_update,
                                   t.resource_group, self.spec.name, image)
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
        from azure.mgmt.compute.models import (
            GalleryArtifactVersionFullSource,
            GalleryImageVersion,
            GalleryImageVersionPublishingProfile,
            GalleryImageVersionStorageProfile,
            TargetRegion,
        )
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
        # The version's source is the managed image for both upload paths. The gallery docs
        # list a managed image as an image source (a managed disk only as an osDiskImage
        # snapshot-style source), and one source kind keeps the immutability check above
        # and cloud-gc's order (versions, then images, then disks/blobs) the same.
        version = GalleryImageVersion(  # type: ignore[call-overload]  # flattened properties, as above
            location=t.location, tags=self.tags,
            storage_profile=GalleryImageVersionStorageProfile(source=GalleryArtifactVersionFullSource(id=self.image.id)),
            publishing_profile=GalleryImageVersionPublishingProfile(
                target_regions=[TargetRegion(name=r) for r in [t.location, *t.replica_locations]]))
        self.version = self.arm_wait(f"create gallery image version {where}", ops.begin_create_or_update,
                                     t.resource_group, t.gallery, t.gallery_image, self.spec.version, version)
        log.info("azure: created gallery image version %s", self.version.id)

    def cleanup(self, failed: bool) -> None:
        # The blob/disk is the image's source: keep it (cloud-gc removes it with the image).
        # A half-made one of a failed run is removed.
        if failed and self.source.made and self.image is None:
            self.source.discard()

    def result(self) -> dict[str, Any]:
        out = {"name": self.spec.name, "images": {self.target.location: self.image.id}, **self.source.result()}
        if self.version is not None:
            out["gallery_image_version"] = {"id": self.version.id,
                                            "regions": [self.target.location, *self.target.replica_locations]}
        return out

    # -- cloud-gc -------------------------------------------------------------------
    def gc_candidates(self, keep: int, max_age_days: int | None) -> list[GcItem]:
        t = self.target
        every = self.arm("list images", lambda: list(self.compute.images.list_by_resource_group(t.resource_group)))
        images = [i for i in every if (i.tags or {}).get(TAG_FLAVOR) == self.spec.flavor]
        items: list[GcItem] = []
        for image in select_for_gc([((i.tags or {}).get(TAG_CREATED, ""), i) for i in images], keep, max_age_days):
            source = _image_source(image)
            items.append(GcItem("azure", t.resource_group, image.name, (image.tags or {}).get(TAG_CREATED, ""),
                                [source] if source else []))
        if t.gallery:
            versions = [v for v in self.arm("list gallery image versions", lambda: list(
                self.compute.gallery_image_versions.list_by_gallery_image(t.resource_group, t.gallery, t.gallery_image)))
                if (v.tags or {}).get(TAG_FLAVOR) == self.spec.flavor]
            for v in select_for_gc([((v.tags or {}).get(TAG_CREATED, ""), v) for v in versions], keep, max_age_days):
                # versions first: they were made from the images deleted after them
                items.insert(0, GcItem("azure", f"{t.resource_group}/{t.gallery}/{t.gallery_image}", f"version:{v.name}",
                                       (v.tags or {}).get(TAG_CREATED, "")))
        # Orphans are judged against every image of the group, whatever its flavor.
        return items + self._orphan_blobs(every) + self._orphan_disks(every)

    def _orphan_cutoff(self) -> datetime:
        return datetime.now(UTC) - timedelta(hours=self.orphan_hours)

    def _orphan_blobs(self, images: list) -> list[GcItem]:
        """Page blobs of this flavor (cos_flavor metadata) in the target container that no
        image uses (by blob URL, or by the cos_image metadata naming an existing image),
        left by runs stopped or failed before their image was made."""
        t = self.target
        if not t.storage_account:  # upload: managed-disk with no account: no blobs of ours
            return []
        names = {i.name for i in images}
        used = {_blob_path(s) for s in map(_image_source, images) if s and not DISK_ID_RE.search(s)}
        cutoff = self._orphan_cutoff()
        try:
            blobs = list(self.blob_service().get_container_client(t.container).list_blobs(include=["metadata"]))
        except ResourceNotFoundError:  # no container yet: nothing was uploaded
            return []
        except AzureError as exc:
            raise _azure_error(exc, f"list blobs in {t.container}") from exc
        out = []
        for blob in blobs:
            meta = blob.metadata or {}
            suffix = f"/{t.container}/{blob.name}"
            # Age by Last-Modified, not creation time: every page written and the final
            # metadata update refresh it, so an upload still running (which may have begun
            # long ago) never looks abandoned; a stopped one stops changing.
            if (meta.get(META_FLAVOR) == self.spec.flavor and meta.get(META_IMAGE) not in names
                    and not any(path.endswith(suffix) for path in used) and blob.last_modified <= cutoff):
                state = "uploaded" if meta.get(META_UPLOADED) else "unfinished"
                out.append(GcItem("azure", f"{t.storage_account}/{t.container}", f"blob:{blob.name}",
                                  blob.last_modified.isoformat(), [f"orphan of {meta.get(META_IMAGE)} ({state})"]))
        return out

    def _orphan_disks(self, images: list) -> list[GcItem]:
        """Upload disks of this flavor (cos-flavor tag) in the resource group that no image
        uses (by disk id, or by the cos-image tag naming an existing image) and that are
        attached to nothing, left by runs stopped or failed before their image was made."""
        t = self.target
        if t.upload != "managed-disk":  # only that path makes disks (and has disks/read)
            return []
        names = {i.name for i in images}
        used = {s.lower() for s in map(_image_source, images) if s and DISK_ID_RE.search(s)}
        cutoff = self._orphan_cutoff()
        disks = self.arm("list managed disks", lambda: list(self.compute.disks.list_by_resource_group(t.resource_group)))
        out = []
        for disk in disks:
            tags = disk.tags or {}
            # ARM's timeCreated, else our cos-created tag: a disk has no last-modified time,
            # and timeCreated is set by Azure whoever made the disk. A running upload's disk
            # is at most its write access' lifetime (SAS_SECONDS, 6 h) old, well below the
            # default 24 h.
            created = disk.time_created or _as_datetime(tags.get(TAG_CREATED, ""))
            if (tags.get(TAG_FLAVOR) == self.spec.flavor and tags.get(TAG_IMAGE) not in names
                    and disk.id.lower() not in used and not disk.managed_by and created <= cutoff):
                state = "uploaded" if tags.get(TAG_UPLOADED) else _state(disk)
                out.append(GcItem("azure", t.resource_group, f"disk:{disk.name}", created.isoformat(),
                                  [f"orphan of {tags.get(TAG_IMAGE)} ({state})"]))
        return out

    def gc_delete(self, item: GcItem) -> None:
        t = self.target
        kind, _, name = item.image.partition(":")
        if kind == "version":
            self.arm_wait(f"delete gallery image version {name}", self.compute.gallery_image_versions.begin_delete,
                          t.resource_group, t.gallery, t.gallery_image, name)
            return
        if kind == "blob":  # an orphan page blob
            self._delete_blob_named(name)
            return
        if kind == "disk":  # an orphan upload disk; an open write access is revoked first
            self.delete_disk(t.resource_group, name)
            return
        self.arm_wait(f"delete image {item.image}", self.compute.images.begin_delete, t.resource_group, item.image)
        for source in item.extras:
            disk = DISK_ID_RE.search(source)
            if disk:
                self.delete_disk(disk["rg"], disk["name"])
            else:
                self._delete_blob(source)

    def delete_disk(self, rg: str, name: str, state: str | None = None) -> None:
        """Delete a managed disk; one with an open SAS is revoked first (ARM refuses to delete it)."""
        if state is None:
            try:
                state = _state(self.compute.disks.get(rg, name))
            except ResourceNotFoundError:
                return
            except (AzureError, HttpResponseError) as exc:
                raise _azure_error(exc, f"get managed disk {name}") from exc
        if state in ACTIVE_SAS:
            self.arm_wait(f"revoke access to managed disk {name}", self.compute.disks.begin_revoke_access, rg, name)
        self.arm_wait(f"delete managed disk {name}", self.compute.disks.begin_delete, rg, name)

    def _delete_blob(self, uri: str) -> None:
        t = self.target
        if not t.storage_account:
            log.warning("azure: blob %s (source of a page-blob image) left: set storage_account to let cloud-gc "
                        "delete it", uri)
            return
        self._delete_blob_named(unquote(urlsplit(uri).path).rsplit(f"/{t.container}/", 1)[-1])

    def _delete_blob_named(self, name: str) -> None:
        t = self.target
        try:
            self.blob_service().get_container_client(t.container).delete_blob(name)
        except ResourceNotFoundError:
            pass
        except AzureError as exc:
            raise _azure_error(exc, f"delete blob {name}") from exc


class DiskSource(ABC):
    """Where the VHD's pages go and what the image is made from."""
    kind: str

    def __init__(self, up: AzureUploader):
        self.up = up
        self.made = False          # this run created it (removed if the publish fails)

    @abstractmethod
    def preflight(self) -> None: ...

    @abstractmethod
    def plan(self) -> list[str]:
        """Read-only: the upload steps, or the reuse of a complete earlier upload."""

    @abstractmethod
    def upload(self) -> None:
        """Write the pages; reuse a complete earlier upload, redo an unfinished one."""

    @abstractmethod
    def image_os_disk(self) -> dict[str, Any]:
        """ImageOSDisk fields naming this source."""

    @abstractmethod
    def discard(self) -> None: ...

    @abstractmethod
    def result(self) -> dict[str, Any]: ...


class PageBlobSource(DiskSource):
    """A page blob in the target's storage account, marked complete by metadata."""
    kind = "page blob"

    def preflight(self) -> None:
        self.name = f"{self.up.spec.name}.vhd"
        self.blob = self.up.blob_service().get_container_client(self.up.target.container).get_blob_client(self.name)

    def complete(self) -> bool:
        try:
            props = self.blob.get_blob_properties()
        except ResourceNotFoundError:
            return False
        except AzureError as exc:
            raise _azure_error(exc, f"read blob {self.name}") from exc
        return props.metadata.get(META_UPLOADED) == self.up.spec.disk_sha256

    def plan(self) -> list[str]:
        if self.complete():
            return [f"reuse uploaded blob {self.blob.url}"]
        return [f"upload {self.up.spec.disk.name} ({self.up.size / 1e6:.1f} MB nominal; zero 4 MiB ranges skipped) "
                f"to page blob {self.blob.url}"]

    def upload(self) -> None:
        if self.complete():
            log.info("azure: blob %s holds this disk already; reusing it", self.name)
            return
        container = self.up.blob_service().get_container_client(self.up.target.container)
        try:
            container.create_container()
        except ResourceExistsError:
            pass
        except AzureError as exc:
            raise _azure_error(exc, f"create container {self.up.target.container}") from exc
        meta = _meta(self.up.tags)
        try:
            self.blob.create_page_blob(self.up.size, metadata=meta, if_none_match="*")
        except ResourceExistsError:  # an unfinished upload of an earlier run: start it over
            log.info("azure: blob %s is incomplete (earlier run stopped); recreating it", self.name)
            self.up.arm(f"recreate page blob {self.name}", self.blob.create_page_blob, self.up.size, metadata=meta)
        except AzureError as exc:
            raise _azure_error(exc, f"create page blob {self.name}") from exc
        self.made = True
        self.up.write_pages(self.blob, f"azure page blob {self.name}")
        # Marks the blob as whole; a killed run's blob never gets this.
        self.up.arm(f"set metadata of {self.name}", self.blob.set_blob_metadata,
                    {**meta, META_UPLOADED: self.up.spec.disk_sha256})

    def image_os_disk(self) -> dict[str, Any]:
        return {"blob_uri": self.blob.url}

    def discard(self) -> None:
        try:
            self.blob.delete_blob()
        except AzureError as exc:
            log.warning("azure: could not delete %s: %s", self.name, exc)

    def result(self) -> dict[str, Any]:
        return {"blob": self.blob.url if hasattr(self, "blob") else None}


class ManagedDiskSource(DiskSource):
    """A managed disk made with create_option Upload and written through a write SAS
    (no storage account); marked complete by the cos-uploaded tag after access is revoked."""
    kind = "managed disk"

    def preflight(self) -> None:
        self.name = self.up.spec.name
        self.disk: Any = None
        if self.up.size < MIN_UPLOAD_BYTES:
            raise PublishError(f"azure: {self.up.spec.disk} is {self.up.size} bytes; a managed disk upload needs "
                               f"at least {MIN_UPLOAD_BYTES} (20 MiB + the 512-byte footer)",
                               "make the raw disk at least 20 MiB, or use upload: page-blob")

    @property
    def where(self) -> str:
        return f"{self.up.target.resource_group}/{self.name}"

    def _get(self):
        try:
            return self.up.compute.disks.get(self.up.target.resource_group, self.name)
        except ResourceNotFoundError:
            return None
        except (AzureError, HttpResponseError) as exc:
            raise _azure_error(exc, f"get managed disk {self.where}") from exc

    def _complete(self, disk) -> bool:
        return (disk.provisioning_state == "Succeeded" and _state(disk) not in ACTIVE_SAS
                and (disk.tags or {}).get(TAG_UPLOADED) == self.up.spec.disk_sha256)

    def plan(self) -> list[str]:
        disk = self._get()
        if disk is not None and self._complete(disk):
            return [f"reuse uploaded managed disk {self.where}"]
        steps = [f"delete unfinished managed disk {self.where} (state {_state(disk)}) of an earlier run"] if disk else []
        t = self.up.target
        return steps + [f"create managed disk {self.where} for upload ({self.up.size} bytes, HyperVGeneration V2) "
                        f"in {t.location}",
                        f"grant write access, upload {self.up.spec.disk.name} ({self.up.size / 1e6:.1f} MB nominal; "
                        f"zero 4 MiB ranges skipped), revoke access"]

    def upload(self) -> None:
        up, rg = self.up, self.up.target.resource_group
        disk = self._get()
        if disk is not None:
            if self._complete(disk):
                log.info("azure: managed disk %s holds this disk already; reusing it", self.where)
                self.disk = disk
                return
            # Written pages of a stopped run are unknown and an upload disk cannot be
            # opened for writing again once revoked: start over.
            log.info("azure: managed disk %s is unfinished (state %s; earlier run stopped); re-making it",
                     self.where, _state(disk))
            up.delete_disk(rg, self.name, _state(disk))
        self.disk = up.arm_wait(f"create managed disk {self.where}", up.compute.disks.begin_create_or_update,
                                rg, self.name, self._new_disk())
        self.made = True
        self._write()
        # Marks the disk as whole; a killed run's disk never gets this.
        from azure.mgmt.compute.models import DiskUpdate
        self.disk = up.arm_wait(f"tag managed disk {self.where}", up.compute.disks.begin_update, rg, self.name,
                                DiskUpdate(tags={**up.tags, TAG_UPLOADED: up.spec.disk_sha256}))

    def _new_disk(self):
        from azure.mgmt.compute.models import CreationData, Disk, DiskProperties, DiskSku, SupportedCapabilities
        up = self.up
        return Disk(location=up.target.location, tags=up.tags, sku=DiskSku(name="Standard_LRS"),
                    properties=DiskProperties(
                        os_type="Linux", hyper_v_generation="V2",
                        supported_capabilities=SupportedCapabilities(architecture=ARCH[up.spec.arch]),
                        # the whole VHD file, footer included
                        creation_data=CreationData(create_option="Upload", upload_size_bytes=up.size)))

    def _write(self) -> None:
        from azure.mgmt.compute.models import GrantAccessData
        up, rg = self.up, self.up.target.resource_group
        access = up.arm_wait(f"grant write access to managed disk {self.where}", up.compute.disks.begin_grant_access,
                             rg, self.name, GrantAccessData(access="Write", duration_in_seconds=SAS_SECONDS))
        if not access or not access.access_sas:
            raise PublishError(f"azure: write access to managed disk {self.where} came without a SAS URL")
        revoke = (f"revoke access to managed disk {self.where}", up.compute.disks.begin_revoke_access, rg, self.name)
        try:
            up.write_pages(BlobClient.from_blob_url(access.access_sas, **_blob_kw()), f"azure managed disk {self.name}")
        except BaseException:
            # Always revoke: a disk left in ActiveUpload can be neither imaged nor deleted.
            try:
                up.arm_wait(*revoke)
            except Exception as exc:  # keep the upload's error
                log.warning("azure: could not revoke access to %s after a failed upload: %s", self.where, exc)
            raise
        up.arm_wait(*revoke)

    def image_os_disk(self) -> dict[str, Any]:
        from azure.mgmt.compute.models import SubResource
        return {"managed_disk": SubResource(id=self.disk.id)}

    def discard(self) -> None:
        try:
            self.up.delete_disk(self.up.target.resource_group, self.name)
        except PublishError as exc:
            log.warning("azure: could not delete managed disk %s: %s", self.where, exc)

    def result(self) -> dict[str, Any]:
        if self.disk is not None:
            return {"disk": self.disk.id}
        profile = self.up.image.storage_profile  # a reused image: its own record of its source
        source = profile.os_disk.managed_disk if profile and profile.os_disk else None
        return {"disk": source.id if source else None}
