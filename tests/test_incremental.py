"""The doit graph is incremental by content: a second build executes nothing; touching
files (an overlay file, multi-GB artifacts) without changing them executes nothing;
changing one overlay file re-runs exactly the image and what depends on it; a host GRUB
upgrade re-runs the ISO and disk tasks only; a stage killed with SIGKILL leaves nothing
that a re-run takes as done."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import DOIT, REPO, doit_lock, executed_tasks, run_doit

pytestmark = pytest.mark.slow

OVERLAY = REPO / "flavors" / "red" / "overlay" / "etc" / "cos" / "flavor"


def _red_tasks() -> set[str]:
    out = run_doit("list", "--all", "--quiet").stdout.split()
    return {t for t in out if t.startswith("build-red:")}


def _status() -> dict[str, str]:
    """doit's own up-to-date verdict per task: R (would run) or U (up to date)."""
    out = run_doit("list", "--all", "--status").stdout
    return {parts[1]: parts[0] for parts in (l.split() for l in out.splitlines()) if len(parts) >= 2}


def test_second_build_executes_nothing(red_build):
    again = run_doit("build-red")
    assert executed_tasks(again.stdout) == [], again.stdout


def test_touch_without_change_executes_nothing(red_build, red_paths):
    OVERLAY.touch()
    big = [p for p in red_paths.build.rglob("*") if p.is_file() and p.stat().st_size > 100 << 20]
    assert big, "expected large artifacts (squashfs, disks) in the build"
    for p in big:
        p.touch()
    again = run_doit("build-red")
    assert executed_tasks(again.stdout) == [], again.stdout


def test_changing_one_overlay_file_reruns_only_its_dependents(red_build):
    original = OVERLAY.read_text()
    expected = _red_tasks() - {"build-red:base", "build-red:toolkit", "build-red:push"}
    try:
        OVERLAY.write_text(original + "# changed by test_incremental\n")
        # doit sees only the first level before running: the image, nothing upstream
        status = {t: s for t, s in _status().items() if t.startswith(("build-red:", "packages:"))}
        assert {t for t, s in status.items() if s == "R"} == {"build-red:image"}
        ran = set(executed_tasks(run_doit("build-red").stdout))
        assert ran == expected, f"ran {sorted(ran)}, expected {sorted(expected)}"
    finally:
        OVERLAY.write_text(original)
    run_doit("build-red")  # back to the original image for later tests
    assert executed_tasks(run_doit("build-red").stdout) == []


def test_host_grub_upgrade_reruns_only_the_bootable_images(red_build, tmp_path):
    """The ISO and disks embed the host's BIOS GRUB: another i386-pc build (its modinfo.sh)
    must re-key them, and nothing upstream. With Secure Boot (red's default) the EFI GRUB
    is the image's signed one: another host x86_64-efi build re-keys nothing."""
    def rerun_with(platform: str) -> set[str]:
        grub = tmp_path / platform
        for p in ("x86_64-efi", "i386-pc"):
            (grub / p).mkdir(parents=True)
            for f in (Path("/usr/lib/grub") / p).iterdir():
                (grub / p / f.name).symlink_to(f)
        modinfo = grub / platform / "modinfo.sh"
        text = modinfo.read_text()
        modinfo.unlink()
        modinfo.write_text(text.replace("grub_package_version=", "grub_package_version=9.99-test+"))
        out = run_doit("list", "--all", "--status", env={"COS_GRUB_LIB": str(grub)}).stdout
        status = {parts[1]: parts[0] for parts in (l.split() for l in out.splitlines()) if len(parts) >= 2}
        return {t for t, s in status.items() if s == "R" and t.startswith(("build-red:", "packages:"))}

    assert rerun_with("i386-pc") == {"build-red:iso", "build-red:raw"}
    assert rerun_with("x86_64-efi") == set()
    assert {t for t, s in _status().items() if s == "R" and t.startswith("build-red:")} == set()


def test_sigkill_mid_stage_leaves_nothing_taken_as_done(red_build, red_paths, docker_client):
    target = red_paths.build / "rootfs.squashfs"
    with doit_lock():
        target.unlink()
        proc = subprocess.Popen([*DOIT, "build-red:squashfs"], cwd=REPO, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                parts = list(red_paths.build.glob(".rootfs.squashfs.*.part"))
                if parts and parts[0].stat().st_size > 1 << 20:
                    break
                assert proc.poll() is None, "the stage ended before it could be killed"
                time.sleep(0.2)
            else:
                pytest.fail("no partial squashfs appeared within 300 s")
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not target.exists(), "a killed stage left its output under the final name"
    assert _status()["build-red:squashfs"] == "R"
    run_doit("build-red")
    assert target.exists() and not list(red_paths.build.glob(".rootfs.squashfs.*.part"))
    from pipeline.docker_engine import EXPORT_LABEL
    assert docker_client.containers.list(all=True, filters={"label": EXPORT_LABEL}) == []
    assert executed_tasks(run_doit("build-red").stdout) == []
