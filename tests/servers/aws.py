"""AWS test servers: moto's HTTP server, and an ImportSnapshot responder for the proxy.

moto does not implement ImportSnapshot/DescribeImportSnapshotTasks. ImportSnapshotTasks
answers those two EC2 calls (real EC2 query protocol, XML) and makes the snapshot in
moto the way EC2 would: it reads the S3 object and writes its blocks with the EBS
direct API, so the imported snapshot's blocks read back equal the disk.
"""
from __future__ import annotations

import hashlib
import base64
import itertools
import threading
from pathlib import Path
from xml.sax.saxutils import escape

import boto3

from .proxy import Reply, Request
from .util import REPO, free_port, need_tool, start, stop

NS = "http://ec2.amazonaws.com/doc/2016-11-15/"
BLOCK = 512 * 1024


class MotoServer:
    def __init__(self, logdir: Path):
        exe = need_tool(REPO / ".venv/bin/moto_server", "moto_server", "pip install 'moto[server]==5.2.5'")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start([exe, "-H", "127.0.0.1", "-p", str(self.port)], self.port, "moto_server",
                          logdir / "moto.log")

    def reset(self) -> None:
        import urllib.request
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/reset", method="POST"), timeout=10).read()

    def client(self, service: str, region: str = "us-east-1"):
        """A client straight to moto (not through the proxy), for checking state."""
        return boto3.client(service, region_name=region, endpoint_url=self.url,
                            aws_access_key_id="testing", aws_secret_access_key="testing")

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
