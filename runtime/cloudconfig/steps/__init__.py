"""One small function per step key. PLUGINS is the fixed order in which a step's keys
are applied, whatever their order in the YAML: the disk first (layout), users before
anything that names them (files' owners, authorized_keys: yip PR #34), commands last so
they see everything the step wrote."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..context import Context
from . import commands, files, layout, settings, users


@dataclass(frozen=True)
class Plugin:
    key: str
    parse: Callable[[Any, str], Any]      # YAML value, key path -> typed spec (raises SpecError)
    apply: Callable[[Any, Context], None]  # raises CosError / OSError on failure


PLUGINS: tuple[Plugin, ...] = (
    Plugin("layout", layout.parse, layout.apply),
    Plugin("dns", settings.parse_dns, settings.apply_dns),
    Plugin("users", users.parse_users, users.apply_users),
    Plugin("directories", files.parse_directories, files.apply_directories),
    Plugin("files", files.parse_files, files.apply_files),
    Plugin("authorized_keys", users.parse_authorized_keys, users.apply_authorized_keys),
    Plugin("hostname", settings.parse_hostname, settings.apply_hostname),
    Plugin("sysctl", settings.parse_sysctl, settings.apply_sysctl),
    Plugin("environment", settings.parse_environment, settings.apply_environment),
    Plugin("modules", settings.parse_modules, settings.apply_modules),
    Plugin("systemctl", settings.parse_systemctl, settings.apply_systemctl),
    Plugin("commands", commands.parse, commands.apply),
)
BY_KEY = {p.key: p for p in PLUGINS}
