"""cos-upgrade: OTA upgrades of the installed system (or, with --recovery, of the recovery
system) from an OS container image or a directory; see upgrade.py."""
