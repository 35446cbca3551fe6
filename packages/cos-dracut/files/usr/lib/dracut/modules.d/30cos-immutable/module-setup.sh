#!/bin/bash
# dracut module: the cOS immutable root (see docs/runtime.md). Runs in dracut's systemd
# initrd: attaches /cOS/<img> from COS_STATE, then, once /sysroot is mounted, runs the
# cloud-config `rootfs` stage, mounts the overlays / COS_OEM / COS_PERSISTENT, and runs
# the `initramfs` stage against the new root.

check() {
    require_binaries losetup mount blkid || return 1
    return 0
}

depends() {
    echo systemd
}

installkernel() {
    hostonly='' instmods loop overlay ext4 squashfs
}

install() {
    inst_multiple chroot losetup mount umount mountpoint blkid mkdir cp mv cat tr sleep modprobe udevadm
    inst_script "$moddir/cos-immutable.sh" /usr/lib/cos/cos-immutable
    local unit target
    for unit in cos-mode.service cos-img-attach.service cos-setup-rootfs.service \
                cos-immutable-rootfs.service cos-setup-initramfs.service; do
        inst_simple "$moddir/$unit" "$systemdsystemunitdir/$unit"
    done
    # WantedBy= of each unit, as symlinks (dracut does not run `systemctl enable`)
    for pair in initrd.target:cos-mode.service \
                initrd-root-device.target:cos-img-attach.service \
                initrd.target:cos-setup-rootfs.service \
                initrd-fs.target:cos-immutable-rootfs.service \
                initrd.target:cos-setup-initramfs.service; do
        target=${pair%%:*}
        unit=${pair#*:}
        mkdir -p "$initdir$systemdsystemunitdir/$target.wants"
        ln_r "$systemdsystemunitdir/$unit" "$systemdsystemunitdir/$target.wants/$unit"
    done
}
