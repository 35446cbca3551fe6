"""pytest fixtures for the cloud tests; test modules import the ones they use.

Every server runs on 127.0.0.1 on a free port and is stopped at the end. The product
code is pointed at them only through the SDKs' standard environment variables.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import Flavor, FlavorPaths, load_flavor

from .arm import IDENTITY_HEADER, ArmServer
from .aws import ImportSnapshotTasks, MotoServer
from .azurite import Azurite
from .disks import make_build
from .gce import FakeGcs, GceServer
from .proxy import FaultProxy
from .util import free_port

CLEAR_ENV = ["AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_EC2",
             "AWS_ENDPOINT_URL_EBS", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_STS", "COS_PUBLISH_DRY_RUN",
             "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID", "AZURE_USERNAME",
             "GOOGLE_CLOUD_PROJECT"]


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


@pytest.fixture(scope="session")
def moto_server(server_logs):
    server = MotoServer(server_logs)
    yield server
    server.close()


@dataclass
class AwsEnv:
    moto: MotoServer
    proxy: FaultProxy
    imports: ImportSnapshotTasks

    def actions(self, name: str | None = None) -> list:
        return self.proxy.seen(lambda r: r.action == name if name else bool(r.action))

    def ebs_calls(self, suffix: str) -> list:
        return self.proxy.seen(lambda r: r.path.split("?")[0].endswith(suffix))


@pytest.fixture
def aws(moto_server, monkeypatch):
    """A clean moto behind a recording/fault proxy, reached via AWS_ENDPOINT_URL."""
    moto_server.reset()
    proxy = FaultProxy(moto_server.port)
    imports = ImportSnapshotTasks(moto_server)
    proxy.handlers.append(imports)
    for var in CLEAR_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    yield AwsEnv(moto_server, proxy, imports)
    proxy.close()


@pytest.fixture(scope="session")
def azurite_server(server_logs):
    server = Azurite(server_logs)
    yield server
    server.close()


@pytest.fixture(scope="session")
def arm_server(server_logs):
    server = ArmServer(server_logs)
    yield server
    server.close()


SUBSCRIPTION = "00000000-0000-0000-0000-00000000c05e"


@dataclass
class AzureEnv:
    azurite: Azurite
    arm: ArmServer
    proxy: FaultProxy      # in front of Azurite
    subscription: str = SUBSCRIPTION

    def blob_service(self):
        from azure.storage.blob import BlobServiceClient
        return BlobServiceClient.from_connection_string(self.azurite.connection_string())


@pytest.fixture
def azure(azurite_server, arm_server, monkeypatch):
    """Azurite behind a fault proxy + the local ARM server, reached through the standard
    variables (connection string, managed identity endpoint, CA bundle) and COS_AZURE_ARM_ENDPOINT."""
    arm_server.resources.clear()
    arm_server.operations.clear()
    arm_server.requests.clear()
    arm_server.faults.clear()
    proxy = FaultProxy(azurite_server.port)
    for var in CLEAR_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING",
                       azurite_server.connection_string(f"{proxy.url}/devstoreaccount1"))
    monkeypatch.setenv("IDENTITY_ENDPOINT", f"{arm_server.url}/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", IDENTITY_HEADER)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(arm_server.ca_path))
    monkeypatch.setenv("COS_AZURE_ARM_ENDPOINT", arm_server.url)
    monkeypatch.setenv("AZURE_SUBSCRIPTION_ID", SUBSCRIPTION)
    yield AzureEnv(azurite_server, arm_server, proxy)
    proxy.close()


@dataclass
class GcpEnv:
    gcs: FakeGcs
    proxy: FaultProxy      # in front of fake-gcs-server
    gce: GceServer
    project: str = "cos-project"

    def storage(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage
        return storage.Client(project=self.project, credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.gcs.url})


@pytest.fixture(scope="session")
def gcp_servers(server_logs):
    port = free_port()
    proxy = FaultProxy(port)
    gcs = FakeGcs(server_logs, port, proxy.url)
    gce = GceServer(gcs.url)
    yield gcs, proxy, gce
    gce.close()
    gcs.close()
    proxy.close()


@pytest.fixture
def gcp(gcp_servers, monkeypatch, tmp_path):
    """fake-gcs-server (behind a fault proxy) via STORAGE_EMULATOR_HOST, the local Compute
    server via COS_GCP_COMPUTE_ENDPOINT, credentials via an ADC file (token_uri local)."""
    gcs, proxy, gce = gcp_servers
    gce.reset()
    proxy.faults.clear()
    proxy.requests.clear()
    proxy.delay = None
    for var in CLEAR_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    monkeypatch.setenv("COS_GCP_COMPUTE_ENDPOINT", gce.url)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(gce.adc_file(tmp_path / "adc.json")))
    env = GcpEnv(gcs, proxy, gce)
    bucket = env.storage().bucket("cos-images")
    if not bucket.exists():
        bucket.create()
    for blob in bucket.list_blobs():
        blob.delete()
    yield env


@pytest.fixture
def cloud_build_dir(tmp_path, monkeypatch) -> Path:
    """$COS_BUILD_DIR in tmp: flavor_paths() puts synthetic artifacts under it."""
    monkeypatch.setenv("COS_BUILD_DIR", str(tmp_path / "build"))
    return tmp_path / "build"


def make_flavor(clouds: dict, name: str = "cloudtest", arch: str = "x86_64", **extra) -> Flavor:
    red = load_flavor("red").model_dump()
    return Flavor.model_validate({**red, "name": name, "arch": arch, "clouds": clouds, **extra})


def flavor_paths(flavor: Flavor, seed: int = 1) -> FlavorPaths:
    """FlavorPaths under $COS_BUILD_DIR with synthetic artifacts and a manifest."""
    paths = FlavorPaths(flavor)
    make_build(paths.build, flavor.name, seed=seed)
    return paths


KILL_SCRIPT = """
import sys, logging
logging.basicConfig(level=logging.INFO)
sys.path.insert(0, {repo!r})
from tests.servers.fixtures import make_flavor
from pipeline import publish
from pipeline.config import FlavorContext, FlavorPaths
{setup}
flavor = make_flavor({clouds!r}, name={name!r})
publish.publish_stage(FlavorContext(flavor, FlavorPaths(flavor), "0.1.0"), {cloud!r})
"""


def kill_publish_midway(proxy: FaultProxy, cloud: str, clouds: dict, name: str, is_upload, after: int,
                        delay_s: float, setup: str = "") -> None:
    """Run a publish in a child process with the upload requests (is_upload) slowed by
    delay_s, and SIGKILL it once `after` of them went out: what a cancelled CI job leaves."""
    proxy.delay = (is_upload, delay_s)
    repo = str(Path(__file__).resolve().parents[2])
    script = KILL_SCRIPT.format(repo=repo, setup=setup, clouds=clouds, name=name, cloud=cloud)
    proc = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy(), cwd=repo)
    try:
        deadline = time.monotonic() + 60
        while len(proxy.seen(is_upload)) < after and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the publish finished before it could be killed"
    finally:
        proc.kill()
        proc.wait()
        proxy.delay = None


__all__ = ["server_logs", "moto_server", "aws", "azurite_server", "arm_server", "azure", "gcp_servers", "gcp", "cloud_build_dir",
           "make_flavor", "flavor_paths", "kill_publish_midway", "os"]
