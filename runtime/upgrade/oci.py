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
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..system import CosError, System

log = logging.getLogger("cos.upgrade")

AUTH_FILE = "/etc/cos/registry-auth.json"
REGISTRIES_CONF = "/etc/containers/registries.conf"
POLICY = "/etc/containers/policy.json"
DEFAULT_POLICY = b'{"default": [{"type": "insecureAcceptAnything"}]}\n'
OCI_TAG = "cos"


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


def pull(system: System, ref: Ref, work: Path, verify: bool, timings: Timings) -> Pulled:
    """The image unpacked into work/rootfs (work is off COS_STATE)."""
    skopeo = Skopeo(system, work)
    start = time.monotonic()
    digest = skopeo.digest(ref)   # recorded even with --no-verify: the channel compares it
    source = f"{ref.repository}@{digest}"
    layout = work / "oci"
    log.info("pulling %s%s into %s", ref, f" ({digest})" if digest and not ref.digest else "", layout)
    skopeo.run("copy", "--quiet", f"docker://{source}", f"oci:{layout}:{OCI_TAG}", what=str(ref))
    timings.add("pull", start)
    start = time.monotonic()
    rootfs = work / "rootfs"
    log.info("unpacking the layers into %s", rootfs)
    system.run(["umoci", "raw", "unpack", "--image", f"{layout}:{OCI_TAG}", rootfs])
    timings.add("unpack", start)
    if verify:
        _verify(skopeo, layout, ref.repository, digest)
    return Pulled(rootfs, str(ref), digest)


def _blob(layout: Path, digest: str) -> bytes:
    algo, hexd = digest.split(":", 1)
    return (layout / "blobs" / algo / hexd).read_bytes()


def _verify(skopeo: Skopeo, layout: Path, repo: str, digest: str) -> None:
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(_blob(layout, index["manifests"][0]["digest"]))
    have, want = manifest["config"]["digest"], skopeo.config_digest(repo, digest)
    if have != want:
        raise CosError(f"verification failed: the unpacked image's config is {have}, the registry's "
                       f"{repo}@{digest} has {want}; nothing was changed", "pull again, or check the registry")
    log.info("verified: %s (config %s)", digest, want)
