"""cos-reset (recovery mode only): the installed system back to a clean state.

    1. active.img and passive.img redeployed from the recovery system (cos-deploy --force's
       code: the same kill -9-safe order, so an interrupted reset is completed by a re-run);
    2. COS_PERSISTENT wiped (a fresh ext4 on the partition; with --persistent DIR, the
       directory emptied): /home, /root, /var/lib, /var/log, /etc/ssh, /usr/local are gone;
    3. COS_OEM kept (its cloud-config is the machine's configuration), unless --reset-oem:
       then everything but GRUB's grubenv goes;
    4. the after-reset stage.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..system import CosError, System
from . import deploy
from .disks import find_partition, mounts_of

log = logging.getLogger("cos.reset")

PERSISTENT_LABEL = "COS_PERSISTENT"


def _empty(directory: Path, keep: tuple[str, ...] = ()) -> None:
    for child in directory.iterdir():
        if child.name in keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def wipe_persistent(system: System, persistent: Path | None) -> None:
    if persistent is not None:
        if not persistent.is_dir():
            raise CosError(f"--persistent directory {persistent} does not exist")
        log.info("emptying %s (COS_PERSISTENT)", persistent)
        _empty(persistent)
        return
    try:
        _, node = find_partition(system, PERSISTENT_LABEL)
    except CosError:
        log.info("no COS_PERSISTENT on this machine: nothing to wipe")
        return
    if mounts_of(node):
        raise CosError(f"COS_PERSISTENT ({node}) is mounted", "unmount it, or boot recovery again")
    log.info("making a fresh filesystem on COS_PERSISTENT (%s)", node)
    system.run(["mkfs.ext4", "-q", "-F", "-L", PERSISTENT_LABEL, node])


def reset(system: System, opts: deploy.Options, persistent: Path | None, reset_oem: bool) -> None:
    deploy.check_recovery(system, "cos-reset")
    deploy.deploy(system, deploy.Options(source=opts.source, state=opts.state, oem=opts.oem, force=True,
                                         strict=opts.strict), stage=None)
    wipe_persistent(system, persistent)
    if reset_oem:
        with deploy.oem_dir(system, opts) as oem:
            log.info("emptying COS_OEM (%s), keeping %s", oem, deploy.GRUBENV)
            _empty(oem, keep=(deploy.GRUBENV, "lost+found"))
    log.info("reset: active and passive are the recovery system again, COS_PERSISTENT is empty%s",
             ", COS_OEM is empty" if reset_oem else "")
    deploy.run_after(system, "after-reset", opts.strict)
