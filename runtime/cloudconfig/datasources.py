"""User-data and SSH keys from the platform: NoCloud (a local cidata filesystem), EC2
(IMDSv2), GCE and Azure (which also gets its "Ready" report).

Probing is cheap and bounded: the local source first; the network ones only when asked
(from the `network` stage on), all at once in threads with a short timeout, so a
machine with none of them loses about PROBE_TIMEOUT seconds once per boot and never
hangs. What was found is kept in /run/cos so the later stages of the boot read it
without asking again."""
from __future__ import annotations

import base64
import json
import logging
import shutil
import tempfile
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from xml.sax.saxutils import escape

import yaml

from ..system import CosError, System, write_atomic

log = logging.getLogger("cos")

PROBE_TIMEOUT = 3.0     # a missing service: connect refused at once, or silence this long (TCG guests are slow)
FETCH_TIMEOUT = 10.0    # once a platform answered, its other answers may take a little longer
METADATA_IP = "http://169.254.169.254"
AZURE_WIRE = "http://168.63.129.16"
AZURE_WIRE_VERSION = "2012-11-30"
CACHE_DIR = "/run/cos"
NONE = "none"   # /run/cos/datasource when every source was probed and none answered


@dataclass
class Found:
    datasource: str
    user_data: bytes = b""
    ssh_keys: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)   # e.g. a failed Azure Ready report


class Datasource(Protocol):
    name: str
    network: bool

    def probe(self, system: System) -> Found | None:
        """None when this platform is not there; CosError when it is but fails."""
        ...


# -- HTTP without proxies (an http_proxy in the environment must never see IMDS) ---------
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def http(method: str, url: str, headers: dict[str, str], timeout: float, data: bytes | None = None) -> Reply:
    """One request; an HTTP error status is a Reply, a network failure raises OSError."""
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())


def _fetch(what: str, method: str, url: str, headers: dict[str, str], data: bytes | None = None,
           missing_ok: bool = True) -> bytes | None:
    """A request to a platform known to be there: 404 -> None, other failures -> CosError."""
    try:
        reply = http(method, url, headers, FETCH_TIMEOUT, data)
    except OSError as exc:
        raise CosError(f"{what}: {method} {url} failed: {getattr(exc, 'reason', exc)}") from None
    if reply.status == 404 and missing_ok:
        return None
    if reply.status >= 300:
        raise CosError(f"{what}: {method} {url} answered HTTP {reply.status}")
    return reply.body


def _key_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


# -- NoCloud ---------------------------------------------------------------------------
@dataclass
class NoCloud:
    labels: tuple[str, ...] = ("cidata", "CIDATA")
    seed_dirs: tuple[str, ...] = ("/var/lib/cloud/seed/nocloud", "/var/lib/cloud/seed/nocloud-net")
    name: str = "nocloud"
    network: bool = False

    def probe(self, system: System) -> Found | None:
        for seed in self.seed_dirs:
            if system.path(seed).is_dir():
                return self.read(system.path(seed), f"nocloud:{seed}")
        device = self.device(system)
        if device is None:
            return None
        if system.dry_run:
            log.info("would mount %s read-only and read its user-data", device)
            return None
        return self.read_device(system, device)

    def device(self, system: System) -> str | None:
        """The cidata filesystem of the running machine (never of the host behind a scratch root)."""
        if not system.is_host_root:
            return None
        for label in self.labels:
            link = Path("/dev/disk/by-label") / label
            if link.exists():
                return str(link.resolve())
        if shutil.which("blkid") is None:
            return None
        for label in self.labels:
            proc = system.run(["blkid", "-l", "-o", "device", "-t", f"LABEL={label}"], check=False)
            if proc.returncode == 0 and proc.stdout.strip():
                return str(proc.stdout.decode().split()[0])
        return None

    def read_device(self, system: System, device: str) -> Found:
        run_dir = system.path(CACHE_DIR)
        run_dir.mkdir(parents=True, exist_ok=True)
        mnt = Path(tempfile.mkdtemp(prefix="cidata.", dir=run_dir))
        try:
            system.run(["mount", "-o", "ro", device, mnt])
            try:
                return self.read(mnt, f"nocloud:{device}")
            finally:
                system.run(["umount", mnt], check=False)
        finally:
            mnt.rmdir()

    def read(self, seed: Path, name: str) -> Found:
        user_data = (seed / "user-data").read_bytes() if (seed / "user-data").exists() else b""
        keys: list[str] = []
        if (seed / "meta-data").exists():
            try:
                meta = yaml.safe_load((seed / "meta-data").read_text()) or {}
            except yaml.YAMLError as exc:
                raise CosError(f"{name}/meta-data is not valid YAML: {exc}") from None
            keys = _public_keys(meta.get("public-keys") if isinstance(meta, dict) else None)
        return Found(name, user_data, keys)


