"""cos-setup [--root DIR] [--dry-run] [--cmdline FILE] [--fetch-datasources] STAGE

Exit 0 when every step succeeded, 1 when any failed (each failure is logged), 2 for a
usage error such as an unknown stage."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ..system import CosError, System
from . import datasources as ds
from .runner import run_stage

log = logging.getLogger("cos")


class JournalFormatter(logging.Formatter):
    """Under systemd, a "<N>" prefix gives each line its priority in the journal, so
    `journalctl -p err` shows exactly the failed steps."""
    PRIORITY = {logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITY.get(record.levelno, 6)}>{record.getMessage()}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cos-setup", description="Run a cloud-config stage.")
    p.add_argument("stage", help="rootfs, initramfs, fs, boot, network, reconcile (with .before/.after), "
                                 "after-install, after-deploy, after-upgrade, after-reset")
    p.add_argument("--root", type=Path, default=Path("/"), help="the target root (default /)")
    p.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    p.add_argument("--cmdline", type=Path, help="kernel command line file (default /proc/cmdline)")
    p.add_argument("--fetch-datasources", action="store_true",
                   help="ask the network datasources (EC2, GCE, Azure) even before the network stage")
    p.add_argument("--datasource-url", action="append", default=[], metavar="NAME=URL",
                   help="base URL of a datasource: ec2, gce, azure, azure-wire (tests)")
    return p.parse_args(argv)


def sources(overrides: list[str]) -> list[ds.Datasource]:
    urls: dict[str, str] = {}
    for item in overrides:
        name, sep, url = item.partition("=")
        if not sep or name not in ("ec2", "gce", "azure", "azure-wire"):
            raise CosError(f"--datasource-url {item!r}: expected ec2|gce|azure|azure-wire=URL")
        urls[name] = url.rstrip("/")
    return [ds.NoCloud(), ds.Ec2(urls.get("ec2", ds.METADATA_IP)), ds.Gce(urls.get("gce", ds.METADATA_IP)),
            ds.Azure(urls.get("azure", ds.METADATA_IP), urls.get("azure-wire", ds.AZURE_WIRE))]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter() if os.environ.get("JOURNAL_STREAM") else
                         logging.Formatter("cos-setup: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        cmdline = None
        if args.cmdline is not None:
            try:
                cmdline = args.cmdline.read_text()
            except OSError as exc:
                raise CosError(f"--cmdline {args.cmdline}: {exc.strerror}") from None
        system = System(root=args.root, dry_run=args.dry_run)
        ok = run_stage(args.stage, system, cmdline=cmdline, fetch_datasources=args.fetch_datasources,
                       datasources=sources(args.datasource_url))
    except CosError as exc:
        print(f"cos-setup: error: {exc}", file=sys.stderr)
        return 2
    finally:
        log.removeHandler(handler)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
