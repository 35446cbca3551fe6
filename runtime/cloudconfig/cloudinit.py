"""`#cloud-config` user-data (the common cloud-init subset) mapped onto our stages, so
users coming from cloud-init keep their files. Where cloud-init runs a module decides
the stage: hostname early (initramfs), bootcmd every boot before the rest (boot.before),
accounts, keys and files in boot, runcmd after the network is up (network).
Keys we do not implement are reported as warnings, not silently dropped."""
from __future__ import annotations

import shlex
from typing import Any

from .schema import Document, from_mapping
from .spec import SpecError, boolean, mapping, str_list, string

PWAUTH_DROPIN = "/etc/ssh/sshd_config.d/50-cos-pwauth.conf"
SUPPORTED = {"users", "ssh_authorized_keys", "chpasswd", "hostname", "fqdn", "write_files", "runcmd", "bootcmd",
             "ssh_pwauth", "preserve_hostname", "prefer_fqdn_over_hostname"}


def _user(entry: Any, where: str) -> tuple[str, dict[str, Any], list[str]]:
    """A cloud-init users entry -> (name, our users spec, sudoers lines)."""
    spec = mapping(entry, where)
    name = string(spec.get("name"), f"{where}.name")
    ours: dict[str, Any] = {}
    if "passwd" in spec:
        ours["passwd"] = spec["passwd"]
    elif "hashed_passwd" in spec:
        ours["passwd"] = spec["hashed_passwd"]
    elif "plain_text_passwd" in spec:
        ours["passwd"] = spec["plain_text_passwd"]
    for key in ("shell", "homedir", "uid", "primary_group", "gecos", "no_create_home", "ssh_authorized_keys"):
        if key in spec:
            ours[key] = spec[key]
    if "groups" in spec:
        ours["groups"] = str_list(spec["groups"], f"{where}.groups", comma=True)
    # cloud-init locks the password unless told otherwise
    ours["lock_passwd"] = boolean(spec.get("lock_passwd", True), f"{where}.lock_passwd")
    sudo = spec.get("sudo")
    sudoers = [f"{name} {rule}" for rule in str_list(sudo, f"{where}.sudo")] if sudo not in (None, False) else []
    return name, ours, sudoers


def _chpasswd(value: Any) -> dict[str, dict[str, Any]]:
    spec = mapping(value, "chpasswd")
    out: dict[str, dict[str, Any]] = {}
    raw = spec.get("list")
    lines = raw.splitlines() if isinstance(raw, str) else str_list(raw, "chpasswd.list")
    for line in lines:
        user, sep, password = line.strip().partition(":")
        if not sep:
            raise SpecError(f"chpasswd.list: '{line}' is not user:password")
        out[user] = {"passwd": password}
    for i, entry in enumerate(spec.get("users") or []):
        item = mapping(entry, f"chpasswd.users[{i}]", {"name", "password", "type"}, ("name", "password"))
        if item.get("type") == "RANDOM":
            raise SpecError(f"chpasswd.users[{i}]: type RANDOM is not supported")
        out[string(item["name"], f"chpasswd.users[{i}].name")] = {"passwd": item["password"]}
    return out


def _write_files(value: Any) -> list[dict[str, Any]]:
    out = []
    if not isinstance(value, list):
        raise SpecError("write_files: expected a list")
    for i, entry in enumerate(value):
        item = mapping(entry, f"write_files[{i}]", {"path", "content", "encoding", "permissions", "owner", "append",
                                                     "defer"}, ("path",))
        if item.get("append"):
            raise SpecError(f"write_files[{i}]: append is not supported (write the whole file)")
        ours: dict[str, Any] = {k: item[k] for k in ("path", "content", "encoding", "permissions") if k in item}
        if "owner" in item:
            ours["ownerstring"] = item["owner"]
        out.append(ours)
    return out


def _commands(value: Any, key: str) -> list[str]:
    if not isinstance(value, list):
        raise SpecError(f"{key}: expected a list")
    return [shlex.join(str_list(c, f"{key}[{i}]")) if isinstance(c, list) else string(c, f"{key}[{i}]")
            for i, c in enumerate(value)]


def _stages(cfg: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    stages: dict[str, list[dict[str, Any]]] = {}

    def add(stage: str, step: dict[str, Any]) -> None:
        stages.setdefault(stage, []).append(step)

    hostname = cfg.get("fqdn") if cfg.get("prefer_fqdn_over_hostname") else cfg.get("hostname") or cfg.get("fqdn")
    if hostname and not cfg.get("preserve_hostname"):
        add("initramfs", {"name": "cloud-config hostname", "hostname": hostname})
    if cfg.get("bootcmd"):
        add("boot.before", {"name": "cloud-config bootcmd", "commands": _commands(cfg["bootcmd"], "bootcmd")})
    users: dict[str, dict[str, Any]] = {}
    sudoers: list[str] = []
    for i, entry in enumerate(cfg.get("users") or []):
        if entry == "default":
            continue  # cloud-init's distro default user: we have none
        name, spec, sudo = _user(entry, f"users[{i}]")
        users[name] = spec
        sudoers += sudo
    for name, spec in _chpasswd(cfg["chpasswd"]).items() if cfg.get("chpasswd") else ():
        users.setdefault(name, {}).update(spec)
    if users:
        add("boot", {"name": "cloud-config users", "users": users})
    if cfg.get("ssh_authorized_keys"):
        keys = str_list(cfg["ssh_authorized_keys"], "ssh_authorized_keys")
        add("boot", {"name": "cloud-config ssh_authorized_keys", "authorized_keys": {"root": keys}})
    files = _write_files(cfg["write_files"]) if cfg.get("write_files") else []
    if sudoers:
        files.append({"path": "/etc/sudoers.d/90-cloud-config-users", "permissions": 0o440,
                      "content": "".join(f"{line}\n" for line in sudoers)})
    if "ssh_pwauth" in cfg:
        on = boolean(cfg["ssh_pwauth"], "ssh_pwauth")
        files.append({"path": PWAUTH_DROPIN, "permissions": 0o644,
                      "content": f"# from cloud-config ssh_pwauth (the cos-network package's default is no)\n"
                                 f"PasswordAuthentication {'yes' if on else 'no'}\nKbdInteractiveAuthentication no\n"})
    if files:
        add("boot", {"name": "cloud-config write_files", "files": files})
    if cfg.get("runcmd"):
        add("network", {"name": "cloud-config runcmd", "commands": _commands(cfg["runcmd"], "runcmd")})
    return stages


def convert(data: Any, source: str) -> Document:
    """A parsed #cloud-config mapping as a Document (errors recorded, never raised)."""
    try:
        cfg = mapping(data if data is not None else {}, "#cloud-config")
        doc = from_mapping({"name": "#cloud-config", "stages": _stages(cfg)}, source)
    except SpecError as exc:
        return Document(source, "#cloud-config", errors=[str(exc)])
    ignored = sorted(k for k in cfg if k not in SUPPORTED)
    if ignored:
        doc.warnings.append(f"#cloud-config keys not supported, ignored: {', '.join(ignored)}")
    return doc
