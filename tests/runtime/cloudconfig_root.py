"""A scratch root for the cos-setup tests: the account files of a fresh Debian-like
image, nothing of the host. `write_config` puts documents where the runner reads them."""
from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest

from runtime.cloudconfig import datasources as ds
from runtime.cloudconfig.runner import run_stage
from runtime.system import System

PASSWD = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
SHADOW = "root:*:19700:0:99999:7:::\ndaemon:*:19700:0:99999:7:::\n"
GROUP = "root:x:0:\ndaemon:x:1:\nsudo:x:27:bob\nshadow:x:42:\n"
GSHADOW = "root:*::\ndaemon:*::\nsudo:*::bob\nshadow:*::\n"


def make_root(base: Path) -> Path:
    root = base / "root"
    for name, text, mode in (("passwd", PASSWD, 0o644), ("shadow", SHADOW, 0o640), ("group", GROUP, 0o644),
                             ("gshadow", GSHADOW, 0o640)):
        path = root / "etc" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n")
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    (root / "etc/skel").mkdir()
    (root / "etc/skel/.profile").write_text("# skel\n")
    (root / "run").mkdir()
    return root


@pytest.fixture(name="root")
def root_fixture(tmp_path: Path) -> Path:
    return make_root(tmp_path)


def write_config(root: Path, rel: str, text: str) -> Path:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def stage(root: Path, name: str, *, dry_run: bool = False, cmdline: str = "",
          sources: list[ds.Datasource] | None = None, fetch: bool = False) -> bool:
    """Run a stage with no datasources unless given (the host's 169.254.169.254 is never asked)."""
    logging.getLogger("cos").setLevel(logging.INFO)
    return run_stage(name, System(root=root, dry_run=dry_run), cmdline=cmdline,
                     datasources=[] if sources is None else sources, fetch_datasources=fetch)


def log_of(root: Path, name: str) -> str:
    return (root / f"run/cos/setup-{name}.log").read_text()
