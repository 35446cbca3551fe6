"""The target's /etc/passwd, group, shadow and gshadow, read and written directly.

No useradd/chpasswd/usermod: minimal images lack them (cOS #165), and in a scratch root
they would edit the host. Each file is a list of colon-separated records; writing keeps
the files' modes and owners (Context.write) and replaces each file atomically."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..system import CosError
from .context import Context

FIRST_UID = 1000
LAST_UID = 59999
FIELDS = {"/etc/passwd": 7, "/etc/group": 4, "/etc/shadow": 9, "/etc/gshadow": 4}


@dataclass
class Table:
    path: str
    rows: list[list[str]] = field(default_factory=list)
    exists: bool = True
    changed: bool = False

    def get(self, name: str) -> list[str] | None:
        return next((r for r in self.rows if r and r[0] == name), None)

    def add(self, row: list[str]) -> list[str]:
        self.rows.append(row)
        self.changed = True
        return row

    def set(self, row: list[str], index: int, value: str) -> None:
        if row[index] != value:
            row[index] = value
            self.changed = True


def _read(ctx: Context, path: str) -> Table:
    target = ctx.path(path)
    if not target.exists():
        return Table(path, exists=False)
    width = FIELDS[path]
    rows = []
    for line in target.read_text().splitlines():
        if line.strip():
            row = line.split(":")
            rows.append(row + [""] * (width - len(row)))
    return Table(path, rows)


@dataclass
class Accounts:
    ctx: Context
    passwd: Table
    group: Table
    shadow: Table
    gshadow: Table

    @classmethod
    def load(cls, ctx: Context) -> Accounts:
        tables = [_read(ctx, p) for p in FIELDS]
        if not tables[0].exists:
            raise CosError(f"{ctx.path('/etc/passwd')} does not exist", "is the root a full OS tree?")
        return cls(ctx, *tables)

    def save(self) -> None:
        """Write the changed tables, passwd last: cut off midway, a user exists only with
        its shadow entry and groups in place (orphan shadow/group lines are harmless).
        A shadow file made new is 0600; existing files keep mode and owner."""
        for table in (self.shadow, self.gshadow, self.group, self.passwd):
            if not table.changed or (not table.exists and table.path == "/etc/gshadow"):
                continue
            mode = None if table.exists else (0o600 if "shadow" in table.path else 0o644)
            data = "".join(":".join(r) + "\n" for r in table.rows).encode()
            self.ctx.write(table.path, data, mode=mode)
            table.changed = False

    # -- look-ups ------------------------------------------------------------------------
    def user(self, name: str) -> list[str] | None:
        return self.passwd.get(name)

    def uid_gid(self, name: str) -> tuple[int, int]:
        row = self.user(name)
        if row is None:
            raise CosError(f"user '{name}' does not exist in {self.ctx.path('/etc/passwd')}",
                           "create it with a `users` step before this one")
        return int(row[2]), int(row[3])

    def gid(self, name: str) -> int:
        row = self.group.get(name)
        if row is None:
            raise CosError(f"group '{name}' does not exist in {self.ctx.path('/etc/group')}")
        return int(row[2])

    def home(self, name: str) -> str:
        row = self.user(name)
        if row is None:
            raise CosError(f"user '{name}' does not exist in {self.ctx.path('/etc/passwd')}")
        return row[5] or "/"

    def _free_id(self, table: Table, column: int, wanted: int | None = None) -> int:
        used = {int(r[column]) for r in table.rows if r[column].isdigit()}
        if wanted is not None and wanted not in used:
            return wanted
        return max((u for u in used if FIRST_UID <= u <= LAST_UID), default=FIRST_UID - 1) + 1

    # -- changes -------------------------------------------------------------------------
    def add_group(self, name: str, gid: int | None = None) -> int:
        new_gid = self._free_id(self.group, 2, gid)
        self.group.add([name, "x", str(new_gid), ""])
        if self.gshadow.exists:
            self.gshadow.add([name, "!", "", ""])
        return new_gid

    def add_member(self, group: str, user: str) -> None:
        """Append (never replace) `user` to the group's member list (yip 0.9 replaced it)."""
        for table, column in ((self.group, 3), (self.gshadow, 3)):
            row = table.get(group)
            if row is None:
                continue
            members = [m for m in row[column].split(",") if m]
            if user not in members:
                table.set(row, column, ",".join([*members, user]))

    def add_user(self, name: str, uid: int | None, gid: int, home: str, shell: str, gecos: str = "") -> int:
        new_uid = self._free_id(self.passwd, 2, uid)
        if uid is not None and new_uid != uid:
            raise CosError(f"uid {uid} for user '{name}' is already taken")
        self.passwd.add([name, "x", str(new_uid), str(gid), gecos, home, shell])
        self.shadow.add([name, "!", str(int(time.time() // 86400)), "0", "99999", "7", "", "", ""])
        return new_uid

    def set_password(self, name: str, hashed: str | None, lock: bool) -> None:
        row = self.shadow.get(name)
        if row is None:
            row = self.shadow.add([name, "!", "", "0", "99999", "7", "", "", ""])
        value = row[1] if hashed is None else hashed
        if lock and not value.startswith("!"):
            value = "!" + value
        self.shadow.set(row, 1, value)
        if hashed is not None:
            self.shadow.set(row, 2, str(int(time.time() // 86400)))
        passwd_row = self.user(name)
        if passwd_row is not None:
            self.passwd.set(passwd_row, 1, "x")
