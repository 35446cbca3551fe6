#!/usr/bin/env python3
"""Benchmark the bootable-artifact stages of a flavor (default red) against the bare
commands run by hand, from the same inputs (build/<flavor>/ after `doit build-<flavor>`).

  .venv/bin/python bench/bench_artifacts.py [--flavor red] [--repeat 2] [--no-boot]

Rows: ISO, raw disk, qcow2, Azure VHD, GCE tar: the pipeline's stage function (in a
scratch build dir: same code path as doit, manifest and digests included) vs the
same tools typed by hand (shell script, ending with a sha256 of the output as the
manifest records a digest), best of --repeat; target ratio <= 1.10.
Then the raw disk's allocated vs nominal size, and seconds from QEMU start to the
login prompt (ISO under OVMF, raw disk under SeaBIOS).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline import artifacts, bootchain, config, disk, efi, files, formats, iso  # noqa: E402
from pipeline.config import FlavorContext, FlavorPaths, load_flavor  # noqa: E402

TARGET = 1.10


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        os.sync()  # the previous run's dirty pages must not be flushed on this one's time (sgdisk syncs)
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def sh(script: str, cwd: Path, env: dict | None = None) -> None:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env={**os.environ, **(env or {})},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"by-hand commands failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def scratch_build(paths: FlavorPaths, scratch: Path) -> FlavorPaths:
    """A build dir holding hard links to the flavor's inputs, so stages write there."""
    dest = scratch / paths.flavor.name
    (dest / "boot").mkdir(parents=True)
    for name in ("rootfs.squashfs", "boot/vmlinuz", "boot/initrd", "image.json", "manifest.json"):
        os.link(paths.build / name, dest / name)
    os.environ["COS_BUILD_DIR"] = str(scratch)
    return FlavorPaths(paths.flavor)


def by_hand_esp(inp: artifacts.BootInputs, esp: str, stub: str, *, cd: bool) -> str:
    """The ESP's EFI files by hand: with Secure Boot the distro's signed chain copied out of
    the squashfs plus the stub at its GRUB's prefix; without, the host's unsigned GRUB."""
    if not inp.secure_boot:
        return (f"grub-mkimage -O x86_64-efi -d {efi.GRUB_LIB}/x86_64-efi -c early.cfg -p /boot/grub "
                f"-o BOOTX64.EFI {' '.join(efi.EFI_MODULES)}\n"
                f"mmd -i {esp} ::/EFI ::/EFI/BOOT; mcopy -i {esp} BOOTX64.EFI ::/EFI/BOOT/BOOTX64.EFI")
    chain = bootchain.CHAINS[inp.secure_boot]
    grub = chain.grub_cd if cd and chain.grub_cd else chain.grub
    prefix = "/boot/grub" if cd else "/EFI/debian"  # Debian's (red's) built-in prefixes
    return "\n".join([
        f"rdsquashfs -c /{chain.shim} {inp.squashfs} > shim.efi",
        f"rdsquashfs -c /{chain.mok_manager} {inp.squashfs} > mm.efi",
        f"rdsquashfs -c /{grub} {inp.squashfs} > grub.efi",
        f"printf '{stub}' > stub.cfg",
        f"mmd -i {esp} ::/EFI ::/EFI/BOOT {' '.join(f'::{d}' for d in _parents(prefix))}",
        f"mcopy -i {esp} shim.efi ::/EFI/BOOT/BOOTX64.EFI; mcopy -i {esp} mm.efi ::/EFI/BOOT/{chain.mok_name}",
        f"mcopy -i {esp} grub.efi ::/EFI/BOOT/{chain.loader_name}; mcopy -i {esp} stub.cfg ::{prefix}/grub.cfg",
        f"mcopy -i {esp} stub.cfg ::/EFI/BOOT/grub.cfg"])


