"""The one place that reads environment variables: each one we use is listed in VARS with
the parser that checks and types it. `check()` runs when the configuration loads (dodo.py),
so a bad value stops everything before any work, with one short message per variable
that names it, shows the value shortened (a secret never) and says what to do.

It lives in the bottom layer because both pipeline/ and cloud/ read settings
(pipeline.config re-exports it). `redact()` removes the values of the secret variables
(and SAS signatures, GCP private keys) from any text: pipeline.log's filter and the
doit error conversion pass every log line and exception message through it.
"""
from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import HintedError

SHOWN = 80  # characters of a bad value shown in a message


class EnvError(HintedError):
    """An environment variable holds a value we cannot use; raised before any work."""


def shorten(value: object, limit: int = SHOWN) -> str:
    """repr(value), cut to `limit` characters: a message stays short whatever the input."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


# ---- parsers: str -> typed value, ValueError(what is wrong) otherwise ----

def _text(value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("holds a control character (newline, tab, ...)")
    if len(value) > 4096:
        raise ValueError(f"is {len(value)} characters long (at most 4096)")
    return value


def _secret(value: str) -> str:
    if re.search(r"[\s\x00-\x1f\x7f]", value):
        raise ValueError("holds whitespace or a control character (a newline?); value not shown")
    if len(value) > 4096:
        raise ValueError(f"is {len(value)} characters long (at most 4096); value not shown")
    return value


def _flag(value: str) -> bool:
    low = value.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("", "0", "false", "no", "off"):
        return False
    raise ValueError("is not a flag: use 1 or 0")


def _int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        if not re.fullmatch(r"[0-9]{1,19}", value.strip()):
            raise ValueError("is not a whole number")
        number = int(value)
        if not lo <= number <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return number
    return parse


def _choice(*options: str, fold: bool = False) -> Callable[[str], str]:
    def parse(value: str) -> str:
        v = value.strip().upper() if fold else value.strip()
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return v
    return parse


def _path(value: str) -> Path:
    return Path(_text(value.strip()))


def _directory(value: str) -> Path:
    path = _path(value)
    if not path.is_dir():
        raise ValueError("is not an existing directory")
    return path.resolve()


HOST_PORT_RE = re.compile(r"(?=[^:]{1,253}(:|$))[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                          r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*(:(?P<port>[0-9]{1,5}))?")


def host_port(value: str) -> str:
    """`host[:port]` of a registry: a DNS name or IPv4 address, a port in 1..65535."""
    m = HOST_PORT_RE.fullmatch(value.strip())
    if not m or (m["port"] is not None and not 1 <= int(m["port"]) <= 65535):
        raise ValueError("is not host[:port] (e.g. 127.0.0.1:5000)")
    return value.strip()


def registry(value: str) -> str:
    """`host[:port][/namespace]`: where OS images are pushed (a namespace such as a GitHub
    owner on registries that need one; the image's repository goes below it)."""
    address, _, namespace = value.strip().partition("/")
    try:
        host_port(address)
    except ValueError:
        raise ValueError("is not host[:port][/namespace] (e.g. 127.0.0.1:5000)") from None
    if namespace and not re.fullmatch(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*", namespace):
        raise ValueError("has a namespace that is not lower-case path words (e.g. host/my-org)")
    return value.strip()


def url(value: str, schemes: tuple[str, ...] = ("https", "http")) -> str:
    """An absolute URL with one of `schemes` and a host (no spaces or control characters)."""
    v = _text(value.strip())
    m = re.fullmatch(r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<host>[^/\s?#]*)[^\s]*", v)
    if not m or m["scheme"] not in schemes or (not m["host"] and m["scheme"] != "file"):
        raise ValueError(f"is not a URL starting with {' or '.join(s + '://' for s in schemes)}")
    return v.rstrip("/")


def _mirror(value: str) -> str:
    return url(value, ("http", "https", "file"))


def _repository(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}", value.strip()):
        raise ValueError("is not owner/name (letters, digits, - . _)")
    return value.strip()


def _uuid(value: str) -> str:
    if not re.fullmatch(r"[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}", value.strip()):
        raise ValueError("is not a subscription id (a UUID)")
    return value.strip()



@dataclass(frozen=True)
class Var:
    name: str
    parse: Callable[[str], Any]
    hint: str
    secret: bool = False


VARS: dict[str, Var] = {v.name: v for v in [
    Var("COS_BUILD_DIR", _path, "a directory path for the build outputs"),
    Var("COS_FLAVORS_DIR", _directory, "point it at a directory holding defaults.yaml and <flavor>/flavor.yaml"),
    Var("COS_VERSION", _text, "e.g. 1.2.3 or v1.2.3 (its format: pipeline.version)"),
    Var("COS_REGISTRY", registry, "a registry as host[:port][/namespace], e.g. 127.0.0.1:5000"),
    Var("COS_REGISTRY_USERNAME", _text, "the user name the registry knows (with COS_REGISTRY_PASSWORD)"),
    Var("COS_REGISTRY_PASSWORD", _secret, "the registry password or token, on one line", secret=True),
    Var("COS_DEBIAN_MIRROR", _mirror, "e.g. http://<mirror host>/debian"),
    # 1980 (FAT, ISO dates) .. 2099: outside, mkfs and xorriso fail late or wrap around
    Var("SOURCE_DATE_EPOCH", _int(315532800, 4102444799), "seconds since 1970, e.g. $(git log -1 --format=%ct)"),
    Var("COS_DOCKER_NO_CACHE", _flag, "1 builds without docker's layer cache"),
    Var("COS_LOG", _choice("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", fold=True), "e.g. COS_LOG=DEBUG"),
    Var("COS_GRUB_LIB", _path, "the directory holding grub's i386-pc and x86_64-efi modules"),
    Var("COS_ARCH", _choice("x86_64", "arm64"), "the arch of the build to release"),
    Var("DOCKER_HOST", _text, "e.g. unix:///var/run/docker.sock"),
    Var("COS_PUBLISH_DRY_RUN", _flag, "1 shows the publishing plan only"),
    Var("COS_RELEASE_REPLACE", _flag, "1 overwrites release assets that differ"),
    Var("COS_RELEASE_MAX_ASSET_BYTES", _int(2, 2 * 1024 ** 3), "a byte count (GitHub: below 2 GiB)"),
    Var("GITHUB_API_URL", url, "the REST API root, with its scheme (GitHub Actions sets it)"),
    Var("GITHUB_REPOSITORY", _repository, "owner/name (GitHub Actions sets it)"),
    Var("GITHUB_TOKEN", _secret, "a token with contents: write, without spaces or newlines", secret=True),
    Var("AZURE_SUBSCRIPTION_ID", _uuid, "the subscription's id, e.g. from `az account show`"),
    Var("COS_AZURE_ARM_ENDPOINT", url, "the ARM endpoint URL (tests only)"),
    Var("COS_GCP_COMPUTE_ENDPOINT", url, "the Compute API endpoint URL (tests only)"),
    Var("AZURE_STORAGE_CONNECTION_STRING", _secret, "the account's connection string, on one line", secret=True),
    # read by the SDKs themselves; checked here so a bad one fails first, and redacted
    Var("AWS_SECRET_ACCESS_KEY", _secret, "the key as AWS shows it, without spaces or newlines", secret=True),
    Var("AWS_SESSION_TOKEN", _secret, "the session token, without spaces or newlines", secret=True),
    Var("AZURE_CLIENT_SECRET", _secret, "the client secret, without spaces or newlines", secret=True),
    Var("GOOGLE_APPLICATION_CREDENTIALS", _path, "the path of a service account key (JSON)"),
]}


def raw(name: str) -> str | None:
    """The variable as set (None when unset or blank), unchecked: for passing it on."""
    value = os.environ.get(name)
    return value if value is not None and value.strip() else None


def get(name: str) -> Any:
    """The checked, typed value of a variable of VARS; None when unset or blank."""
    var = VARS[name]
    value = raw(name)
    if value is None:
        return None
    try:
        return var.parse(value)
    except ValueError as exc:
        raise EnvError(problem(var, value, str(exc)), var.hint) from None


def flag(name: str) -> bool:
    return bool(get(name))


def problem(var: Var, value: str, what: str) -> str:
    shown = "" if var.secret else f"={shorten(value)}"
    return f"${var.name}{shown} {what}"


def check() -> None:
    """Every variable of VARS that is set, checked at once; one EnvError lists each bad one."""
    bad = []
    for var in VARS.values():
        value = raw(var.name)
        if value is None:
            continue
        try:
            var.parse(value)
        except ValueError as exc:
            bad.append((problem(var, value, str(exc)), var.hint))
    if len(bad) == 1:
        raise EnvError(*bad[0])
    if bad:
        raise EnvError("bad environment variables:\n  - " + "\n  - ".join(f"{m} ({h})" for m, h in bad),
                       "fix or unset them; nothing was done")


def child(**extra: str) -> dict[str, str]:
    """The environment for a subprocess: ours plus `extra`."""
    return {**os.environ, **extra}


# ---- redaction ----

SAS_RE = re.compile(r"(?i)([?&](?:sig|se?ssion_?token|x-amz-security-token|x-amz-signature)=)[^&\s'\"<>]+")
PRIVATE_KEY_RE = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S)
MASK = "***"


def secret_values() -> tuple[str, ...]:
    """The values to hide: each secret variable as set, its escaped forms and, for a value
    with whitespace in it, each longer piece (a log may show it split or repr'd).
    Cached by the variables' values: redact() runs for every log line."""
    return _secret_values(tuple(os.environ.get(v.name) for v in VARS.values() if v.secret),
                          raw("GOOGLE_APPLICATION_CREDENTIALS"))


@functools.lru_cache(maxsize=16)
def _secret_values(values: tuple[str | None, ...], gcp_key_file: str | None) -> tuple[str, ...]:
    out: set[str] = set()
    for value in values:
        if not value or len(value.strip()) < 4:
            continue
        out |= {value, value.strip(), value.encode("unicode_escape").decode(), json.dumps(value)[1:-1]}
        out |= {piece for piece in value.split() if len(piece) >= 6}
        out |= {part for part in re.split(r"[;,]", value) if "=" in part and len(part) >= 12
                and part.split("=", 1)[0].strip().lower() in ("accountkey", "sharedaccesssignature")}
    out |= _gcp_key_secrets(gcp_key_file)
    return tuple(sorted((v for v in out if len(v) >= 4), key=len, reverse=True))


def _gcp_key_secrets(path: str | None) -> set[str]:
    """The private key (and its id) in the file $GOOGLE_APPLICATION_CREDENTIALS names."""
    try:
        data = json.loads(Path(path).read_text()) if path else {}
    except (OSError, ValueError):
        return set()
    if not isinstance(data, dict):
        return set()
    return {str(data[k]) for k in ("private_key", "private_key_id", "refresh_token", "client_secret")
            if isinstance(data.get(k), str) and len(data[k]) >= 8}


def redact(text: str) -> str:
    """`text` without any secret value, SAS signature or private key block."""
    for value in secret_values():
        text = text.replace(value, MASK)
    text = PRIVATE_KEY_RE.sub(MASK, text)
    return SAS_RE.sub(lambda m: m.group(1) + MASK, text)
