#!/bin/sh
# The cOS immutable root, in the initrd (units of the dracut module 30cos-immutable):
#   mode    /run/cos/<mode>_mode from cos.mode= (live | recovery | active | passive)
#   attach  COS_STATE read-only at /run/initramfs/cos-state, `losetup -r` of
#           cos-img/filename=: the image's label (COS_ACTIVE/COS_PASSIVE) is root=
#   mount   active/passive: tmpfs overlays on RW_PATHS, COS_OEM at /oem, COS_PERSISTENT
#           at /usr/local with PERSISTENT_STATE_PATHS bound from /usr/local/.state;
#           recovery: COS_OEM at /oem; live: nothing
#   stage S the image's `cos-setup S` chrooted into /sysroot with the initrd's /dev, /proc,
#           /sys, /run (a wrapper, not RootDirectory=: that makes the unit require
#           sysroot.mount, which fails on live roots that dracut-mount mounts instead)
# Settings: /etc/cos/immutable.env of the image, then /oem/immutable.env, then
# /run/cos/immutable.env (e.g. written by the rootfs stage); see docs/runtime.md.
set -eu

SYSROOT=/sysroot
STATE_MNT=/run/initramfs/cos-state
OVERLAY=/run/overlay
RW_PATHS="/etc /root /home /opt /srv /var"
PERSISTENT_STATE_PATHS="/etc/ssh /home /root /opt /var/lib /var/log"
OEM_TIMEOUT=10
STATE_TIMEOUT=60

say() { echo "cos-immutable: $*" >&2; }

# Value of NAME= on the kernel command line (the last one wins, as in the kernel).
cmdline_arg() {
    value=
    for arg in $(cat /proc/cmdline); do
        case "$arg" in "$1="*) value=${arg#*=} ;; esac
    done
    [ -n "$value" ] && echo "$value"
}

boot_mode() {
    mode=$(cmdline_arg cos.mode) || mode=
    case "$mode" in
        live|recovery|active|passive) echo "$mode" ;;
        "") case " $(cat /proc/cmdline) " in *" root=live:"*) echo live ;; *) echo none ;; esac ;;
        *) say "unknown cos.mode=$mode: treated as live"; echo live ;;
    esac
}

# The device of filesystem label $1, waiting up to $2 s for it (udev may still probe).
find_label() {
    tries=$(( $2 * 2 ))
    while :; do
        if [ -e "/dev/disk/by-label/$1" ]; then echo "/dev/disk/by-label/$1"; return 0; fi
        if dev=$(blkid -L "$1" 2>/dev/null) && [ -n "$dev" ]; then echo "$dev"; return 0; fi
        [ "$tries" -gt 0 ] || return 1
        tries=$((tries - 1))
        sleep 0.5
    done
}

do_mode() {
    mkdir -p /run/cos
    mode=$(boot_mode)
    [ "$mode" = none ] || : > "/run/cos/${mode}_mode"
}

do_attach() {
    img=$(cmdline_arg cos-img/filename) || { say "no cos-img/filename= on the kernel command line"; exit 1; }
    timeout=$(cmdline_arg rd.cos.statetimeout) || timeout=$STATE_TIMEOUT
    dev=$(find_label COS_STATE "$timeout") || { say "no COS_STATE filesystem after ${timeout} s"; exit 1; }
    mkdir -p "$STATE_MNT"
    mountpoint -q "$STATE_MNT" || mount -o ro "$dev" "$STATE_MNT"
    [ -f "$STATE_MNT/${img#/}" ] || { say "COS_STATE has no ${img}: boot another entry (fallback, recovery)"; exit 1; }
    modprobe loop 2>/dev/null || true
    loopdev=$(losetup -r -f --show "$STATE_MNT/${img#/}")
    say "attached $img on $loopdev (read-only)"
    udevadm settle --timeout=30 || true
}

load_settings() {
    for env in "$SYSROOT/etc/cos/immutable.env" "$SYSROOT/oem/immutable.env" /run/cos/immutable.env; do
        # shellcheck source=/dev/null
        [ -f "$env" ] && . "$env"
    done
    return 0
}

