"""Shared fixtures. Real tools only: a real dockerd, real doit runs, real files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import pytest
from filelock import FileLock

from pipeline.config import FlavorPaths, build_root, load_flavor
from tests.runtime_vm import installed  # noqa: F401  (one deployed disk for all runtime QEMU tests)

REPO = Path(__file__).resolve().parent.parent
DOIT = [sys.executable, "-m", "doit", "--dir", str(REPO)]


def run_doit(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run doit in the repo the way a user does; output captured for assertions. One doit
    at a time on the repo's build/ (its sqlite dep file, its artifacts): ./dev test's two
    pytest processes share it."""
    full_env = {**os.environ, **(env or {})}
    with doit_lock(full_env):
        proc = subprocess.run([*DOIT, *args], cwd=REPO, capture_output=True, text=True, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"doit {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def doit_lock(env: Mapping[str, str] = os.environ) -> AbstractContextManager[object]:
    """Held while a doit runs on the repo's build/; a test's own COS_BUILD_DIR is its alone."""
    if env.get("COS_BUILD_DIR"):
        return nullcontext()
    (REPO / "build").mkdir(exist_ok=True)
    return FileLock(REPO / "build/.pytest-doit.lock")


def executed_tasks(output: str) -> list[str]:
    """Task names doit ran ('.  name'); up-to-date ones print '-- name'."""
    return [line[3:].strip() for line in output.splitlines() if line.startswith(".  ")]


# A timing log written while the run goes (build/test-times.log): when CI is cut off at
# its time limit, pytest's --durations summary never prints, and this says where the time went.
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.duration < 1:
        return   # sub-second phases are noise
    part = os.environ.get("COS_TEST_PART", "-")   # ./dev test runs two pytest processes
    line = (f"{time.strftime('%H:%M:%S', time.gmtime())} {part} {report.when:8} {report.outcome:7} "
            f"{report.duration:7.1f}s {report.nodeid}\n")
    (REPO / "build").mkdir(exist_ok=True)
    with open(REPO / "build/test-times.log", "a") as log:
        log.write(line)


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
