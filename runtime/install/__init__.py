"""Installing and changing the system on disk: layout, cos-deploy (and, later, upgrade,
reset, install). Each tool works through runtime.system.System."""
