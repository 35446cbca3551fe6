"""The channel from the flavor config to the device: the pipeline's build args, the image's
write-channel step (run for real into a scratch /etc), cos-upgrade's reading of it."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pipeline.config import UpgradeChannel, load_flavor
from pipeline.image import build_args
from runtime.system import System
from runtime.upgrade import channel

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "packages/cos-runtime/files/usr/lib/cos/write-channel"


def write_channel(root: Path, args: dict[str, str]) -> None:
    env = {**os.environ, **{k: v for k, v in args.items() if k.startswith("COS_UPGRADE")},
           "COS_CHANNEL_FILE": str(root / "etc/cos/upgrade.yaml")}
    subprocess.run([SCRIPT], check=True, env=env, capture_output=True)


def test_the_flavor_channel_reaches_cos_upgrade(tmp_path: Path) -> None:
    flavor = load_flavor("red").model_copy(update={"upgrade": UpgradeChannel(repository="ghcr.io/o/cos")})
    args = build_args(flavor, "0.2.0", "base", "toolkit")
    assert args["COS_UPGRADE_TAGS"] == f"red-*-{flavor.arch}"
    write_channel(tmp_path, args)
    got = channel.load(System(root=tmp_path))
    assert got == channel.Channel("ghcr.io/o/cos", f"red-*-{flavor.arch}")
    assert channel.newest_first([f"red-0.1.0-{flavor.arch}", f"red-0.2.0-dev-{flavor.arch}",
                                 f"red-latest-{flavor.arch}"], got.tags)[0] == f"red-0.2.0-dev-{flavor.arch}"


def test_no_channel_configured_means_no_file(tmp_path: Path) -> None:
    args = build_args(load_flavor("red"), "0.2.0", "base", "toolkit")
    assert args["COS_UPGRADE_REPOSITORY"] == ""
    (tmp_path / "etc/cos").mkdir(parents=True)
    (tmp_path / "etc/cos/upgrade.yaml").write_text("stale\n")
    write_channel(tmp_path, args)
    assert channel.load(System(root=tmp_path)) is None