mount_oem() {
    timeout=$(cmdline_arg rd.cos.oemtimeout) || timeout=$OEM_TIMEOUT
    if dev=$(find_label COS_OEM "$timeout"); then
        mkdir -p "$SYSROOT/oem" 2>/dev/null || true
        mountpoint -q "$SYSROOT/oem" || mount -o rw "$dev" "$SYSROOT/oem"
    else
        say "no COS_OEM filesystem: /oem stays the image's"
    fi
}

# A tmpfs-backed overlay on $1, so the read-only image's path is writable until reboot.
overlay_path() {
    p=$1
    [ -d "$SYSROOT$p" ] || { say "$p is not a directory of the image: no overlay"; return 0; }
    name=$(echo "${p#/}" | tr / -)
    mkdir -p "$OVERLAY/$name.overlay/upper" "$OVERLAY/$name.overlay/work"
    mount -t overlay overlay \
        -o "lowerdir=$SYSROOT$p,upperdir=$OVERLAY/$name.overlay/upper,workdir=$OVERLAY/$name.overlay/work" \
        "$SYSROOT$p"
}

# $1 bound from COS_PERSISTENT's /.state/<path>.bind; the first boot seeds it with the
# image's content (copied under a temporary name, so a cut boot seeds again).
bind_state() {
    p=$1
    state="$SYSROOT/usr/local/.state/$(echo "${p#/}" | tr / -).bind"
    if [ ! -d "$state" ]; then
        rm -rf "$state.seed"
        mkdir -p "$state.seed"
        [ -d "$SYSROOT$p" ] && cp -a "$SYSROOT$p/." "$state.seed/"
        mv "$state.seed" "$state"
    fi
    mkdir -p "$SYSROOT$p" || { say "cannot create $p (not under a writable path): not persistent"; return 0; }
    mount --bind "$state" "$SYSROOT$p"
}

do_mount() {
    mode=$(boot_mode)
    case "$mode" in
        active|passive)
            mountpoint -q "$OVERLAY" || { mkdir -p "$OVERLAY"; mount -t tmpfs -o mode=0755 tmpfs "$OVERLAY"; }
            mount_oem
            load_settings
            for p in $RW_PATHS; do overlay_path "$p"; done
            # The image is read-only and Debian/Ubuntu mount nothing on /tmp: systemd builds
            # PrivateDevices=/PrivateTmp= namespaces through it (resolved failed with EROFS).
            mountpoint -q "$SYSROOT/tmp" || mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$SYSROOT/tmp"
            if dev=$(find_label COS_PERSISTENT 0); then
                mount -o rw "$dev" "$SYSROOT/usr/local"
                for p in $PERSISTENT_STATE_PATHS; do bind_state "$p"; done
            else
                say "no COS_PERSISTENT filesystem: nothing persists across reboots"
                overlay_path /usr/local
            fi ;;
        recovery)
            mount_oem ;;
        *) : ;;
    esac
}

do_stage() {
    stage=$1
    mountpoint -q "$SYSROOT" || { say "no root at $SYSROOT: stage $stage skipped"; return 0; }
    [ -x "$SYSROOT/usr/bin/cos-setup" ] || { say "the image has no cos-setup: stage $stage skipped"; return 0; }
    bound=
    for d in /dev /proc /sys /run; do
        mountpoint -q "$SYSROOT$d" && continue
        mount --bind "$d" "$SYSROOT$d" && bound="$SYSROOT$d $bound"
    done
    rc=0
    chroot "$SYSROOT" /usr/bin/cos-setup "$stage" || rc=$?
    for m in $bound; do umount "$m" || umount -l "$m"; done
    return "$rc"
}

case "${1:-}" in
    mode) do_mode ;;
    attach) do_attach ;;
    mount) do_mount ;;
    stage) do_stage "${2:?usage: $0 stage NAME}" ;;
    *) echo "usage: $0 mode|attach|mount|stage NAME" >&2; exit 2 ;;
esac
