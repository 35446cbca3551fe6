"""AWS test servers: moto's HTTP server, and an ImportSnapshot responder for the proxy.

moto does not implement ImportSnapshot/DescribeImportSnapshotTasks. ImportSnapshotTasks
answers those two EC2 calls (real EC2 query protocol, XML) and makes the snapshot in
moto the way EC2 would: it reads the S3 object and writes its blocks with the EBS
direct API, so the imported snapshot's blocks read back equal the disk.
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import os
import threading
from pathlib import Path
from xml.sax.saxutils import escape

import boto3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from .proxy import Reply, Request
from .util import REPO, free_port, need_tool, start, stop

NS = "http://ec2.amazonaws.com/doc/2016-11-15/"
BLOCK = 512 * 1024


class MotoServer:
    """moto_server on a free port. env adds to its environment, e.g.
    {"INITIAL_NO_AUTH_ACTION_COUNT": "3"}: IAM is enforced after the first 3 requests."""

    def __init__(self, logdir: Path, env: dict[str, str] | None = None, name: str = "moto"):
        exe = need_tool(REPO / ".venv/bin/moto_server", "moto_server", "pip install 'moto[server]==5.2.5'")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start([exe, "-H", "127.0.0.1", "-p", str(self.port)], self.port, "moto_server",
                          logdir / f"{name}.log", env={**os.environ, **(env or {})})
        self.credentials = ("testing", "testing")  # an IAM-enforcing server needs a real user's key

    def reset(self) -> None:
        import urllib.request
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/reset", method="POST"), timeout=10).read()

    def client(self, service: str, region: str = "us-east-1"):
        """A client straight to moto (not through the proxy), for checking state."""
        return boto3.client(service, region_name=region, endpoint_url=self.url,
                            aws_access_key_id=self.credentials[0], aws_secret_access_key=self.credentials[1])

    def close(self) -> None:
        stop(self.proc)


def _xml(action: str, inner: str) -> Reply:
    body = f'<?xml version="1.0" encoding="UTF-8"?><{action}Response xmlns="{NS}"><requestId>local</requestId>{inner}</{action}Response>'
    return Reply(200, body.encode(), {"Content-Type": "text/xml;charset=UTF-8"})


class ImportSnapshotTasks:
    """Handler for FaultProxy.handlers. A task is 'active' for `polls_before_done`
    describes, then completes (or fails when the S3 key contains 'corrupt')."""

    def __init__(self, moto: MotoServer, polls_before_done: int = 2):
        self.moto = moto
        self.polls = polls_before_done
        self.tasks: dict[str, dict] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def __call__(self, req: Request) -> Reply | None:
        form = req.form
        if req.action == "ImportSnapshot":
            task_id = f"import-snap-{next(self._ids):017x}"
            with self._lock:
                self.tasks[task_id] = {"bucket": form["DiskContainer.UserBucket.S3Bucket"],
                                       "key": form["DiskContainer.UserBucket.S3Key"],
                                       "format": form.get("DiskContainer.Format", ""),
                                       "description": form.get("Description", ""),
                                       "region": _region(req), "polls": 0, "snapshot": None, "form": form}
            return _xml("ImportSnapshot", f"<importTaskId>{task_id}</importTaskId>"
                        + self._detail(self.tasks[task_id]))
        if req.action == "DescribeImportSnapshotTasks":
            ids = [v for k, v in form.items() if k.startswith("ImportTaskId.")]
            items = []
            for task_id in ids:
                with self._lock:
                    task = self.tasks[task_id]
                    task["polls"] += 1
                    if task["polls"] > self.polls and task["snapshot"] is None and "corrupt" not in task["key"]:
                        task["snapshot"] = self._make_snapshot(task)
                items.append(f"<item><importTaskId>{task_id}</importTaskId>{self._detail(task)}</item>")
            return _xml("DescribeImportSnapshotTasks", f"<importSnapshotTaskSet>{''.join(items)}</importSnapshotTaskSet>")
        return None

    def _detail(self, task: dict) -> str:
        if task["snapshot"]:
            state = f"<status>completed</status><snapshotId>{task['snapshot']}</snapshotId>"
        elif "corrupt" in task["key"] and task["polls"] > self.polls:
            state = "<status>deleted</status><statusMessage>ClientError: Disk validation failed [Unsupported specified file format]</statusMessage>"
        else:
            state = "<status>active</status><statusMessage>converting</statusMessage><progress>42</progress>"
        return (f"<snapshotTaskDetail><format>{escape(task['format'])}</format>{state}"
                f"<userBucket><s3Bucket>{escape(task['bucket'])}</s3Bucket><s3Key>{escape(task['key'])}</s3Key></userBucket>"
                f"</snapshotTaskDetail>")

    def _make_snapshot(self, task: dict) -> str:
        s3 = self.moto.client("s3", task["region"])
        data = s3.get_object(Bucket=task["bucket"], Key=task["key"])["Body"].read()
        ebs = self.moto.client("ebs", task["region"])
        snap = ebs.start_snapshot(VolumeSize=max(1, -(-len(data) // 1024 ** 3)), Description=task["description"])
        count = 0
        for index in range(0, -(-len(data) // BLOCK)):
            block = data[index * BLOCK:(index + 1) * BLOCK].ljust(BLOCK, b"\0")
            if block.count(0) == BLOCK:
                continue
            ebs.put_snapshot_block(SnapshotId=snap["SnapshotId"], BlockIndex=index, BlockData=block,
                                   DataLength=BLOCK, ChecksumAlgorithm="SHA256",
                                   Checksum=base64.b64encode(hashlib.sha256(block).digest()).decode())
            count += 1
        ebs.complete_snapshot(SnapshotId=snap["SnapshotId"], ChangedBlocksCount=count)
        return snap["SnapshotId"]


def _region(req: Request) -> str:
    auth = req.headers.get("authorization", "")
    # Credential=AKID/20261125/us-east-1/ec2/aws4_request
    try:
        return auth.split("Credential=")[1].split("/")[2]
    except IndexError:
        return "us-east-1"


class ImageDeprecations:
    """Handler for FaultProxy.handlers: moto 5.2.5 answers EnableImageDeprecation with a
    500 (not implemented) after its IAM check. The call goes to moto first (so an IAM-
    enforcing moto still refuses it); on that 500 this answers as EC2 does (for images that
    exist in moto), remembers the time, and adds it as deprecationTime to moto's
    DescribeImages answers, so the product's describe-first check sees what it set."""

    def __init__(self, moto: MotoServer, forward):
        self.moto = moto
        self.forward = forward          # FaultProxy.forward: hands a request to moto
        self.times: dict[str, str] = {}  # image id -> DeprecateAt as sent

    def __call__(self, req: Request) -> Reply | None:
        if req.action == "EnableImageDeprecation":
            reply = self.forward(req)
            if reply.status != 500:  # refused by moto's IAM check, or implemented by a newer moto
                return reply
            image_id, at = req.form["ImageId"], req.form["DeprecateAt"]
            try:
                self.moto.client("ec2", _region(req)).describe_images(ImageIds=[image_id])
            except Exception:  # noqa: BLE001 - moto says it does not exist
                return Reply(400, _error("InvalidAMIID.NotFound", f"The image id '[{image_id}]' does not exist"),
                             {"Content-Type": "text/xml;charset=UTF-8"})
            self.times[image_id] = at
            return _xml("EnableImageDeprecation", "<return>true</return>")
        if req.action == "DescribeImages" and self.times:
            reply = self.forward(req)
            body = reply.body.decode()
            for image_id, at in self.times.items():
                body = body.replace(f"<imageId>{image_id}</imageId>",
                                    f"<imageId>{image_id}</imageId><deprecationTime>{escape(at)}</deprecationTime>")
            return Reply(reply.status, body.encode(), reply.headers)
        return None


