"""Pulling an OS image without a docker daemon: skopeo (registry client, auth,
registries.conf for insecure registries and mirrors) and umoci (layers applied in
order: whiteouts, hard links, xattrs, file capabilities).

    skopeo inspect docker://REF             -> the manifest digest (what is recorded)
    skopeo copy docker://REPO@DIGEST oci:DIR:cos   (pulled by digest: skopeo checks it)
    umoci raw unpack --image DIR:cos ROOTFS

The image is always pulled by its digest (resolved first, recorded beside the image: what
"already up to date" compares). Verification (skipped by --no-verify): after the unpack
the config blob the OCI layout holds must be the one the registry serves for that digest
(the config names every layer's uncompressed digest, which umoci checks).

skopeo reads /etc/containers/registries.conf itself (`insecure = true` for plain HTTP);
credentials come from /etc/cos/registry-auth.json (containers-auth.json format) or
REGISTRY_AUTH_FILE. Under a scratch --root, the root's files are used instead.

The layer cache: the OCI layout is kept between upgrades (CACHE_NAME, beside the work
directory, so off COS_STATE: on an installed system in COS_PERSISTENT's /usr/local).
skopeo's oci: destination skips every blob the layout already holds, so a re-upgrade to
an image that differs in one layer fetches that layer only. After a successful upgrade the
layout is pruned to the blobs of the image now active (bounded: one image, compressed);
before a pull it is dropped first when its filesystem is short of room.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..install.durable import fsync_dir
from ..system import CosError, System, write_atomic

log = logging.getLogger("cos.upgrade")

AUTH_FILE = "/etc/cos/registry-auth.json"
REGISTRIES_CONF = "/etc/containers/registries.conf"
POLICY = "/etc/containers/policy.json"
DEFAULT_POLICY = b'{"default": [{"type": "insecureAcceptAnything"}]}\n'
OCI_TAG = "cos"
CACHE_NAME = ".cos-upgrade-cache"
REF_NAME = "org.opencontainers.image.ref.name"
# Room a pull needs beside the cache, per byte of compressed layers: the new blobs plus the
# unpacked tree (a gzip layer of a root file system unpacks to ~2-3x its size).
ROOM_FACTOR = 4
MIB = 1024 * 1024


@dataclass(frozen=True)
class Ref:
    """docker://-style reference split into repository and tag or digest."""
    repository: str
    tag: str | None = None
    digest: str | None = None

    @staticmethod
    def parse(text: str) -> Ref:
        text = text.removeprefix("docker://")
        if "@" in text:
            repo, digest = text.split("@", 1)
            return Ref(repo, digest=digest)
        last = text.rsplit("/", 1)[-1]
        if ":" in last:
            repo, tag = text.rsplit(":", 1)
            return Ref(repo, tag=tag)
        return Ref(text, tag="latest")

    def __str__(self) -> str:
        return f"{self.repository}@{self.digest}" if self.digest else f"{self.repository}:{self.tag}"


@dataclass
class Timings:
    """Seconds per phase, logged at the end (the README quotes them)."""
    phases: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, since: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + time.monotonic() - since

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())


