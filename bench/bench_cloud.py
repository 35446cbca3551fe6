#!/usr/bin/env python3
"""Cloud upload benchmark against the local test servers (not a test; prints a table).

For each upload path: MB/s against its local server next to the disk's plain
sequential read speed, and bytes sent against the disk's nominal and allocated sizes;
then the wall time of a no-change re-run of `doit publish-<flavor>` (all three clouds)
and of a forced re-publish (describe calls only, nothing uploaded).

    .venv/bin/python bench/bench_cloud.py [--size-mib 2048] [--data-mib 384] [--workers 16]

The disk is synthetic: --size-mib nominal, --data-mib of random data in 8 MiB extents
spread over it, holes elsewhere (like a real raw disk: mostly empty partitions).
Servers run on 127.0.0.1 (moto, Azurite, fake-gcs-server, local ARM/Compute servers).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cloud.disk import allocated_bytes  # noqa: E402
from pipeline import log  # noqa: E402
from pipeline.config import FlavorContext, FlavorPaths  # noqa: E402
from tests.servers import disks  # noqa: E402
from tests.servers.arm import IDENTITY_HEADER, ArmServer  # noqa: E402
from tests.servers.aws import ImportSnapshotTasks, MotoServer  # noqa: E402
from tests.servers.azurite import Azurite  # noqa: E402
from tests.servers.ebs import EbsServer  # noqa: E402
from tests.servers.fixtures import SUBSCRIPTION, make_flavor  # noqa: E402
from tests.servers.gce import FakeGcs, GceServer  # noqa: E402
from tests.servers.proxy import FaultProxy  # noqa: E402
from tests.servers.util import free_port  # noqa: E402

MIB = 1024 * 1024
MB = 1e6


def make_disk(build: Path, size_mib: int, data_mib: int) -> None:
    """raw + fixed VHD + GCE tar.gz with data_mib of random data in 8 MiB extents."""
    build.mkdir(parents=True, exist_ok=True)
    raw = build / "disk.raw"
    extents = max(1, data_mib // 8)
    stride = size_mib // extents
    with open(raw, "wb") as f:
        f.truncate(size_mib * MIB)
        for i in range(extents):
            f.seek(i * stride * MIB)
            f.write(os.urandom(8 * MIB))
    disks.make_vhd(raw, build / "disk.vhd")
    subprocess.run(["tar", "--format=gnu", "-S", "-cf", "-", "-C", str(build), "disk.raw"], check=True,
                   stdout=open(build / "disk.tar.gz.tmp", "wb"))
    with open(build / "disk.tar.gz", "wb") as out:  # fast gzip: random data does not compress anyway
        subprocess.run(["gzip", "-1", "-n", "-c", str(build / "disk.tar.gz.tmp")], check=True, stdout=out)
    (build / "disk.tar.gz.tmp").unlink()
    arts = [{"kind": k, "path": p, "sha256": disks.sha256(build / p), "size": (build / p).stat().st_size}
            for k, p in (("raw", "disk.raw"), ("azure-vhd", "disk.vhd"), ("gce-tar", "disk.tar.gz"))]
    (build / "manifest.json").write_text(json.dumps({"schema": 1, "artifacts": arts}))


def link_build(src: Path, build: Path) -> None:
    """Symlink a real build's three cloud artifacts and list them in a manifest."""
    build.mkdir(parents=True, exist_ok=True)
    real = json.loads((src / "manifest.json").read_text())["artifacts"]
    arts = [a for a in real if a["kind"] in ("raw", "azure-vhd", "gce-tar")]
    for a in arts:
        os.symlink(src / a["path"], build / a["path"])
    (build / "manifest.json").write_text(json.dumps({"schema": 1, "artifacts": arts}))


def read_speed(path: Path, cold: bool) -> float:
    """Plain sequential read of the allocated data, from the page cache (warm, as the
    uploads find it right after a build) or after dropping the file's cached pages (cold)."""
    from cloud.disk import data_extents
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    if cold:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    start, total = time.monotonic(), 0
    for a, b in data_extents(fd, size):
        pos = a
        while pos < b:
            total += len(os.pread(fd, min(8 * MIB, b - pos), pos))
            pos += 8 * MIB
    os.close(fd)
    return total / MB / (time.monotonic() - start)


def publish(cloud: str, flavor, paths) -> dict:
    from pipeline import publish as pub
    return pub.publish_stage(FlavorContext(flavor, paths, "0.1.0"), cloud)


