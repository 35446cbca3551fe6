"""`doit release-red` against a local server speaking the GitHub Releases API.

Proves, with real doit runs, real zstd and real HTTP (tests/servers/github_api.py on
127.0.0.1, with its separate upload host): a first release uploads every asset under
the reference names with the right sizes, and the SHA256SUMS it uploads verifies the
bytes downloaded back (the .zst disks decompress to the original); a re-run uploads
nothing and recompresses nothing; a changed asset is refused by name unless
--replace / COS_RELEASE_REPLACE=1, and then replaced without duplicates; a file over
the size limit is split into parts below it that join to the original, and a release
needing > 1000 assets is refused; a 5xx (leaving a half-made asset) and a 429 are
retried; a bad or missing token fails with a clear message.

The artifacts are small synthetic files and a manifest in a temporary COS_BUILD_DIR
(the real ISO/disk stages are tested in their own files).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import httpx
import pytest

from pipeline.release import merge_section, part_size
from tests.conftest import run_doit
from tests.servers.github_api import GitHubAPIServer

VERSION = "1.2.3"
TAG = f"v{VERSION}"
KEY = "red-x86_64"
REF = "127.0.0.1:5000/cos-pipeline/cos@" + "sha256:" + "ab" * 32
DIGEST = "sha256:" + "ab" * 32
ISO = f"cOS-Seed-red-{VERSION}-x86_64.iso"
RAW = f"cOS-Vanilla-RAW-red-{VERSION}-x86_64.raw"
VHD = f"cOS-Vanilla-AZURE-red-{VERSION}-x86_64.vhd"
GCE = f"cOS-Vanilla-GCE-red-{VERSION}-x86_64.tar.gz"
QCOW2 = f"cOS-Vanilla-QEMU-red-{VERSION}-x86_64.qcow2"
EXPECTED = {ISO, RAW + ".zst", VHD + ".zst", GCE, QCOW2, f"manifest-{KEY}.json",
            f"cloud-images-{KEY}.json", f"images-{KEY}.txt", f"README-{KEY}.md", f"SHA256SUMS-{KEY}"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_sparse(path: Path, size: int, chunks: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)  # a hole: like the real sparse disk images
        for offset, data in chunks.items():
            f.seek(offset)
            f.write(data)


def make_build(build_root: Path, iso_bytes: int = 300 * 1024) -> Path:
    """Synthetic artifacts of each kind plus a manifest, as the build stages write them."""
    b = build_root / "red"
    (b / "disk").mkdir(parents=True)
    (b / ISO).write_bytes(os.urandom(iso_bytes))
    write_sparse(b / "disk" / RAW, 16 * 1024 ** 2, {0: os.urandom(4096), 9 * 1024 ** 2: os.urandom(65536)})
    write_sparse(b / "disk" / VHD, 16 * 1024 ** 2 + 512, {1024 ** 2: os.urandom(8192)})
    (b / "disk" / QCOW2).write_bytes(b"QFI\xfb" + os.urandom(50_000))
    with tarfile.open(b / "disk" / GCE, "w:gz", format=tarfile.GNU_FORMAT) as tar:
        tar.add(b / "disk" / RAW, arcname="disk.raw")
    (b / "cloud-images.json").write_text(json.dumps(
        {"aws": {"us-east-1": "ami-0123456789abcdef0"}, "gcp": {"image": "cos-red-1-2-3"}}))
    write_manifest(b)
    return b


def write_manifest(b: Path) -> None:
    kinds = {"iso": ISO, "raw": f"disk/{RAW}", "azure-vhd": f"disk/{VHD}", "gce-tar": f"disk/{GCE}",
             "qcow2": f"disk/{QCOW2}"}
    arts = [{"kind": k, "path": p, "sha256": sha256((b / p).read_bytes()), "size": (b / p).stat().st_size}
            for k, p in sorted(kinds.items())]
    (b / "manifest.json").write_text(json.dumps(
        {"schema": 1, "flavor": "red", "version": VERSION, "arch": "x86_64",
         "image": {"reference": "cos-pipeline/cos:red-1.2.3-x86_64", "pushed": REF, "digest": DIGEST},
         "artifacts": arts}, indent=2))


@pytest.fixture
def gh():
    server = GitHubAPIServer(token="good-token").start()
    yield server
    server.stop()


@pytest.fixture
def build(tmp_path) -> Path:
    return make_build(tmp_path / "build")


def env_for(gh: GitHubAPIServer, build: Path, **extra: str) -> dict:
    env = {"COS_BUILD_DIR": str(build.parent), "COS_VERSION": VERSION, "GITHUB_API_URL": gh.api_url,
           "GITHUB_REPOSITORY": gh.repository, "GITHUB_TOKEN": gh.token, "COS_LOG": "INFO"}
    return {**env, **extra}


def release(gh, build, *args: str, check: bool = True, **extra: str) -> subprocess.CompletedProcess:
    return run_doit("release-red", *args, env=env_for(gh, build, **extra), check=check)


def remote_assets(gh: GitHubAPIServer) -> dict[str, dict]:
    rel = gh.release(TAG)
    assert rel is not None, f"no release {TAG} on the server"
    assets = [gh.asset_json(a) for a in rel.assets.values()]
    names = [a["name"] for a in assets]
    assert len(names) == len(set(names)), f"duplicate assets: {names}"
    return {a["name"]: a for a in assets}


def download(asset: dict) -> bytes:
    resp = httpx.get(asset["browser_download_url"])
    resp.raise_for_status()
    return resp.content


def verify_sums(assets: dict[str, dict]) -> dict[str, str]:
    """Check every asset against the uploaded SHA256SUMS, on downloaded bytes."""
    sums = {}
    for line in download(assets[f"SHA256SUMS-{KEY}"]).decode().splitlines():
        sha, name = line.split("  ", 1)
        sums[name] = sha
    for name, asset in assets.items():
        if name == f"SHA256SUMS-{KEY}":
            continue
        assert name in sums, f"{name} is not covered by SHA256SUMS"
        assert sha256(download(asset)) == sums[name], f"{name}: downloaded bytes do not match SHA256SUMS"
    return sums


def zstd_decompress(data: bytes, tmp: Path) -> bytes:
    src = tmp / "x.zst"
    src.write_bytes(data)
    subprocess.run(["zstd", "-q", "-d", "-f", str(src), "-o", str(tmp / "x")], check=True)
    return (tmp / "x").read_bytes()


def test_first_release_uploads_every_asset_and_sums_verify(gh, build, tmp_path):
    out = release(gh, build)
    assets = remote_assets(gh)
    assert set(assets) == EXPECTED
    assert all(a["state"] == "uploaded" for a in assets.values())
    # uncompressed files keep their size; the .zst disks are small and decompress to the original
    for name, local in [(ISO, build / ISO), (GCE, build / "disk" / GCE), (QCOW2, build / "disk" / QCOW2)]:
        assert assets[name]["size"] == local.stat().st_size
    sums = verify_sums(assets)
    assert sums[ISO] == sha256((build / ISO).read_bytes())
    for name, src in [(RAW, build / "disk" / RAW), (VHD, build / "disk" / VHD)]:
        assert assets[name + ".zst"]["size"] < src.stat().st_size // 10
        assert zstd_decompress(download(assets[name + ".zst"]), tmp_path) == src.read_bytes()
    assert download(assets[f"images-{KEY}.txt"]).decode().strip() == REF
    assert json.loads(download(assets[f"manifest-{KEY}.json"]))["version"] == VERSION
    assert json.loads(download(assets[f"cloud-images-{KEY}.json"]))["aws"]["us-east-1"].startswith("ami-")
    rel = gh.release(TAG)
    assert not rel.prerelease and rel.name == f"cOS {VERSION}"
    for needle in (REF, DIGEST, "ami-0123456789abcdef0", "cos-red-1-2-3", ISO, f"<!-- cos-release:{KEY} -->"):
        assert needle in rel.body, f"release notes lack {needle}"
    assert f"{len(EXPECTED)} uploaded" in out.stderr + out.stdout


def test_second_run_uploads_nothing_and_does_not_recompress(gh, build):
    release(gh, build)
    first = gh.uploads_done()
    zst = cached_zst(build, build / "disk" / RAW)
    mtime = zst.stat().st_mtime_ns
    body = gh.release(TAG).body
    out = release(gh, build)
    assert gh.uploads_done() == first, "a re-run uploaded again"
    assert zst.stat().st_mtime_ns == mtime, "the raw disk was recompressed although it did not change"
    assert "reusing" in out.stderr
    assert gh.release(TAG).body == body and body.count(f"<!-- cos-release:{KEY} -->") == 1
    assert set(remote_assets(gh)) == EXPECTED


def test_rerun_without_digest_field_uses_release_sha256sums(build):
    """Older GitHub servers report no `digest`: the release's own SHA256SUMS is the reference."""
    server = GitHubAPIServer(report_digest=False).start()
    try:
        release(server, build)
        first = server.uploads_done()
        release(server, build)
        assert server.uploads_done() == first
    finally:
        server.stop()


