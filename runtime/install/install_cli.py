"""`cos-install` entry point (python-run runs a module's main).

    cos-install [--config FILE] [--force] [--strict] [--root DIR] [--medium DIR] [--source DIR]
                [--state DIR] [--oem DIR] [--poweroff | --reboot] DEVICE

Exit 0 on success, 1 with one line `cos-install: error: ...` otherwise.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..system import System
from ..tool import add_power_options, power_after, run_tool
from . import deploy, install


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cos-install",
        description="From the live ISO: install cOS onto an empty disk (COS_GRUB, COS_OEM, COS_RECOVERY, COS_STATE, "
                    "COS_PERSISTENT; BIOS and UEFI bootable) and deploy the live system as active; then the "
                    "after-install stage.")
    p.add_argument("device", type=Path, metavar="DEVICE", help="the target disk, e.g. /dev/vda (all of it is used)")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help=f"a cloud-config put on COS_OEM as /{install.CUSTOM_CONFIG}: applied on every boot")
    p.add_argument("--force", action="store_true",
                   help="overwrite a disk that is not empty, and run outside the live system")
    p.add_argument("--strict", action="store_true", help="fail when the after-install stage fails")
    add_power_options(p, "install")
    p.add_argument("--root", type=Path, default=Path("/"), help="the system's root (default /; tests: a scratch root)")
    p.add_argument("--medium", type=Path, help=f"the live medium (default {install.MEDIUM} in --root)")
    p.add_argument("--source", type=Path, help=f"the system tree to install (default {deploy.DEFAULT_SOURCE})")
    p.add_argument("--state", type=Path, help="tests: a directory standing for COS_STATE when deploying")
    p.add_argument("--oem", type=Path, help="tests: a directory standing for COS_OEM when deploying")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    system = System(root=args.root)
    opts = install.Options(device=args.device, config=args.config, force=args.force, strict=args.strict,
                           medium=args.medium, source=args.source, state=args.state, oem=args.oem)

    def work() -> None:
        install.install(system, opts)
        power_after(system, args)
    return run_tool("cos-install", work)


if __name__ == "__main__":
    sys.exit(main())