def _public_keys(value: Any) -> list[str]:
    """cloud-init's meta-data public-keys: a string, a list, or a mapping of them."""
    if isinstance(value, str):
        return _key_lines(value)
    if isinstance(value, list):
        return [k for v in value for k in _public_keys(v)]
    if isinstance(value, dict):
        return [k for v in value.values() for k in _public_keys(v)]
    return []


# -- EC2 (IMDSv2: our AMIs require the token; a v1 GET is refused there) -----------------
@dataclass
class Ec2:
    base: str = METADATA_IP
    timeout: float = PROBE_TIMEOUT
    name: str = "ec2"
    network: bool = True

    def probe(self, system: System) -> Found | None:
        try:
            reply = http("PUT", f"{self.base}/latest/api/token",
                         {"X-aws-ec2-metadata-token-ttl-seconds": "21600"}, self.timeout, b"")
        except OSError:
            return None
        if reply.status != 200 or not reply.body:
            return None
        headers = {"X-aws-ec2-metadata-token": reply.body.decode().strip()}
        user_data = _fetch("ec2", "GET", f"{self.base}/latest/user-data", headers) or b""
        keys = []
        listing = _fetch("ec2", "GET", f"{self.base}/latest/meta-data/public-keys/", headers) or b""
        for line in listing.decode().splitlines():
            index = line.split("=")[0].strip()
            if index.isdigit():
                key = _fetch("ec2", "GET", f"{self.base}/latest/meta-data/public-keys/{index}/openssh-key", headers)
                keys += _key_lines((key or b"").decode())
        return Found(self.name, user_data, keys)


# -- GCE -------------------------------------------------------------------------------
@dataclass
class Gce:
    base: str = METADATA_IP   # metadata.google.internal is this address; no DNS needed
    timeout: float = PROBE_TIMEOUT
    name: str = "gce"
    network: bool = True

    def probe(self, system: System) -> Found | None:
        headers = {"Metadata-Flavor": "Google"}
        url = f"{self.base}/computeMetadata/v1/instance/attributes/?recursive=true"
        try:
            reply = http("GET", url, headers, self.timeout)
        except OSError:
            return None
        if reply.headers.get("metadata-flavor") != "Google" or reply.status != 200:
            return None
        try:
            attributes = json.loads(reply.body or b"{}")
        except ValueError:
            raise CosError(f"gce: {url} did not answer JSON") from None
        keys = _gce_keys(str(attributes.get("ssh-keys", "")))
        if str(attributes.get("block-project-ssh-keys", "")).lower() != "true":
            project = _fetch("gce", "GET", f"{self.base}/computeMetadata/v1/project/attributes/ssh-keys", headers)
            keys += _gce_keys((project or b"").decode())
        return Found(self.name, str(attributes.get("user-data", "")).encode(), keys)


def _gce_keys(text: str) -> list[str]:
    """GCE's "user:ssh-ed25519 AAAA... comment" lines; every key goes to root."""
    return [line.split(":", 1)[1].strip() for line in _key_lines(text) if ":" in line]


