"""cos-upgrade: a new OS image (registry image or directory) becomes active; the old
active stays as passive (the fallback entry).

Order, so a kill -9 or power cut at any moment leaves a bootable active (or passive) and
a re-run completes:
  1. pull + unpack into a work directory OFF COS_STATE (COS_PERSISTENT's /usr/local or
     /var/tmp, whichever has more room; the log says which) - COS_STATE untouched;
  2. refuse (one line, nothing changed) what is not a cOS image, or does not fit;
  3. transition.img (mkfs.ext4 -d, the code cos-deploy uses) + transition.json, fsynced;
     journal phase `written`. passive.img is still the old passive;
  4. passive.img <- a copy of active.img relabelled COS_PASSIVE (cos-deploy's
     make_passive), passive.json <- active.json; journal phase `passive`;
  5. rename transition.img -> active.img, transition.json -> active.json, the new image's
     boot menu (waiting as cOS/.new-grub.cfg, .new-bootargs.cfg) -> /etc/cos/; journal gone.
Every rename is atomic and every file complete before it gets its final name, so
active.img is always the old or the new system, whole. A re-run that finds the journal
finishes steps 4-5 without pulling again.

The record beside each image (cOS/<name>.json: image, digest, date) is what a channel
upgrade compares ("already up to date") and what boot assessment names when it rolls an
upgrade back (cOS/failed-images.json: those digests are skipped by a channel upgrade).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..install import deploy, grubenv
from ..install.durable import fsync_dir, read_record, remove_record, write_record
from ..system import CosError, System, write_atomic
from .oci import Pulled, Timings, prune
from .source import PASSIVE_MODE, Options, check_cos_image, obtain, record_of, record_path, work_dir

log = logging.getLogger("cos.upgrade")

JOURNAL = "cOS/.upgrade-journal"
RECOVERY_MODE = deploy.RECOVERY_SENTINEL


# ---- the swap (steps 3-5) ------------------------------------------------------------------

def write_transition(system: System, pulled: Pulled, state: Path, keep_passive: bool, timings: Timings) -> None:
    start = time.monotonic()
    size = deploy.image_size(pulled.rootfs)
    deploy.check_upgrade_space(state, size, passive_in_use=keep_passive)
    deploy.make_transition(system, pulled.rootfs, state, size)
    write_record(record_path(state, deploy.TRANSITION), record_of(pulled))
    for name in deploy.MENU:   # the new image's boot menu, put in place with the image
        write_atomic(_new_menu(state, name), (pulled.rootfs / name).read_bytes(), mode=0o644)
    write_record(state / JOURNAL, {"phase": "written", "keep_passive": keep_passive, "image": pulled.image})
    timings.add("write", start)
    # logged now, not only at the end: a run killed in the swap still says what it cost
    log.info("transition.img is complete (%s); swapping", timings)


def swap(system: System, state: Path) -> dict[str, object]:
    """Steps 4-5 from wherever the journal says; returns the journal's content."""
    journal = read_record(state / JOURNAL) or {}
    if journal.get("phase") == "written":
        if not journal.get("keep_passive"):
            # passive is replaced only now: the new image (transition.img) is complete
            deploy.make_passive(system, state)
            old = read_record(record_path(state, deploy.ACTIVE))
            if old is None:
                remove_record(record_path(state, deploy.PASSIVE))
            else:
                write_record(record_path(state, deploy.PASSIVE), old)
        write_record(state / JOURNAL, {**journal, "phase": "passive"})
    transition = state / deploy.TRANSITION
    if transition.exists():
        os.replace(transition, state / deploy.ACTIVE)
        fsync_dir(transition.parent)
    if record_path(state, deploy.TRANSITION).exists():
        os.replace(record_path(state, deploy.TRANSITION), record_path(state, deploy.ACTIVE))
        fsync_dir(transition.parent)
    for name in deploy.MENU:
        if _new_menu(state, name).exists():
            (state / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(_new_menu(state, name), state / name)
            fsync_dir((state / name).parent)
    remove_record(state / JOURNAL)
    return journal


def _new_menu(state: Path, name: str) -> Path:
    """Where the new image's grub.cfg / bootargs.cfg wait on COS_STATE for the swap."""
    return state / "cOS" / f".new-{Path(name).name}"


def remove_leftovers(state: Path) -> None:
    """What a run killed before the journal existed leaves: an incomplete transition."""
    for path in (state / deploy.TRANSITION, record_path(state, deploy.TRANSITION), state / deploy.PASSIVE_TMP,
                 *(_new_menu(state, n) for n in deploy.MENU)):
        if path.exists():
            log.info("removing %s, left by an interrupted upgrade", path)
            path.unlink()


# ---- the whole -----------------------------------------------------------------------------

@contextmanager
def _places(system: System, opts: Options) -> Iterator[tuple[Path, Path]]:
    dopts = deploy.Options(state=opts.state, oem=opts.oem)
    with deploy.state_dir(system, dopts) as state, deploy.oem_dir(system, dopts) as oem:
        yield state, oem


def upgrade(system: System, opts: Options) -> bool:
    """True when a new active was put in place (then the caller may reboot)."""
    if system.path(RECOVERY_MODE).exists() and not opts.recovery:
        raise CosError("cos-upgrade updates the installed system; this is recovery mode",
                       "run cos-deploy here (it takes -d IMAGE too), or boot the installed system")
    if opts.recovery:
        from .recovery import upgrade_recovery  # late: only --recovery needs it
        return upgrade_recovery(system, opts)
    timings = Timings()
    with _places(system, opts) as (state, oem):
        if (state / JOURNAL).exists():
            journal = swap(system, state)
            log.info("completed the interrupted upgrade to %s", journal.get("image", "?"))
            after_swap(system, oem, opts.strict)
            return True
        if not (state / deploy.ACTIVE).exists():
            raise CosError("COS_STATE holds no deployed system (cOS/active.img)", "run cos-deploy from recovery first")
        remove_leftovers(state)
        work = work_dir(system, state, opts.tmpdir)
        try:
            pulled = obtain(system, opts, state, work, timings)
            if pulled is None:
                return False
            check_cos_image(system, pulled.rootfs, pulled.image)
            keep_passive = system.path(PASSIVE_MODE).exists()
            if keep_passive:
                log.info("running the passive system: it stays passive, the new image replaces active")
            write_transition(system, pulled, state, keep_passive, timings)
        except BaseException:
            remove_leftovers(state)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        start = time.monotonic()
        swap(system, state)
        timings.add("swap", start)
        log.info("upgraded: active.img is %s%s; passive.img holds the previous system (%s)", pulled.image,
                 f" ({pulled.digest})" if pulled.digest else "", timings)
        if pulled.layout is not None:
            prune(pulled.layout)
        after_swap(system, oem, opts.strict)
    return True


def after_swap(system: System, oem: Path, strict: bool) -> None:
    """The next start boots the new active, counted by boot assessment; then after-upgrade."""
    grubenv.update(oem / deploy.GRUBENV, next_entry=None, saved_entry=None, **ASSESS_ARM)
    from ..cloudconfig.runner import run_stage  # late: the runner loads yaml

    if run_stage("after-upgrade", system):
        return
    if strict:
        raise CosError("the after-upgrade stage failed", "see /run/cos/setup-after-upgrade.log")
    log.warning("the after-upgrade stage failed (see /run/cos/setup-after-upgrade.log); the upgrade is complete")


# grubenv variables grub.cfg reads: the first start of a new active is on trial
ASSESS_ARM: dict[str, str | None] = {"cos_trial": "1", "cos_tried": None}
