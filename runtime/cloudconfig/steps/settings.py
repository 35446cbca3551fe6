"""`dns`, `hostname`, `sysctl`, `environment`, `modules`, `systemctl`: small system files.

On the running system ('/') the live setting is applied too (sethostname, /proc/sys,
modprobe, systemctl start); on a scratch root only the files change."""
from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import shlex
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

from ...system import CosError
from ..context import Context
from ..spec import SpecError, mapping, str_list, string

log = logging.getLogger("cos")

SYSCTL_FILE = "/etc/sysctl.d/90-cos-setup.conf"
MODULES_FILE = "/etc/modules-load.d/cos-setup.conf"
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*$")


def _merge_lines(old: str, key_of: Any, new: dict[str, str]) -> bytes:
    """Replace the lines whose key is in `new`, append the others; other lines are kept."""
    out, seen = [], set()
    for line in old.splitlines():
        key = key_of(line)
        if key in new:
            if key not in seen:
                out.append(new[key])
            seen.add(key)
        else:
            out.append(line)
    out += [line for key, line in new.items() if key not in seen]
    return "".join(f"{line}\n" for line in out).encode()


# -- dns ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DnsSpec:
    nameservers: list[str] = field(default_factory=list)
    search: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)


def parse_dns(value: Any, where: str) -> DnsSpec:
    spec = mapping(value, where, {"nameservers", "search", "options"})
    servers = str_list(spec.get("nameservers"), f"{where}.nameservers")
    for i, server in enumerate(servers):
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise SpecError(f"{where}.nameservers[{i}]: '{server}' is not an IP address") from None
    return DnsSpec(servers, str_list(spec.get("search"), f"{where}.search"),
                   str_list(spec.get("options"), f"{where}.options"))


def apply_dns(spec: DnsSpec, ctx: Context) -> None:
    lines = [f"nameserver {s}" for s in spec.nameservers]
    if spec.search:
        lines.append("search " + " ".join(spec.search))
    if spec.options:
        lines.append("options " + " ".join(spec.options))
    # replaces a symlink to a resolver's stub file too: the user asked for these servers
    ctx.write("/etc/resolv.conf", "".join(f"{line}\n" for line in ["# written by cos-setup", *lines]).encode(),
              mode=0o644)


# -- hostname ----------------------------------------------------------------------------
def parse_hostname(value: Any, where: str) -> str:
    return string(value, where)


def render_hostname(template: str, ctx: Context) -> str:
    machine_id = ctx.read_text("/etc/machine-id").strip()
    name = (template.replace("{{.MachineID}}", machine_id).replace("{{.Random}}", secrets.token_hex(4))
            .replace("{{.UUID}}", str(uuid.uuid4())))
    if "{{.MachineID}}" in template and not machine_id:
        raise CosError("hostname uses {{.MachineID}} but /etc/machine-id is empty or missing")
    if not HOSTNAME.match(name) or len(name) > 253:
        raise CosError(f"'{name}' is not a valid hostname")
    return name


def apply_hostname(template: str, ctx: Context) -> None:
    name = render_hostname(template, ctx)
    ctx.write("/etc/hostname", f"{name}\n".encode(), mode=0o644)
    short = name.split(".")[0]
    entry = f"127.0.1.1\t{name}" + (f" {short}" if short != name else "")
    hosts = ctx.read_text("/etc/hosts") or "127.0.0.1\tlocalhost\n"
    ctx.write("/etc/hosts", _merge_lines(hosts, lambda line: "h" if line.startswith("127.0.1.1") else None,
                                         {"h": entry}), mode=0o644)
    if ctx.system.is_host_root:
        if ctx.dry_run:
            log.info("would set the hostname to %s", name)
        else:
            socket.sethostname(name)


# -- sysctl ------------------------------------------------------------------------------
def parse_sysctl(value: Any, where: str) -> dict[str, str]:
    spec = mapping(value, where)
    out = {}
    for key, val in spec.items():
        if not re.match(r"^[A-Za-z0-9_.\-/*]+$", key) or ".." in key:
            raise SpecError(f"{where}: '{key}' is not a sysctl name")
        out[key] = string(val, f"{where}.{key}")
    return out


