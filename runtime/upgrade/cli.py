"""Entry point of `cos-upgrade` on the OS.

    cos-upgrade [--no-verify] [--no-cosign] [--recovery] [--reboot | --poweroff] [--strict]
                [-d|--docker-image IMAGE | --directory DIR]
                [--root DIR] [--state DIR] [--oem DIR] [--recovery-dir DIR] [--tmpdir DIR] [--quiet]

Exit 0 on success and when already up to date, 1 with one line `cos-upgrade: error: ...`.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..system import System
from ..tool import add_power_options, power_after, run_tool
from . import source, upgrade


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cos-upgrade",
        description="Upgrade the installed system from an OS container image (or a directory): the image becomes "
                    "cOS/active.img, the current system stays as cOS/passive.img (the fallback entry). Without an "
                    "image: the newest version of the channel in /etc/cos/upgrade.yaml.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("-d", "--docker-image", metavar="IMAGE", help="REGISTRY/NAME:TAG or REGISTRY/NAME@DIGEST")
    src.add_argument("--directory", type=Path, help="a root tree to install instead of an image")
    p.add_argument("--no-verify", action="store_true",
                   help="do not check the unpacked image against the registry (its digest is still recorded)")
    p.add_argument("--no-cosign", action="store_true", help="accepted (signature checks arrive with cosign)")
    p.add_argument("--recovery", action="store_true", help="upgrade the recovery system on COS_RECOVERY instead")
    add_power_options(p, "upgrade")
    p.add_argument("--strict", action="store_true", help="fail when the after-upgrade cloud-config stage fails")
    p.add_argument("--root", type=Path, default=Path("/"), help="the system's root (a scratch root for tests)")
    p.add_argument("--state", type=Path, help="use this directory as COS_STATE instead of the partition")
    p.add_argument("--oem", type=Path, help="use this directory as COS_OEM instead of /oem or the partition")
    p.add_argument("--recovery-dir", type=Path, help="use this directory as COS_RECOVERY (--recovery)")
    p.add_argument("--tmpdir", type=Path,
                   help="where the pulled and unpacked image go (default: the roomiest of /usr/local, /var/tmp, "
                        "/tmp that is not on COS_STATE)")
    p.add_argument("--quiet", action="store_true", help="print only warnings and errors")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    system = System(root=args.root)
    opts = source.Options(image=args.docker_image, directory=args.directory, verify=not args.no_verify,
                           recovery=args.recovery, strict=args.strict, state=args.state, oem=args.oem,
                           recovery_dir=args.recovery_dir, tmpdir=args.tmpdir)

    def work() -> None:
        if upgrade.upgrade(system, opts):  # nothing changed ("already up to date"): no reboot
            power_after(system, args)
    return run_tool("cos-upgrade", work, quiet=args.quiet)


if __name__ == "__main__":
    sys.exit(main())
