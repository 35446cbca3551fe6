"""GCP: disk.raw tar.gz -> GCS object (resumable upload) -> images.insert (UEFI and the
configured guest OS features, family, labels, architecture) -> deprecate the family's
previous image.

Credentials: Application Default Credentials. Endpoints: STORAGE_EMULATOR_HOST for GCS
(honoured by google-cloud-storage) and $COS_GCP_COMPUTE_ENDPOINT for Compute (a
private/regional endpoint or a test server). Compute long-running operations are
waited for with GlobalOperationsClient on the same endpoint: `insert().result()` would
poll the public endpoint whatever the client options say.
"""
from __future__ import annotations

import io
import logging
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote, urlsplit

from google.api_core import exceptions as gexc
from google.api_core.retry import Retry, if_exception_type

from core import env

from .base import (
    TAG_CREATED,
    TAG_FLAVOR,
    TAG_IMAGE,
    GcItem,
    ImageSpec,
    Uploader,
    require_file,
    select_for_gc,
    wait_until,
)
from .errors import PublishError
from .progress import Progress
from .targets import GcpTarget

log = logging.getLogger("cos.cloud.gcp")

COMPUTE_ENDPOINT_ENV = "COS_GCP_COMPUTE_ENDPOINT"
UPLOAD_CHUNK = 64 * 1024 * 1024   # resumable upload chunk (multiple of 256 KiB)
META_SHA = "cos-sha256"           # object metadata, set with the upload's final request
ARCH = {"x86_64": "X86_64", "arm64": "ARM64"}
# insert/deprecate carry a requestId, so retrying them is safe too.
RETRY = Retry(predicate=if_exception_type(gexc.TooManyRequests, gexc.InternalServerError, gexc.BadGateway,
                                          gexc.ServiceUnavailable, gexc.GatewayTimeout),
              initial=1.0, maximum=16.0, multiplier=2.0, timeout=300.0)


def _gcp_error(exc: Exception, what: str) -> PublishError:
    hint = "check the IAM roles listed in docs/clouds.md" if isinstance(exc, gexc.Forbidden) else None
    message = getattr(exc, "message", None) or str(exc)
    return PublishError(f"gcp: {what} failed: {type(exc).__name__}: {message}", hint)


def _state(value) -> str:
    """proto-plus gives enum members for status fields; compare by name."""
    return getattr(value, "name", value) or ""


class CountingReader(io.RawIOBase):
    """A file wrapper that reports bytes read to a Progress (resumable uploads rewind:
    only forward reads past the high-water mark count)."""

    def __init__(self, f, progress: Progress):
        self.f, self.progress, self.high = f, progress, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        end = self.f.tell()
        if end > self.high:
            self.progress.add(end - self.high)
            self.high = end
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def tell(self) -> int:
        return self.f.tell()


