"""Run one stage: every document's steps for it, in source order, each failure logged
(file, stage, step, reason) to stderr and /run/cos/setup-<stage>.log while the rest
still runs; the result says whether everything succeeded."""
from __future__ import annotations

import gzip
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..system import CosError, System
from . import datasources as ds
from .context import Context
from .schema import BOOT_ORDER, Action, Document, Step, expand
from .sources import local_documents, parse_text
from .spec import SpecError
from .steps import BY_KEY

log = logging.getLogger("cos")

IF_TIMEOUT = 60.0
NETWORK_FROM = BOOT_ORDER.index("network.before")  # network datasources are asked from here on
KEYS_STAGE = "initramfs"  # the root's overlays exist from here on, so /root/.ssh is writable


@dataclass
class UserData:
    """This boot's datasource result as documents, and the boot stages it missed."""
    documents: list[Document] = field(default_factory=list)
    late: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def log_path(stage: str) -> str:
    return f"/run/cos/setup-{stage}.log"


def read_cmdline(system: System) -> str:
    """The kernel command line of the running system; a scratch root has none."""
    return Path("/proc/cmdline").read_text() if system.is_host_root else ""


def found_documents(found: ds.Found) -> list[Document]:
    docs = []
    if found.ssh_keys:
        step = Step(f"ssh keys from {found.datasource}",
                    actions=[Action(BY_KEY["authorized_keys"], {"root": found.ssh_keys})])
        docs.append(Document(f"datasource {found.datasource} (keys)", stages={KEYS_STAGE: [step]}))
    try:
        raw = gzip.decompress(found.user_data) if found.user_data[:2] == b"\x1f\x8b" else found.user_data
        text = raw.decode()
    except (UnicodeDecodeError, OSError, EOFError):
        return [*docs, Document(f"datasource {found.datasource} (user-data)",
                                errors=["user-data is neither UTF-8 text nor gzip of it"])]
    doc = parse_text(text, f"datasource {found.datasource} (user-data)")
    return docs + ([doc] if doc else [])


def userdata(first: str, system: System, sources: Sequence[ds.Datasource], fetch: bool) -> UserData:
    """Datasource documents for a run starting at stage `first`: from this boot's cache,
    or probed now (network sources only from the network stage on, or when `fetch`).
    Newly arrived user-data also lists its boot stages that ran before it came."""
    boot = first in BOOT_ORDER
    network = fetch or (boot and BOOT_ORDER.index(first) >= NETWORK_FROM)
    hit = ds.cached(system)
    if isinstance(hit, ds.Found):
        return UserData(found_documents(hit))
    if hit == ds.NONE and not fetch:
        return UserData()
    found, errors = ds.probe(list(sources), system, network)
    if found is None:
        if network and not errors:
            ds.save(system, None)
        return UserData(errors=errors)
    log.info("user-data from datasource %s (%d bytes, %d ssh key(s))", found.datasource, len(found.user_data),
             len(found.ssh_keys))
    ds.save(system, found)
    docs = found_documents(found)
    late = [s for s in BOOT_ORDER[:BOOT_ORDER.index(first)] if any(s in d.stages for d in docs)] if boot else []
    return UserData(docs, late, errors + found.errors)


def run_step(step: Step, where: str, ctx: Context) -> bool:
    if step.errors:
        log.error("%s: FAILED (not run): %s", where, "; ".join(step.errors))
        return False
    if step.condition:
        if ctx.dry_run:
            log.info("%s: if '%s' (not evaluated in dry-run)", where, step.condition)
        else:
            try:
                proc = ctx.shell(step.condition, timeout=IF_TIMEOUT)
            except CosError as exc:
                log.error("%s: FAILED: if: %s", where, exc)
                return False
            if proc.returncode != 0:
                log.info("%s: skipped: if '%s' exited %d", where, step.condition, proc.returncode)
                return True
    ok = True
    for action in step.actions:
        try:
            action.plugin.apply(action.spec, ctx)
        except (CosError, SpecError, OSError) as exc:
            log.error("%s: %s: FAILED: %s", where, action.plugin.key, exc)
            ok = False
        except Exception as exc:  # a bug in one step must not cost the boot the other steps
            log.error("%s: %s: FAILED: %s: %s", where, action.plugin.key, type(exc).__name__, exc)
            ok = False
    if ok:
        log.info("%s: %s", where, "ok" if step.actions else "ok (nothing to do)")
    return ok


def run_documents(stage: str, docs: Sequence[Document], system: System, prefix: str = "") -> bool:
    ctx = Context(system, stage)
    ok = True
    for doc in docs:
        for step in doc.stages.get(stage, []):
            ok &= run_step(step, f"{prefix}{doc.source}: {stage}: step '{step.name}'", ctx)
    return ok


def report(docs: Sequence[Document]) -> bool:
    ok = True
    for doc in docs:
        for warning in doc.warnings:
            log.warning("%s: %s", doc.source, warning)
        for error in doc.errors:
            log.error("%s: FAILED: %s", doc.source, error)
            ok = False
    return ok


@contextmanager
def stage_log(system: System, stage: str) -> Iterator[None]:
    """Everything logged while the stage runs also goes to /run/cos/setup-<stage>.log
    (appended: reconcile runs many times a boot); dry-run writes no log file."""
    handlers: list[logging.Handler] = []
    if not logging.getLogger().handlers and not log.handlers:
        handlers.append(logging.StreamHandler())   # errors reach the journal for API callers too
        handlers[-1].setLevel(logging.WARNING)
    if not system.dry_run:
        path = system.path(log_path(stage))
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, encoding="utf-8"))
        handlers[-1].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    old_level = log.level
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    for h in handlers:
        log.addHandler(h)
    try:
        yield
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
        log.setLevel(old_level)


def run_stage(stage: str, system: System, *, cmdline: str | None = None, fetch_datasources: bool = False,
              datasources: Sequence[ds.Datasource] | None = None) -> bool:
    """Run `stage` (a boot stage runs with its .before and .after) against system.root.
    True when every step of every document succeeded. Raises CosError only for an
    unknown stage name."""
    try:
        stages = expand(stage)
    except SpecError as exc:
        raise CosError(str(exc)) from None
    with stage_log(system, stage):
        start = time.monotonic()
        log.info("stage %s: root %s%s", stage, system.root, " (dry-run)" if system.dry_run else "")
        local = local_documents(system.root, read_cmdline(system) if cmdline is None else cmdline)
        found = userdata(stages[0], system, ds.default_sources() if datasources is None else datasources,
                         fetch_datasources)
        for error in found.errors:
            log.error("%s", error)
        ok = report([*local, *found.documents]) and not found.errors
        for late in found.late:
            ok &= run_documents(late, found.documents, system, prefix="late: ")
        for sub in stages:
            ok &= run_documents(sub, [*local, *found.documents], system)
        log.info("stage %s: %s in %.1fs", stage, "done" if ok else "FAILED (see the errors above)",
                 time.monotonic() - start)
    return ok
