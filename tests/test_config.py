"""The flavor model: the four real flavors validate, shared defaults apply, and every
file in tests/data/bad-flavors fails with one message naming the file and the field
(and, through doit, exits non-zero before anything is built)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.config import flavor_names, load_all, load_flavor
from pipeline.errors import ConfigError

from .conftest import REPO, run_doit

BAD = sorted((Path(__file__).parent / "data" / "bad-flavors").glob("*.yaml"))


def test_the_four_flavors_validate():
    flavors = {f.name: f for f in load_all()}
    assert set(flavors) == {"green", "blue", "orange", "red"}
    assert flavors["green"].distro == "opensuse" and flavors["red"].distro == "debian"
    # defaults come from flavors/defaults.yaml, not from each flavor file
    for f in flavors.values():
        assert f.squashfs.compression == "zstd" and f.squashfs.block_bytes == 1 << 20
        assert f.disk.efi.label == "COS_GRUB" and f.disk.recovery.label == "COS_RECOVERY"
        assert f.boot.live_label == "COS_LIVE"
    assert flavors["red"].base.bootstrap is not None
    assert all(flavors[n].base.bootstrap is None for n in ("green", "blue", "orange"))


def test_a_flavor_overrides_only_what_differs(tmp_path):
    fdir = _flavor_tree(tmp_path, "description: x\ndistro: debian\nbase: {ref: debian:bookworm}\n"
                                  "squashfs: {compression: xz}\n")
    f = load_flavor("probe", fdir)
    assert f.squashfs.compression == "xz"
    assert f.squashfs.block_size == "1M"  # merged from defaults, not replaced


def _flavor_tree(tmp_path: Path, text: str) -> Path:
    fdir = tmp_path / "flavors"
    (fdir / "probe").mkdir(parents=True)
    shutil.copy(REPO / "flavors" / "defaults.yaml", fdir / "defaults.yaml")
    (fdir / "probe" / "flavor.yaml").write_text(text)
    (fdir / "probe" / "Dockerfile").write_text("FROM scratch\n")
    return fdir


def _expectations(path: Path) -> list[str]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: ...'"
    return [part.strip() for part in first[len("# expect: "):].split("|")]


@pytest.mark.parametrize("bad", BAD, ids=[p.stem for p in BAD])
def test_broken_flavor_file_names_file_and_field(tmp_path, bad):
    fdir = _flavor_tree(tmp_path, bad.read_text())
    with pytest.raises(ConfigError) as exc:
        load_flavor("probe", fdir)
    message = str(exc.value)
    assert "probe/flavor.yaml" in message, message
    for expected in _expectations(bad):
        assert expected in message, f"{expected!r} not in:\n{message}"


def test_corpus_is_not_empty():
    assert len(BAD) >= 10


def test_doit_refuses_a_broken_flavor_and_builds_nothing(tmp_path):
    fdir = tmp_path / "flavors"
    shutil.copytree(REPO / "flavors", fdir)
    (fdir / "red" / "flavor.yaml").write_text((fdir / "red" / "flavor.yaml").read_text()
                                             + "squashfs: {compression: lzma}\n")
    build = tmp_path / "build"
    proc = run_doit("build-red", env={"COS_FLAVORS_DIR": str(fdir), "COS_BUILD_DIR": str(build)},
                    check=False)
    assert proc.returncode == 2
    assert "flavors/red/flavor.yaml" in proc.stderr and "squashfs.compression" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not build.exists() or not any(build.rglob("*.json")), "something was built"


def test_flavor_directories_are_discovered():
    assert flavor_names() == ["blue", "green", "orange", "red"]
