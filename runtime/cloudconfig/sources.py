"""Where documents come from, in the order they run: the config directories, a
`cos.setup=` path or URL from the kernel command line, then the datasource's user-data."""
from __future__ import annotations

import shlex
import urllib.error
import urllib.request
from pathlib import Path

from .cloudinit import convert
from .schema import Document, load_yaml, parse_document
from .spec import SpecError

CONFIG_DIRS = ("/system/oem", "/oem", "/usr/local/cloud-config")
SUFFIXES = (".yaml", ".yml")
URL_TIMEOUT = 10.0


def parse_text(text: str, source: str) -> Document | None:
    """One user-provided text: `#cloud-config`, a yip document, or nothing (empty)."""
    stripped = text.lstrip()
    if not stripped:
        return None
    if stripped.startswith("#cloud-config"):
        try:
            return convert(load_yaml(text, source), source)
        except SpecError as exc:
            return Document(source, "#cloud-config", errors=[str(exc)])
    if stripped.startswith("#!"):
        return Document(source, errors=["user-data is a script (#!): not supported, give a cloud-config"])
    return parse_document(text, source)


def read_file(path: Path, shown: str) -> Document | None:
    try:
        return parse_text(path.read_text(), shown)
    except (OSError, UnicodeDecodeError) as exc:
        return Document(shown, errors=[f"cannot read: {exc}"])


def dir_documents(root: Path, directory: str) -> list[Document]:
    """A directory's *.yaml/*.yml in lexical order (a missing directory has none)."""
    base = root / directory.lstrip("/")
    if not base.is_dir():
        return []
    files = sorted(p for p in base.iterdir() if p.suffix in SUFFIXES and p.is_file())
    return [d for p in files if (d := read_file(p, f"{directory.rstrip('/')}/{p.name}")) is not None]


def cmdline_args(cmdline: str) -> dict[str, str]:
    try:
        words = shlex.split(cmdline)
    except ValueError:
        words = cmdline.split()
    return {k: v for k, _, v in (w.partition("=") for w in words)}


def fetch_url(url: str) -> Document | None:
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT) as resp:  # noqa: S310 (the user's own URL)
            return parse_text(resp.read().decode(), url)
    except (urllib.error.URLError, OSError, UnicodeDecodeError) as exc:
        return Document(url, errors=[f"cannot fetch cos.setup={url}: {getattr(exc, 'reason', exc)}"])


def cmdline_documents(root: Path, cmdline: str) -> list[Document]:
    """`cos.setup=` from the kernel command line: an http(s) URL, or a file or directory
    of the target (file:// accepted)."""
    value = cmdline_args(cmdline).get("cos.setup")
    if not value:
        return []
    if value.startswith(("http://", "https://")):
        doc = fetch_url(value)
        return [doc] if doc else []
    path = value.removeprefix("file://")
    target = root / path.lstrip("/")
    if target.is_dir():
        return dir_documents(root, path)
    if not target.exists():
        return [Document(f"cos.setup={value}", errors=[f"{path} does not exist"])]
    doc = read_file(target, path)
    return [doc] if doc else []


def local_documents(root: Path, cmdline: str) -> list[Document]:
    docs = [d for directory in CONFIG_DIRS for d in dir_documents(root, directory)]
    return docs + cmdline_documents(root, cmdline)
