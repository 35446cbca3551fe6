"""The artifact stages are keyed on their own code: code_files follows what a stage
module uses (modules and the modules of imported functions), transitively, within our
packages; code_digest changes when any of those files changes, and only then."""
from __future__ import annotations

import importlib
import sys

import pytest

from pipeline import disk, formats, graph, iso, squashfs


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    pkg = tmp_path / "cosfake"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "stage.py").write_text("from . import helper\nfrom .util import f\nimport json\n")
    (pkg / "helper.py").write_text("X = 1\n")
    (pkg / "util.py").write_text("def f():\n    return 1\n")
    (pkg / "unused.py").write_text("Y = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield pkg
    for name in [n for n in sys.modules if n.split(".")[0] == "cosfake"]:
        del sys.modules[name]


def test_code_files_follow_imports_within_the_roots(fake_package):
    stage = importlib.import_module("cosfake.stage")
    assert [p.name for p in graph.code_files(stage, ("cosfake",))] == ["helper.py", "stage.py", "util.py"]


def test_code_digest_changes_with_a_used_file_only(fake_package):
    stage = importlib.import_module("cosfake.stage")
    before = graph.code_digest(stage, ("cosfake",))
    (fake_package / "unused.py").write_text("Y = 3\n")
    assert graph.code_digest(stage, ("cosfake",)) == before
    (fake_package / "util.py").write_text("def f():\n    return 2\n")
    assert graph.code_digest(stage, ("cosfake",)) != before


def test_the_stages_keys_cover_the_code_that_makes_their_bytes():
    def names(module):
        return {f"{p.parent.name}/{p.name}" for p in graph.code_files(module)}
    assert {"pipeline/iso.py", "pipeline/efi.py", "pipeline/bootchain.py", "pipeline/disk.py"} <= names(iso)
    assert {"pipeline/disk.py", "pipeline/efi.py", "pipeline/bootchain.py", "core/sparse.py"} <= names(disk)
    assert "pipeline/formats.py" in names(formats) and "pipeline/squashfs.py" in names(squashfs)
    for module in (iso, disk, formats, squashfs):   # the graph and publishing make no bytes
        assert not names(module) & {"pipeline/graph.py", "pipeline/publish.py", "pipeline/release.py"}
