"""A small Azure Resource Manager server (HTTPS, trustme certificate) for azure-mgmt-compute.

It speaks the ARM REST calls cloud/azure.py uses: managed images (PUT/GET/DELETE/list),
gallery image definitions (GET) and versions (PUT/GET/DELETE/list), managed disks for
direct upload (PUT/GET/PATCH/DELETE/list, timeCreated, beginGetAccess/endGetAccess; see DiskStore), long-running
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
from datetime import UTC, datetime, timedelta
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
        self.disks: DiskStore | None = None       # set by use_blob_storage()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
        super().__init__(ctx)

    # -- test helpers ------------------------------------------------------------------
    def add_gallery_image(self, sub: str, rg: str, gallery: str, name: str, generation="V2", arch="x64",
                          security_type: str | None = "TrustedLaunchSupported") -> None:
        rid = f"/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/galleries/{gallery}/images/{name}"
        self.resources[rid.lower()] = {"id": rid, "name": name, "location": "westeurope",
                                       "type": "Microsoft.Compute/galleries/images",
                                       "properties": {"osType": "Linux", "osState": "Generalized",
                                                      "hyperVGeneration": generation, "architecture": arch,
                                                      "identifier": {"publisher": "cos", "offer": "cos", "sku": name},
                                                      "provisioningState": "Succeeded"}}
        if security_type:
            self.resources[rid.lower()]["properties"]["features"] = [{"name": "SecurityType", "value": security_type}]

    def use_blob_storage(self, connection_string: str, public_url: str, keep_data: bool = True) -> DiskStore:
        """Keep managed disks' upload blobs in this (Azurite) account; SAS URLs handed out
        point at public_url (e.g. a fault proxy in front of it). keep_data=False records
        only the page ranges at revoke (benchmarks: no read-back of GBs)."""
        self.disks = DiskStore(connection_string, public_url, keep_data)
        return self.disks

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
        if re.fullmatch(r"/operations/[0-9a-f]+/result", path):
            return self._operation_result(path.split("/")[2])
        if path.startswith("/operations/"):
            return self._operation(path.rsplit("/", 1)[1])
        action = re.fullmatch(rf"(?P<disk>{PROVIDER}/disks/[^/]+)/(?P<action>beginGetAccess|endGetAccess)", path)
        if action and method == "POST":
            return self._disk_access(action["disk"], action["action"], body or {})
        kinds = [(rf"{PROVIDER}/images", "Microsoft.Compute/images"),
                 (rf"{PROVIDER}/disks", "Microsoft.Compute/disks"),
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
                refused = self._refuse_put(kind, current, props)
                if refused:
                    return refused
                props["provisioningState"] = "Creating"
                if kind == "Microsoft.Compute/disks":  # read-only, set by ARM (cloud-gc ages orphan disks by it)
                    props["timeCreated"] = datetime.now(UTC).isoformat()
                res = {"id": path, "name": path.rsplit("/", 1)[1], "type": kind,
                       "location": (body or {}).get("location"), "tags": (body or {}).get("tags") or {},
                       "properties": props}
                self.resources[key] = res
                op = self._new_op(key, "create")
                # the disks API answers a new disk with 202 (+ Location), the others with 201
                if kind == "Microsoft.Compute/disks":
                    return 202, res, {"Azure-AsyncOperation": op, "Location": op}
                return (200 if current else 201), res, {"Azure-AsyncOperation": op}
            if method == "PATCH" and current is not None:
                if "tags" in (body or {}):
                    current["tags"] = body["tags"]
                current["properties"].update((body or {}).get("properties") or {})
                return 200, current, {"Azure-AsyncOperation": self._new_op(key, "update")}
            if method == "DELETE":
                if current is None:
                    return 204, None, {}
                if current["properties"].get("diskState") in ACTIVE_SAS:
                    return _conflict(f"disk {current['name']} has an active SAS (state "
                                     f"{current['properties']['diskState']}): revoke access first")
                op = self._new_op(key, "delete")
                return 202, None, {"Azure-AsyncOperation": op, "Location": op}
        return 405, {"error": {"code": "MethodNotAllowed", "message": method}}, {}

    def _refuse_put(self, kind: str, current: dict | None, props: dict):
        """What ARM checks on the PUTs the uploader makes (called with the lock held)."""
        if kind == "Microsoft.Compute/disks":
            if current is not None:
                return _conflict(f"disk {current['name']} exists; an upload disk is made once")
            creation = props.get("creationData") or {}
            if creation.get("createOption") == "Upload":
                size = creation.get("uploadSizeBytes") or 0
                if size < 20 * MIB + 512 or (size - 512) % MIB:
                    return 400, {"error": {"code": "InvalidParameter",
                                           "message": f"uploadSizeBytes {size}: must be N MiB + 512, N >= 20"}}, {}
                props["diskState"] = "ReadyToUpload"
                props["diskSizeBytes"] = size - 512
        if kind == "Microsoft.Compute/images":
            managed = ((props.get("storageProfile") or {}).get("osDisk") or {}).get("managedDisk")
            if managed:
                disk = self.resources.get(managed["id"].lower())
                if disk is None:
                    return 404, {"error": {"code": "NotFound", "message": f"source disk {managed['id']} not found"}}, {}
                if disk["properties"].get("diskState") != "Unattached":
                    return _conflict(f"source disk is {disk['properties'].get('diskState')}, not Unattached")
        return None

    # -- managed disk upload: beginGetAccess / endGetAccess ---------------------------------
    def _disk_access(self, path: str, action: str, body: dict):
        key = path.lower()
        with self.lock:
            disk = self.resources.get(key)
            if disk is None:
                return 404, {"error": {"code": "ResourceNotFound", "message": f"{path} not found"}}, {}
            props = disk["properties"]
            state = props.get("diskState")
            if action == "beginGetAccess":
                if body.get("access") != "Write" or state != "ReadyToUpload":
                    return _conflict(f"{body.get('access')} access to a disk in state {state} (this server "
                                     "grants Write to ReadyToUpload disks only)")
                props["diskState"] = "ActiveUpload"
        if action == "beginGetAccess":
            sas = self.disks.open(disk["name"], props["diskSizeBytes"] + 512, int(body["durationInSeconds"]))
            op = self._new_op(key, "grant", {"accessSAS": sas})
            return 202, None, {"Azure-AsyncOperation": op, "Location": op.replace("?", "/result?", 1)}
        if state == "ActiveUpload":
            self.disks.close(disk["name"])
        with self.lock:
            if state in ACTIVE_SAS:
                props["diskState"] = "Unattached"
        op = self._new_op(key, "revoke")
        return 202, None, {"Azure-AsyncOperation": op, "Location": op}

    def _operation_result(self, op_id: str):
        op = self.operations.get(op_id)
        if op is None or op.get("result") is None:
            return 404, {"error": {"code": "NotFound", "message": "no such operation result"}}, {}
        return 200, op["result"], {}

    def _new_op(self, key: str, action: str, result: dict | None = None) -> str:
        op_id = uuid.uuid4().hex
        self.operations[op_id] = {"key": key, "action": action, "polls": 0, "result": result}
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


ACTIVE_SAS = ("ActiveUpload", "ActiveSAS", "ActiveSASFrozen")
MIB = 1024 * 1024


def _conflict(message: str):
    return 409, {"error": {"code": "OperationNotAllowed", "message": message}}, {}


class DiskStore:
    """Managed disks' data as page blobs in Azurite, as Azure keeps them: granting write
    access makes a zeroed page blob of uploadSizeBytes (container named after the disk)
    and returns a SAS URL for it; revoking access records what was written (the bytes
    and the page ranges, so tests can read the disk back) and removes the blob, so the
    SAS stops working."""

    def __init__(self, connection_string: str, public_url: str, keep_data: bool = True):
        from azure.storage.blob import BlobServiceClient
        self.service = BlobServiceClient.from_connection_string(connection_string)
        self.public_url = public_url.rstrip("/")
        self.keep_data = keep_data
        self.data: dict[str, bytes] = {}                       # disk name -> content at revoke
        self.page_ranges: dict[str, list[tuple[int, int]]] = {}  # disk name -> written [start, end]

    @staticmethod
    def container(disk: str) -> str:
        return re.sub(r"[^a-z0-9-]", "-", disk.lower())[:63]

    def open(self, disk: str, size: int, seconds: int) -> str:
        from azure.core.exceptions import ResourceExistsError
        from azure.storage.blob import BlobSasPermissions, generate_blob_sas
        container = self.service.get_container_client(self.container(disk))
        try:
            container.create_container()
        except ResourceExistsError:
            pass
        container.get_blob_client("disk").create_page_blob(size)
        token = generate_blob_sas(self.service.account_name, container.container_name, "disk",
                                  account_key=self.service.credential.account_key,
                                  permission=BlobSasPermissions(read=True, write=True),
                                  expiry=datetime.now(UTC) + timedelta(seconds=seconds))
        return f"{self.public_url}/{container.container_name}/disk?{token}"

    def close(self, disk: str) -> None:
        container = self.service.get_container_client(self.container(disk))
        blob = container.get_blob_client("disk")
        self.page_ranges[disk] = [(r.start, r.end) for r in blob.list_page_ranges() if not r.cleared]
        if self.keep_data:
            self.data[disk] = blob.download_blob().readall()
        container.delete_container()
