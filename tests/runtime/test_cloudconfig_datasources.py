"""Datasources against real local metadata servers (tests/servers/imds.py): EC2 IMDSv2,
GCE, Azure (with its Ready report), NoCloud seed; the per-boot cache, late stages, and
probing that stays short when nothing is there."""
from __future__ import annotations

import gzip
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.cloudconfig import datasources as ds
from runtime.cloudconfig.cli import main
from tests.servers.imds import AzureMetadata, Ec2Imds, GceMetadata

from .cloudconfig_root import log_of, root_fixture, stage, write_config  # noqa: F401 (a fixture)

KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKeyA a@test"
KEY_B = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABKeyB b@test"

# the deployment user-data, shortened: a layout in rootfs.after, steps in later stages
LATE_USER_DATA = """\
name: "Default deployment"
stages:
  rootfs.after:
    - name: "Repart image"
      commands: ['echo rootfs.after >> "$COS_ROOT/order"']
  initramfs:
    - commands: ['echo initramfs >> "$COS_ROOT/order"']
  boot:
    - commands: ['echo boot >> "$COS_ROOT/order"']
  network:
    - name: "Deploy"
      commands: ['echo network >> "$COS_ROOT/order"']
  reconcile:
    - commands: ['echo reconcile >> "$COS_ROOT/order"']
"""


@pytest.fixture
def ec2() -> Iterator[Ec2Imds]:
    server = Ec2Imds()
    yield server
    server.stop()


def order(root: Path) -> list[str]:
    return (root / "order").read_text().split() if (root / "order").exists() else []


def root_keys(root: Path) -> str:
    return (root / "root/.ssh/authorized_keys").read_text()


# -- EC2 ------------------------------------------------------------------------------------
def test_ec2_server_refuses_imdsv1(ec2: Ec2Imds) -> None:
    ec2.start(user_data="x")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{ec2.url}/latest/user-data", timeout=5)
    assert err.value.code == 401 and ec2.v1_refused == 1


def test_ec2_late_stages_keys_and_cache(root: Path, ec2: Ec2Imds) -> None:
    ec2.start(user_data=LATE_USER_DATA, public_keys={"mine": KEY_A, "other": KEY_B})
    (root / "root/.ssh").mkdir(parents=True)
    (root / "root/.ssh/authorized_keys").write_text(KEY_A + "\n")
    sources: list[ds.Datasource] = [ds.NoCloud(), ds.Ec2(ec2.url)]
    for early in ("rootfs", "initramfs", "fs", "boot"):
        assert stage(root, early, sources=sources)
    assert ec2.requests == [] and order(root) == []  # no network datasource before the network stage
    assert stage(root, "network", sources=sources)
    assert order(root) == ["rootfs.after", "initramfs", "boot", "network"]
    log = log_of(root, "network")
    assert "late: datasource ec2 (user-data): rootfs.after: step 'Repart image': ok" in log
    assert root_keys(root) == f"{KEY_A}\n{KEY_B}\n"  # deduplicated
    assert (root / "run/cos/datasource").read_text() == "ec2\n"
    assert (root / "run/cos/userdata").read_text() == LATE_USER_DATA
    assert ec2.v1_refused == 0 and ec2.requests[0].method == "PUT"
    asked = len(ec2.requests)
    assert stage(root, "reconcile", sources=sources)  # later stages read the cache
    assert len(ec2.requests) == asked and order(root)[-1] == "reconcile" and order(root).count("boot") == 1


def test_ec2_fetch_before_network_when_asked(root: Path, ec2: Ec2Imds) -> None:
    ec2.start(user_data=LATE_USER_DATA)
    assert stage(root, "initramfs", sources=[ds.Ec2(ec2.url)], fetch=True)
    assert order(root) == ["rootfs.after", "initramfs"]


def test_ec2_without_user_data_or_keys(root: Path, ec2: Ec2Imds) -> None:
    ec2.start()
    assert stage(root, "network", sources=[ds.Ec2(ec2.url)])
    assert (root / "run/cos/datasource").read_text() == "ec2\n" and (root / "run/cos/userdata").read_bytes() == b""


def test_ec2_gzipped_user_data(root: Path, ec2: Ec2Imds) -> None:
    ec2.start(user_data=gzip.compress(LATE_USER_DATA.encode()))
    assert stage(root, "network", sources=[ds.Ec2(ec2.url)])
    assert order(root) == ["rootfs.after", "initramfs", "boot", "network"]


def test_ec2_bad_user_data_is_a_failure_not_a_crash(root: Path, ec2: Ec2Imds) -> None:
    ec2.start(user_data="stages:\n  network: [\n")
    assert not stage(root, "network", sources=[ds.Ec2(ec2.url)])
    assert "datasource ec2 (user-data): FAILED: invalid YAML" in log_of(root, "network")


def test_cli_with_datasource_url(root: Path, ec2: Ec2Imds) -> None:
    ec2.start(user_data="#cloud-config\nruncmd: ['touch \"$COS_ROOT/from-ec2\"']\n", public_keys=[KEY_A])
    assert main(["--root", str(root), "--cmdline", "/dev/null", "--datasource-url", f"ec2={ec2.url}",
                 "--datasource-url", "gce=http://127.0.0.1:9", "--datasource-url", "azure=http://127.0.0.1:9",
                 "network"]) == 0
    assert (root / "from-ec2").exists() and root_keys(root) == f"{KEY_A}\n"