class Skopeo:
    """skopeo with this System's auth file, registries.conf and policy."""

    def __init__(self, system: System, work: Path):
        self.system = system
        self.work = work

    def _global(self) -> list[str | Path]:
        policy = self.system.path(POLICY)
        if not policy.is_file():   # no policy file: pull anything (signatures arrive with cosign)
            policy = self.work / "policy.json"
            policy.write_bytes(DEFAULT_POLICY)
        return ["skopeo", "--policy", policy]

    def _namespace(self) -> list[str | Path]:
        """Under a scratch root, its registries.conf is bound over /etc/containers/registries.conf
        in a private mount namespace: skopeo 1.9 reads only that path (no env override), and
        it must be skopeo that reads it, as on the device."""
        conf = self.system.path(REGISTRIES_CONF)
        if self.system.is_host_root or not conf.is_file():
            return []
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f'mount --bind "$0" {REGISTRIES_CONF} && exec "$@"', conf]

    def _auth(self) -> list[str | Path]:
        auth = self.system.path(AUTH_FILE)
        return ["--authfile", auth] if auth.is_file() else []   # else skopeo reads REGISTRY_AUTH_FILE

    def run(self, verb: str, *args: str | Path, what: str) -> bytes:
        proc = self.system.run([*self._namespace(), *self._global(), verb, *self._auth(), *args], check=False)
        if proc.returncode != 0:
            raise _refusal(proc.stderr.decode(errors="replace"), what)
        return proc.stdout

    def digest(self, ref: Ref) -> str:
        if ref.digest:
            return ref.digest
        info = json.loads(self.run("inspect", "--no-tags", f"docker://{ref}", what=str(ref)))
        return str(info["Digest"])

    def config_digest(self, repo: str, digest: str) -> str:
        raw = self.run("inspect", "--raw", "--config", f"docker://{repo}@{digest}", what=f"{repo}@{digest}")
        return "sha256:" + hashlib.sha256(raw).hexdigest()

    def compressed_size(self, repo: str, digest: str) -> int | None:
        """Bytes of the image's blobs per its manifest; None for an index (the platform's
        manifest is picked by skopeo copy)."""
        raw = json.loads(self.run("inspect", "--raw", f"docker://{repo}@{digest}", what=f"{repo}@{digest}"))
        if "layers" not in raw:
            return None
        return int(raw["config"]["size"]) + sum(int(layer["size"]) for layer in raw["layers"])

    def tags(self, repository: str) -> list[str]:
        out = json.loads(self.run("list-tags", f"docker://{repository}", what=repository))
        return [str(t) for t in out.get("Tags") or []]


def _refusal(stderr: str, what: str) -> CosError:
    """skopeo's error as one line the user can act on."""
    text = stderr.lower()
    if "unauthorized" in text or "authentication required" in text or "denied" in text:
        return CosError(f"the registry needs credentials for {what}",
                        f"put them in {AUTH_FILE} (containers-auth.json format) or point REGISTRY_AUTH_FILE at them")
    if "manifest unknown" in text or "not found" in text or "name unknown" in text:
        return CosError(f"{what} does not exist in the registry (no such tag, digest or repository)",
                        "check the name with `skopeo list-tags docker://REPOSITORY`")
    if "http response to https client" in text or "x509" in text or "tls" in text:
        return CosError(f"cannot talk TLS to the registry of {what}",
                        f"a plain-HTTP registry must be marked `insecure = true` in {REGISTRIES_CONF}")
    last = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or ["(no message)"]
    return CosError(f"skopeo could not read {what}: {re.sub(r'^time=.*?msg=', '', last[0])}")


@dataclass(frozen=True)
class Pulled:
    rootfs: Path
    image: str            # what the user asked for
    digest: str | None    # the manifest digest pulled (None: a directory)
    layout: Path | None = None   # the layer cache it came through (pruned after success)


def pull(system: System, ref: Ref, work: Path, verify: bool, timings: Timings, cache: Path | None = None) -> Pulled:
    """The image unpacked into work/rootfs (work is off COS_STATE), its blobs fetched into
    `cache` (kept for the next upgrade) or, without one, into work/oci."""
    skopeo = Skopeo(system, work)
    start = time.monotonic()
    digest = skopeo.digest(ref)   # recorded even with --no-verify: the channel compares it
    source = f"{ref.repository}@{digest}"
    layout = cache or work / "oci"
    if cache is not None:
        make_room(cache, skopeo.compressed_size(ref.repository, digest))
    before = blob_sizes(layout)
    log.info("pulling %s%s into %s", ref, f" ({digest})" if digest and not ref.digest else "", layout)
    skopeo.run("copy", "--quiet", f"docker://{source}", f"oci:{layout}:{OCI_TAG}", what=str(ref))
    timings.add("pull", start)
    log.info(transfer_report(before, blob_sizes(layout), _referenced(layout)))
    start = time.monotonic()
    rootfs = work / "rootfs"
    log.info("unpacking the layers into %s", rootfs)
    system.run(["umoci", "raw", "unpack", "--image", f"{layout}:{OCI_TAG}", rootfs])
    timings.add("unpack", start)
    if verify:
        _verify(skopeo, layout, ref.repository, digest)
    return Pulled(rootfs, str(ref), digest, cache)


