"""What every cos-* tool does the same way: log to stderr under its name, turn a CosError
into one line `<tool>: error: <what> (<hint>)` and exit 1, and --reboot / --poweroff after
success (never from a test's scratch root)."""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Callable

from .system import CosError, System

log = logging.getLogger("cos")


def add_power_options(p: argparse.ArgumentParser, what: str) -> None:
    when = p.add_mutually_exclusive_group()
    when.add_argument("--reboot", action="store_true", help=f"reboot after a successful {what}")
    when.add_argument("--poweroff", action="store_true", help=f"power off after a successful {what}")


def power(system: System, action: str) -> None:
    """reboot / poweroff, only ever on the real root (never from a test's scratch root)."""
    if not system.is_host_root:
        log.info("not running %s: %s is a scratch root", action, system.root)
        return
    system.run(["systemctl", action] if shutil.which("systemctl") else [action])


def power_after(system: System, args: argparse.Namespace) -> None:
    if getattr(args, "reboot", False) or getattr(args, "poweroff", False):
        power(system, "reboot" if args.reboot else "poweroff")


def run_tool(prog: str, body: Callable[[], object], quiet: bool = False) -> int:
    """Run a tool's work: 0 when it returns, 1 with one error line when it raises CosError."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format=f"{prog}: %(message)s",
                        stream=sys.stderr)
    try:
        body()
    except CosError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0
