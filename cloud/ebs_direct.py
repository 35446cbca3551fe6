"""EBS direct API block upload: 512 KiB blocks in parallel, on threads and processes.

botocore spends ~1.4 ms of CPU per PutSnapshotBlock (serialising, signing, http.client),
so one Python process tops out near one core's worth of blocks (~350 MB/s on a 2020s
x86 core) however fast the network is. With `processes: N` large uploads run on N worker
processes, each with its own client and a few threads; small ones always stay in-process,
where starting workers (~0.2 s each) would cost more than it saves. The default is one
process: on a 2-core machine a second one only competes with the rest (measured in
bench/bench_cloud.py).
"""
from __future__ import annotations

import base64
import hashlib
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from .aws_client import aws_error, client_config
from .disk import for_each_block, is_zero, read_block

log = logging.getLogger("cos.cloud.aws")

BLOCK = 512 * 1024
CHUNK_BLOCKS = 64                  # blocks per task handed to a worker process (32 MiB)
MULTIPROCESS_MIN = 128 * 1024 ** 2  # less data than this is sent in-process
SNAPSHOT_APPEAR_S = 120            # "snapshot does not exist" right after StartSnapshot: retry this long


@dataclass(frozen=True)
class Job:
    """What a worker needs to send blocks of one file to one snapshot (picklable)."""
    path: str
    size: int
    snapshot_id: str
    region: str
    endpoint_url: str
    credentials: tuple[str, str, str | None]  # frozen key, secret, token: never logged
    threads: int
    skip_zero: bool


def upload_blocks(job: Job, indexes: list[int], processes: int,
                  progress: Callable[[int, int], None], client=None) -> dict[int, bytes]:
    """Send blocks `indexes` of job.path; returns {index: sha256 digest} of the blocks
    sent (all-zero blocks are skipped when job.skip_zero). progress(bytes, requests) is
    called as blocks go out. The first failure stops the upload and is raised. In-process,
    `client` (the caller's, with refreshable credentials) is used when given."""
    if processes <= 1 or len(indexes) * BLOCK < MULTIPROCESS_MIN:
        return _Sender(job, client).send(indexes, progress)
    chunks = [indexes[i:i + CHUNK_BLOCKS] for i in range(0, len(indexes), CHUNK_BLOCKS)]
    digests: dict[int, bytes] = {}
    # spawn, not fork: the caller (doit) has threads of its own, and a forked child could
    # inherit a lock another thread held. Workers import boto3 anew (~0.2 s each).
    pool = ProcessPoolExecutor(min(processes, len(chunks)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(job,))
    try:
        pending = {pool.submit(_send_chunk, chunk) for chunk in chunks}
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                sent, nbytes, requests = future.result()  # raises the worker's error
                digests.update(sent)
                progress(nbytes, requests)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return digests


class _Sender:
    """One client and a thread pool, in the calling process or in a worker process."""

    def __init__(self, job: Job, client=None):
        self.job = job
        self.ebs = client
        if client is None:  # a worker process: its own client, with the parent's frozen credentials
            key, secret, token = job.credentials
            session = boto3.Session(aws_access_key_id=key, aws_secret_access_key=secret, aws_session_token=token)
            self.ebs = session.client("ebs", region_name=job.region, endpoint_url=job.endpoint_url,
                                      config=client_config(job.threads))
        self.fd = os.open(job.path, os.O_RDONLY)

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)

    def send(self, indexes: list[int], progress: Callable[[int, int], None] | None = None) -> dict[int, bytes]:
        digests: dict[int, bytes] = {}

        def put(index: int) -> None:
            data = read_block(self.fd, index, BLOCK, self.job.size)
            if self.job.skip_zero and is_zero(data):
                return
            digest = hashlib.sha256(data).digest()
            self._put(index, data, base64.b64encode(digest).decode())
            digests[index] = digest
            if progress:
                progress(len(data), 1)

        for_each_block(indexes, put, self.job.threads, "ebs-put")
        return digests

    def _put(self, index: int, data: bytes, checksum: str) -> None:
        deadline = time.monotonic() + SNAPSHOT_APPEAR_S
        delay = 0.5
        while True:
            try:
                self.ebs.put_snapshot_block(SnapshotId=self.job.snapshot_id, BlockIndex=index, BlockData=data,
                                            DataLength=BLOCK, Checksum=checksum, ChecksumAlgorithm="SHA256")
                return
            except ClientError as exc:
                # Right after StartSnapshot the snapshot may not be visible yet.
                if exc.response["Error"]["Code"] == "ResourceNotFoundException" and time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 10)
                    continue
                raise aws_error(exc, f"PutSnapshotBlock {index} of {self.job.snapshot_id}") from exc
            except BotoCoreError as exc:
                raise aws_error(exc, f"PutSnapshotBlock {index} of {self.job.snapshot_id}") from exc


_worker: _Sender | None = None


def _init_worker(job: Job) -> None:
    global _worker
    _worker = _Sender(job)


def _send_chunk(indexes: list[int]) -> tuple[dict[int, bytes], int, int]:
    assert _worker is not None
    digests = _worker.send(indexes)
    return digests, len(digests) * BLOCK, len(digests)
