"""Where the new system comes from: a registry image (pulled and unpacked off COS_STATE),
a directory, or the newest image of the upgrade channel; and the check that it is a cOS
image at all, before anything on disk changes."""
from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ..install import deploy
from ..install.disks import MIB
from ..install.durable import read_record
from ..system import CosError, System
from . import channel as chan
from .oci import CACHE_NAME, Pulled, Ref, Skopeo, Timings, pull

log = logging.getLogger("cos.upgrade")

FAILED = "cOS/failed-images.json"
PASSIVE_MODE = "/run/cos/passive_mode"
WORK_NAME = ".cos-upgrade"
WORK_CANDIDATES = ("/usr/local", "/var/tmp", "/tmp")   # /usr/local is COS_PERSISTENT when booted
TOOLKIT = "usr/lib/cos/python-run"                     # what package cos-runtime installs
SCRIPT_CHECK = ("grub-script-check", "grub2-script-check")
KERNEL, INITRD = "boot/vmlinuz", "boot/initrd"
# What the runtime relies on in a menu (/etc/cos/grub.cfg): entries it boots by id (grubenv
# next_entry/saved_entry), what each loads, and the grubenv variables of boot assessment.
MENU_ENTRIES = {"cos": (deploy.STATE_LABEL, f"/{deploy.ACTIVE}"), "fallback": (deploy.STATE_LABEL, f"/{deploy.PASSIVE}"),
                "recovery": (deploy.RECOVERY_LABEL,)}
MENU_VARIABLES = ("next_entry", "saved_entry", "cos_trial", "cos_tried")


def record_path(state: Path, image: str) -> Path:
    """cOS/active.json for cOS/active.img."""
    return state / Path(image).with_suffix(".json")


@dataclass(frozen=True)
class Options:
    image: str | None = None          # -d REF
    directory: Path | None = None     # --directory DIR
    verify: bool = True
    recovery: bool = False
    strict: bool = False
    state: Path | None = None         # a directory standing for COS_STATE
    oem: Path | None = None           # ... for COS_OEM
    recovery_dir: Path | None = None  # ... for COS_RECOVERY (--recovery)
    tmpdir: Path | None = None        # where the pull and the unpacked tree go
    cache: bool = True                # keep the layers for the next upgrade (beside the work dir)


# ---- the source ----------------------------------------------------------------------------

def check_cos_image(system: System, rootfs: Path, what: str) -> None:
    """Refuse anything that is not a cOS image, before COS_STATE is touched."""
    missing = [f"/{p}" for p in (KERNEL, INITRD, TOOLKIT, *deploy.MENU) if not deploy.resolve_in(rootfs, p).exists()]
    if missing:
        raise CosError(f"{what} is not a cOS image: it has no {', '.join(missing)}; nothing was changed",
                       "build it FROM a cOS image (flavor red, green, blue or orange)")
    check_menu(system, rootfs, what)


def check_menu(system: System, rootfs: Path, what: str) -> None:
    """The new image's boot menu replaces the one that boots active AND passive: a menu GRUB
    cannot parse would leave neither bootable, and boot assessment never gets to run. So
    grub-script-check (GRUB's own parser; grub2-script-check on Fedora/openSUSE) vets it first."""
    tool = next((t for t in SCRIPT_CHECK if shutil.which(t)), None)
    if tool is None:
        log.warning("no %s here: the new boot menu's syntax is not checked before it replaces this one",
                    " or ".join(SCRIPT_CHECK))
    else:
        for name in deploy.MENU:
            proc = system.run([tool, deploy.resolve_in(rootfs, name)], check=False)
            if proc.returncode != 0:
                detail = (proc.stdout + proc.stderr).decode(errors="replace").split()
                raise CosError(f"{what}: its /{name} does not parse ({' '.join(detail)[-200:]}); nothing was changed",
                               f"fix /{name} in the image (check it with {tool})")
    problem = menu_problem(deploy.resolve_in(rootfs, deploy.MENU[0]).read_text(errors="replace"))
    if problem:
        raise CosError(f"{what}: its /{deploy.MENU[0]} {problem}; nothing was changed",
                       "keep the entries and grubenv variables of the cos-grub package's menu")


def menu_entries(text: str) -> dict[str, str]:
    """id -> body of each `menuentry ... --id ID {...}` (braces counted; GRUB quoting is
    not parsed, which the menus we ship and their derivatives do not need)."""
    entries = {}
    for m in re.finditer(r"^\s*menuentry\b[^{\n]*?--id[= ]+[\"']?([\w.-]+)[^{\n]*\{", text, re.M):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        entries[m.group(1)] = text[m.end():i - 1]
    return entries


def menu_problem(text: str) -> str | None:
    """Why a menu that parses would still not boot the way the runtime expects (a wrong
    label, a lost fallback entry, boot assessment dropped), or None."""
    entries = menu_entries(text)
    for entry, needed in MENU_ENTRIES.items():
        if entry not in entries:
            return f"has no menu entry with --id {entry} (the runtime boots it by that id)"
        missing = [n for n in needed if n not in entries[entry]]
        if missing:
            return f"has a menu entry {entry} that does not use {', '.join(missing)}"
    lost = [v for v in MENU_VARIABLES if v not in text]
    if lost:
        return f"does not read grubenv's {', '.join(lost)} (boot selection and assessment)"
    return None


