"""The uploader interface every cloud implements, and what the clouds share.

publish() runs: preflight -> find existing image (idempotency by name) ->
upload -> register -> share/copy -> cleanup. A failure after upload removes the
temporary objects (snapshot, blob, object) it made; an image that already exists is
reused and only share/copy is (re)applied, so a re-run creates nothing new.
"""
from __future__ import annotations

import hashlib
import logging
import re
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core import env

from .errors import PublishError
from .progress import Progress

log = logging.getLogger("cos.cloud")

DRY_RUN_ENV = "COS_PUBLISH_DRY_RUN"

# Tag/label keys on every resource we create: cloud-gc finds images by them.
TAG_FLAVOR = "cos-flavor"
TAG_VERSION = "cos-version"
TAG_SHA = "cos-sha256"       # first 16 hex digits of the uploaded artifact
TAG_CREATED = "cos-created"  # UTC, sortable: 20261125t231500z
TAG_IMAGE = "cos-image"      # the image name, also on snapshots/blobs/objects made for it


def dry_run_from_env() -> bool:
    return env.flag(DRY_RUN_ENV)


@dataclass(frozen=True)
class ImageSpec:
    """What to publish: one disk artifact of one flavor build."""
    flavor: str
    version: str
    arch: str                  # x86_64 | arm64 (the flavor's)
    disk: Path                 # raw (AWS), fixed VHD (Azure), disk.raw tar.gz (GCP)
    disk_sha256: str
    description: str = ""
    secure_boot: bool = True   # the disk boots through the distro's signed chain (boot.secure_boot)
    extra_tags: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y%m%dt%H%M%Sz"))

    @property
    def name(self) -> str:
        """Image name: flavor, version, arch and content; same content -> same name."""
        prefix = safe_name(f"cos-{self.flavor}-{self.version}-{self.arch}")[:50].rstrip("-")
        return f"{prefix}-{self.disk_sha256[:12]}"  # <= 63 characters, the digest always kept

    @property
    def tags(self) -> dict[str, str]:
        return {TAG_FLAVOR: self.flavor, TAG_VERSION: safe_name(self.version),
                TAG_SHA: self.disk_sha256[:16], TAG_CREATED: self.created, TAG_IMAGE: self.name,
                **self.extra_tags}

    def token(self, *parts: str) -> str:
        """A stable idempotency token for one create call of this image."""
        return hashlib.sha256("/".join((self.name, self.disk_sha256, *parts)).encode()).hexdigest()[:32]


def safe_name(text: str) -> str:
    """Lower-case letters, digits and dashes: valid as an AMI, Azure and GCE image name
    and as a GCE label value."""
    out = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return out[:63].rstrip("-")


@dataclass
class GcItem:
    """One image cloud-gc would delete, with what goes with it."""
    cloud: str
    where: str                 # region / resource group / project
    image: str
    created: str
    extras: list[str] = field(default_factory=list)  # snapshots, blobs, objects


