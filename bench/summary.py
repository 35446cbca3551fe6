"""Markdown summary of the benchmarks, for CI's job summary ($GITHUB_STEP_SUMMARY).

    .venv/bin/python bench/summary.py [--run] >> "$GITHUB_STEP_SUMMARY"

--run first runs every other bench script (bench/*.py with the venv's python, other
executable files directly), saving each one's stdout to bench/results/<name>.out with
its exit status and wall time. Then every file in bench/results/ is rendered: .md and
markdown tables as they are, .json as a key/value table, anything else as a code block.
A failing benchmark is shown as failed and makes the exit status non-zero.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
ROOT = BENCH.parent


def scripts() -> list[Path]:
    me = Path(__file__).resolve()
    return sorted(p for p in BENCH.iterdir()
                  if p.is_file() and p.resolve() != me and not p.name.startswith(("_", "."))
                  and (p.suffix == ".py" or os.access(p, os.X_OK)))


def run_all() -> int:
    RESULTS.mkdir(exist_ok=True)
    failed = 0
    for script in scripts():
        cmd = [sys.executable, str(script)] if script.suffix == ".py" else [str(script)]
        started = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        secs = time.monotonic() - started
        (RESULTS / f"{script.stem}.out").write_text(proc.stdout)
        (RESULTS / f"{script.stem}.status.json").write_text(
            json.dumps({"script": script.name, "exit_code": proc.returncode, "seconds": round(secs, 1)}))
        failed += proc.returncode != 0
    return failed


def render(path: Path) -> str:
    text = path.read_text(errors="replace").strip()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError:
            return f"```\n{text}\n```"
        rows = data.items() if isinstance(data, dict) else enumerate(data)
        return "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    if path.suffix == ".md" or any(line.startswith("|") for line in text.splitlines()):
        return text
    return f"```\n{text}\n```" if text else "_(no output)_"


def summary() -> str:
    parts = ["## Benchmarks"]
    files = sorted(RESULTS.glob("*")) if RESULTS.is_dir() else []
    if not files:
        return "## Benchmarks\n\n_No benchmark results (bench/results/ is empty)._\n"
    for path in files:
        if path.is_file():
            parts += [f"### {path.name}", render(path)]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str]) -> int:
    failed = run_all() if "--run" in argv else 0
    print(summary())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