def apply_sysctl(spec: dict[str, str], ctx: Context) -> None:
    if ctx.system.is_host_root:
        for key, value in spec.items():
            proc = f"/proc/sys/{key.replace('.', '/')}"
            if ctx.dry_run:
                log.info("would write %s = %s", proc, value)
                continue
            try:
                with open(proc, "w") as f:
                    f.write(value)
            except OSError as exc:
                raise CosError(f"sysctl {key}: cannot write {proc}: {exc.strerror}") from None
        return
    old = ctx.read_text(SYSCTL_FILE)
    ctx.write(SYSCTL_FILE, _merge_lines(old, lambda line: line.split("=")[0].strip() or None,
                                        {k: f"{k} = {v}" for k, v in spec.items()}), mode=0o644)


# -- environment -------------------------------------------------------------------------
def parse_environment(value: Any, where: str) -> dict[str, str]:
    spec = mapping(value, where)
    for key in spec:
        if not ENV_NAME.match(key):
            raise SpecError(f"{where}: '{key}' is not a valid variable name")
    return {k: string(v, f"{where}.{k}") for k, v in spec.items()}


def _env_line(key: str, value: str) -> str:
    plain = re.match(r"^[A-Za-z0-9_./:,@%+=-]*$", value)
    return f"{key}={value}" if plain else f'{key}="' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def apply_environment(spec: dict[str, str], ctx: Context) -> None:
    old = ctx.read_text("/etc/environment")
    ctx.write("/etc/environment", _merge_lines(old, lambda line: line.split("=")[0].strip() if "=" in line else None,
                                               {k: _env_line(k, v) for k, v in spec.items()}), mode=0o644)


# -- modules -----------------------------------------------------------------------------
def parse_modules(value: Any, where: str) -> list[str]:
    names = str_list(value, where)
    for i, name in enumerate(names):
        if not re.match(r"^[A-Za-z0-9_-]+$", name):
            raise SpecError(f"{where}[{i}]: '{name}' is not a module name")
    return names


def apply_modules(spec: list[str], ctx: Context) -> None:
    old = ctx.read_text(MODULES_FILE)
    ctx.write(MODULES_FILE, _merge_lines(old, lambda line: line.strip() or None, {m: m for m in spec}), mode=0o644)
    if ctx.system.is_host_root:
        for name in spec:
            ctx.system.run(["modprobe", name])


# -- systemctl ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SystemctlSpec:
    enable: list[str] = field(default_factory=list)
    disable: list[str] = field(default_factory=list)
    mask: list[str] = field(default_factory=list)
    start: list[str] = field(default_factory=list)


def parse_systemctl(value: Any, where: str) -> SystemctlSpec:
    spec = mapping(value, where, {"enable", "disable", "mask", "start"})
    lists = {k: str_list(spec.get(k), f"{where}.{k}") for k in ("enable", "disable", "mask", "start")}
    for key, units in lists.items():
        for i, unit in enumerate(units):
            if unit.startswith("-") or "/" in unit or not unit:
                raise SpecError(f"{where}.{key}[{i}]: '{unit}' is not a unit name")
    return SystemctlSpec(**lists)


def apply_systemctl(spec: SystemctlSpec, ctx: Context) -> None:
    root = [] if ctx.system.is_host_root else [f"--root={ctx.system.root}"]
    for verb in ("disable", "mask", "enable"):
        units = getattr(spec, verb)
        if units:
            ctx.system.run(["systemctl", *root, verb, *units])
    if spec.start and not ctx.system.is_host_root:
        log.info("systemctl start %s: skipped (%s is not the running system)", shlex.join(spec.start), ctx.system.root)
    elif spec.start:
        # --no-block: a unit ordered after this boot stage would otherwise wait for us forever
        ctx.system.run(["systemctl", "start", "--no-block", *spec.start])
