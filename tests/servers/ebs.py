"""A lean EBS direct API server: blocks kept in memory, every checksum verified.

moto implements the EBS direct API, but one moto process spends ~4 ms of CPU per
512 KiB block and does not check the per-block SHA-256 or the linear aggregate
checksum. This server speaks the same REST calls (the shapes of botocore's `ebs`
model), verifies what real EBS verifies, and costs ~0.6 ms per block, so a benchmark
sees the client's ceiling, and a test fails when a checksum is wrong.

StartSnapshot and CompleteSnapshot are forwarded to moto (the upstream) so the snapshot
exists for EC2 there (DescribeSnapshots, RegisterImage); block data stays here.

Run in its own process (it must not share the client's GIL):
    python -m tests.servers.ebs --port P --upstream http://127.0.0.1:MOTO
Fault injection: POST /_faults {"block_status": 500, "count": 3, "after": 10} answers the
next `count` PutSnapshotBlock calls after `after` more with that status.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

BLOCK = 512 * 1024
PUT_BLOCK = re.compile(r"^/snapshots/([^/]+)/blocks/(\d+)$")
LIST_BLOCKS = re.compile(r"^/snapshots/([^/]+)/blocks$")
COMPLETE = re.compile(r"^/snapshots/completion/([^/]+)$")


@dataclass
class Snapshot:
    blocks: dict[int, bytes] = field(default_factory=dict)
    digests: dict[int, bytes] = field(default_factory=dict)
    status: str = "pending"


class EbsApi:
    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.snapshots: dict[str, Snapshot] = {}
        self.faults = {"block_status": 0, "count": 0, "after": 0}
        self.stats = {"put_blocks": 0, "bad_checksums": 0}

    async def handle(self, method: str, target: str, headers: dict[str, str], body: bytes):
        url = urlsplit(target)
        path, query = url.path, parse_qs(url.query)
        if method == "PUT" and (m := PUT_BLOCK.match(path)):
            return self.put_block(m[1], int(m[2]), headers, body)
        if method == "GET" and (m := PUT_BLOCK.match(path)):
            return self.get_block(m[1], int(m[2]))
        if method == "GET" and (m := LIST_BLOCKS.match(path)):
            return self.list_blocks(m[1], query)
        if method == "POST" and (m := COMPLETE.match(path)):
            return await self.complete(m[1], target, headers, body)
        if method == "POST" and path == "/snapshots":
            status, out_headers, out = await self.forward(method, target, headers, body)
            if status == 201:
                self.snapshots[json.loads(out)["SnapshotId"]] = Snapshot()
            return status, out_headers, out
        if path == "/_faults":
            if method == "POST":
                self.faults.update(json.loads(body))
            return 200, {}, json.dumps({**self.faults, **self.stats}).encode()
        return _error(404, "ResourceNotFoundException", f"no route for {method} {path}")

    def put_block(self, snap_id: str, index: int, headers: dict[str, str], body: bytes):
        snap = self.snapshots.get(snap_id)
        if snap is None or snap.status != "pending":
            return _error(404, "ResourceNotFoundException", f"The snapshot '{snap_id}' does not exist or is not pending")
        if self.faults["count"]:
            if self.faults["after"]:
                self.faults["after"] -= 1
            else:
                self.faults["count"] -= 1
                return _error(self.faults["block_status"], "InternalServerException", "injected fault")
        if len(body) != BLOCK or int(headers.get("x-amz-data-length", -1)) != BLOCK:
            return _error(400, "ValidationException", f"block {index}: data length {len(body)} is not {BLOCK}")
        digest = hashlib.sha256(body).digest()
        if headers.get("x-amz-checksum-algorithm") != "SHA256" or \
                base64.b64decode(headers.get("x-amz-checksum", "")) != digest:
            self.stats["bad_checksums"] += 1
            return _error(400, "ValidationException", f"block {index}: checksum does not match the data")
        snap.blocks[index], snap.digests[index] = body, digest
        self.stats["put_blocks"] += 1
        return 201, {"x-amz-Checksum": headers["x-amz-checksum"], "x-amz-Checksum-Algorithm": "SHA256"}, b""

    async def complete(self, snap_id: str, target: str, headers: dict[str, str], body: bytes):
        snap = self.snapshots.get(snap_id)
        if snap is None:
            return _error(404, "ResourceNotFoundException", f"The snapshot '{snap_id}' does not exist")
        count = int(headers.get("x-amz-changedblockscount", -1))
        if count != len(snap.blocks):
            return _error(400, "ValidationException", f"ChangedBlocksCount {count} != {len(snap.blocks)} blocks written")
        if "x-amz-checksum" in headers:
            if headers.get("x-amz-checksum-aggregation-method") != "LINEAR":
                return _error(400, "ValidationException", "only the LINEAR aggregation method is known here")
            whole = hashlib.sha256(b"".join(snap.digests[i] for i in sorted(snap.digests))).digest()
            if base64.b64decode(headers["x-amz-checksum"]) != whole:
                return _error(400, "ValidationException", "the aggregate checksum does not match the blocks")
        status, out_headers, out = await self.forward("POST", target, headers, body)
        if status < 300:
            snap.status = "completed"
        return status, out_headers, out

    def list_blocks(self, snap_id: str, query: dict):
        snap = self.snapshots.get(snap_id)
        if snap is None:
            return _error(404, "ResourceNotFoundException", f"The snapshot '{snap_id}' does not exist")
        start = int(query.get("pageToken", query.get("startingBlockIndex", ["0"]))[0])
        limit = int(query.get("maxResults", ["10000"])[0])
        indexes = [i for i in sorted(snap.blocks) if i >= start]
        page = indexes[:limit]
        out = {"Blocks": [{"BlockIndex": i, "BlockToken": f"t{i}"} for i in page], "BlockSize": BLOCK}
        if len(indexes) > limit:
            out["NextToken"] = str(indexes[limit])
        return 200, {"Content-Type": "application/json"}, json.dumps(out).encode()

    def get_block(self, snap_id: str, index: int):
        data = self.snapshots.get(snap_id, Snapshot()).blocks.get(index)
        if data is None:
            return _error(404, "ResourceNotFoundException", f"block {index} of '{snap_id}' does not exist")
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
        return 200, {"x-amz-Data-Length": str(len(data)), "x-amz-Checksum": checksum,
                     "x-amz-Checksum-Algorithm": "SHA256"}, data

    async def forward(self, method: str, target: str, headers: dict[str, str], body: bytes):
        """The request as sent, to moto (which does not check signatures without IAM enforcement)."""
        def call():
            req = urllib.request.Request(self.upstream + target, data=body or None, method=method,
                                         headers={k: v for k, v in headers.items() if k != "host"})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return resp.status, dict(resp.headers), resp.read()
            except urllib.error.HTTPError as exc:
                return exc.code, dict(exc.headers), exc.read()
        status, out_headers, out = await asyncio.get_running_loop().run_in_executor(None, call)
        keep = {k: v for k, v in out_headers.items() if k.lower() in ("content-type", "x-amzn-errortype")}
        return status, keep, out


def _error(status: int, code: str, message: str):
    return status, {"Content-Type": "application/json", "x-amzn-ErrorType": code}, \
        json.dumps({"__type": code, "message": message}).encode()


class Connection(asyncio.BufferedProtocol):
    """One HTTP/1.1 keep-alive connection. A BufferedProtocol so a block's 512 KiB are
    received straight into their own buffer, with no copying: the server must stay cheap
    next to the client it measures."""

    def __init__(self, api: EbsApi):
        self.api = api
        self.head = bytearray(64 * 1024)
        self.head_len = 0
        self.body: bytearray | None = None
        self.body_len = 0
        self.request: tuple[str, str, dict[str, str]] | None = None

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint: int):
        if self.body is not None:
            return memoryview(self.body)[self.body_len:]
        return memoryview(self.head)[self.head_len:]

    def buffer_updated(self, nbytes: int) -> None:
        if self.body is not None:
            self.body_len += nbytes
        else:
            self.head_len += nbytes
            end = self.head.find(b"\r\n\r\n", 0, self.head_len)
            if end < 0:
                if self.head_len == len(self.head):
                    self.transport.close()  # headers larger than any botocore sends
                return
            lines = bytes(self.head[:end]).decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
            self.request = (method, target, headers)
            self.body = bytearray(int(headers.get("content-length", 0)))
            extra = self.head[end + 4:self.head_len]  # body bytes that came with the headers
            self.body[:len(extra)] = extra
            self.body_len, self.head_len = len(extra), 0
            if headers.get("expect", "").lower() == "100-continue":
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.body_len == len(self.body):
            method, target, headers = self.request
            body, self.body, self.request = self.body, None, None  # a fresh buffer per request: kept as is
            self.transport.pause_reading()  # one request at a time per connection
            asyncio.ensure_future(self.answer(method, target, headers, body))

    async def answer(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        status, out_headers, out = await self.api.handle(method, target, headers, body)
        head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(out)}", *(f"{k}: {v}" for k, v in out_headers.items())]
        self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + out)
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc) -> None:
        pass


async def main_async(port: int, upstream: str) -> None:
    api = EbsApi(upstream)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(api), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="moto's URL (StartSnapshot/CompleteSnapshot go there)")
    args = ap.parse_args()
    asyncio.run(main_async(args.port, args.upstream))


class EbsServer:
    """The server above in its own process on a free port, in front of `upstream` (moto)."""

    def __init__(self, logdir: Path, upstream: str):
        from .util import REPO, free_port, start
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start([sys.executable, "-m", "tests.servers.ebs", "--port", str(self.port),
                           "--upstream", upstream], self.port, "ebs server", logdir / "ebs-server.log", cwd=REPO)

    def client(self, service: str = "ebs"):
        """An EBS client straight to this server (for reading snapshots back)."""
        import boto3
        return boto3.client(service, region_name="us-east-1", endpoint_url=self.url,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def faults(self, **set_faults) -> dict:
        req = urllib.request.Request(f"{self.url}/_faults", method="POST" if set_faults else "GET",
                                     data=json.dumps(set_faults).encode() if set_faults else None)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def close(self) -> None:
        from .util import stop
        stop(self.proc)


if __name__ == "__main__":
    main()