def cached_zst(build: Path, src: Path) -> Path:
    return build / "release" / "cache" / f"{sha256(src.read_bytes())[:32]}.zst"


def test_new_version_of_same_disk_reuses_compression_and_stale_cache_is_pruned(gh, build):
    release(gh, build)
    raw = build / "disk" / RAW
    old_zst = cached_zst(build, raw)
    mtime = old_zst.stat().st_mtime_ns
    # same disk under a new version (e.g. the next commit): compressed once only
    data = json.loads((build / "manifest.json").read_text())
    (build / "manifest.json").write_text(json.dumps({**data, "version": "1.2.4"}))
    release(gh, build, COS_VERSION="1.2.4")
    assert old_zst.stat().st_mtime_ns == mtime
    assert "cOS-Vanilla-RAW-red-1.2.4-x86_64.raw.zst" in {a.name for a in gh.release("v1.2.4").assets.values()}
    # a changed disk: the old multi-GB compressed copy is removed
    write_sparse(raw, 16 * 1024 ** 2, {0: os.urandom(4096)})
    write_manifest(build)
    release(gh, build, "--replace")
    assert not old_zst.exists() and cached_zst(build, raw).is_file()


def change_iso(build: Path) -> bytes:
    data = os.urandom((build / ISO).stat().st_size)  # same size: only the digest can tell
    (build / ISO).write_bytes(data)
    write_manifest(build)
    return data