# ---- the layer cache -----------------------------------------------------------------------

def blob_sizes(layout: Path) -> dict[str, int]:
    blobs = layout / "blobs" / "sha256"
    if not blobs.is_dir():
        return {}
    return {f"sha256:{p.name}": p.stat().st_size for p in blobs.iterdir() if p.is_file()}


def transfer_report(before: dict[str, int], after: dict[str, int], wanted: set[str]) -> str:
    """What the registry had to send (README: "bytes pulled on a re-upgrade")."""
    new = {d: n for d, n in after.items() if d in wanted and d not in before}
    kept = {d: n for d, n in after.items() if d in wanted and d in before}
    return (f"fetched {len(new)} blob(s), {sum(new.values()) / MIB:.1f} MiB ({sum(new.values())} bytes); "
            f"{len(kept)} blob(s), {sum(kept.values()) / MIB:.1f} MiB reused from the layer cache")


def _manifest_digest(layout: Path) -> str:
    index = json.loads((layout / "index.json").read_text())
    named = [m for m in index["manifests"] if (m.get("annotations") or {}).get(REF_NAME) == OCI_TAG]
    if not named:
        raise CosError(f"the OCI layout {layout} has no image tagged {OCI_TAG!r}", f"remove {layout} and retry")
    return str(named[-1]["digest"])


def _referenced(layout: Path) -> set[str]:
    """The blobs of the tagged image: its manifest, config and layers."""
    top = _manifest_digest(layout)
    manifest = json.loads(_blob(layout, top))
    return {top, manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])}


def prune(layout: Path) -> None:
    """Keep only the blobs of the image just installed; index.json names only it."""
    keep = _referenced(layout)
    index = json.loads((layout / "index.json").read_text())
    index["manifests"] = [m for m in index["manifests"] if m["digest"] == _manifest_digest(layout)][-1:]
    write_atomic(layout / "index.json", json.dumps(index).encode(), mode=0o644)
    dropped = 0
    for digest, size in blob_sizes(layout).items():
        if digest not in keep:
            (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).unlink()
            dropped += size
    for leftover in layout.iterdir():   # skopeo's temporary blobs from an interrupted pull
        if leftover.name not in ("oci-layout", "index.json", "blobs"):
            _remove(leftover)
    fsync_dir(layout)
    log.info("layer cache %s: %d blob(s), %.1f MiB kept for the next upgrade, %.1f MiB dropped", layout, len(keep),
             sum(blob_sizes(layout).values()) / MIB, dropped / MIB)


def make_room(cache: Path, compressed: int | None) -> None:
    """Drop the cache first when its filesystem lacks room for this pull and unpack."""
    if not cache.exists():
        return
    held = sum(blob_sizes(cache).values())
    free = shutil.disk_usage(cache).free
    if compressed is not None and free < ROOM_FACTOR * compressed:
        log.warning("dropping the layer cache %s (%.1f MiB): %.1f MiB free there, the pull and unpack need about "
                    "%.1f MiB", cache, held / MIB, free / MIB, ROOM_FACTOR * compressed / MIB)
        _remove(cache)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _blob(layout: Path, digest: str) -> bytes:
    algo, hexd = digest.split(":", 1)
    return (layout / "blobs" / algo / hexd).read_bytes()


def _verify(skopeo: Skopeo, layout: Path, repo: str, digest: str) -> None:
    manifest = json.loads(_blob(layout, _manifest_digest(layout)))
    have, want = manifest["config"]["digest"], skopeo.config_digest(repo, digest)
    if have != want:
        raise CosError(f"verification failed: the unpacked image's config is {have}, the registry's "
                       f"{repo}@{digest} has {want}; nothing was changed", "pull again, or check the registry")
    log.info("verified: %s (config %s)", digest, want)