# -- GCE ----------------------------------------------------------------------------------------
def test_gce_user_data_and_ssh_keys(root: Path) -> None:
    with GceMetadata() as gce:
        gce.start(user_data="#cloud-config\nhostname: gce-host\n", ssh_keys=f"alice:{KEY_A}\n",
                  project_ssh_keys=f"bob:{KEY_B}\n")
        assert stage(root, "network", sources=[ds.Gce(gce.url)])
        assert all(r.headers.get("metadata-flavor") == "Google" for r in gce.requests)
    assert (root / "etc/hostname").read_text() == "gce-host\n"  # initramfs, run late
    assert root_keys(root) == f"{KEY_A}\n{KEY_B}\n"


def test_gce_block_project_keys(root: Path) -> None:
    with GceMetadata() as gce:
        gce.start(ssh_keys=f"alice:{KEY_A}", project_ssh_keys=f"bob:{KEY_B}",
                  attributes={"block-project-ssh-keys": "true"})
        assert stage(root, "network", sources=[ds.Gce(gce.url)])
    assert root_keys(root) == f"{KEY_A}\n"


# -- Azure ---------------------------------------------------------------------------------------
def test_azure_user_data_keys_and_ready_report(root: Path) -> None:
    with AzureMetadata() as azure:
        azure.start(user_data=LATE_USER_DATA, public_keys=[KEY_B])
        assert stage(root, "network", sources=[ds.Azure(azure.url, azure.url)])
        assert [(r.container_id, r.instance_id, r.incarnation, r.state) for r in azure.ready_reports] == [
            (azure.container_id, azure.instance_id, "1", "Ready")]
        health = [r for r in azure.requests if r.query.get("comp") == "health"]
        assert health[0].headers["x-ms-version"] == "2012-11-30"
        assert health[0].headers["content-type"].startswith("text/xml")
        assert stage(root, "reconcile", sources=[ds.Azure(azure.url, azure.url)])
        assert len(azure.ready_reports) == 1  # once per boot
    assert order(root) == ["rootfs.after", "initramfs", "boot", "network", "reconcile"]
    assert root_keys(root) == f"{KEY_B}\n"


def test_azure_failed_ready_report_is_logged_user_data_still_applied(root: Path) -> None:
    with AzureMetadata() as azure:
        azure.start(user_data=LATE_USER_DATA)
        assert not stage(root, "network", sources=[ds.Azure(azure.url, "http://127.0.0.1:9")])
    assert "azure: GET http://127.0.0.1:9/machine/?comp=goalstate failed" in log_of(root, "network")
    assert order(root) == ["rootfs.after", "initramfs", "boot", "network"]


# -- NoCloud --------------------------------------------------------------------------------------
def test_nocloud_seed_in_any_stage(root: Path) -> None:
    write_config(root, "/var/lib/cloud/seed/nocloud/user-data", LATE_USER_DATA)
    write_config(root, "/var/lib/cloud/seed/nocloud/meta-data",
                 f"instance-id: i-1\npublic-keys:\n  - {KEY_A}\n")
    assert stage(root, "rootfs", sources=[ds.NoCloud()])
    assert order(root) == ["rootfs.after"] and "late:" not in log_of(root, "rootfs")
    assert (root / "run/cos/datasource").read_text() == "nocloud:/var/lib/cloud/seed/nocloud\n"
    assert stage(root, "initramfs", sources=[ds.NoCloud()])
    assert order(root) == ["rootfs.after", "initramfs"] and root_keys(root) == f"{KEY_A}\n"


def test_nocloud_bad_meta_data(root: Path) -> None:
    write_config(root, "/var/lib/cloud/seed/nocloud/meta-data", "public-keys: [\n")
    assert not stage(root, "rootfs", sources=[ds.NoCloud()])
    assert "datasource nocloud:" in log_of(root, "rootfs") and "meta-data is not valid YAML" in log_of(root, "rootfs")


# -- nothing there ------------------------------------------------------------------------------
@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers (a blackholed metadata address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_missing_datasources_cost_seconds_not_minutes(root: Path, silent_port: int) -> None:
    silent, closed = f"http://127.0.0.1:{silent_port}", f"http://127.0.0.1:{closed_port()}"
    sources: list[ds.Datasource] = [ds.NoCloud(), ds.Ec2(silent), ds.Gce(closed), ds.Azure(silent, silent)]
    start = time.monotonic()
    assert stage(root, "network", sources=sources)
    elapsed = time.monotonic() - start
    assert elapsed < ds.PROBE_TIMEOUT + 2, f"probing took {elapsed:.1f}s"
    assert (root / "run/cos/datasource").read_text() == "none\n"
    start = time.monotonic()
    assert stage(root, "reconcile", sources=sources)
    assert time.monotonic() - start < 1, "a boot that found nothing does not probe again"


def test_default_sources_order() -> None:
    assert [s.name for s in ds.default_sources()] == ["nocloud", "ec2", "gce", "azure"]


def test_first_source_in_order_wins(root: Path, ec2: Ec2Imds) -> None:
    ec2.start(user_data=LATE_USER_DATA)
    with GceMetadata() as gce:
        gce.start(user_data="#cloud-config\nhostname: gce\n")
        assert stage(root, "network", sources=[ds.Ec2(ec2.url), ds.Gce(gce.url)])
    assert (root / "run/cos/datasource").read_text() == "ec2\n"
