"""Shared fixtures. Real tools only: a real dockerd, real doit runs, real files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import FlavorPaths, build_root, load_flavor
from tests.runtime_vm import fallback, installed  # noqa: F401  (one deployed disk for all runtime QEMU tests)

REPO = Path(__file__).resolve().parent.parent
DOIT = [sys.executable, "-m", "doit", "--dir", str(REPO)]


def run_doit(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run doit in the repo the way a user does; output captured for assertions."""
    proc = subprocess.run([*DOIT, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"doit {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def executed_tasks(output: str) -> list[str]:
    """Task names doit ran ('.  name'); up-to-date ones print '-- name'."""
    return [line[3:].strip() for line in output.splitlines() if line.startswith(".  ")]


@pytest.fixture(scope="session")
def docker_client():
    from pipeline import docker_engine
    return docker_engine.client()


def _build(name: str) -> dict:
    """`doit build-<name>` (reuses a previous build when up to date); returns the manifest."""
    run_doit(f"build-{name}")
    return json.loads(FlavorPaths(load_flavor(name)).manifest.read_text())


@pytest.fixture(scope="session")
def red_paths() -> FlavorPaths:
    return FlavorPaths(load_flavor("red"))


@pytest.fixture(scope="session")
def red_build(docker_client, red_paths) -> dict:
    """red built once per session: the flavor that builds everywhere, offline too."""
    return _build("red")


# The boot tests boot this flavor: red by default; `./dev build <flavor>` sets it.
BOOT_FLAVOR = os.environ.get("COS_BOOT_FLAVOR", "red")


@pytest.fixture(scope="session")
def flavor_paths() -> FlavorPaths:
    return FlavorPaths(load_flavor(BOOT_FLAVOR))


@pytest.fixture(scope="session")
def flavor_build(docker_client, flavor_paths) -> dict:
    return _build(BOOT_FLAVOR)


@pytest.fixture(scope="session")
def build_dir() -> Path:
    return build_root()
