"""pipeline.version in throw-away git repositories: the tag at HEAD gives the version
(highest release tag wins, non-release tags are ignored), a commit between tags gives
<config version>-dev (the commit is not in the version), $COS_VERSION overrides (a leading v is dropped, junk is
refused), and outside git the configured version is used as is."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.version import is_tagged_release, release_tag, resolve
from tests.conftest import run_doit


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@localhost",
                          "-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false", *args],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def commit(repo: Path, msg: str) -> str:
    (repo / "f").write_text(msg)
    git(repo, "add", "f")
    git(repo, "commit", "-q", "-m", msg)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("COS_VERSION", raising=False)
    git(tmp_path, "init", "-q")
    commit(tmp_path, "one")
    return tmp_path


def test_tag_at_head_is_the_version(repo):
    git(repo, "tag", "v1.2.3")
    assert resolve("0.1.0", repo) == "1.2.3"


def test_highest_release_tag_at_head_wins(repo):
    for tag in ("v0.9.0", "v0.10.0", "latest", "v0.10.0-rc1"):
        git(repo, "tag", tag)
    assert resolve("0.1.0", repo) == "0.10.0"


def test_prerelease_tag(repo):
    git(repo, "tag", "v2.0.0-rc1")
    assert resolve("0.1.0", repo) == "2.0.0-rc1"
    assert is_tagged_release("2.0.0-rc1")


def test_between_tags_is_config_version_dev(repo):
    git(repo, "tag", "v1.2.3")
    commit(repo, "two")
    version = resolve("1.3.0", repo)
    assert version == "1.3.0-dev"
    assert not is_tagged_release(version)
    assert release_tag(version) == "v1.3.0-dev"
    commit(repo, "three")   # another commit: the same version, so nothing in the image changes
    assert resolve("1.3.0", repo) == version


def test_non_release_tags_are_ignored(repo):
    git(repo, "tag", "nightly")
    assert resolve("0.1.0", repo) == "0.1.0-dev"


def test_cos_version_overrides(repo, monkeypatch):
    git(repo, "tag", "v1.2.3")
    monkeypatch.setenv("COS_VERSION", "4.5.6")
    assert resolve("0.1.0", repo) == "4.5.6"
    monkeypatch.setenv("COS_VERSION", "v4.5.7")  # what CI passes from the pushed tag's name
    assert resolve("0.1.0", repo) == "4.5.7"


@pytest.mark.parametrize("bad", ["1.0 beta", "../1.0", "v1/2"])
def test_bad_cos_version_is_refused(repo, monkeypatch, bad):
    monkeypatch.setenv("COS_VERSION", bad)
    with pytest.raises(ConfigError, match="COS_VERSION"):
        resolve("0.1.0", repo)


def test_outside_git_the_config_version_is_used(tmp_path, monkeypatch):
    monkeypatch.delenv("COS_VERSION", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert resolve("0.1.0", tmp_path) == "0.1.0"


def test_doit_graph_uses_the_version():
    out = run_doit("list", env={"COS_VERSION": "3.4.5"})
    assert "GitHub Release v3.4.5" in out.stdout
