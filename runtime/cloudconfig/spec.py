"""Small validators for the YAML values of step keys: each raises SpecError naming the
key path (e.g. "files[1].permissions") and what was expected, so a typo in a user's
file becomes one clear line instead of a traceback."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class SpecError(Exception):
    """A value in a cloud-config document has the wrong shape."""


def mapping(value: Any, where: str, allowed: set[str] | None = None,
            required: tuple[str, ...] = ()) -> dict[str, Any]:
    """`value` as a dict with string keys; unknown keys (when `allowed` is given) and
    missing required keys are errors that name the key."""
    if not isinstance(value, Mapping):
        raise SpecError(f"{where}: expected a mapping, got {type_name(value)}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise SpecError(f"{where}: key {key!r} is not a string")
        if allowed is not None and key not in allowed:
            raise SpecError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(allowed))})")
        out[key] = item
    for key in required:
        if key not in out:
            raise SpecError(f"{where}: missing required key '{key}'")
    return out


def string(value: Any, where: str) -> str:
    """A scalar as a string (YAML turns `hostname: 1234` into an int; that is still a name)."""
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise SpecError(f"{where}: expected a string, got {type_name(value)}")
    return str(value)


def opt_string(value: Any, where: str) -> str | None:
    return None if value is None else string(value, where)


def str_list(value: Any, where: str, comma: bool = False) -> list[str]:
    """A list of strings; a single string is a one-item list (or split at commas)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()] if comma else [value]
    if not isinstance(value, list):
        raise SpecError(f"{where}: expected a list of strings, got {type_name(value)}")
    return [string(v, f"{where}[{i}]") for i, v in enumerate(value)]


def boolean(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "false", "no"):
        return value.lower() in ("true", "yes")
    raise SpecError(f"{where}: expected true or false, got {value!r}")


def integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SpecError(f"{where}: expected an integer, got {type_name(value)}")
    try:
        return int(value)
    except ValueError:
        raise SpecError(f"{where}: expected an integer, got {value!r}") from None


def mode(value: Any, where: str) -> int | None:
    """File permissions: YAML's 0644 is already the octal int; a string is read as octal."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            bits = int(value, 8)
        except ValueError:
            raise SpecError(f"{where}: expected octal permissions like 0644, got {value!r}") from None
    else:
        bits = integer(value, where)
    if not 0 <= bits <= 0o7777:
        raise SpecError(f"{where}: permissions {value!r} out of range (0000-7777 octal)")
    return bits


def type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(
        type(value), type(value).__name__)
