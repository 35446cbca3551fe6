"""The GRUB environment block (`/grubenv` on COS_OEM): what `load_env`/`save_env` read.

Format (grub-core/lib/envblk.c): exactly 1024 bytes, the header line
"# GRUB Environment Block", then `key=value` lines, padded with '#'. In values GRUB
escapes '\\' and newline with a backslash. GRUB's save_env rewrites the file's blocks in
place, so the file must stay exactly 1024 bytes; we replace it atomically (a new inode is
fine: GRUB finds the blocks afresh on every boot).
"""
from __future__ import annotations

from pathlib import Path

from ..system import CosError, write_atomic
from .durable import fsync_dir

SIZE = 1024
HEADER = "# GRUB Environment Block\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\\n")


def _unescape(value: str) -> str:
    out, it = [], iter(value)
    for c in it:
        out.append(next(it, "") if c == "\\" else c)
    return "".join(out)


def parse(data: bytes, where: str = "grubenv") -> dict[str, str]:
    if len(data) != SIZE or not data.startswith(HEADER.encode()):
        raise CosError(f"{where} is not a GRUB environment block ({len(data)} bytes)",
                       f"remove it or recreate it with: grub-editenv {where} create")
    text = data[len(HEADER):].decode(errors="replace")
    entries: dict[str, str] = {}
    # A line ends at a newline not escaped by a backslash; '#' padding and comments are skipped.
    line: list[str] = []
    escaped = False
    for c in text:
        if c == "\n" and not escaped:
            _add_line("".join(line), entries)
            line = []
            continue
        escaped = c == "\\" and not escaped
        line.append(c)
    _add_line("".join(line), entries)
    return entries


def _add_line(line: str, entries: dict[str, str]) -> None:
    if line and not line.startswith("#") and "=" in line:
        key, value = line.split("=", 1)
        entries[key] = _unescape(value)


def encode(entries: dict[str, str]) -> bytes:
    for key in entries:
        if not key or "=" in key or "\n" in key or key.startswith("#"):
            raise CosError(f"invalid GRUB environment variable name {key!r}")
    body = (HEADER + "".join(f"{k}={_escape(v)}\n" for k, v in entries.items())).encode()
    if len(body) > SIZE:
        raise CosError(f"GRUB environment entries take {len(body)} bytes, the block holds {SIZE}",
                       "drop unused variables from grubenv")
    return body + b"#" * (SIZE - len(body))


def read(path: Path) -> dict[str, str]:
    """The block's entries; {} when the file does not exist yet."""
    try:
        return parse(path.read_bytes(), str(path))
    except FileNotFoundError:
        return {}


def update(path: Path, **changes: str | None) -> dict[str, str]:
    """Set (or, with None, remove) variables, keeping the others; atomic. Returns the new entries."""
    entries = read(path)
    for key, value in changes.items():
        if value is None:
            entries.pop(key, None)
        else:
            entries[key] = value
    write_atomic(path, encode(entries), mode=0o644)
    fsync_dir(path.parent)
    return entries