def test_changed_asset_is_refused_then_replaced_when_asked(gh, build):
    release(gh, build)
    old = download(remote_assets(gh)[ISO])
    new = change_iso(build)
    out = release(gh, build, check=False)
    assert out.returncode != 0
    msg = out.stdout + out.stderr
    assert ISO in msg and "--replace" in msg and "COS_RELEASE_REPLACE=1" in msg
    assert download(remote_assets(gh)[ISO]) == old, "the refused run changed the release"

    release(gh, build, "--replace")
    assets = remote_assets(gh)
    assert set(assets) == EXPECTED, "replacing left extra or missing assets"
    assert download(assets[ISO]) == new
    verify_sums(assets)

    newer = change_iso(build)
    release(gh, build, COS_RELEASE_REPLACE="1")
    assert download(remote_assets(gh)[ISO]) == newer


def test_asset_over_limit_is_split_in_parts_that_join(tmp_path):
    limit = 1024 * 1024
    server = GitHubAPIServer(max_asset_bytes=limit).start()  # the server refuses >= limit, like GitHub
    try:
        b = make_build(tmp_path / "build", iso_bytes=3 * limit)
        release(server, b, COS_RELEASE_MAX_ASSET_BYTES=str(limit))
        assets = remote_assets(server)
        parts = sorted(n for n in assets if n.startswith(ISO + ".part"))
        assert ISO not in assets and len(parts) == 4
        assert all(assets[p]["size"] < limit for p in parts)
        joined = b"".join(download(assets[p]) for p in parts)
        assert joined == (b / ISO).read_bytes()
        sums = verify_sums(assets)
        assert sums[ISO] == sha256(joined), "SHA256SUMS does not cover the joined file"
        notes = server.release(TAG).body
        assert f"cat {ISO}.part* > {ISO}" in notes
        assert f"cat {ISO}.part* > {ISO}" in download(assets[f"README-{KEY}.md"]).decode()
        before = server.uploads_done()
        release(server, b, COS_RELEASE_MAX_ASSET_BYTES=str(limit))
        assert server.uploads_done() == before
    finally:
        server.stop()


