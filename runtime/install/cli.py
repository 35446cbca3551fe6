"""Entry points of the install tools on the OS: `cos-deploy` (main).

    cos-deploy [--no-verify] [--no-cosign] [--reboot | --poweroff] [--force] [--strict]
               [-d|--docker-image IMAGE | --source DIR] [--root DIR] [--state DIR] [--oem DIR]
               [--tmpdir DIR] [--quiet]

Exit 0 on success, 1 with one line `cos-deploy: error: ...` otherwise.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..system import System
from ..tool import add_power_options, power_after, run_tool
from ..upgrade.source import deploy_fetcher
from . import deploy, reset


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cos-deploy",
        description="Install an OS image into COS_STATE (cOS/active.img, cOS/passive.img, boot menu) and boot it "
                    "next: -d IMAGE; without it the newest image of the upgrade channel (/etc/cos/upgrade.yaml) "
                    "when one is configured and reachable, else the running recovery system. Only in recovery mode.")
    p.add_argument("--no-verify", action="store_true",
                   help="do not check a pulled image against the registry (its digest is still recorded)")
    p.add_argument("--no-cosign", action="store_true", help="accepted (signature checks arrive with cosign)")
    add_power_options(p, "deploy")
    p.add_argument("--force", action="store_true", help="replace a system already deployed on COS_STATE")
    p.add_argument("--strict", action="store_true", help="fail when the after-deploy cloud-config stage fails")
    src = p.add_mutually_exclusive_group()
    src.add_argument("-d", "--docker-image", metavar="IMAGE", help="deploy this image (REGISTRY/NAME:TAG or @DIGEST)")
    src.add_argument("--source", type=Path,
                   help=f"the root tree to deploy (default: {deploy.DEFAULT_SOURCE} in --root, the recovery squashfs)")
    p.add_argument("--root", type=Path, default=Path("/"),
                   help=f"the system's root (default /; a scratch root for tests): {deploy.RECOVERY_SENTINEL} "
                        "is read from it")
    p.add_argument("--state", type=Path, help="use this directory as COS_STATE instead of mounting the partition")
    p.add_argument("--oem", type=Path, help="use this directory as COS_OEM instead of /oem or the partition")
    p.add_argument("--tmpdir", type=Path, help="where a pulled image is unpacked (default: off COS_STATE, the "
                                                "roomiest of /usr/local, /var/tmp, /tmp)")
    p.add_argument("--quiet", action="store_true", help="print only warnings and errors")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    system = System(root=args.root)
    opts = deploy.Options(source=args.source, state=args.state, oem=args.oem, force=args.force, strict=args.strict)

    def work() -> None:
        fetch = deploy_fetcher(system, args.docker_image, not args.no_verify, args.tmpdir) \
            if args.source is None else deploy.no_fetch
        deploy.deploy(system, opts, fetch)
        power_after(system, args)
    return run_tool("cos-deploy", work, quiet=args.quiet)


def reset_main(argv: Sequence[str] | None = None) -> int:
    """cos-reset [--reset-oem] [--reboot | --poweroff] [--strict] [--root DIR] [--state DIR] [--oem DIR]
    [--persistent DIR] [--source DIR]"""
    p = argparse.ArgumentParser(prog="cos-reset", description="In recovery mode: redeploy active and passive from "
                                "the recovery system, wipe COS_PERSISTENT, keep COS_OEM unless --reset-oem.")
    p.add_argument("--reset-oem", action="store_true", help="also empty COS_OEM (its grubenv is kept)")
    add_power_options(p, "reset")
    p.add_argument("--strict", action="store_true", help="fail when the after-reset stage fails")
    p.add_argument("--root", type=Path, default=Path("/"))
    p.add_argument("--state", type=Path, help="a directory standing for COS_STATE")
    p.add_argument("--oem", type=Path, help="a directory standing for COS_OEM")
    p.add_argument("--persistent", type=Path, help="a directory standing for COS_PERSISTENT")
    p.add_argument("--source", type=Path, help=f"the recovery tree (default {deploy.DEFAULT_SOURCE})")
    args = p.parse_args(argv)
    system = System(root=args.root)

    def work() -> None:
        reset.reset(system, deploy.Options(source=args.source, state=args.state, oem=args.oem, strict=args.strict),
                    args.persistent, args.reset_oem)
        power_after(system, args)
    return run_tool("cos-reset", work)


if __name__ == "__main__":
    sys.exit(main())
