"""Entry point of `cos-upgrade` on the OS.

    cos-upgrade [--no-verify] [--no-cosign] [--recovery] [--reboot | --poweroff] [--strict]
                [-d|--docker-image IMAGE | --directory DIR]
                [--root DIR] [--state DIR] [--oem DIR] [--recovery-dir DIR] [--tmpdir DIR] [--quiet]

Exit 0 on success and when already up to date, 1 with one line `cos-upgrade: error: ...`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ..install import deploy
from ..system import CosError, System
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
    when = p.add_mutually_exclusive_group()
    when.add_argument("--reboot", action="store_true", help="reboot after a successful upgrade")
    when.add_argument("--poweroff", action="store_true", help="power off after a successful upgrade")
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
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="cos-upgrade: %(message)s",
                        stream=sys.stderr)
    system = System(root=args.root)
    opts = source.Options(image=args.docker_image, directory=args.directory, verify=not args.no_verify,
                           recovery=args.recovery, strict=args.strict, state=args.state, oem=args.oem,
                           recovery_dir=args.recovery_dir, tmpdir=args.tmpdir)
    try:
        changed = upgrade.upgrade(system, opts)
        if changed and (args.reboot or args.poweroff):
            deploy.power(system, "reboot" if args.reboot else "poweroff")
    except CosError as e:
        print(f"cos-upgrade: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