class Uploader(ABC):
    cloud: str = "?"

    def __init__(self, target: Any, spec: ImageSpec, *, dry_run: bool | None = None):
        self.target = target
        self.spec = spec
        self.dry_run = dry_run_from_env() if dry_run is None else dry_run
        self.progress: Progress | None = None
        self.created: list[str] = []   # temporary resources to remove if we fail
        # cloud-gc: leftovers of stopped publishes (no image uses them) must be this old,
        # so that a publish running right now is not disturbed
        self.orphan_hours: float = 24

    # -- the interface each cloud implements ------------------------------------
    @abstractmethod
    def preflight(self) -> None:
        """Check the artifact and the target (credentials, bucket, gallery...) before any write."""

    @abstractmethod
    def find_existing(self) -> bool:
        """True when the image already exists (then upload/register are skipped)."""

    @abstractmethod
    def upload(self) -> None:
        """Send the disk (skipping holes/zero pages where safe); reuse a complete earlier upload."""

    @abstractmethod
    def register(self) -> None:
        """Make the image from the uploaded disk."""

    @abstractmethod
    def share(self) -> None:
        """Launch permissions, copies to other regions, gallery versions, deprecations."""

    @abstractmethod
    def cleanup(self, failed: bool) -> None:
        """Remove temporary resources; on failure also the half-made ones in self.created."""

    @abstractmethod
    def plan(self) -> list[str]:
        """What publish() would create/reuse, from read-only calls only."""

    @abstractmethod
    def result(self) -> dict[str, Any]:
        """Ids per region/location, for cloud-images.json and the manifest."""

    @abstractmethod
    def gc_candidates(self, keep: int, max_age_days: int | None) -> list[GcItem]:
        """Images of this flavor beyond the retention rule (read-only)."""

    @abstractmethod
    def gc_delete(self, item: GcItem) -> None:
        """Delete one image and its snapshots/blobs/objects."""

    # -- the flow ----------------------------------------------------------------
    def publish(self) -> dict[str, Any]:
        started = time.monotonic()
        self.preflight()
        if self.dry_run:
            steps = self.plan()
            for step in steps:
                log.info("%s plan: %s", self.cloud, step)
            return {"dry_run": True, "plan": steps}
        try:
            if self.find_existing():
                log.info("%s: image %s exists; reusing it", self.cloud, self.spec.name)
            else:
                self.upload()
                self.register()
            self.share()
        except BaseException:
            try:
                self.cleanup(failed=True)
            except Exception as exc:  # keep the original error; say what is left over
                log.warning("%s: cleanup after failure failed too: %s (left: %s)", self.cloud, exc, self.created)
            raise
        self.cleanup(failed=False)
        out = self.result()
        out["seconds"] = round(time.monotonic() - started, 2)
        if self.progress:
            out["upload"] = self.progress.stats()
        return out

    def gc(self, keep: int, max_age_days: int | None = None, dry_run: bool = True,
           orphan_hours: float = 24) -> list[GcItem]:
        self.orphan_hours = orphan_hours
        items = self.gc_candidates(keep, max_age_days)
        for item in items:
            what = ", ".join([item.image, *item.extras])
            if dry_run:
                log.info("%s gc (dry run): would delete %s in %s (created %s)", self.cloud, what, item.where, item.created)
            else:
                log.info("%s gc: deleting %s in %s (created %s)", self.cloud, what, item.where, item.created)
                self.gc_delete(item)
        return items


def select_for_gc(images: list[tuple[str, Any]], keep: int, max_age_days: int | None,
                  now: datetime | None = None) -> list[Any]:
    """Given (created, image) pairs (created: sortable UTC text or datetime), return the
    images beyond the newest `keep`; with max_age_days, only those also older than that."""
    ordered = sorted(images, key=lambda p: _as_datetime(p[0]), reverse=True)
    old = ordered[keep:]
    if max_age_days is not None:
        now = now or datetime.now(UTC)
        old = [p for p in old if (now - _as_datetime(p[0])).days >= max_age_days]
    return [img for _, img in old]


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = str(value)
    for fmt in ("%Y%m%dt%H%M%Sz", "%Y-%m-%dT%H:%M:%S.%f%z", "%Y-%m-%dT%H:%M:%S%z"):
        try:
            dt = datetime.strptime(text.replace("Z", "+0000") if "T" in text else text, fmt)
            return dt if dt.tzinfo else dt.replace(tzinfo=UTC)
        except ValueError:
            continue
    try:
        return datetime.fromisoformat(text).astimezone(UTC)
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)


def require_file(path: Path, cloud: str, kind: str) -> int:
    try:
        size = Path(path).stat().st_size
    except FileNotFoundError:
        raise PublishError(f"{cloud}: artifact {kind} not found: {path}",
                           "build it first (doit build-<flavor>), then publish") from None
    if size == 0:
        raise PublishError(f"{cloud}: artifact {kind} is empty: {path}")
    return size


class WaitTimeout(PublishError, TimeoutError):
    """A cloud resource did not reach the wanted state before our own deadline."""


def wait_until(check, what: str, timeout_s: float, interval_s: float = 2.0):
    """Poll check() until it returns a truthy value; raise PublishError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    delay = min(0.2, interval_s)
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout_s:.0f}s waiting for {what}",
                              "raise the target's wait_minutes, or check the resource in the cloud console")
        time.sleep(delay)
        delay = min(delay * 2, interval_s)
