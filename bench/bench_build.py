#!/usr/bin/env python3
"""Benchmark the foundation for red: cold build, no-op re-runs (also after touching
multi-GB artifacts), a re-run after touching/changing one overlay file, and the
pipeline's image + squashfs stages against the same raw commands typed by hand.

  .venv/bin/python bench/bench_build.py [--flavor red] [--only cold|noop|overhead ...]

Targets (issue 2): no-op re-run < 1 s with no stage executed, also after `touch`ing
the big artifacts; pipeline overhead <= 1.10x the raw commands. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline import version  # noqa: E402
from pipeline.config import FlavorPaths, load_flavor  # noqa: E402
from pipeline.image import build_args  # noqa: E402
from pipeline.squashfs import source_date_epoch, tar2sqfs_command  # noqa: E402

DOIT = [str(REPO / ".venv/bin/doit"), "--dir", str(REPO)]
ROWS: list[tuple[str, str, str]] = []


def timed(cmd: list[str] | str, env: dict | None = None, shell: bool = False) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, shell=shell, executable="/bin/bash" if shell else None,
                          capture_output=True, text=True, env={**os.environ, **(env or {})})
    secs = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"bench: {cmd if shell else shlex.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return secs, proc.stdout


def ran(output: str) -> list[str]:
    return [l[3:].strip() for l in output.splitlines() if l.startswith(".  ")]


def doit(*args: str, env: dict | None = None) -> tuple[float, list[str]]:
    secs, out = timed([*DOIT, *args], env)
    return secs, ran(out)


def row(what: str, value: str, note: str = "") -> None:
    ROWS.append((what, value, note))
    print(f"  {what}: {value} {note}", file=sys.stderr, flush=True)


def noop_rows(flavor: str, paths: FlavorPaths) -> None:
    doit(f"build-{flavor}")  # make sure everything is built
    times = []
    for _ in range(3):
        secs, executed = doit(f"build-{flavor}")
        times.append(secs)
    row("no-op re-run (median of 3)", f"{statistics.median(times):.2f} s",
        f"executed: {executed or 'nothing'}; target < 1 s")
    big = [p for p in paths.build.rglob("*") if p.is_file() and p.stat().st_size > 100 << 20]
    total = sum(p.stat().st_size for p in big)
    for p in big:
        p.touch()
    first, executed1 = doit(f"build-{flavor}")
    second, executed2 = doit(f"build-{flavor}")
    row(f"no-op after touching {len(big)} artifacts ({total / 2**30:.1f} GiB)",
        f"{first:.2f} s, then {second:.2f} s", f"executed: {executed1 + executed2 or 'nothing'}")
    overlay = paths.source / "overlay" / "etc" / "cos" / "flavor"
    overlay.touch()
    secs, executed = doit(f"build-{flavor}")
    row("re-run after touching one overlay file (same content)", f"{secs:.2f} s",
        f"executed: {executed or 'nothing'}")
    original = overlay.read_text()
    try:
        overlay.write_text(original + "# bench\n")
        secs, executed = doit(f"build-{flavor}")
        row("re-run after changing one overlay file", f"{secs:.1f} s", f"executed: {', '.join(executed)}")
    finally:
        overlay.write_text(original)
    secs, executed = doit(f"build-{flavor}")
    row("re-run after restoring it", f"{secs:.1f} s", f"executed: {', '.join(executed)}")


def overhead_rows(flavor: str, paths: FlavorPaths) -> None:
    """Image (docker build, no cache) and squashfs: doit stage vs the raw commands."""
    f = paths.flavor
    image = json.loads(paths.state("image").read_text())
    toolkit = json.loads(paths.state("toolkit").read_text())
    base = json.loads(paths.state("base").read_text())
    args = build_args(f, version.resolve(f.version, REPO), base["ref"], toolkit["tag"])
    arg_flags = " ".join(f"--build-arg {shlex.quote(k)}={shlex.quote(v)}" for k, v in args.items())
    dockerfile = paths.build / "Dockerfile"  # composed by the image stage (common head + tail)
    raw_build = (f"DOCKER_BUILDKIT=0 docker build -q --no-cache --network host {arg_flags} "
                 f"-f {shlex.quote(str(dockerfile))} -t cos-bench/raw:{flavor} {shlex.quote(str(paths.source))}")
    raw_secs, _ = timed(raw_build, shell=True)
    doit("forget", f"build-{flavor}:image")
    pipe_secs, _ = doit(f"build-{flavor}:image", env={"COS_DOCKER_NO_CACHE": "1"})
    row("docker build, no cache: pipeline / raw", f"{pipe_secs / raw_secs:.2f}x",
        f"({pipe_secs:.1f} s vs {raw_secs:.1f} s; apt downloads make this noisy)")

    image = json.loads(paths.state("image").read_text())
    out = paths.build / "bench-raw.squashfs"
    cmd = " ".join(shlex.quote(c) for c in tar2sqfs_command(f.squashfs, out, source_date_epoch(image)))
    raw = f"c=$(docker create {image['id']} /bin/true); docker export $c | {cmd}; docker rm $c >/dev/null"
    raw_secs, _ = timed(raw, shell=True)
    out.unlink()
    doit("forget", f"build-{flavor}:squashfs")
    pipe_secs, _ = doit(f"build-{flavor}:squashfs")
    row("squashfs (docker export into tar2sqfs): pipeline / raw", f"{pipe_secs / raw_secs:.2f}x",
        f"({pipe_secs:.1f} s vs {raw_secs:.1f} s; pipeline adds the filter, kernel/initrd, sha256; target <= 1.10)")
    doit(f"build-{flavor}")  # downstream back in step with the new image


def cold_row(flavor: str, paths: FlavorPaths) -> None:
    """Everything but the base image (pull/bootstrap is the network's time, not ours)."""
    import shutil
    doit("forget", f"build-{flavor}")
    doit("forget", "packages")
    for p in paths.build.iterdir():
        if p.name != "base.json":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    doit("forget", f"build-{flavor}:base")
    secs, executed = doit(f"build-{flavor}", env={"COS_DOCKER_NO_CACHE": "1"})
    row("cold build (no doit state, no outputs, no docker cache; base image kept)",
        f"{secs:.0f} s", f"{len(executed)} tasks")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavor", default="red")
    ap.add_argument("--only", choices=["cold", "noop", "overhead"], action="append",
                    help="run only these parts (repeatable); default: all")
    opts = ap.parse_args()
    paths = FlavorPaths(load_flavor(opts.flavor))
    parts = {"cold": cold_row, "noop": noop_rows, "overhead": overhead_rows}
    for name, part in parts.items():
        if not opts.only or name in opts.only:
            part(opts.flavor, paths)
    print(f"### Build benchmark ({opts.flavor}, {os.cpu_count()} cores)\n")
    print("| measure | value | note |\n|---|---|---|")
    for what, value, note in ROWS:
        print(f"| {what} | {value} | {note} |")


if __name__ == "__main__":
    main()
