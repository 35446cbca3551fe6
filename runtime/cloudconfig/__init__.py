"""The cloud-config stage runner (cos-setup): yip-format documents and #cloud-config.

    cos-setup [--root DIR] [--dry-run] [--cmdline FILE] [--fetch-datasources] STAGE
    runtime.cloudconfig.runner.run_stage(stage, system) -> bool      (cos-deploy & co.)

Stages: rootfs, initramfs, fs, boot, network, reconcile (`cos-setup boot` runs
boot.before, boot, boot.after; `cos-setup boot.after` only that one) and after-install,
after-deploy, after-upgrade, after-reset.

Sources, in the order their steps run within a stage: /system/oem, /oem,
/usr/local/cloud-config (each directory's *.yaml/*.yml, lexical), `cos.setup=` (a path
in the root or an http(s) URL) from the kernel command line, then the datasource:
NoCloud (cidata/CIDATA filesystem, or /var/lib/cloud/seed/nocloud) in any stage; EC2
(IMDSv2), GCE, Azure only from the network stage on (or --fetch-datasources). What a
boot found is kept in /run/cos/{datasource,userdata,ssh-keys}; user-data that arrives
after stages it names ran gets those stages run once, right then ("late:" in the log).
Datasource SSH keys go to root's authorized_keys (in the initramfs stage).

Within a step the keys run in a fixed order (steps.PLUGINS): layout, dns, users,
directories, files, authorized_keys, hostname, sysctl, environment, modules, systemctl,
commands. A step with a bad value or an unknown key is not run; a failing step (or an
unreadable document) is logged with file, stage, step and reason to stderr and
/run/cos/setup-<stage>.log, the rest still runs, and the stage returns False (exit 1).

On a scratch root (--root DIR != /) commands and `if` run on the host with cwd=DIR and
COS_ROOT=DIR (COS_ROOT is / on the machine, so "$COS_ROOT/etc/x" works in both); live
settings (sethostname, /proc/sys, modprobe, systemctl start) are only applied on /.
"""