def proc_cpu(pid: int) -> float:
    """CPU seconds used so far by a server process and its children that exited."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    """This process's CPU seconds, with its worker processes that have exited (EBS direct)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def measured(cloud: str, flavor, paths, server_pid: int) -> tuple[dict, float, float]:
    """publish, with the client's and the server's CPU seconds (2 cores are shared)."""
    c0, s0 = own_cpu(), proc_cpu(server_pid)
    res = publish(cloud, flavor, paths)
    return res, own_cpu() - c0, proc_cpu(server_pid) - s0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--data-mib", type=int, default=384)
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--processes", type=int, default=2, help="EBS direct worker processes for the last lean row")
    ap.add_argument("--from-build", type=Path, metavar="DIR",
                    help="use the raw/azure-vhd/gce-tar artifacts of a real build (e.g. build/red) instead")
    args = ap.parse_args()
    os.environ.setdefault("COS_LOG", "WARNING")
    log.setup()

    tmp = Path(tempfile.mkdtemp(prefix="bench-cloud-"))
    os.environ["COS_BUILD_DIR"] = str(tmp / "build")
    servers = []
    try:
        moto = MotoServer(tmp); servers.append(moto)
        ec2_proxy = FaultProxy(moto.port); servers.append(ec2_proxy)
        ec2_proxy.handlers.append(ImportSnapshotTasks(moto))
        ebs = EbsServer(tmp, moto.url); servers.append(ebs)
        azurite = Azurite(tmp); servers.append(azurite)
        arm = ArmServer(tmp); servers.append(arm)
        gcs_port = free_port()
        gcs = FakeGcs(tmp, gcs_port, f"http://127.0.0.1:{gcs_port}"); servers.append(gcs)
        gce = GceServer(gcs.url); servers.append(gce)
        os.environ.update({
            "AWS_ENDPOINT_URL": moto.url, "AWS_ENDPOINT_URL_EC2": ec2_proxy.url,  # EC2 via the import responder
            "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_EC2_METADATA_DISABLED": "true",
            "AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string(),
            "IDENTITY_ENDPOINT": f"{arm.url}/msi/token", "IDENTITY_HEADER": IDENTITY_HEADER,
            "REQUESTS_CA_BUNDLE": str(arm.ca_path), "COS_AZURE_ARM_ENDPOINT": arm.url,
            "AZURE_SUBSCRIPTION_ID": SUBSCRIPTION,
            "STORAGE_EMULATOR_HOST": gcs.url, "COS_GCP_COMPUTE_ENDPOINT": gce.url,
            "GOOGLE_APPLICATION_CREDENTIALS": str(gce.adc_file(tmp / "adc.json")),
        })
        moto.client("s3").create_bucket(Bucket="bench-staging")
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage
        storage.Client(project="bench", credentials=AnonymousCredentials()).bucket("bench-images").create()

        clouds = {"aws": {"regions": ["us-east-1"], "workers": args.workers},
                  "azure": {"resource_group": "rg", "location": "westeurope", "storage_account": "devstoreaccount1",
                            "workers": 8},
                  "gcp": {"project": "bench", "bucket": "bench-images", "family": "cos-bench"}}
        flavor = make_flavor(clouds, name="bench")
        paths = FlavorPaths(flavor)
        if args.from_build:
            link_build(args.from_build.resolve(), paths.build)
        else:
            print(f"making a {args.size_mib} MiB disk with {args.data_mib} MiB of data ...", flush=True)
            make_disk(paths.build, args.size_mib, args.data_mib)
        arts = {a["kind"]: a["path"] for a in json.loads(paths.manifest.read_text())["artifacts"]}
        raw, vhd, tar = (paths.build / arts[k] for k in ("raw", "azure-vhd", "gce-tar"))
        cold = read_speed(raw, cold=True)
        read = read_speed(raw, cold=False)
        rows = []

        def row(path, art, measurement):
            res, client_cpu, server_cpu = measurement
            up = res.get("upload") or {}
            mbs = up.get("mb_per_s", 0.0)
            rows.append((path, mbs, mbs / cold, up.get("bytes_sent", 0), art.stat().st_size, allocated_bytes(art),
                         res.get("seconds", 0.0), client_cpu, server_cpu))

        def aws_variant(name: str, **aws):
            """Another flavor name (so another image name: nothing to reuse) on the same raw disk."""
            f = make_flavor({"aws": {**clouds["aws"], **aws}}, name=name)
            p = FlavorPaths(f)
            p.build.mkdir(parents=True, exist_ok=True)
            for file in (raw.name, "manifest.json"):
                os.symlink(os.path.realpath(paths.build / file), p.build / file)
            return f, p

        row("aws ebs-direct (moto)", raw, measured("aws", *aws_variant("benchmoto", processes=1), moto.proc.pid))
        # moto spends ~4 ms of CPU per block and is the bottleneck above; the lean EBS
        # server (checksums verified, ~0.6 ms per block) shows the client's own ceiling.
        os.environ["AWS_ENDPOINT_URL_EBS"] = ebs.url
        row("aws ebs-direct (lean, 1 proc)", raw, measured("aws", *aws_variant("bench1p", processes=1), ebs.proc.pid))
        row(f"aws ebs-direct (lean, {args.processes} proc)", raw,
            measured("aws", *aws_variant("benchnp", processes=args.processes), ebs.proc.pid))
        del os.environ["AWS_ENDPOINT_URL_EBS"]
        row("aws s3 multipart (+import)", raw,
            measured("aws", *aws_variant("benchs3", upload="s3-import", bucket="bench-staging"), moto.proc.pid))
        row("azure page blob", vhd, measured("azure", flavor, paths, azurite.proc.pid))
        arm.use_blob_storage(azurite.connection_string(), azurite.url, keep_data=False)  # upload disks' pages
        md_flavor = make_flavor({"azure": {**clouds["azure"], "upload": "managed-disk"}}, name="benchmd")
        md_paths = FlavorPaths(md_flavor)
        md_paths.build.mkdir(parents=True, exist_ok=True)
        for name in (vhd.name, "manifest.json"):
            os.symlink(os.path.realpath(paths.build / name), md_paths.build / name)
        row("azure managed disk", vhd, measured("azure", md_flavor, md_paths, azurite.proc.pid))
        row("gcp gcs resumable", tar, measured("gcp", flavor, paths, gcs.proc.pid))

        # no-change re-run through doit (tasks up to date) and a forced re-publish (describes only)
        dodo = REPO / "tests/servers/publish_dodo.py"
        env = {**os.environ, "COS_TEST_FLAVOR": "bench", "COS_TEST_CLOUDS": json.dumps(clouds)}
        doit = [sys.executable, "-m", "doit", "-f", str(dodo), "--dir", str(REPO), "publish-bench"]
        subprocess.run(doit, env=env, capture_output=True, check=True)  # records doit state
        start = time.monotonic()
        out = subprocess.run(doit, env=env, capture_output=True, text=True, check=True)
        doit_s = time.monotonic() - start
        ran = [l for l in out.stdout.splitlines() if l.startswith(".  ")]
        forced = {}
        for cloud in ("aws", "azure", "gcp"):
            start = time.monotonic()
            publish(cloud, flavor, paths)
            forced[cloud] = time.monotonic() - start

        print(f"\ndisk: {raw.stat().st_size / MB:.0f} MB nominal, {allocated_bytes(raw) / MB:.0f} MB allocated; "
              f"plain sequential read of the data: {cold:.0f} MB/s cold, {read:.0f} MB/s from page cache\n"
              "(x read = upload MB/s / cold read MB/s)\n")
        print(f"{'path':28} {'MB/s':>7} {'x read':>7} {'sent MB':>8} {'nominal MB':>11} {'alloc MB':>9} "
              f"{'publish s':>10} {'client cpu s':>13} {'server cpu s':>13}")
        for p, mbs, ratio, sent, nominal, alloc, secs, ccpu, scpu in rows:
            print(f"{p:28} {mbs:7.1f} {ratio:7.2f} {sent / MB:8.1f} {nominal / MB:11.1f} {alloc / MB:9.1f} "
                  f"{secs:10.1f} {ccpu:13.1f} {scpu:13.1f}")
        print("(client cpu includes the in-process ImportSnapshot responder/ARM/Compute servers; "
              "server cpu is moto, Azurite or fake-gcs-server)")
        print(f"\nno-change `doit publish-bench` (aws+azure+gcp): {doit_s:.2f} s, tasks run: {ran or 'none'}")
        print("forced re-publish (describe/get only, nothing uploaded): "
              + ", ".join(f"{c} {s:.2f} s" for c, s in forced.items()))
        return 0
    finally:
        for s in reversed(servers):
            s.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
