"""pytest fixtures for the cloud tests; test modules import the ones they use.

Every server runs on 127.0.0.1 on a free port and is stopped at the end. The product
code is pointed at them only through the SDKs' standard environment variables.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import Flavor, FlavorPaths, load_flavor

from .aws import ImportSnapshotTasks, MotoServer
from .disks import make_build
from .proxy import FaultProxy

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


@pytest.fixture
def build_dir(tmp_path, monkeypatch) -> Path:
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


__all__ = ["server_logs", "moto_server", "aws", "build_dir", "make_flavor", "flavor_paths", "os"]