def test_more_than_1000_assets_is_refused_before_upload(gh, tmp_path):
    b = make_build(tmp_path / "build", iso_bytes=1100 * 1000)
    out = release(gh, b, check=False, COS_RELEASE_MAX_ASSET_BYTES="1000")
    assert out.returncode != 0
    assert "GitHub allows at most 1000" in out.stdout + out.stderr
    assert gh.release(TAG) is None and gh.uploads_done() == []


def test_5xx_and_429_are_retried(gh, build):
    # a 502 on the ISO upload that leaves a half-made 'starter' asset, as GitHub can
    gh.inject("POST", rf"/assets\?name={ISO}$", status=502, partial=True)
    gh.inject("GET", r"/releases/\d+/assets", status=429, retry_after=1)
    out = release(gh, build)
    assets = remote_assets(gh)
    assert set(assets) == EXPECTED and assets[ISO]["state"] == "uploaded"
    assert download(assets[ISO]) == (build / ISO).read_bytes()
    statuses = [s for m, p, s in gh.log if m == "POST" and f"name={ISO}" in p]
    assert statuses == [502, 201]
    assert "retry 1/4" in out.stderr and "half-uploaded" in out.stderr


def _tmpfs_works() -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", 'd=$(mktemp -d) && mount -t tmpfs -o size=1m cos "$d"'],
                           capture_output=True)
    return probe.returncode == 0


def test_full_disk_fails_fast_with_a_clear_error(gh, tmp_path):
    """build/<flavor>/release/ on a 2 MiB filesystem; the raw disk compresses to ~12 MiB.
    zstd must be stopped when writing its output fails, not waited for (it blocks on the
    full pipe: the release would hang). A tmpfs in a private mount namespace when this
    host allows mounts, else a file size limit (RLIMIT_FSIZE) that makes writes fail alike."""
    import resource
    import signal

    from tests.conftest import DOIT, REPO
    b = make_build(tmp_path / "build")
    write_sparse(b / "disk" / RAW, 16 * 1024 ** 2, {0: os.urandom(12 * 1024 ** 2)})  # incompressible
    write_manifest(b)
    release_dir, listing = b / "release", tmp_path / "left-behind.txt"
    release_dir.mkdir()
    cmd, limit = [*DOIT, "release-red"], None
    if _tmpfs_works():
        cmd = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=2m cos-full "$0" && "$@"; rc=$?; '
               'find "$0" -type f > "$LISTING"; exit $rc', str(release_dir), *cmd]
    else:
        limit = 2 * 1024 ** 2

    def small_files() -> None:  # the fallback: writes beyond `limit` bytes fail with EFBIG
        if limit:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, preexec_fn=small_files,
                         env={**os.environ, **env_for(gh, b), "LISTING": str(listing)})
    assert out.returncode != 0, out.stdout + out.stderr
    assert f"cannot write {release_dir / 'cache'}" in out.stdout, out.stdout + out.stderr
    assert ("No space left on device" if limit is None else "File too large") in out.stdout
    left = listing.read_text().split() if limit is None else [str(p) for p in release_dir.rglob("*") if p.is_file()]
    assert not [f for f in left if f.endswith((".zst", ".part"))], f"half-written output left: {left}"
    assert gh.uploads_done() == []


def test_bad_token_fails_clearly(gh, build):
    out = release(gh, build, check=False, GITHUB_TOKEN="wrong-token")
    assert out.returncode != 0
    assert "GITHUB_TOKEN is missing or lacks contents:write" in out.stdout + out.stderr
    assert gh.release(TAG) is None
    assert not (build / "release").exists(), "compressed the disks before checking the token"


def test_missing_token_fails_before_any_request(gh, build):
    out = release(gh, build, check=False, GITHUB_TOKEN="")
    assert out.returncode != 0
    assert "GITHUB_TOKEN is missing" in out.stdout + out.stderr
    assert gh.log == []


def test_build_of_another_version_is_refused(gh, build):
    out = release(gh, build, check=False, COS_VERSION="9.9.9")
    assert out.returncode != 0
    assert "built as version '1.2.3'" in out.stdout + out.stderr
    assert gh.log == []


def test_missing_artifact_kinds_are_named(gh, build):
    data = json.loads((build / "manifest.json").read_text())
    data["artifacts"] = [a for a in data["artifacts"] if a["kind"] not in ("qcow2", "gce-tar")]
    (build / "manifest.json").write_text(json.dumps(data))
    out = release(gh, build, check=False)
    assert out.returncode != 0
    assert "no artifact of kind gce-tar, qcow2" in out.stdout + out.stderr