def _error(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code>'
            f'<Message>{escape(message)}</Message></Error></Errors><RequestID>local</RequestID></Response>').encode()


class EmptyBodySigner:
    """Handler for FaultProxy.handlers in front of an IAM-enforcing moto. moto 5.2.5
    hashes a body-less request's parsed parameters instead of its empty body when it
    checks the signature, so EBS CompleteSnapshot (all parameters in headers) always ends
    in SignatureDoesNotMatch there. This re-signs that request with the caller's own key
    (`secrets`: access key id -> secret, filled by the test that made the key) and a `{}`
    body; moto still checks the signature and the caller's ebs:CompleteSnapshot permission."""

    def __init__(self, secrets: dict[str, str], forward):
        self.secrets = secrets
        self.forward = forward

    def __call__(self, req: Request) -> Reply | None:
        if req.method != "POST" or req.body or not req.path.startswith("/snapshots/completion/"):
            return None
        auth = req.headers.get("authorization", "")
        try:
            key_id, _, region, service, _ = auth.split("Credential=")[1].split(",")[0].split("/")
            signed = auth.split("SignedHeaders=")[1].split(",")[0].split(";")
        except (IndexError, ValueError):
            return None
        if key_id not in self.secrets:
            return None  # an unknown key: let moto refuse it
        headers = {k: v for k, v in req.headers.items() if k in signed and k != "x-amz-date"}
        headers["content-type"] = "application/json"
        signing = AWSRequest("POST", f"http://{req.headers['host']}{req.path}", data=b"{}", headers=headers)
        SigV4Auth(Credentials(key_id, self.secrets[key_id]), service, region).add_auth(signing)
        return self.forward(Request("POST", req.path, {k.lower(): v for k, v in signing.headers.items()}, b"{}"))


def snapshot_bytes(server, snapshot_id: str, size: int) -> bytes:
    """The snapshot's content read back with the EBS direct API from `server` (MotoServer or
    EbsServer); absent blocks are zeros."""
    ebs = server.client("ebs")
    out = bytearray(size)
    token = None
    while True:
        page = ebs.list_snapshot_blocks(SnapshotId=snapshot_id, **({"NextToken": token} if token else {}))
        for b in page["Blocks"]:
            data = ebs.get_snapshot_block(SnapshotId=snapshot_id, BlockIndex=b["BlockIndex"],
                                          BlockToken=b["BlockToken"])["BlockData"].read()
            start = b["BlockIndex"] * BLOCK
            out[start:start + BLOCK] = data[:max(0, size - start)]
        token = page.get("NextToken")
        if not token:
            return bytes(out)
