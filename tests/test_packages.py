"""Toolkit packages: a package ships repo directories (package.yaml `ship:`) besides its
files/; the content hash follows those sources (a change in runtime/ changes the tag of
cos-runtime and of no other package), the build context is reproducible and carries no
byte-code caches, bad `ship:` entries fail with one line naming the file; the runtime's
launchers run the shipped package on a python >= 3.11 and say so when there is none."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline import packages
from pipeline.config import PACKAGES_DIR, load_flavor
from pipeline.errors import PipelineError

REPO = PACKAGES_DIR.parent


def make_repo(tmp_path: Path, ship: str | None) -> Path:
    """A scratch repository: packages/demo (files/ + package.yaml) and tool/ to ship."""
    pkgs = tmp_path / "packages"
    (pkgs / "demo/files/usr/bin").mkdir(parents=True)
    (pkgs / "demo/files/usr/bin/demo").write_text("#!/bin/sh\necho demo\n")
    os.chmod(pkgs / "demo/files/usr/bin/demo", 0o755)
    (pkgs / "other/files/etc").mkdir(parents=True)
    (pkgs / "other/files/etc/other.conf").write_text("x=1\n")
    (tmp_path / "tool/sub").mkdir(parents=True)
    (tmp_path / "tool/__init__.py").write_text("")
    (tmp_path / "tool/cli.py").write_text("import sys\ndef main(argv):\n    print('argv', argv)\n    return len(argv)\n")
    (tmp_path / "tool/sub/data.txt").write_text("data\n")
    if ship is not None:
        (pkgs / "demo/package.yaml").write_text(ship)
    return pkgs


def tar_members(pkgs: Path, name: str) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=packages._context_tar(name, pkgs)) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_shipped_directory_lands_at_its_destination(tmp_path):
    pkgs = make_repo(tmp_path, "ship:\n  tool: /usr/lib/demo/python/tool\n")
    names = set(tar_members(pkgs, "demo"))
    assert {"files/usr/bin/demo", "files/usr/lib/demo/python/tool/cli.py",
            "files/usr/lib/demo/python/tool/sub/data.txt"} <= names
    assert pkgs / "demo/package.yaml" in packages.package_files("demo", pkgs)  # doit file_dep
    assert tmp_path / "tool/cli.py" in packages.package_files("demo", pkgs)


def test_hash_follows_the_shipped_sources_only(tmp_path):
    pkgs = make_repo(tmp_path, "ship:\n  tool: /usr/lib/demo/python/tool\n")
    before = {n: packages.source_hash(n, pkgs) for n in ("demo", "other")}
    (tmp_path / "tool/cli.py").write_text("def main(argv):\n    return 0\n")
    after = {n: packages.source_hash(n, pkgs) for n in ("demo", "other")}
    assert after["demo"] != before["demo"] and after["other"] == before["other"]
    (pkgs / "demo/package.yaml").write_text("ship:\n  tool: /usr/lib/elsewhere/tool\n")
    assert packages.source_hash("demo", pkgs) != after["demo"]  # the destination counts too


def test_byte_code_caches_are_not_shipped_nor_hashed(tmp_path):
    pkgs = make_repo(tmp_path, "ship:\n  tool: /usr/lib/demo/python/tool\n")
    digest, tar = packages.source_hash("demo", pkgs), packages._context_tar("demo", pkgs).getvalue()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-c", "import tool.cli"], cwd=tmp_path, check=True, env=env)
    assert list(tmp_path.glob("tool/__pycache__/*.pyc")), "python wrote no cache: the test checks nothing"
    (tmp_path / "tool/stray.pyc").write_bytes(b"\0")
    assert packages.source_hash("demo", pkgs) == digest
    assert packages._context_tar("demo", pkgs).getvalue() == tar  # byte-identical context


def test_context_is_reproducible_and_root_owned(tmp_path):
    pkgs = make_repo(tmp_path, "ship:\n  tool: /usr/lib/demo/python/tool\n")
    one = packages._context_tar("demo", pkgs).getvalue()
    os.utime(tmp_path / "tool/cli.py", (1, 1))
    assert packages._context_tar("demo", pkgs).getvalue() == one
    for m in tar_members(pkgs, "demo").values():
        assert (m.uid, m.gid, m.mtime) == (0, 0, 0), m.name
    assert tar_members(pkgs, "demo")["files/usr/bin/demo"].mode == 0o755


def test_package_without_ship_file_is_unchanged(tmp_path):
    pkgs = make_repo(tmp_path, None)
    assert set(tar_members(pkgs, "demo")) == {"Dockerfile", "files/usr/bin/demo"}


@pytest.mark.parametrize("ship,needle", [
    ("ship: [runtime]\n", "expected only"),
    ("ship:\n  tool: usr/lib/x\n", "must be an absolute path"),
    ("ship:\n  tool: /usr/../etc\n", "must be an absolute path"),
    ("ship:\n  nosuchdir: /usr/lib/x\n", "no such directory"),
    ("ship:\n  ../outside: /usr/lib/x\n", "no such directory"),
    ("ship: {tool: /x}\nextra: 1\n", "expected only"),
    ("ship: [\n", "not valid YAML"),
])
def test_bad_ship_entries_fail_with_one_clear_line(tmp_path, ship, needle):
    (tmp_path / "outside").mkdir()
    pkgs = make_repo(tmp_path / "repo", ship)
    with pytest.raises(PipelineError) as err:
        packages.source_hash("demo", pkgs)
    assert "packages/demo/package.yaml" in err.value.message and needle in err.value.message


def test_cos_runtime_ships_the_runtime_package():
    members = {s.arcname for s in packages.package_sources("cos-runtime")}
    assert "usr/lib/cos/python/runtime/__init__.py" in members
    assert "usr/lib/cos/python/runtime/system.py" in members
    assert {"usr/bin/cos-setup", "usr/bin/cos-deploy", "usr/lib/cos/python-run"} <= members
    assert not [m for m in members if "__pycache__" in m or m.endswith(".pyc")]
    assert "cos-runtime" in load_flavor("red").packages


def unpack(pkgs: Path, name: str, dest: Path) -> Path:
    with tarfile.open(fileobj=packages._context_tar(name, pkgs)) as tar:
        tar.extractall(dest, filter="tar")
    return dest / "files"


def test_python_run_runs_the_shipped_module_main(tmp_path):
    pkgs = make_repo(tmp_path, "ship:\n  tool: /usr/lib/cos/python/tool\n")
    shutil.copytree(PACKAGES_DIR / "cos-runtime/files/usr/lib/cos", pkgs / "demo/files/usr/lib/cos",
                    dirs_exist_ok=True)
    root = unpack(pkgs, "demo", tmp_path / "img")
    proc = subprocess.run([root / "usr/lib/cos/python-run", "tool.cli", "a", "b c"],
                          capture_output=True, text=True, cwd="/")
    assert proc.stdout.strip() == "argv ['a', 'b c']" and proc.returncode == 2  # main's return value


def test_python_run_compiles_the_shipped_package_and_runs_it_from_the_pyc(tmp_path):
    """`python-run --compile` (the image build's setup-image.d/50-runtime-pyc) leaves a
    checked-hash .pyc beside every module for the interpreter python-run picks; the tool
    then runs from it (its source changed on disk: the check compiles it again, in memory)."""
    pkgs = make_repo(tmp_path, "ship:\n  tool: /usr/lib/cos/python/tool\n")
    shutil.copytree(PACKAGES_DIR / "cos-runtime/files/usr/lib/cos", pkgs / "demo/files/usr/lib/cos",
                    dirs_exist_ok=True)
    root = unpack(pkgs, "demo", tmp_path / "img")
    run = root / "usr/lib/cos/python-run"
    subprocess.run([run, "--compile"], check=True, cwd="/")
    pyc = sorted((root / "usr/lib/cos/python/tool").rglob("*.pyc"))
    assert {p.name.split(".")[0] for p in pyc} == {"__init__", "cli"}, pyc
    assert all(int.from_bytes(p.read_bytes()[4:8], "little") == 0b11 for p in pyc)
    before = {p: p.read_bytes() for p in pyc}
    cli = root / "usr/lib/cos/python/tool/cli.py"
    cli.write_text(cli.read_text().replace("'argv'", "'ARGV'"))
    proc = subprocess.run([run, "tool.cli", "x"], capture_output=True, text=True, cwd="/")
    assert proc.stdout.strip() == "ARGV ['x']" and proc.returncode == 1
    assert {p: p.read_bytes() for p in pyc} == before  # -B: nothing written at run time


def test_python_run_refuses_an_old_python(tmp_path):
    """openSUSE Leap's python3 is 3.6: the launcher must not run it, and must say why."""
    fake = tmp_path / "bin"
    fake.mkdir()
    old = fake / "python3"
    old.write_text("#!/bin/sh\nexit 1\n")  # answers the version probe like a 3.6 would
    old.chmod(0o755)
    for tool in ("sh", "dirname", "readlink"):
        (fake / tool).symlink_to(shutil.which(tool))
    proc = subprocess.run([PACKAGES_DIR / "cos-runtime/files/usr/bin/cos-setup", "boot"],
                          capture_output=True, text=True, env={"PATH": str(fake)})
    assert proc.returncode == 1
    assert "no python >= 3.11 found" in proc.stderr and "python311" in proc.stderr


def test_cos_setup_launcher_reaches_the_runner(tmp_path):
    """The real launcher + the real runtime/ of this repo, unpacked as in the image."""
    root = unpack(PACKAGES_DIR, "cos-runtime", tmp_path / "img")
    proc = subprocess.run([root / "usr/bin/cos-setup", "--help"], capture_output=True, text=True)
    if "No module named 'runtime.cloudconfig.cli'" in proc.stderr:
        pytest.skip("runtime.cloudconfig.cli not merged yet")
    assert proc.returncode == 0, proc.stderr
    assert "STAGE" in proc.stdout.upper() or "stage" in proc.stdout
