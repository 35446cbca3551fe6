"""Boot assessment: is the new active good? (`cos-boot-assess`, run by
cos-boot-assess.service once multi-user.target is reached.)

The protocol, in COS_OEM's grubenv (GRUB's load_env/save_env, see /etc/cos/grub.cfg):
  cos-upgrade   sets cos_trial=1 (and clears saved_entry/next_entry): the next start is a trial
  GRUB          at a start with cos_trial=1: if cos_tried=1 is already set, the previous trial
                never got here, so it boots `fallback` for good (saved_entry=fallback) with
                cos_rollback=1 and `cos.rollback` on the kernel command line; else sets cos_tried=1
  this tool     in active mode with a trial under way: the boot is good, both are cleared;
                after a rollback: /run/cos/upgrade_rolled_back + a warning in the journal, the
                failed image's digest goes to COS_STATE's cOS/failed-images.json (a channel
                upgrade skips it), cos_rollback is cleared.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from ..install import deploy, grubenv
from ..install.durable import read_record, write_record
from ..system import System, write_atomic
from ..tool import run_tool
from .source import FAILED, record_path

log = logging.getLogger("cos.assess")

ROLLED_BACK = "/run/cos/upgrade_rolled_back"
ACTIVE_MODE = "/run/cos/active_mode"


def assess(system: System, opts: deploy.Options) -> str:
    """What was concluded: good, rolled-back, or nothing."""
    with deploy.oem_dir(system, opts) as oem:
        env = grubenv.read(oem / deploy.GRUBENV)
        if env.get("cos_rollback") == "1":
            _rolled_back(system, opts)
            grubenv.update(oem / deploy.GRUBENV, cos_rollback=None)
            return "rolled-back"
        if env.get("cos_trial") == "1" and system.path(ACTIVE_MODE).exists():
            grubenv.update(oem / deploy.GRUBENV, cos_trial=None, cos_tried=None)
            log.info("the first boot of the new active reached multi-user: marked good")
            return "good"
    return "nothing"


def _rolled_back(system: System, opts: deploy.Options) -> None:
    with deploy.state_dir(system, opts) as state:
        failed = read_record(record_path(state, deploy.ACTIVE)) or {}
        what = f"{failed.get('image', 'the new active')}" + (f" ({failed['digest']})" if "digest" in failed else "")
        if "digest" in failed:
            known = read_record(state / FAILED) or {}
            digests = sorted(set(known.get("digests", [])) | {failed["digest"]})
            write_record(state / FAILED, {"digests": digests})
    write_atomic(system.path(ROLLED_BACK), f"{what}\n".encode())
    log.warning("the upgrade to %s was rolled back: its first boot did not reach multi-user; running passive, "
                "which stays the default (a channel upgrade skips that image)", what)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cos-boot-assess",
                                description="Mark the first boot of a new active good, or report a rollback.")
    p.add_argument("--root", type=Path, default=Path("/"))
    p.add_argument("--state", type=Path, help="a directory standing for COS_STATE")
    p.add_argument("--oem", type=Path, help="a directory standing for COS_OEM")
    args = p.parse_args(argv)
    return run_tool("cos-boot-assess", lambda: assess(System(root=args.root),
                                                       deploy.Options(state=args.state, oem=args.oem)))


if __name__ == "__main__":
    sys.exit(main())