class GcpUploader(Uploader):
    cloud = "gcp"
    target: GcpTarget

    def __init__(self, target: GcpTarget, spec: ImageSpec, *, dry_run: bool | None = None, credentials=None):
        super().__init__(target, spec, dry_run=dry_run)
        self.credentials = credentials
        self.labels = {**spec.tags, **target.labels}
        self.object_name = f"{spec.name}.tar.gz"
        self.image: Any = None
        self.deprecated: list[str] = []
        self.object_created = False
        self._images = self._ops = self._storage = None

    # -- clients -------------------------------------------------------------------
    def _client_kw(self) -> dict:
        kw: dict[str, Any] = {"transport": "rest"}
        if endpoint := env.get(COMPUTE_ENDPOINT_ENV):
            kw["client_options"] = {"api_endpoint": endpoint}
        if self.credentials is not None:
            kw["credentials"] = self.credentials
        return kw

    @property
    def images(self):
        if self._images is None:
            from google.cloud import compute_v1
            self._images = compute_v1.ImagesClient(**self._client_kw())
        return self._images

    @property
    def operations(self):
        if self._ops is None:
            from google.cloud import compute_v1
            self._ops = compute_v1.GlobalOperationsClient(**self._client_kw())
        return self._ops

    @property
    def bucket(self):
        if self._storage is None:
            from google.cloud import storage
            self._storage = storage.Client(project=self.target.project, credentials=self.credentials)
        return self._storage.bucket(self.target.bucket)

    def gcall(self, what: str, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except gexc.GoogleAPIError as exc:
            raise _gcp_error(exc, what) from exc
        except Exception as exc:  # google.auth errors (no ADC) and transport errors
            if type(exc).__module__.startswith(("google.auth", "requests", "urllib3")):
                raise PublishError(f"gcp: {what} failed: {exc}",
                                   "check Application Default Credentials (gcloud auth application-default login, "
                                   "GOOGLE_APPLICATION_CREDENTIALS) and the endpoint") from exc
            raise

    # -- preflight / lookups -------------------------------------------------------------
    def preflight(self) -> None:
        self.size = require_file(self.spec.disk, "gcp", "gce-tar")
        with open(self.spec.disk, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                raise PublishError(f"gcp: {self.spec.disk} is not gzip-compressed",
                                   "GCE wants a .tar.gz holding disk.raw (tar --format=gnu -S -czf)")
        if self.spec.arch not in ARCH:
            raise PublishError(f"gcp: architecture {self.spec.arch!r} is not supported (x86_64, arm64)")
        # the clients are made inside gcall too: without credentials they raise on creation
        self.gcall("make the Compute client", lambda: self.images)
        if not self.gcall(f"look up bucket {self.target.bucket}", lambda: self.bucket.exists(retry=RETRY)):
            raise PublishError(f"gcp: bucket gs://{self.target.bucket} does not exist or is not visible",
                               "create it (in the image's storage location) or fix clouds.gcp.bucket")

    def _get_image(self, name: str):
        try:
            return self.images.get(project=self.target.project, image=name, retry=RETRY)
        except gexc.NotFound:
            return None
        except gexc.GoogleAPIError as exc:
            raise _gcp_error(exc, f"get image {name}") from exc

    def find_existing(self) -> bool:
        image = self._get_image(self.spec.name)
        if image is not None and _state(image.status) == "FAILED":
            log.info("gcp: image %s is FAILED (earlier run); deleting it to start over", self.spec.name)
            self._wait(self.gcall("delete failed image", self.images.delete_unary, project=self.target.project,
                                  image=self.spec.name, retry=RETRY), f"deletion of {self.spec.name}")
            image = None
        if image is not None and _state(image.status) == "PENDING" and not self.dry_run:
            # an earlier run stopped while GCE was still creating it: wait for the outcome
            image = wait_until(lambda: self._settled(self.spec.name), f"image {self.spec.name}",
                               self.target.wait_minutes * 60, interval_s=10)
            if _state(image.status) != "READY":
                raise PublishError(f"gcp: image {self.spec.name} ended {_state(image.status)}",
                                   "delete it (or run again: a FAILED image is replaced)")
        self.image = image
        return image is not None

    def _settled(self, name: str):
        image = self._get_image(name)
        if image is None:
            raise PublishError(f"gcp: image {name} disappeared while it was being created", "run the publish again")
        return image if _state(image.status) != "PENDING" else None

    def _object(self):
        blob = self.bucket.blob(self.object_name)
        try:
            blob.reload(retry=RETRY)
        except gexc.NotFound:
            return blob, False
        except gexc.GoogleAPIError as exc:
            raise _gcp_error(exc, f"look up gs://{self.target.bucket}/{self.object_name}") from exc
        return blob, True

    def plan(self) -> list[str]:
        steps = []
        if self.find_existing():
            steps.append(f"reuse image {self.image.self_link or self.spec.name}")
        else:
            blob, exists = self._object()
            if exists and (blob.metadata or {}).get(META_SHA) == self.spec.disk_sha256:
                steps.append(f"reuse object gs://{self.target.bucket}/{self.object_name}")
            else:
                steps.append(f"upload {self.spec.disk.name} ({self.size / 1e6:.1f} MB) to gs://{self.target.bucket}/{self.object_name}")
            steps.append(f"insert image {self.spec.name} ({ARCH[self.spec.arch]}, "
                         f"{', '.join(self.features)}, family {self.target.family}"
                         f"{', Shielded VM: Secure Boot with the default (Microsoft) keys' if self.spec.secure_boot else ''})")
        if self.target.family and self.target.deprecate_previous:
            steps.append(f"deprecate earlier images of family {self.target.family}")
        return steps

    # -- upload ---------------------------------------------------------------------------
    def upload(self) -> None:
        blob, exists = self._object()
        if exists and (blob.metadata or {}).get(META_SHA) == self.spec.disk_sha256:
            log.info("gcp: gs://%s/%s holds this disk already; reusing it", self.target.bucket, self.object_name)
            return
        blob.metadata = {**{k: v for k, v in self.labels.items()}, META_SHA: self.spec.disk_sha256}
        blob.chunk_size = UPLOAD_CHUNK  # resumable, in chunks
        self.progress = Progress(f"gcp gs://{self.target.bucket}/{self.object_name}", self.size)
        # Only create, or replace the exact generation we saw: makes the upload retryable.
        generation = blob.generation if exists else 0
        with open(self.spec.disk, "rb") as f:
            self.gcall(f"upload to gs://{self.target.bucket}/{self.object_name}", blob.upload_from_file,
                       # size=None: always a resumable session (with a size, small files go multipart)
                       CountingReader(f, self.progress), size=None, content_type="application/gzip",
                       if_generation_match=generation, checksum="crc32c")
        self.object_created = True
        self.progress.done()

    # -- register / share -------------------------------------------------------------------
    def _request_id(self, *parts: str) -> str:
        return str(uuid.UUID(self.spec.token(*parts)))

    def _wait(self, op, what: str):
        """Wait for a global operation on the configured endpoint; raise its errors."""
        project = self.target.project

        def done():
            nonlocal op
            if _state(op.status) != "DONE":
                op = self.gcall(f"wait for {what}", self.operations.wait, project=project, operation=op.name, retry=RETRY)
            return op if _state(op.status) == "DONE" else None

        op = wait_until(done, what, self.target.wait_minutes * 60, interval_s=5)
        if op.error and op.error.errors:
            detail = "; ".join(f"{e.code}: {e.message}" for e in op.error.errors)
            raise PublishError(f"gcp: {what} failed: {detail}")
        return op

    @property
    def features(self) -> list[str]:
        """The target's guestOsFeatures, plus SECURE_BOOT for a Secure Boot disk. No
        shieldedInstanceInitialState: then GCE enrolls its default db (Microsoft's CAs,
        which sign the distro's shim), which is what this disk needs."""
        extra = ["SECURE_BOOT"] if self.spec.secure_boot and "SECURE_BOOT" not in self.target.guest_os_features else []
        return [*self.target.guest_os_features, *extra]

    def register(self) -> None:
        from google.cloud import compute_v1
        t = self.target
        blob = self.bucket.blob(self.object_name)
        image = compute_v1.Image(
            name=self.spec.name, description=self.spec.description, family=t.family, labels=self.labels,
            architecture=ARCH[self.spec.arch], storage_locations=t.storage_locations,
            guest_os_features=[compute_v1.GuestOsFeature(type_=f) for f in self.features],
            raw_disk=compute_v1.RawDisk(source=blob.public_url))
        request = compute_v1.InsertImageRequest(project=t.project, image_resource=image,
                                                request_id=self._request_id("insert"))
        op = self.gcall(f"insert image {self.spec.name}", self.images.insert_unary, request=request, retry=RETRY)
        self._wait(op, f"image {self.spec.name}")
        self.image = self._get_image(self.spec.name)
        log.info("gcp: created image %s", self.image.self_link)

    def share(self) -> None:
        t = self.target
        if not (t.family and t.deprecate_previous):
            return
        from google.cloud import compute_v1
        ours = self.image
        earlier = [i for i in self.gcall("list family images", lambda: list(self.images.list(
            request=compute_v1.ListImagesRequest(project=t.project, filter=f'family = "{t.family}"'), retry=RETRY)))
            if i.name != ours.name and not _state(i.deprecated.state)
            and i.creation_timestamp < ours.creation_timestamp]
        for image in earlier:
            status = compute_v1.DeprecationStatus(state="DEPRECATED", replacement=ours.self_link)
            request = compute_v1.DeprecateImageRequest(project=t.project, image=image.name,
                                                       deprecation_status_resource=status,
                                                       request_id=self._request_id("deprecate", image.name))
            op = self.gcall(f"deprecate {image.name}", self.images.deprecate_unary, request=request, retry=RETRY)
            self._wait(op, f"deprecation of {image.name}")
            self.deprecated.append(image.name)
            log.info("gcp: deprecated %s (replacement %s)", image.name, ours.name)

    def cleanup(self, failed: bool) -> None:
        # The object is the image's source record: kept (cloud-gc deletes it with the image),
        # except a fresh upload whose image could not be made.
        if failed and self.object_created and self.image is None:
            try:
                self.bucket.blob(self.object_name).delete()
            except gexc.GoogleAPIError as exc:
                log.warning("gcp: could not delete gs://%s/%s: %s", self.target.bucket, self.object_name, exc)

    def result(self) -> dict[str, Any]:
        link = f"projects/{self.target.project}/global/images/{self.spec.name}"
        return {"name": self.spec.name, "images": {"global": link}, "family": self.target.family,
                "object": f"gs://{self.target.bucket}/{self.object_name}", "deprecated": self.deprecated}

    # -- cloud-gc -------------------------------------------------------------------------
    def gc_candidates(self, keep: int, max_age_days: int | None) -> list[GcItem]:
        t = self.target
        from google.cloud import compute_v1
        # every image of the project: orphans are judged against all of them, whatever their flavor
        every = self.gcall("list images", lambda: list(self.images.list(
            request=compute_v1.ListImagesRequest(project=t.project), retry=RETRY)))
        images = [i for i in every if i.labels.get(TAG_FLAVOR) == self.spec.flavor]
        return [GcItem("gcp", t.project, i.name, i.creation_timestamp or i.labels.get(TAG_CREATED, ""),
                       [f"gs://{t.bucket}/{i.name}.tar.gz"])
                for i in select_for_gc([(i.creation_timestamp, i) for i in images], keep, max_age_days)
                ] + self._orphan_objects(every)

    def _orphan_objects(self, images: list) -> list[GcItem]:
        """Objects of this flavor (cos-flavor metadata) in the bucket that no image uses
        (by rawDisk.source, or by the cos-image metadata naming an existing image): left
        by runs that failed after the upload and could not delete them, or were stopped
        before images.insert."""
        t = self.target
        names = {i.name for i in images}
        used = {_object_of(i.raw_disk.source) for i in images if i.raw_disk and i.raw_disk.source}
        cutoff = datetime.now(UTC) - timedelta(hours=self.orphan_hours)
        try:
            blobs = list(self.bucket.list_blobs(retry=RETRY))
        except gexc.NotFound:  # no bucket: nothing was uploaded
            return []
        except gexc.GoogleAPIError as exc:
            raise _gcp_error(exc, f"list gs://{t.bucket}") from exc
        out = []
        for blob in blobs:
            meta = blob.metadata or {}
            # Aged by timeCreated: an object appears only when its resumable upload
            # completes (each new generation gets its own), so a publish still uploading
            # has nothing here yet, and one that just finished uploading is fresh.
            if (meta.get(TAG_FLAVOR) == self.spec.flavor and meta.get(TAG_IMAGE) not in names
                    and (t.bucket, blob.name) not in used and blob.time_created <= cutoff):
                # gs://B/O#GENERATION: deleted only if not replaced meanwhile (by a new upload)
                out.append(GcItem("gcp", t.project, f"object:gs://{t.bucket}/{blob.name}#{blob.generation}",
                                  blob.time_created.isoformat(), [f"orphan of {meta.get(TAG_IMAGE)}"]))
        return out

    def gc_delete(self, item: GcItem) -> None:
        if item.image.startswith("object:"):
            self._delete_orphan(item.image.removeprefix("object:"))
            return
        from google.cloud import compute_v1
        request = compute_v1.DeleteImageRequest(project=self.target.project, image=item.image,
                                                request_id=self._request_id("delete", item.image))
        op = self.gcall(f"delete image {item.image}", self.images.delete_unary, request=request, retry=RETRY)
        self._wait(op, f"deletion of {item.image}")
        for uri in item.extras:
            try:
                self.bucket.blob(uri.split("/", 3)[3]).delete(retry=RETRY)
            except gexc.NotFound:
                pass
            except gexc.GoogleAPIError as exc:
                raise _gcp_error(exc, f"delete {uri}") from exc

    def _delete_orphan(self, uri: str) -> None:
        """Delete gs://BUCKET/NAME#GENERATION if that generation is still the live one."""
        where, _, generation = uri.rpartition("#")
        name = where.split("/", 3)[3]
        try:
            self.bucket.blob(name).delete(if_generation_match=int(generation), retry=RETRY)
        except (gexc.NotFound, gexc.PreconditionFailed):
            log.info("gcp: %s was deleted or replaced meanwhile; left alone", uri)
        except gexc.GoogleAPIError as exc:
            raise _gcp_error(exc, f"delete {uri}") from exc


def _object_of(source: str) -> tuple[str, str]:
    """rawDisk.source as (bucket, object). GCE takes https://storage.googleapis.com/B/O
    (what register() sends: the blob's public URL; the host differs with an emulator);
    gs://B/O is read too."""
    path = source[len("gs://"):] if source.startswith("gs://") else unquote(urlsplit(source).path).lstrip("/")
    bucket, _, name = path.partition("/")
    return bucket, name