def _parents(path: str) -> list[str]:
    parts = Path(path).parts[1:]
    return [p for p in ("/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)) if p not in ("/EFI",)]


def by_hand_iso(inp: artifacts.BootInputs, flavor, out: Path, work: Path) -> str:
    grub, label = efi.GRUB_LIB, flavor.boot.live_label
    mods = " ".join(efi.BIOS_MODULES)
    cmdline = iso.live_cmdline(label, flavor.boot.cmdline)
    esp = by_hand_esp(inp, "esp.img", "search --label --set=root " + label + "\\nconfigfile ($root)/boot/grub/grub.cfg\\n",
                      cd=True)
    payload, payload_grafts = by_hand_install_payload(inp, flavor)
    return f"""
cd {work}
{payload}
printf 'search --no-floppy --label --set=root {label}\\nconfigfile ($root)/boot/grub/grub.cfg\\n' > early.cfg
printf 'serial --unit=0 --speed=115200\\nterminal_output serial console\\nmenuentry live {{\\n linux /boot/vmlinuz {cmdline}\\n initrd /boot/initrd\\n}}\\n' > grub.cfg
grub-mkimage -O i386-pc-eltorito -d {grub}/i386-pc -c early.cfg -p /boot/grub -o eltorito.img {mods}
rm -f esp.img; mkfs.vfat -C --invariant -n COS_ESP esp.img 8192
{esp}
rm -f {out}
xorriso -volume_date all_file_dates ={inp.sde} -as mkisofs -quiet -o {out} -iso-level 3 -r -J -joliet-long \\
  -V {label} -graft-points -b boot/grub/i386-pc/eltorito.img -no-emul-boot -boot-load-size 4 \\
  -boot-info-table --grub2-boot-info --grub2-mbr {grub}/i386-pc/boot_hybrid.img -partition_offset 16 \\
  --mbr-force-bootable -append_partition 2 0xef esp.img -eltorito-alt-boot \\
  -e --interval:appended_partition_2:all:: -no-emul-boot \\
  /rootfs.squashfs={inp.squashfs} /boot/vmlinuz={inp.kernel} /boot/initrd={inp.initrd} \\
  /boot/grub/grub.cfg=grub.cfg /boot/grub/i386-pc/eltorito.img=eltorito.img {payload_grafts}
openssl dgst -sha256 -r {out} > {out}.sha256
"""


def by_hand_bootloader(inp: artifacts.BootInputs, flavor) -> str:
    """The raw disk's bootloader in the current directory: the COS_GRUB image efi.img
    (the partition's size) and GRUB's BIOS core.img."""
    d, grub = flavor.disk, efi.GRUB_LIB
    esp = by_hand_esp(inp, "efi.img", "search --label --set=root " + d.recovery.label
                      + "\\nconfigfile ($root)/etc/cos/grub.cfg\\n", cd=False)
    return f"""
printf 'search --no-floppy --label --set=root {d.recovery.label}\\nconfigfile ($root)/etc/cos/grub.cfg\\n' > early.cfg
grub-mkimage -O i386-pc -d {grub}/i386-pc -c early.cfg -p /boot/grub -o core.img {" ".join(efi.BIOS_MODULES)}
rm -f efi.img; mkfs.vfat -C --invariant -n {d.efi.label} efi.img {d.efi.size_mib * 1024}
{esp}"""


def by_hand_install_payload(inp: artifacts.BootInputs, flavor) -> tuple[str, str]:
    """(commands, grafts) for the ISO's /cos/install, as pipeline/disk.py's install_payload:
    the bootloader, efi.img without its trailing zeros, boot.img and install.json."""
    d = flavor.disk
    parts = [*disk.layout(d), disk.Part("state", "8300", d.state.size_mib, d.state.label)]
    table = [{"name": p.name, "type": p.type, "size_mib": p.size_mib, "label": p.label} for p in parts]
    table.append({"name": "persistent", "type": "8300", "size_mib": d.persistent.size_mib, "label": d.persistent.label})
    manifest = json.dumps({"format": 1, "partitions": table, "efi_image": "efi.img", "efi_image_size":
                           d.efi.size_mib * 2**20, "bios_core": "core.img", "bios_boot": "boot.img"})
    trim = ("import sys; d = open('efi.img', 'rb').read(); "
            "open('trimmed.img', 'wb').write(d[:-(-len(d.rstrip(bytes(1))) // 512) * 512])")
    commands = f"""mkdir install; cd install
{by_hand_bootloader(inp, flavor)}
python3 -c "{trim}"
cp {efi.GRUB_LIB}/i386-pc/boot.img boot.img; printf '%s\\n' '{manifest}' > install.json
cd .."""
    dest = "/" + disk.INSTALL_DIR
    grafts = (f"{dest}/efi.img=install/trimmed.img {dest}/core.img=install/core.img "
              f"{dest}/boot.img=install/boot.img {dest}/install.json=install/install.json")
    return commands, grafts


def by_hand_raw(inp: artifacts.BootInputs, flavor, out: Path, work: Path) -> str:
    d = flavor.disk
    parts = disk.layout(d)
    starts, total = disk.offsets(parts)
    sg = " ".join(f"-n {i}:{s * 2048}:{(s + p.size_mib) * 2048 - 1} -t {i}:{p.type} -c {i}:{p.name}"
                  for i, (p, s) in enumerate(zip(parts, starts), 1))
    return f"""
cd {work}
{by_hand_bootloader(inp, flavor)}
mkdir -p oem rec/cOS rec/boot rec/etc/cos
printf '# GRUB Environment Block\\nnext_entry=recovery\\n' > oem/grubenv; truncate -s 1024 oem/grubenv
cp {inp.squashfs} rec/cOS/recovery.squashfs; cp {inp.kernel} rec/boot/vmlinuz; cp {inp.initrd} rec/boot/initrd
rdsquashfs -c /etc/cos/grub.cfg {inp.squashfs} > rec/etc/cos/grub.cfg
rdsquashfs -c /etc/cos/bootargs.cfg {inp.squashfs} > rec/etc/cos/bootargs.cfg
mkfs.ext4 -q -F -L {d.oem.label} -d oem oem.img {d.oem.size_mib}M >/dev/null
mkfs.ext4 -q -F -L {d.recovery.label} -d rec rec.img {d.recovery.size_mib}M >/dev/null
rm -f {out}; truncate -s {total}M {out}
sgdisk --clear {sg} {out} >/dev/null
dd if=efi.img of={out} bs=1M seek={starts[1]} conv=notrunc,sparse status=none
dd if=oem.img of={out} bs=1M seek={starts[2]} conv=notrunc,sparse status=none
dd if=rec.img of={out} bs=1M seek={starts[3]} conv=notrunc,sparse status=none
dd if=core.img of={out} bs=512 seek={starts[0] * 2048} conv=notrunc status=none
dd if={efi.GRUB_LIB}/i386-pc/boot.img of={out} bs=440 count=1 conv=notrunc status=none
openssl dgst -sha256 -r {out} >/dev/null
"""


def by_hand_format(kind: str, raw: Path, out: Path, work: Path, sde: int) -> str:
    """The same tools by hand; each ends with a digest, as the manifest records one
    (openssl: coreutils' sha256sum here does not use the CPU's SHA instructions)."""
    digest = f"openssl dgst -sha256 -r {out} >/dev/null"
    if kind == "qcow2":
        return f"qemu-img convert -f raw -O qcow2 {raw} {out}; {digest}"
    if kind == "azure-vhd":
        return f"qemu-img convert -f raw -O vpc -o subformat=fixed,force_size {raw} {out}; {digest}"
    gib = -(-raw.stat().st_size // 2**30)
    return f"""cd {work}; cp --sparse=always {raw} disk.raw; truncate -s {gib}G disk.raw
tar --sort=name --mtime=@{sde} --owner=0 --group=0 --numeric-owner --format=oldgnu -S -cf - disk.raw \\
  | gzip -n > {out}; rm -f disk.raw; {digest}"""


def boot_seconds(path: Path, media: str, firmware: str) -> float | str:
    from tests.qemu import VM, Drive, missing_tools
    if missing_tools(firmware):
        return "n/a"
    with VM(Drive(path, media), firmware=firmware, name=f"bench-{firmware}-{media}") as vm:
        seconds = vm.login(timeout=600)
        vm.poweroff()
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flavor", default="red")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-boot", action="store_true", help="skip the QEMU boot timings")
    args = ap.parse_args()

    flavor = load_flavor(args.flavor)
    real = FlavorPaths(flavor)
    version = "bench"
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory(dir=config.build_root(), prefix=".bench-") as tmp:
        scratch = Path(tmp)
        paths = scratch_build(real, scratch / "build")
        inputs = artifacts.boot_inputs(paths)
        ctx = FlavorContext(flavor, paths, version)
        hand = scratch / "hand"
        hand.mkdir()

        def fresh_work() -> Path:
            w = scratch / "work"
            shutil.rmtree(w, ignore_errors=True)
            w.mkdir()
            return w

        pipe = best(lambda: iso.iso_stage(ctx), args.repeat)
        manual = best(lambda: sh(by_hand_iso(inputs, flavor, hand / "x.iso", fresh_work()), scratch), args.repeat)
        rows.append(("ISO", pipe, manual))

        pipe = best(lambda: disk.raw_stage(ctx), args.repeat)
        manual = best(lambda: sh(by_hand_raw(inputs, flavor, hand / "x.raw", fresh_work()), scratch), args.repeat)
        rows.append(("raw disk", pipe, manual))

        raw = artifacts.path(ctx, "raw")
        for kind in formats.FORMATS:
            pipe = best(lambda kind=kind: formats.format_stage(ctx, kind), args.repeat)
            manual = best(lambda kind=kind: sh(by_hand_format(kind, raw, hand / f"x.{kind}", fresh_work(), inputs.sde),
                                     scratch), args.repeat)
            rows.append((kind, pipe, manual))

        st = raw.stat()
        iso_file = artifacts.path(ctx, "iso")
        print(f"\nbootable artifacts of {flavor.name}, best of {args.repeat} (seconds)")
        print(f"{'artifact':<12}{'pipeline':>10}{'by hand':>10}{'ratio':>8}  target <= {TARGET:.2f}")
        for name, p, m in rows:
            ratio = p / m
            print(f"{name:<12}{p:>10.2f}{m:>10.2f}{ratio:>8.2f}  {'ok' if ratio <= TARGET else 'OVER'}")
        print(f"\nraw disk: nominal {st.st_size / 2**20:.0f} MiB, allocated {st.st_blocks * 512 / 2**20:.0f} MiB "
              f"({st.st_blocks * 512 / st.st_size:.1%}); ISO {iso_file.stat().st_size / 2**20:.0f} MiB")
        if not args.no_boot:
            print("\nQEMU (TCG) start -> login prompt:")
            for label, path, media, fw in [("ISO, OVMF, CD-ROM", iso_file, "cdrom", "uefi"),
                                           ("raw, SeaBIOS, disk", raw, "disk", "bios")]:
                s = boot_seconds(path, media, fw)
                print(f"  {label:<22}{s if isinstance(s, str) else f'{s:.1f} s'}")
        files.DIGESTS.save()  # now, while the scratch dir exists (not at exit, after it is gone)
    return 0


if __name__ == "__main__":
    sys.exit(main())
