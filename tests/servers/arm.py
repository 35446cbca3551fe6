"""A small Azure Resource Manager server (HTTPS, trustme certificate) for azure-mgmt-compute.

It speaks the ARM REST calls cloud/azure.py uses: managed images (PUT/GET/DELETE/list),
gallery image definitions (GET) and versions (PUT/GET/DELETE/list), long-running
operations answered with 201/202 + Azure-AsyncOperation (InProgress once, then
Succeeded), and an App Service style managed-identity token endpoint
(IDENTITY_ENDPOINT/IDENTITY_HEADER) so azure-identity's DefaultAzureCredential gets a
token with no test-only code path. Requests without that bearer token get 401.
Fault injection: `fail(method, pattern, times, status)` answers matching requests with
that status (429/503 carry Retry-After: 1).
"""
from __future__ import annotations

import re
import ssl
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import trustme

from .util import JsonApiServer

TOKEN = "local-arm-token-" + uuid.uuid4().hex
IDENTITY_HEADER = "local-identity-" + uuid.uuid4().hex
PROVIDER = r"/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.Compute"


class ArmServer(JsonApiServer):
    def __init__(self, workdir: Path):
        self.ca = trustme.CA()
        self.ca_path = workdir / "arm-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        self.resources: dict[str, dict] = {}     # lower-cased id -> resource JSON
        self.operations: dict[str, dict] = {}
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
        super().__init__(ctx)

    # -- test helpers ------------------------------------------------------------------
    def add_gallery_image(self, sub: str, rg: str, gallery: str, name: str, generation="V2", arch="x64") -> None:
        rid = f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/galleries/{gallery}/images/{name}"
        self.resources[rid.lower()] = {"id": rid, "name": name, "location": "westeurope",
                                       "type": "Microsoft.Compute/galleries/images",
                                       "properties": {"osType": "Linux", "osState": "Generalized",
                                                      "hyperVGeneration": generation, "architecture": arch,
                                                      "identifier": {"publisher": "cos", "offer": "cos", "sku": name},
                                                      "provisioningState": "Succeeded"}}

    def of_type(self, kind: str) -> list[dict]:
        return [r for r in self.resources.values() if r["type"] == kind]

    def puts(self, kind_fragment: str) -> list[dict]:
        return [b for m, p, b in self.requests if m == "PUT" and kind_fragment in p]

    # -- the protocol ------------------------------------------------------------------
    def fault_answer(self, status: int):
        code = "ServerBusy" if status != 429 else "TooManyRequests"
        return status, {"error": {"code": code, "message": "injected fault"}}, {"Retry-After": "1"}

    def handle(self, method: str, raw: str, headers: dict, body):
        url = urlsplit(raw)
        path = url.path.rstrip("/")
        if path == "/msi/token":
            if headers.get("x-identity-header") != IDENTITY_HEADER:
                return 401, {"error": "bad identity header"}, {}
            return 200, {"access_token": TOKEN, "expires_on": str(int(time.time()) + 3600),
                         "resource": parse_qs(url.query).get("resource", [""])[0], "token_type": "Bearer"}, {}
        if headers.get("authorization") != f"Bearer {TOKEN}":
            return 401, {"error": {"code": "InvalidAuthenticationToken", "message": "no or bad bearer token"}}, {}
        if "api-version" not in url.query:
            return 400, {"error": {"code": "MissingApiVersionParameter", "message": "api-version required"}}, {}
        if path.startswith("/operations/"):
            return self._operation(path.rsplit("/", 1)[1])
        kinds = [(rf"{PROVIDER}/images", "Microsoft.Compute/images"),
                 (rf"{PROVIDER}/galleries/[^/]+/images/[^/]+/versions", "Microsoft.Compute/galleries/images/versions"),
                 (rf"{PROVIDER}/galleries/[^/]+/images", "Microsoft.Compute/galleries/images")]
        for collection, kind in kinds:
            if re.fullmatch(collection + "/[^/]+", path):
                return self._resource(method, path, kind, body)
            if re.fullmatch(collection, path) and method == "GET":
                prefix = path.lower() + "/"
                items = [r for k, r in self.resources.items() if k.startswith(prefix) and "/" not in k[len(prefix):]]
                return 200, {"value": items}, {}
        return 404, {"error": {"code": "NotFound", "message": f"no route {method} {path}"}}, {}

    def _resource(self, method: str, path: str, kind: str, body):
        key = path.lower()
        with self.lock:
            current = self.resources.get(key)
            if method == "GET":
                if current is None:
                    return 404, {"error": {"code": "ResourceNotFound", "message": f"{path} not found"}}, {}
                return 200, current, {}
            if method == "PUT":
                props = dict((body or {}).get("properties") or {})
                props["provisioningState"] = "Creating"
                res = {"id": path, "name": path.rsplit("/", 1)[1], "type": kind,
                       "location": (body or {}).get("location"), "tags": (body or {}).get("tags") or {},
                       "properties": props}
                self.resources[key] = res
                op = self._new_op(key, "create")
                return (200 if current else 201), res, {"Azure-AsyncOperation": op}
            if method == "DELETE":
                if current is None:
                    return 204, None, {}
                op = self._new_op(key, "delete")
                return 202, None, {"Azure-AsyncOperation": op, "Location": op}
        return 405, {"error": {"code": "MethodNotAllowed", "message": method}}, {}

    def _new_op(self, key: str, action: str) -> str:
        op_id = uuid.uuid4().hex
        self.operations[op_id] = {"key": key, "action": action, "polls": 0}
        return f"{self.url}/operations/{op_id}?api-version=2024-01-01"

    def _operation(self, op_id: str):
        with self.lock:
            op = self.operations.get(op_id)
            if op is None:
                return 404, {"error": {"code": "NotFound", "message": "no such operation"}}, {}
            op["polls"] += 1
            if op["polls"] < 2:
                return 200, {"status": "InProgress"}, {"Retry-After": "0"}
            if op["action"] == "create" and op["key"] in self.resources:
                self.resources[op["key"]]["properties"]["provisioningState"] = "Succeeded"
            elif op["action"] == "delete":
                self.resources.pop(op["key"], None)
            return 200, {"status": "Succeeded"}, {}
