"""Import directions, read from the source (every import, also those inside functions):

    pipeline/ ──► cloud/ ──► core/        runtime/ (on the booted OS) stands alone
        └──────────────────────►┘

- core/ (the bottom layer) imports nothing of ours;
- cloud/ imports nothing of pipeline/ (nor runtime/);
- runtime/ imports nothing of pipeline/, cloud/ or core/: it ships to the OS on its own;
- pipeline/ does not import runtime/ (it ships it as files);
- only pipeline/graph.py imports doit; the modules of our packages form no import cycle;
- a spawned EBS worker process loads neither doit nor pipeline/.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "cloud", "pipeline", "runtime")
FORBIDDEN = {  # package -> our packages it must not import
    "core": {"pipeline", "cloud", "runtime", "tests", "bench", "dodo"},
    "cloud": {"pipeline", "runtime", "tests", "bench", "dodo"},
    "runtime": {"pipeline", "cloud", "core", "tests", "bench", "dodo"},
    "pipeline": {"runtime", "tests", "bench", "dodo"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path | None = None) -> set[str]:
    """Every module `module` imports (names of our modules where they resolve to one)."""
    path = path or MODULES[module]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", node)
            subs = {f"{target}.{a.name}" for a in node.names} & MODULES.keys()
            out |= subs or {target}
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_below_it(package):
    bad = sorted(f"{m} imports {i}" for m, deps in GRAPH.items() if m.split(".")[0] == package
                 for i in deps if i.split(".")[0] in FORBIDDEN[package])
    assert not bad, "import against the allowed direction:\n" + "\n".join(bad)


def test_only_graph_imports_doit():
    users = sorted(m for m, deps in GRAPH.items() if any(i.split(".")[0] == "doit" for i in deps))
    assert users == ["pipeline.graph"]


def test_no_import_cycles():
    ours = {m: {d for d in deps if d in MODULES and d != m} for m, deps in GRAPH.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(ours[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [m, d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(ours):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_reader_sees_late_and_relative_imports(tmp_path):
    """The tests above could pass by reading nothing: imports inside functions count."""
    src = tmp_path / "x.py"
    src.write_text("from . import disk\nfrom ..pipeline import files\n"
                   "def f():\n    from pipeline.config import Flavor\n    import doit.tools\n")
    assert imports_of("cloud.x", src) == {"cloud.disk", "pipeline.files", "pipeline.config", "doit.tools"}
    assert "pipeline.config" in imports_of("cloud.x", src) and "pipeline.graph" in GRAPH


def test_ebs_worker_process_loads_no_doit_and_no_pipeline(tmp_path):
    """What a spawned EBS direct worker imports: cloud.ebs_direct and what it needs."""
    code = ("import multiprocessing as mp, sys\n"
            "def loaded():\n"
            "    import cloud.ebs_direct  # noqa: F401 (the worker's initializer lives here)\n"
            "    return sorted(m for m in sys.modules if m.split('.')[0] in ('doit', 'pipeline'))\n"
            "if __name__ == '__main__':\n"
            "    with mp.get_context('spawn').Pool(1) as pool:\n"
            "        print(pool.apply(loaded))\n")
    script = tmp_path / "worker_imports.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
