"""`files` and `directories`."""
from __future__ import annotations

import base64
import binascii
import gzip
from dataclasses import dataclass
from typing import Any

from ..accounts import Accounts
from ..context import Context
from ..spec import SpecError, mapping, mode, opt_string, string

ENCODINGS = {"": (), "b64": ("b64",), "base64": ("b64",), "gz": ("gz",), "gzip": ("gz",),
             "gz+b64": ("b64", "gz"), "gzip+base64": ("b64", "gz"), "gz+base64": ("b64", "gz"),
             "gzip+b64": ("b64", "gz")}
OWNER_KEYS = {"owner", "group", "ownerstring"}


@dataclass(frozen=True)
class Owner:
    user: str | None = None   # a name or a numeric id, resolved in the target's /etc/passwd
    group: str | None = None

    def resolve(self, ctx: Context) -> tuple[int, int] | None:
        if self.user is None and self.group is None:
            return None
        accounts = Accounts.load(ctx)
        uid, gid = 0, 0
        if self.user is not None:
            uid, gid = (int(self.user), gid) if self.user.isdigit() else accounts.uid_gid(self.user)
        if self.group is not None:
            gid = int(self.group) if self.group.isdigit() else accounts.gid(self.group)
        return uid, gid


def parse_owner(spec: dict[str, Any], where: str) -> Owner:
    user, group = opt_string(spec.get("owner"), f"{where}.owner"), opt_string(spec.get("group"), f"{where}.group")
    ownerstring = opt_string(spec.get("ownerstring"), f"{where}.ownerstring")
    if ownerstring:
        u, _, g = ownerstring.partition(":")
        user, group = u or user, g or group
    return Owner(user, group)


@dataclass(frozen=True)
class FileSpec:
    path: str
    content: bytes
    permissions: int | None
    owner: Owner


def _path(value: Any, where: str) -> str:
    path = string(value, where)
    if not path.startswith("/"):
        raise SpecError(f"{where}: '{path}' is not an absolute path")
    if ".." in path.split("/"):
        raise SpecError(f"{where}: '{path}' contains '..'")  # it could leave the target root
    return path


def decode(content: str, encoding: str, where: str) -> bytes:
    if encoding not in ENCODINGS:
        raise SpecError(f"{where}.encoding: unknown encoding '{encoding}' (known: {', '.join(sorted(ENCODINGS)[1:])})")
    data = content.encode()
    try:
        for layer in ENCODINGS[encoding]:
            data = base64.b64decode(data, validate=False) if layer == "b64" else gzip.decompress(data)
    except (binascii.Error, OSError, EOFError) as exc:
        raise SpecError(f"{where}.content: not valid {encoding}: {exc}") from None
    return data


def parse_files(value: Any, where: str) -> list[FileSpec]:
    if not isinstance(value, list):
        raise SpecError(f"{where}: expected a list of files")
    out = []
    for i, item in enumerate(value):
        w = f"{where}[{i}]"
        spec = mapping(item, w, {"path", "content", "encoding", "permissions"} | OWNER_KEYS, ("path",))
        content = "" if spec.get("content") is None else string(spec["content"], f"{w}.content")
        out.append(FileSpec(_path(spec["path"], f"{w}.path"),
                            decode(content, opt_string(spec.get("encoding"), f"{w}.encoding") or "", w),
                            mode(spec.get("permissions"), f"{w}.permissions"), parse_owner(spec, w)))
    return out


def apply_files(specs: list[FileSpec], ctx: Context) -> None:
    for f in specs:
        exists = ctx.path(f.path).exists()
        ctx.write(f.path, f.content, mode=f.permissions if f.permissions is not None or exists else 0o644,
                  owner=f.owner.resolve(ctx))


@dataclass(frozen=True)
class DirSpec:
    path: str
    permissions: int | None
    owner: Owner


def parse_directories(value: Any, where: str) -> list[DirSpec]:
    if not isinstance(value, list):
        raise SpecError(f"{where}: expected a list of directories")
    out = []
    for i, item in enumerate(value):
        w = f"{where}[{i}]"
        spec = mapping(item, w, {"path", "permissions"} | OWNER_KEYS, ("path",))
        out.append(DirSpec(_path(spec["path"], f"{w}.path"), mode(spec.get("permissions"), f"{w}.permissions"),
                           parse_owner(spec, w)))
    return out


def apply_directories(specs: list[DirSpec], ctx: Context) -> None:
    for d in specs:
        ctx.mkdir(d.path, d.permissions, d.owner.resolve(ctx))