def work_dir(system: System, state: Path, tmpdir: Path | None) -> Path:
    """The roomiest candidate that is not on COS_STATE (temporary data must not fill it)."""
    state_dev = os.stat(state).st_dev
    candidates = [tmpdir] if tmpdir else [system.path(c) for c in WORK_CANDIDATES]
    usable = [c for c in candidates if c.is_dir() and os.stat(c).st_dev != state_dev]
    if not usable:
        raise CosError(f"no place for the temporary data off COS_STATE (tried {', '.join(map(str, candidates))})",
                       "give --tmpdir DIR on another filesystem")
    # where the layer cache of the last upgrade is (its room is checked before the pull), else the roomiest
    cached = [c for c in usable if (c / CACHE_NAME).is_dir()]
    best = cached[0] if cached else max(usable, key=lambda c: shutil.disk_usage(c).free)
    work = best / WORK_NAME
    if work.exists():
        log.info("removing %s, left by an interrupted upgrade", work)
        shutil.rmtree(work)
    work.mkdir(mode=0o700)
    log.info("temporary data in %s (%d MiB free there)", work, shutil.disk_usage(best).free // MIB)
    return work


def failed_digests(state: Path) -> set[str]:
    data = read_record(state / FAILED) or {}
    return set(data.get("digests", []))


def pick_from_channel(system: System, state: Path, work: Path) -> Ref | None:
    """The channel's newest version not known to fail; None when active already runs it."""
    channel = chan.load(system)
    if channel is None:
        raise CosError(f"no image given and no upgrade channel ({chan.CHANNEL})",
                       "give -d REGISTRY/NAME:TAG or --directory DIR")
    skopeo = Skopeo(system, work)
    tags = chan.newest_first(skopeo.tags(channel.repository), channel.tags)
    if not tags:
        raise CosError(f"the channel {channel.repository} has no tag matching {channel.tags!r} with a version",
                       f"check {chan.CHANNEL}")
    running = running_image(system)
    current = (read_record(record_path(state, running)) or {}).get("digest")
    failed = failed_digests(state)
    for tag in tags:
        ref = Ref(channel.repository, tag=tag)
        digest = skopeo.digest(ref)
        # failed first: after a rollback active.json still names the failed image
        if digest in failed:
            log.warning("skipping %s (%s): it failed to boot before and was rolled back", ref, digest)
            continue
        if digest == current:
            log.info("already up to date: the running system (%s) is %s (%s)", running, ref, digest)
            return None
        log.info("newest in the channel: %s (%s)", ref, digest)
        return Ref(channel.repository, tag=tag, digest=digest)
    log.info("nothing to upgrade to: every image of the channel failed to boot before")
    return None


def running_image(system: System) -> str:
    """cOS/passive.img after a rollback (or when the fallback entry was chosen), else cOS/active.img."""
    return deploy.PASSIVE if system.path(PASSIVE_MODE).exists() else deploy.ACTIVE


def obtain(system: System, opts: Options, state: Path, work: Path, timings: Timings) -> Pulled | None:
    if opts.directory is not None:
        if not opts.directory.is_dir():
            raise CosError(f"--directory {opts.directory} is not a directory")
        return Pulled(opts.directory, str(opts.directory), None)
    ref = Ref.parse(opts.image) if opts.image else pick_from_channel(system, state, work)
    if ref is None:
        return None
    pulled = pull(system, ref, work, opts.verify, timings, work.parent / CACHE_NAME if opts.cache else None)
    if not opts.image and ref.tag:   # a channel pick: record the tag, not only the digest
        pulled = Pulled(pulled.rootfs, f"{ref.repository}:{ref.tag}", pulled.digest, pulled.layout)
    return pulled


def deploy_fetcher(system: System, image: str | None, verify: bool, tmpdir: Path | None) -> deploy.Fetcher:
    """What `cos-deploy` installs: -d IMAGE; with none, the channel's newest image when a
    channel is configured and reachable, else the recovery system (the log says which)."""
    @contextmanager
    def fetch(state: Path) -> Iterator[deploy.Fetched | None]:
        if image is None and chan.load(system) is None:
            yield None
            return
        work = work_dir(system, state, tmpdir)
        try:
            yield _fetch(system, image, verify, state, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return fetch


def _fetch(system: System, image: str | None, verify: bool, state: Path, work: Path) -> deploy.Fetched | None:
    opts = Options(image=image, verify=verify, cache=False)   # recovery mode: /usr/local and /var/tmp are RAM
    try:
        pulled = obtain(system, opts, state, work, Timings())
    except CosError as e:
        if image is not None:
            raise
        log.warning("the upgrade channel is not usable (%s): deploying the recovery system instead", e)
        return None
    if pulled is None:   # "already up to date" cannot happen on a fresh deploy, but be exact
        return None
    check_cos_image(system, pulled.rootfs, pulled.image)
    return deploy.Fetched(pulled.rootfs, record_of(pulled))


def record_of(pulled: Pulled) -> dict[str, str]:
    data = {"image": pulled.image, "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if pulled.digest:
        data["digest"] = pulled.digest
    return data