def test_notes_sections_of_other_flavors_are_kept():
    body = merge_section("cOS 1.2.3", "green-x86_64", "green notes")
    body = merge_section(body, "red-x86_64", "red notes v1")
    again = merge_section(body, "red-x86_64", "red notes v2")
    assert "green notes" in again and "red notes v2" in again and "red notes v1" not in again
    assert merge_section(again, "red-x86_64", "red notes v2") == again


def test_part_size_is_below_limit():
    assert part_size(2 * 1024 ** 3) == 2047 * 1024 ** 2
    assert part_size(1000) == 999


@pytest.fixture(autouse=True)
def _zstd_present():
    if shutil.which("zstd") is None:
        if os.environ.get("CI"):
            pytest.fail("zstd is not installed (apt-get install zstd)")
        pytest.skip("zstd is not installed (apt-get install zstd)")


def test_release_created_meanwhile_by_another_job_is_reused(gh, build):
    """Matrix jobs share one release: another job creates it between our lookup and our
    create (422 already_exists), and its notes section must survive ours."""
    other = "<!-- cos-release:green-x86_64 -->\ngreen notes\n<!-- /cos-release:green-x86_64 -->"
    resp = httpx.post(f"{gh.api_url}/repos/{gh.repository}/releases", json={"tag_name": TAG, "body": other},
                      headers={"Authorization": f"Bearer {gh.token}"})
    assert resp.status_code == 201
    gh.inject("GET", rf"/releases/tags/{TAG}$", status=404, times=2)  # our lookups miss it
    release(gh, build)
    assert len(gh.releases) == 1
    assert any(m == "POST" and p.endswith("/releases") and s == 422 for m, p, s in gh.log)
    body = gh.release(TAG).body
    assert "green notes" in body and f"<!-- cos-release:{KEY} -->" in body
    assert set(remote_assets(gh)) == EXPECTED


@pytest.mark.slow
def test_release_of_the_real_red_build(red_build, red_paths, gh, tmp_path):
    """The real artifacts of `doit build-red` (ISO, raw, VHD, GCE tar, qcow2) released."""
    kinds = {a["kind"] for a in red_build.get("artifacts", [])}
    missing = {"iso", "raw", "azure-vhd", "gce-tar", "qcow2"} - kinds
    if missing:
        reason = f"the red build has no {sorted(missing)} artifacts yet"
        pytest.fail(reason) if os.environ.get("CI") else pytest.skip(reason)
    env = {"GITHUB_API_URL": gh.api_url, "GITHUB_REPOSITORY": gh.repository, "GITHUB_TOKEN": gh.token}
    run_doit("release-red", env=env)
    rel = next(iter(gh.releases.values()))
    assets = {a.name: a for a in rel.assets.values()}
    version, arch = red_build["version"], red_build["arch"]
    by_kind = {a["kind"]: a for a in red_build["artifacts"]}
    iso = f"cOS-Seed-red-{version}-{arch}.iso"
    parts = sorted(n for n in assets if n.startswith(iso))
    assert sum(len(assets[p].data) for p in parts) == by_kind["iso"]["size"]
    raw = assets[f"cOS-Vanilla-RAW-red-{version}-{arch}.raw.zst"]
    out = subprocess.run(["zstd", "-d", "-c"], input=raw.data, capture_output=True, check=True).stdout
    assert sha256(out) == by_kind["raw"]["sha256"]
    sums = dict(reversed(line.split("  ", 1)) for line in
                assets[f"SHA256SUMS-red-{arch}"].data.decode().splitlines())
    for name, asset in assets.items():
        if not name.startswith("SHA256SUMS"):
            assert sums[name] == asset.sha256
    before = gh.uploads_done()
    run_doit("release-red", env=env)
    assert gh.uploads_done() == before


def test_asset_listing_follows_pagination(build):
    """With 3 assets per page the client must follow Link: rel=next to see them all."""
    server = GitHubAPIServer(per_page_max=3).start()
    try:
        release(server, build)
        first = server.uploads_done()
        release(server, build)
        assert server.uploads_done() == first
        assert sum(1 for m, p, s in server.log if m == "GET" and "page=" in p and "page=1" not in p) >= 3
    finally:
        server.stop()
