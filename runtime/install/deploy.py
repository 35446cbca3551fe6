"""cos-deploy: install the running recovery system into COS_STATE as active and passive.

Run in recovery mode (`/run/cos/recovery_mode`): the pristine root tree of the recovery
system (its squashfs, mounted by dmsquash-live at /run/rootfsbase) becomes
`cOS/active.img` (ext4, label COS_ACTIVE) and `cOS/passive.img` (COS_PASSIVE) on
COS_STATE, with the boot menu (`/etc/cos/grub.cfg`, `/etc/cos/bootargs.cfg` of that tree)
beside them, and the next boot goes to `cos` (`next_entry=cos` in COS_OEM's /grubenv).

Built without loop mounts: `mkfs.ext4 -d SOURCE` fills the image (hard links, owners,
xattrs such as file capabilities are kept). Sized content + 20 % + 256 MiB, sparse.

Safe to kill at any point: everything is written under a temporary name and renamed
when complete, in this order: menu, transition.img -> active.img, passive temp ->
passive.img, grubenv. Recovery is never touched, so it stays bootable; the next run
removes the leftovers first. `cOS/.deploy-incomplete` marks a deploy that has not
finished: a re-run resumes it without --force.

Refusals (one line, exit 1, nothing written): not in recovery mode; no COS_STATE (the
cloud-config `layout` step makes it); the source tree has no boot menu; COS_STATE has
no room for active + passive + the transition.img a later upgrade needs; and a system
already deployed (active.img present and complete) unless --force: a recovery boot that
runs `cos-deploy` from cloud-config (as the usual first-boot config does) must not
replace the installed system; `cos-deploy --force` re-deploys on purpose.
"""
from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..system import CosError, System, write_atomic
from . import grubenv
from .disks import MIB, find_partition, mounts_of
from .durable import fsync_dir, fsync_file, remove_record, write_record

log = logging.getLogger("cos.deploy")

RECOVERY_SENTINEL = "/run/cos/recovery_mode"
DEFAULT_SOURCE = Path("/run/rootfsbase")
STATE_MOUNT = "/run/cos/state"
OEM_MOUNT = "/oem"                 # where the booted system has COS_OEM
OEM_FALLBACK_MOUNT = "/run/cos/oem"
STATE_LABEL, OEM_LABEL, RECOVERY_LABEL = "COS_STATE", "COS_OEM", "COS_RECOVERY"
ACTIVE_LABEL, PASSIVE_LABEL = "COS_ACTIVE", "COS_PASSIVE"

ACTIVE, PASSIVE = "cOS/active.img", "cOS/passive.img"
TRANSITION, PASSIVE_TMP = "cOS/transition.img", "cOS/.passive.img.tmp"
INCOMPLETE = "cOS/.deploy-incomplete"
MENU = ("etc/cos/grub.cfg", "etc/cos/bootargs.cfg")
# grubenv variables of boot assessment (etc/cos/grub.cfg, runtime/upgrade) cleared by a deploy
FRESH_BOOT: dict[str, str | None] = {"saved_entry": None, "cos_trial": None, "cos_tried": None, "cos_rollback": None}
GRUBENV = "grubenv"

BLOCK = 4096
HEADROOM_MIN = 256 * MIB          # room for the journal, inode tables and a little growth
HEADROOM_RATIO = 0.2
INODE_SIZE = 256
SPARE_INODES = 4096


@dataclass(frozen=True)
class Options:
    source: Path | None = None    # the tree to deploy; None: /run/rootfsbase in the System root
    state: Path | None = None     # a directory standing for COS_STATE; None: find and mount the partition
    oem: Path | None = None       # a directory standing for COS_OEM; None: /oem if mounted, else the partition
    force: bool = False
    strict: bool = False          # a failing after-deploy stage fails the deploy


@dataclass(frozen=True)
class ImageSize:
    bytes: int
    inodes: int


# ---- checks (nothing written) ---------------------------------------------------------------

def check_recovery(system: System, tool: str = "cos-deploy") -> None:
    if not system.path(RECOVERY_SENTINEL).exists():
        raise CosError(f"{tool} runs only in recovery mode ({RECOVERY_SENTINEL} is missing)",
                       "boot the 'cOS recovery' entry and run it there")


