"""Instance metadata servers on 127.0.0.1, speaking what cos-setup's datasources ask:

- Ec2Imds: IMDSv2 only, as our AMIs are registered (`HttpTokens: required`): PUT
  /latest/api/token first; a GET without a valid token gets 401, like EC2.
- GceMetadata: the metadata server; requests without `Metadata-Flavor: Google` get 403.
- AzureMetadata: IMDS (`Metadata: true`, api-version) with base64 userData and
  publicKeys, and the wire server's goal state + health endpoint, recording the Ready
  report (x-ms-version 2012-11-30 required).

Each: `port = server.start(...)` (a free port, or the one given), `server.url`,
`server.requests` (every request: method, path, query, headers, body), `server.stop()`;
also a context manager. The EC2 one is reused from QEMU through
`guestfwd=tcp:169.254.169.254:80-tcp:127.0.0.1:<port>`.
"""
from __future__ import annotations

import base64
import json
import secrets
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qs, urlsplit

Answer = tuple[int, dict[str, str], bytes]


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]   # lower-cased names
    body: bytes


class MetadataServer:
    """A small threaded HTTP server; subclasses answer in handle()."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._httpd: ThreadingHTTPServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serve(self, port: int = 0) -> int:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                split = urlsplit(self.path)
                req = Request(self.command, split.path, {k: v[0] for k, v in parse_qs(split.query).items()},
                              {k.lower(): v for k, v in self.headers.items()},
                              self.rfile.read(length) if length else b"")
                server.requests.append(req)
                status, headers, body = server.handle(req)
                self.send_response(status)
                for k, v in {"Content-Type": "text/plain", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = _any

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self.port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def handle(self, req: Request) -> Answer:
        raise NotImplementedError


def _text(status: int, body: str | bytes, headers: dict[str, str] | None = None) -> Answer:
    return status, headers or {}, body.encode() if isinstance(body, str) else body


def _keys(public_keys: list[str] | dict[str, str] | None) -> dict[str, str]:
    if not public_keys:
        return {}
    if isinstance(public_keys, dict):
        return dict(public_keys)
    return {f"key-{i}": key for i, key in enumerate(public_keys)}


# -- EC2 -------------------------------------------------------------------------------
@dataclass
class Ec2Imds(MetadataServer):
    user_data: bytes | None = None
    public_keys: dict[str, str] = field(default_factory=dict)   # key name -> OpenSSH public key
    instance_id: str = "i-0123456789abcdef0"

    def __post_init__(self) -> None:
        MetadataServer.__init__(self)
        self.tokens: set[str] = set()

    def start(self, user_data: str | bytes | None = None, public_keys: list[str] | dict[str, str] | None = None,
              port: int = 0) -> int:
        """Serve `user_data` (None: 404 like an instance without it) and `public_keys`."""
        self.user_data = user_data.encode() if isinstance(user_data, str) else user_data
        self.public_keys = _keys(public_keys)
        return self.serve(port)

    @property
    def v1_refused(self) -> int:
        """GETs of EC2 paths refused for lack of a token (what an IMDSv1 client would get).
        Only /latest/: the GCE and Azure probes ask the same address for their own paths."""
        return sum(1 for r in self.requests if r.method == "GET" and r.path.startswith("/latest/")
                   and r.headers.get("x-aws-ec2-metadata-token") not in self.tokens)

    def handle(self, req: Request) -> Answer:
        if req.method == "PUT" and req.path == "/latest/api/token":
            ttl = req.headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return _text(400, "missing or invalid x-aws-ec2-metadata-token-ttl-seconds")
            token = secrets.token_urlsafe(24)
            self.tokens.add(token)
            return _text(200, token, {"X-Aws-Ec2-Metadata-Token-Ttl-Seconds": ttl})
        if req.method != "GET":
            return _text(405, "")
        if req.headers.get("x-aws-ec2-metadata-token") not in self.tokens:
            return _text(401, "")   # HttpTokens: required
        names = list(self.public_keys)
        if req.path == "/latest/user-data":
            return _text(200, self.user_data) if self.user_data is not None else _text(404, "")
        if req.path == "/latest/meta-data/instance-id":
            return _text(200, self.instance_id)
        if req.path == "/latest/meta-data/public-keys/":
            if not names:
                return _text(404, "")
            return _text(200, "\n".join(f"{i}={n}" for i, n in enumerate(names)))
        parts = req.path.split("/")
        if (len(parts) == 6 and req.path.startswith("/latest/meta-data/public-keys/") and parts[4].isdigit()
                and int(parts[4]) < len(names) and parts[5] == "openssh-key"):
            return _text(200, self.public_keys[names[int(parts[4])]] + "\n")
        return _text(404, "")


# -- GCE -------------------------------------------------------------------------------
GOOGLE = {"Metadata-Flavor": "Google"}


@dataclass
class GceMetadata(MetadataServer):
    attributes: dict[str, str] = field(default_factory=dict)           # instance attributes
    project_attributes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        MetadataServer.__init__(self)

    def start(self, user_data: str | None = None, ssh_keys: str | None = None,
              project_ssh_keys: str | None = None, attributes: dict[str, str] | None = None, port: int = 0) -> int:
        """ssh_keys: GCE's "user:ssh-ed25519 AAAA... comment" lines; attributes: other
        instance attributes (e.g. block-project-ssh-keys)."""
        self.attributes = dict(attributes or {})
        if user_data is not None:
            self.attributes["user-data"] = user_data
        if ssh_keys is not None:
            self.attributes["ssh-keys"] = ssh_keys
        if project_ssh_keys is not None:
            self.project_attributes["ssh-keys"] = project_ssh_keys
        return self.serve(port)

    def handle(self, req: Request) -> Answer:
        if req.headers.get("metadata-flavor") != "Google" or "x-forwarded-for" in req.headers:
            return 403, GOOGLE, b"Missing Metadata-Flavor:Google header."
        base = "/computeMetadata/v1/"
        for prefix, attrs in (("instance/attributes/", self.attributes), ("project/attributes/",
                                                                          self.project_attributes)):
            if req.path == base + prefix and req.query.get("recursive") == "true":
                return 200, {**GOOGLE, "Content-Type": "application/json"}, json.dumps(attrs).encode()
            if req.path.startswith(base + prefix):
                name = req.path[len(base + prefix):]
                if name in attrs:
                    return 200, GOOGLE, attrs[name].encode()
        return 404, GOOGLE, b"Not Found"


# -- Azure -----------------------------------------------------------------------------
WIRE_VERSION = "2012-11-30"


@dataclass
class ReadyReport:
    incarnation: str
    container_id: str
    instance_id: str
    state: str


@dataclass
class AzureMetadata(MetadataServer):
    """IMDS and the wire server on one port (the client takes both base URLs)."""
    user_data: bytes = b""
    public_keys: list[str] = field(default_factory=list)
    container_id: str = "c6d5e0a8-6c1e-4b7e-9f7a-3a1d2b4c5e6f"
    instance_id: str = "4d1b2c3e-0000-4aaa-8bbb-0123456789ab._cos-vm"
    incarnation: str = "1"

    def __post_init__(self) -> None:
        MetadataServer.__init__(self)
        self.ready_reports: list[ReadyReport] = []

    def start(self, user_data: str | bytes = b"", public_keys: list[str] | None = None, port: int = 0) -> int:
        self.user_data = user_data.encode() if isinstance(user_data, str) else user_data
        self.public_keys = list(public_keys or [])
        return self.serve(port)

    def handle(self, req: Request) -> Answer:
        if req.path.startswith("/metadata/"):
            return self._imds(req)
        if req.path == "/machine/" or req.path == "/machine":
            return self._wire(req)
        return _text(404, "")

    def _imds(self, req: Request) -> Answer:
        json_type = {"Content-Type": "application/json; charset=utf-8"}
        if req.headers.get("metadata") != "true":
            return 400, json_type, b'{"error": "Bad request. Required metadata header not specified"}'
        if "api-version" not in req.query:
            return 400, json_type, b'{"error": "Bad request. api-version was not specified in the request"}'
        if req.path != "/metadata/instance":
            return _text(404, "")
        doc = {"compute": {"name": "cos-vm", "vmId": self.instance_id.split(".")[0], "osType": "Linux",
                           "userData": base64.b64encode(self.user_data).decode(),
                           "publicKeys": [{"keyData": k, "path": "/home/azureuser/.ssh/authorized_keys"}
                                          for k in self.public_keys]},
               "network": {"interface": []}}
        return 200, json_type, json.dumps(doc).encode()

    def _wire(self, req: Request) -> Answer:
        if req.headers.get("x-ms-version") != WIRE_VERSION:
            return _text(400, "<Error>x-ms-version missing or unsupported</Error>")
        comp = req.query.get("comp")
        if req.method == "GET" and comp == "goalstate":
            return 200, {"Content-Type": "text/xml; charset=utf-8"}, GOAL_STATE.format(
                incarnation=self.incarnation, container=self.container_id, instance=self.instance_id).encode()
        if req.method == "POST" and comp == "health":
            try:
                root = ET.fromstring(req.body)
            except ET.ParseError:
                return _text(400, "<Error>health report is not XML</Error>")
            report = ReadyReport(root.findtext("GoalStateIncarnation") or "",
                                 root.findtext("Container/ContainerId") or "",
                                 root.findtext("Container/RoleInstanceList/Role/InstanceId") or "",
                                 root.findtext("Container/RoleInstanceList/Role/Health/State") or "")
            if (report.container_id, report.instance_id, report.incarnation) != (
                    self.container_id, self.instance_id, self.incarnation):
                return _text(400, "<Error>unknown container, instance or incarnation</Error>")
            self.ready_reports.append(report)
            return _text(200, "")
        return _text(404, "")


GOAL_STATE = """<?xml version="1.0" encoding="utf-8"?>
<GoalState xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:noNamespaceSchemaLocation="goalstate10.xsd">
  <Version>2012-11-30</Version>
  <Incarnation>{incarnation}</Incarnation>
  <Machine><ExpectedState>Started</ExpectedState><StopRolesDeadlineHint>300000</StopRolesDeadlineHint></Machine>
  <Container>
    <ContainerId>{container}</ContainerId>
    <RoleInstanceList>
      <RoleInstance>
        <InstanceId>{instance}</InstanceId>
        <State>Started</State>
      </RoleInstance>
    </RoleInstanceList>
  </Container>
</GoalState>
"""
