"""cos-upgrade --recovery: the new image becomes the recovery system on COS_RECOVERY
(/cOS/recovery.squashfs, /boot/vmlinuz, /boot/initrd and the boot menu, the layout the
disk stage makes). Each file is written under a temporary name; a journal written once
they are all complete lets a re-run finish the renames, so a kill leaves the old or the
new recovery (a kill between two renames is completed by the re-run)."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..install import deploy
from ..install.disks import MIB
from ..install.durable import fsync_dir, fsync_file, remove_record, write_record
from ..system import CosError, System
from .oci import Timings
from .source import Options, check_cos_image, obtain, work_dir

log = logging.getLogger("cos.upgrade")

RECOVERY_LABEL = deploy.RECOVERY_LABEL
RECOVERY_MOUNT = "/run/cos/recovery"
SQUASHFS = "cOS/recovery.squashfs"
FILES = (SQUASHFS, "boot/vmlinuz", "boot/initrd", *deploy.MENU)
JOURNAL = "cOS/.upgrade-journal"


def _tmp(target: Path) -> Path:
    return target.with_name(f".{target.name}.new")


def _finish(part: Path) -> None:
    for name in FILES:
        tmp = _tmp(part / name)
        if tmp.exists():
            os.replace(tmp, part / name)
            fsync_dir(tmp.parent)
    remove_record(part / JOURNAL)


def _write(system: System, rootfs: Path, part: Path) -> None:
    for name in FILES:
        _tmp(part / name).parent.mkdir(parents=True, exist_ok=True)
        _tmp(part / name).unlink(missing_ok=True)
    log.info("building %s from %s", SQUASHFS, rootfs)
    system.run(["mksquashfs", rootfs, _tmp(part / SQUASHFS), "-noappend", "-quiet", "-comp", "xz"])
    for name in FILES[1:]:
        shutil.copyfile(deploy.resolve_in(rootfs, name), _tmp(part / name))
    for name in FILES:
        fsync_file(_tmp(part / name))


def _check_space(rootfs: Path, part: Path) -> None:
    """The new squashfs is at most the tree's size (xz usually makes it a third)."""
    need = deploy.image_size(rootfs).bytes // 2
    free = shutil.disk_usage(part).free
    if free < need:
        raise CosError(f"COS_RECOVERY has {free // MIB} MiB free, the new recovery system needs about "
                       f"{need // MIB} MiB; nothing was changed", "grow COS_RECOVERY or use a smaller image")


def upgrade_recovery(system: System, opts: Options) -> bool:
    where = opts.recovery_dir
    ctx = deploy.given_dir(where, "--recovery-dir") if where else deploy.mounted(
        system, RECOVERY_LABEL, RECOVERY_MOUNT, "is this a cOS disk?")
    timings = Timings()
    with ctx as part:
        if (part / JOURNAL).exists():
            _finish(part)
            log.info("completed the interrupted recovery upgrade")
            return True
        work = work_dir(system, part, opts.tmpdir)
        try:
            pulled = obtain(system, opts, part, work, timings)
            if pulled is None:
                return False
            check_cos_image(system, pulled.rootfs, pulled.image)
            _check_space(pulled.rootfs, part)
            _write(system, pulled.rootfs, part)
            write_record(part / JOURNAL, {"phase": "written", "image": pulled.image})
        except BaseException:
            for name in FILES:
                _tmp(part / name).unlink(missing_ok=True)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _finish(part)
        log.info("upgraded the recovery system to %s (%s)", pulled.image, timings)
    return True