def check_source(source: Path) -> None:
    if not source.is_dir():
        raise CosError(f"the system to deploy, {source}, is not a directory",
                       "in recovery mode it is the squashfs at /run/rootfsbase; or give --source DIR")
    for name in MENU:
        if not (source / name).is_file():
            raise CosError(f"{source}/{name} is missing: the system to deploy has no boot menu",
                           "add package cos-grub to the flavor")


def resolve_in(root: Path, rel: str) -> Path:
    """`rel` inside the tree `root`, its absolute symlinks resolved in `root` (never on the host)."""
    path = root / rel
    for _ in range(16):
        if not path.is_symlink():
            return path
        target = Path(os.readlink(path))
        path = root / str(target).lstrip("/") if target.is_absolute() else path.parent / target
    return path


def _allocated(st: os.stat_result) -> int:
    """Bytes a file takes in the image: holes stay holes (mkfs.ext4 -d keeps them)."""
    size = min(st.st_size, st.st_blocks * 512)
    return -(-size // BLOCK) * BLOCK


def image_size(source: Path) -> ImageSize:
    """Size and inode count of an ext4 image that holds `source`, hard links counted once."""
    seen: set[tuple[int, int]] = set()
    content = BLOCK
    for top, dirs, files in os.walk(source):
        for name in dirs + files:
            st = os.lstat(os.path.join(top, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                content += max(_allocated(st), BLOCK if stat.S_ISDIR(st.st_mode) else 0)
            elif stat.S_ISLNK(st.st_mode) and st.st_size >= 60:   # longer targets need a block
                content += BLOCK
    inodes = len(seen) + len(seen) // 4 + SPARE_INODES
    total = content + inodes * INODE_SIZE + max(HEADROOM_MIN, int(content * HEADROOM_RATIO))
    return ImageSize(-(-total // MIB) * MIB, inodes)


def _held(path: Path) -> int:
    return path.stat().st_blocks * 512 if path.exists() else 0


def check_space(state: Path, size: ImageSize) -> None:
    """Room on COS_STATE, counted before anything is written: transition.img while the old
    active and passive still exist, then the passive copy, and afterwards still one
    transition.img for the next upgrade (active + passive + transition)."""
    st = os.statvfs(state)
    free = st.f_bavail * st.f_frsize
    old_active, old_passive = _held(state / ACTIVE), _held(state / PASSIVE)
    need = 3 * size.bytes
    if free < size.bytes or free + old_active < 2 * size.bytes or free + old_active + old_passive < need:
        have = (free + old_active + old_passive) // MIB
        raise CosError(f"COS_STATE has {have} MiB for the images, cos-deploy needs {need // MIB} MiB "
                       f"(active.img + passive.img + an upgrade's transition.img, {size.bytes // MIB} MiB each)",
                       f"give COS_STATE at least {need * 11 // 10 // MIB} MiB in the cloud-config layout step")


def check_not_deployed(state: Path, force: bool) -> None:
    if (state / ACTIVE).exists() and not (state / INCOMPLETE).exists() and not force:
        raise CosError("COS_STATE already holds a deployed system (cOS/active.img)",
                       "cos-deploy --force replaces it (active and passive); cos-upgrade updates it")


# ---- where COS_STATE and COS_OEM are ----------------------------------------------------------

@contextmanager
def mounted(system: System, label: str, where: str, hint: str) -> Iterator[Path]:
    """The partition labelled `label`, read-write: where it is already mounted, else
    mounted at `where` (in the System root) and unmounted afterwards."""
    try:
        _, node = find_partition(system, label)
    except CosError as e:
        raise CosError(f"{e.message} on this machine", hint) from None
    mounted = mounts_of(node)
    if mounted:   # already mounted (read-only by the initrd, or left by a killed run): use it rw
        target, read_only = mounted[0]
        if not read_only:
            yield target
            return
        system.run(["mount", "-o", "remount,rw", target])
        try:
            yield target
        finally:
            system.run(["mount", "-o", "remount,ro", target], check=False)
        return
    target = system.path(where)
    target.mkdir(parents=True, exist_ok=True)
    system.run(["mount", "-o", "rw", node, target])
    try:
        yield target
    finally:
        system.run(["umount", target], check=False)


@contextmanager
def given_dir(path: Path, what: str) -> Iterator[Path]:
    if not path.is_dir():
        raise CosError(f"{what} directory {path} does not exist")
    yield path


def state_dir(system: System, opts: Options) -> AbstractContextManager[Path]:
    if opts.state is not None:
        return given_dir(opts.state, "--state")
    return mounted(system, STATE_LABEL, STATE_MOUNT,
                    "the cloud-config `layout` step makes it: add_partitions: [{fsLabel: COS_STATE, "
                    "pLabel: state, size: 8192}] in a rootfs stage, then boot recovery again")


def oem_dir(system: System, opts: Options) -> AbstractContextManager[Path]:
    if opts.oem is not None:
        return given_dir(opts.oem, "--oem")
    if os.path.ismount(system.path(OEM_MOUNT)):
        return given_dir(system.path(OEM_MOUNT), OEM_MOUNT)
    return mounted(system, OEM_LABEL, OEM_FALLBACK_MOUNT, "COS_OEM holds GRUB's grubenv: is this a cOS disk?")


# ---- writing --------------------------------------------------------------------------------

def remove_leftovers(state: Path, oem: Path) -> None:
    """What a killed run leaves: the unfinished images and write_atomic's temporary names."""
    images = (state / ACTIVE).parent
    leftovers = [state / TRANSITION]
    leftovers += [p for p in images.glob(".*") if p.name != Path(INCOMPLETE).name] if images.is_dir() else []
    leftovers += [p for d in {(state / n).parent for n in MENU} if d.is_dir() for p in d.glob(".*.cfg.*")]
    leftovers += list(oem.glob(f".{GRUBENV}.*"))
    for path in leftovers:
        if path.exists():
            log.info("removing %s, left by an interrupted deploy", path)
            path.unlink()


def write_menu(source: Path, state: Path) -> None:
    for name in MENU:
        write_atomic(state / name, (source / name).read_bytes(), mode=0o644)
    fsync_dir((state / MENU[0]).parent)


def make_transition(system: System, source: Path, state: Path, size: ImageSize, label: str = ACTIVE_LABEL) -> Path:
    """mkfs.ext4 -d into transition.img (fsynced): the new image, not yet in place."""
    transition = state / TRANSITION
    log.info("building %s (%d MiB, sparse) from %s", TRANSITION, size.bytes // MIB, source)
    system.run(["mkfs.ext4", "-q", "-F", "-L", label, "-b", str(BLOCK), "-m", "0", "-N", str(size.inodes),
                "-E", "nodiscard", "-d", source, transition, f"{size.bytes // 1024}k"])
    fsync_file(transition)
    return transition


def make_active(system: System, source: Path, state: Path, size: ImageSize) -> None:
    """transition.img, then rename: active.img is whole or absent."""
    transition = make_transition(system, source, state, size)
    os.replace(transition, state / ACTIVE)
    fsync_dir(transition.parent)


def check_upgrade_space(state: Path, size: ImageSize, passive_in_use: bool = False) -> None:
    """Room on COS_STATE for an upgrade, counted before anything is written: transition.img
    beside the old active and passive (passive is not touched until the new image is
    complete), then the copy of the old active that replaces passive (the old passive's
    blocks are free again by then, unless it is the running system)."""
    st = os.statvfs(state)
    free = st.f_bavail * st.f_frsize
    old_active = _held(state / ACTIVE)
    old_passive = 0 if passive_in_use else _held(state / PASSIVE)
    need = size.bytes + old_active
    if free < size.bytes or free + old_passive < need:
        raise CosError(f"COS_STATE has {(free + old_passive) // MIB} MiB free for the upgrade, it needs "
                       f"{need // MIB} MiB (transition.img {size.bytes // MIB} MiB + the old active kept as "
                       f"passive.img {old_active // MIB} MiB); nothing was changed",
                       "grow COS_STATE (cloud-config layout step) or use a smaller image")


def make_passive(system: System, state: Path) -> None:
    """A sparse copy of the complete active.img with its own label and UUID."""
    tmp = state / PASSIVE_TMP
    log.info("copying %s to %s", ACTIVE, PASSIVE)
    system.run(["cp", "--sparse=always", state / ACTIVE, tmp])
    system.run(["tune2fs", "-L", PASSIVE_LABEL, "-U", "random", tmp])
    fsync_file(tmp)
    os.replace(tmp, state / PASSIVE)
    fsync_dir(tmp.parent)


def _mark(state: Path, incomplete: bool) -> None:
    marker = state / INCOMPLETE
    if incomplete:
        write_atomic(marker, b"cos-deploy started; not finished\n")
    else:
        marker.unlink(missing_ok=True)
    fsync_dir(marker.parent)


def run_after(system: System, stage: str, strict: bool) -> None:
    """An after-* cloud-config stage (after-deploy, after-reset), through the runner."""
    from ..cloudconfig.runner import run_stage  # late: the runner loads yaml, deploy alone does not

    if run_stage(stage, system):  # the runner logs each failed step itself
        return
    if strict:
        raise CosError(f"the {stage} stage failed", f"see /run/cos/setup-{stage}.log")
    log.warning("the %s stage failed (see /run/cos/setup-%s.log); the %s itself is complete",
                stage, stage, stage.removeprefix("after-"))


@dataclass(frozen=True)
class Fetched:
    """An image pulled for `cos-deploy -d`: its unpacked tree and the record kept beside
    active.img / passive.img (cOS/active.json: image, digest)."""
    rootfs: Path
    record: dict[str, str]


# Given COS_STATE (to keep temporary data off it), yields the pulled image, or None for the
# recovery system; the work directory is removed when the context ends.
Fetcher = Callable[[Path], AbstractContextManager[Fetched | None]]


@contextmanager
def no_fetch(state: Path) -> Iterator[Fetched | None]:
    yield None


def deploy(system: System, opts: Options, fetch: Fetcher = no_fetch, stage: str | None = "after-deploy") -> None:
    check_recovery(system)
    deploy_system(system, opts, fetch, stage)


def deploy_system(system: System, opts: Options, fetch: Fetcher = no_fetch,
                  stage: str | None = "after-deploy") -> None:
    """The deploy itself, in any boot mode: cos-install runs it from the live system."""
    if opts.source is not None:
        check_source(opts.source)
    with state_dir(system, opts) as state, oem_dir(system, opts) as oem:
        check_not_deployed(state, opts.force)
        remove_leftovers(state, oem)
        with fetch(state) as fetched:
            source = fetched.rootfs if fetched else opts.source or system.path(DEFAULT_SOURCE)
            if fetched is None:
                log.info("deploying the recovery system (%s)", source)
            check_source(source)
            _deploy_tree(system, source, state, oem, fetched.record if fetched else None)
        log.info("deployed: %s and %s on COS_STATE; the next boot starts 'cos'", ACTIVE, PASSIVE)
        if stage:
            run_after(system, stage, opts.strict)


def _deploy_tree(system: System, source: Path, state: Path, oem: Path, record: dict[str, str] | None) -> None:
    size = image_size(source)
    check_space(state, size)
    (state / ACTIVE).parent.mkdir(parents=True, exist_ok=True)
    _mark(state, incomplete=True)
    try:
        write_menu(source, state)
        for name in (ACTIVE, PASSIVE):   # the records of what was there go first: never a stale one
            remove_record(state / Path(name).with_suffix(".json"))
        make_active(system, source, state, size)
        make_passive(system, state)
        if record is not None:
            for name in (ACTIVE, PASSIVE):
                write_record(state / Path(name).with_suffix(".json"), record)
        # a fresh system: no trial, no rollback of an earlier upgrade steering the default to fallback
        grubenv.update(oem / GRUBENV, next_entry="cos", **FRESH_BOOT)
    except CosError:
        remove_leftovers(state, oem)   # a failed mkfs/copy leaves no half image behind
        raise
    _mark(state, incomplete=False)
