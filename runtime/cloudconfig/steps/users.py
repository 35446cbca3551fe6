"""`users` and `authorized_keys`, editing the target's account files directly."""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

from ..accounts import Accounts
from ..context import Context
from ..shacrypt import sha512_crypt
from ..spec import SpecError, boolean, integer, mapping, opt_string, str_list

log = logging.getLogger("cos")

USER_KEYS = {"passwd", "groups", "shell", "homedir", "uid", "primary_group", "ssh_authorized_keys",
             "lock_passwd", "lock", "no_create_home", "gecos"}


@dataclass(frozen=True)
class UserSpec:
    name: str
    passwd: str | None = None          # a crypt hash ("$...") or plain text, hashed here
    groups: list[str] = field(default_factory=list)
    shell: str | None = None
    homedir: str | None = None
    uid: int | None = None
    primary_group: str | None = None
    ssh_authorized_keys: list[str] = field(default_factory=list)
    lock: bool = False
    create_home: bool = True
    gecos: str = ""


def parse_user(name: str, value: Any, where: str) -> UserSpec:
    spec = mapping(value if value is not None else {}, where, USER_KEYS)
    uid = spec.get("uid")
    return UserSpec(
        name=name, passwd=opt_string(spec.get("passwd"), f"{where}.passwd"),
        groups=str_list(spec.get("groups"), f"{where}.groups", comma=True),
        shell=opt_string(spec.get("shell"), f"{where}.shell"),
        homedir=opt_string(spec.get("homedir"), f"{where}.homedir"),
        uid=None if uid is None else integer(uid, f"{where}.uid"),
        primary_group=opt_string(spec.get("primary_group"), f"{where}.primary_group"),
        ssh_authorized_keys=str_list(spec.get("ssh_authorized_keys"), f"{where}.ssh_authorized_keys"),
        lock=any(boolean(spec[k], f"{where}.{k}") for k in ("lock", "lock_passwd") if k in spec),
        create_home=not boolean(spec.get("no_create_home", False), f"{where}.no_create_home"),
        gecos=opt_string(spec.get("gecos"), f"{where}.gecos") or "")


def parse_users(value: Any, where: str) -> list[UserSpec]:
    users = mapping(value, where)
    for name in users:
        if not name or ":" in name or "/" in name or name.startswith("-"):
            raise SpecError(f"{where}: '{name}' is not a valid user name")
    return [parse_user(name, spec, f"{where}.{name}") for name, spec in users.items()]


def _hash(passwd: str) -> str:
    return passwd if passwd.startswith("$") else sha512_crypt(passwd)


def _default_shell(ctx: Context) -> str:
    return "/bin/bash" if ctx.path("/bin/bash").exists() else "/bin/sh"


def _create(u: UserSpec, accounts: Accounts, ctx: Context) -> str:
    """A new user and its primary group; returns its home directory."""
    if u.primary_group:
        row = accounts.group.get(u.primary_group)
        gid = int(row[2]) if row else accounts.add_group(u.primary_group)
    elif accounts.group.get(u.name):
        gid = accounts.gid(u.name)
    else:
        gid = accounts.add_group(u.name, u.uid)
    home = u.homedir or f"/home/{u.name}"
    uid = accounts.add_user(u.name, u.uid, gid, home, u.shell or _default_shell(ctx), u.gecos)
    log.info("user %s created (uid %d, gid %d, home %s)", u.name, uid, gid, home)
    return home


def _update(u: UserSpec, accounts: Accounts) -> None:
    row = accounts.user(u.name)
    assert row is not None
    if u.shell:
        accounts.passwd.set(row, 6, u.shell)
    if u.homedir:
        accounts.passwd.set(row, 5, u.homedir)


def _make_home(ctx: Context, home: str, owner: tuple[int, int]) -> None:
    """Home 0700 owned by the user, seeded from the target's /etc/skel like useradd -m."""
    target = ctx.path(home)
    if target.exists() or ctx.dry_run:
        ctx.mkdir(home)
        return
    skel = ctx.path("/etc/skel")
    if skel.is_dir():
        shutil.copytree(skel, target, symlinks=True)
    ctx.mkdir(home, 0o700, owner)
    for dirpath, dirnames, filenames in os.walk(target):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), *owner)


def apply_users(specs: list[UserSpec], ctx: Context) -> None:
    accounts = Accounts.load(ctx)
    homes: dict[str, str] = {}
    for u in specs:
        if accounts.user(u.name) is None:
            homes[u.name] = _create(u, accounts, ctx)
        else:
            _update(u, accounts)
        for group in u.groups:
            if accounts.group.get(group) is None:
                log.info("group %s created for user %s", group, u.name)
                accounts.add_group(group)
            accounts.add_member(group, u.name)
        if u.passwd is not None or u.lock:
            accounts.set_password(u.name, None if u.passwd is None else _hash(u.passwd), u.lock)
    accounts.save()  # the accounts exist before their homes and keys are made
    for u in specs:
        if u.name in homes and u.create_home:
            _make_home(ctx, homes[u.name], accounts.uid_gid(u.name))
        if u.ssh_authorized_keys:
            add_authorized_keys(ctx, accounts, u.name, u.ssh_authorized_keys)


def add_authorized_keys(ctx: Context, accounts: Accounts, user: str, keys: list[str]) -> None:
    """Append the keys not already there to ~user/.ssh/authorized_keys (0600, the user's)."""
    owner = accounts.uid_gid(user)
    ssh_dir = f"{accounts.home(user).rstrip('/')}/.ssh"
    current = ctx.read_text(f"{ssh_dir}/authorized_keys").splitlines()
    new = [k.strip() for k in keys if k.strip() and k.strip() not in current]
    new = list(dict.fromkeys(new))
    if not new and ctx.path(f"{ssh_dir}/authorized_keys").exists():
        return
    ctx.mkdir(ssh_dir, 0o700, owner)
    data = "".join(f"{line}\n" for line in [*current, *new]).encode()
    ctx.write(f"{ssh_dir}/authorized_keys", data, mode=0o600, owner=owner)
    log.info("%d key(s) added for %s", len(new), user)


def parse_authorized_keys(value: Any, where: str) -> dict[str, list[str]]:
    spec = mapping(value, where)
    return {user: str_list(keys, f"{where}.{user}") for user, keys in spec.items()}


def apply_authorized_keys(spec: dict[str, list[str]], ctx: Context) -> None:
    accounts = Accounts.load(ctx)
    for user, keys in spec.items():
        add_authorized_keys(ctx, accounts, user, keys)