# -- Azure -----------------------------------------------------------------------------
@dataclass
class Azure:
    imds: str = METADATA_IP
    wire: str = AZURE_WIRE
    timeout: float = PROBE_TIMEOUT
    name: str = "azure"
    network: bool = True

    def probe(self, system: System) -> Found | None:
        url = f"{self.imds}/metadata/instance?api-version=2021-02-01"
        try:
            reply = http("GET", url, {"Metadata": "true"}, self.timeout)
        except OSError:
            return None
        if reply.status != 200:
            return None
        try:
            compute = json.loads(reply.body).get("compute", {})
            user_data = base64.b64decode(compute.get("userData") or "")
        except (ValueError, AttributeError):
            return None  # not Azure's IMDS
        keys = [k.get("keyData", "").strip() for k in compute.get("publicKeys") or [] if isinstance(k, dict)]
        found = Found(self.name, user_data, [k for k in keys if k])
        if system.dry_run:
            log.info("would report Ready to the Azure wire server %s", self.wire)
        else:
            try:
                self.report_ready()
            except CosError as exc:
                found.errors.append(str(exc))
        return found

    def report_ready(self) -> None:
        """Tell the platform the VM is up; without Microsoft's agent nobody else does, and
        the VM's creation fails after a long timeout."""
        headers = {"x-ms-version": AZURE_WIRE_VERSION, "x-ms-agent-name": "cos-setup"}
        body = _fetch("azure", "GET", f"{self.wire}/machine/?comp=goalstate", headers, missing_ok=False) or b""
        try:
            state = ET.fromstring(body)
        except ET.ParseError:
            raise CosError(f"azure: the goal state from {self.wire} is not XML") from None
        incarnation = state.findtext("Incarnation") or ""
        container = state.findtext("Container/ContainerId") or ""
        instance = state.findtext("Container/RoleInstanceList/RoleInstance/InstanceId") or ""
        if not (incarnation and container and instance):
            raise CosError(f"azure: the goal state from {self.wire} lacks Incarnation/ContainerId/InstanceId")
        report = HEALTH_XML.format(incarnation=escape(incarnation), container=escape(container),
                                   instance=escape(instance)).encode()
        _fetch("azure", "POST", f"{self.wire}/machine/?comp=health",
               {**headers, "Content-Type": "text/xml;charset=utf-8"}, report, missing_ok=False)
        log.info("azure: reported Ready (container %s, instance %s)", container, instance)


HEALTH_XML = """<?xml version="1.0" encoding="utf-8"?>
<Health xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema">
  <GoalStateIncarnation>{incarnation}</GoalStateIncarnation>
  <Container>
    <ContainerId>{container}</ContainerId>
    <RoleInstanceList>
      <Role>
        <InstanceId>{instance}</InstanceId>
        <Health>
          <State>Ready</State>
        </Health>
      </Role>
    </RoleInstanceList>
  </Container>
</Health>
"""


def default_sources() -> list[Datasource]:
    return [NoCloud(), Ec2(), Gce(), Azure()]


# -- probing and the per-boot cache ----------------------------------------------------
def _try(ds: Datasource, system: System) -> tuple[Found | None, str | None]:
    try:
        return ds.probe(system), None
    except (CosError, OSError) as exc:
        return None, f"datasource {ds.name}: {exc}"
    except Exception as exc:  # an odd answer (bad encoding, odd JSON) must not cost the boot its stage
        return None, f"datasource {ds.name}: {type(exc).__name__}: {exc}"


def probe(sources: list[Datasource], system: System, network: bool) -> tuple[Found | None, list[str]]:
    """The first source (in list order) that answers; local ones first, then the network
    ones in parallel. Also the errors of sources that are there but failed."""
    errors: list[str] = []
    for ds in (s for s in sources if not s.network):
        found, error = _try(ds, system)
        errors += [error] if error else []
        if found:
            return found, errors
    remote = [s for s in sources if s.network] if network else []
    if not remote:
        return None, errors
    with ThreadPoolExecutor(len(remote)) as pool:
        results = list(pool.map(lambda ds: _try(ds, system), remote))
    errors += [e for _, e in results if e]
    return next((f for f, _ in results if f), None), errors


def cached(system: System) -> Found | str | None:
    """This boot's datasource result: a Found, NONE (all probed, nothing there), or None."""
    name_file = system.path(f"{CACHE_DIR}/datasource")
    if not name_file.exists():
        return None
    name = name_file.read_text().strip()
    if name == NONE:
        return NONE
    data = system.path(f"{CACHE_DIR}/userdata")
    keys = system.path(f"{CACHE_DIR}/ssh-keys")
    return Found(name, data.read_bytes() if data.exists() else b"",
                 _key_lines(keys.read_text()) if keys.exists() else [])


def save(system: System, found: Found | None) -> None:
    if system.dry_run:
        return
    if found is not None:
        write_atomic(system.path(f"{CACHE_DIR}/userdata"), found.user_data, mode=0o600)
        write_atomic(system.path(f"{CACHE_DIR}/ssh-keys"), "".join(f"{k}\n" for k in found.ssh_keys).encode(),
                     mode=0o600)
    # the name last: its presence says the rest is complete
    write_atomic(system.path(f"{CACHE_DIR}/datasource"), f"{found.datasource if found else NONE}\n".encode())
