"""The typed flavor model.

Defaults live in one place, flavors/defaults.yaml; flavors/<name>/flavor.yaml states
only what differs. Both are merged, then validated; a bad file gives one
ConfigError naming the file, each bad field and what is allowed.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cloud.targets import CloudTargets
from core import env

from .errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
FLAVORS_DIR = REPO_ROOT / "flavors"  # $COS_FLAVORS_DIR overrides (see flavors_dir())
PACKAGES_DIR = REPO_ROOT / "packages"
DEFAULTS_FILE = "defaults.yaml"
FLAVOR_FILE = "flavor.yaml"

NAME_RE = r"^[a-z][a-z0-9-]*$"
LABEL_RE = r"^[A-Z0-9_]{1,16}$"  # ext4 labels hold 16 bytes; FAT (efi) 11, checked below


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Bootstrap(StrictModel):
    """How to make the base image when it cannot be pulled (Debian-family only)."""
    tool: Literal["mmdebstrap"] = "mmdebstrap"
    suite: str
    variant: Literal["minbase", "essential", "apt", "required", "important", "standard"] = "minbase"
    mirror: str | None = Field(None, description="default: read from the host's apt sources")
    components: list[str] = ["main"]
    include: list[str] = []


class BaseImage(StrictModel):
    ref: str = Field(description="image reference to pull, e.g. debian:bookworm")
    bootstrap: Bootstrap | None = None


class ImageOptions(StrictModel):
    repository: str = Field(pattern=r"^[a-z0-9]+([._/-][a-z0-9]+)*$")
    registry: str | None = Field(None, description="host[:port] to push to; $COS_REGISTRY overrides")
    build_args: dict[str, str] = {}


class SquashfsOptions(StrictModel):
    compression: Literal["zstd", "xz", "gzip", "lz4"]
    level: int | None = Field(None, ge=1, le=22)
    block_size: Literal["128K", "256K", "512K", "1M"]

    @property
    def block_bytes(self) -> int:
        return int(self.block_size[:-1]) * (1024 * 1024 if self.block_size.endswith("M") else 1024)


class Partition(StrictModel):
    label: str = Field(pattern=LABEL_RE)
    size_mib: int = Field(ge=0, description="0 means: the rest of the disk")


class DiskLayout(StrictModel):
    bios_boot_mib: int = Field(ge=1)
    efi: Partition
    oem: Partition
    recovery: Partition
    state: Partition
    persistent: Partition

    @field_validator("efi")
    @classmethod
    def _fat_label(cls, efi: Partition) -> Partition:
        if len(efi.label) > 11:
            raise ValueError(f"a FAT label has at most 11 characters, '{efi.label}' has {len(efi.label)}")
        return efi


class BootOptions(StrictModel):
    live_label: str = Field(pattern=LABEL_RE)
    cmdline: str


class Flavor(StrictModel):
    name: str = Field(pattern=NAME_RE)
    description: str
    distro: Literal["opensuse", "fedora", "ubuntu", "debian"]
    version: str = Field(pattern=r"^[0-9]+\.[0-9]+\.[0-9]+([.+~-][0-9A-Za-z.+~-]+)?$")
    arch: Literal["x86_64", "arm64"]
    base: BaseImage
    packages: list[str] = Field(min_length=1)
    image: ImageOptions
    squashfs: SquashfsOptions
    boot: BootOptions
    disk: DiskLayout
    clouds: CloudTargets = CloudTargets()

    @field_validator("packages")
    @classmethod
    def _packages_exist(cls, names: list[str]) -> list[str]:
        missing = [n for n in names if not (PACKAGES_DIR / n).is_dir()]
        if missing:
            have = ", ".join(sorted(p.name for p in PACKAGES_DIR.iterdir() if p.is_dir()))
            raise ValueError(f"no such package {missing} under packages/ (have: {have})")
        return names

    @property
    def registry(self) -> str | None:
        registry: str | None = env.get("COS_REGISTRY")
        return registry or self.image.registry


@dataclass(frozen=True)
class FlavorPaths:
    """Where a flavor's inputs and outputs live; the one place that knows."""
    flavor: Flavor
    root: Path = REPO_ROOT

    @property
    def source(self) -> Path:
        return flavors_dir() / self.flavor.name

    @property
    def dockerfile(self) -> Path:
        return self.source / "Dockerfile"

    @property
    def build(self) -> Path:
        return build_root(self.root) / self.flavor.name

    @property
    def manifest(self) -> Path:
        return self.build / "manifest.json"

    def state(self, stage: str) -> Path:
        """A stage's small JSON record (ids, digests) that later stages depend on."""
        return self.build / f"{stage}.json"

    @property
    def common_dockerfiles(self) -> tuple[Path, Path]:
        """The head and tail every flavor's Dockerfile is wrapped in (see image.compose)."""
        common = flavors_dir() / "common"
        return common / "head.Dockerfile", common / "tail.Dockerfile"

    @cached_property
    def context_files(self) -> list[Path]:
        """Every input of the docker build, sorted (flavor.yaml is config, not context)."""
        return sorted([*self.common_dockerfiles,
                       *(p for p in self.source.rglob("*") if p.is_file() and p.name != FLAVOR_FILE)])


@dataclass(frozen=True)
class FlavorContext:
    """The single argument of every stage: the flavor, where its files are, the version
    it carries (one per doit run; see graph.contexts)."""
    flavor: Flavor
    paths: FlavorPaths
    version: str

    @property
    def name(self) -> str:
        return self.flavor.name

    def task(self, stage: str) -> str:
        return f"build-{self.name}:{stage}"


def flavors_dir() -> Path:
    return Path(env.get("COS_FLAVORS_DIR") or FLAVORS_DIR).resolve()


def build_root(root: Path = REPO_ROOT) -> Path:
    return Path(env.get("COS_BUILD_DIR") or root / "build").resolve()


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{_rel(path)}: file not found",
                          "every flavor directory needs a flavor.yaml") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        raise ConfigError(f"{_rel(path)}{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{_rel(path)}: expected a mapping of fields at the top level, "
                          f"got {type(data).__name__}")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge mappings; lists and scalars in `over` replace those in `base`."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _has_path(data: Any, loc: tuple[Any, ...]) -> bool:
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return False
    return True


def _field_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc`, to list allowed names."""
    model: Any = Flavor
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        ann = field.annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type)]
        model = ann if isinstance(ann, type) else (args[0] if args else None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _describe(err: Mapping[str, Any]) -> str:
    loc = tuple(p for p in err["loc"] if not isinstance(p, str) or not p.startswith("function-"))
    field = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        model = _field_model(loc)
        allowed = sorted(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        guess = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{field}: unknown field{guess}; allowed here: {', '.join(allowed)}"
    got = err.get("input")
    shown = "" if err["type"] == "missing" or isinstance(got, dict) else f" (got {got!r})"
    return f"{field}: {err['msg']}{shown}"


def load_flavor(name: str, directory: Path | None = None) -> Flavor:
    directory = directory or flavors_dir()
    defaults_path = directory / DEFAULTS_FILE
    flavor_path = directory / name / FLAVOR_FILE
    defaults = _read_yaml(defaults_path)
    own = _read_yaml(flavor_path)
    if "name" in own:
        raise ConfigError(f"{_rel(flavor_path)}: name: the flavor's name is its directory "
                          f"name ('{name}'); remove the field")
    try:
        flavor = Flavor.model_validate(_merge(defaults, own) | {"name": name})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            origin = flavor_path if _has_path(own, err["loc"]) or not _has_path(defaults, err["loc"]) \
                else defaults_path
            problems.append(f"{_rel(origin)}: {_describe(err)}")
        raise ConfigError(f"invalid flavor '{name}':\n  - " + "\n  - ".join(problems),
                          f"fix the field(s) above in {_rel(flavor_path)}; nothing was built") from None
    if not (directory / name / "Dockerfile").is_file():
        raise ConfigError(f"{_rel(directory / name)}: no Dockerfile",
                          "each flavor directory needs a Dockerfile beside flavor.yaml")
    return flavor


def flavor_names(directory: Path | None = None) -> list[str]:
    directory = directory or flavors_dir()
    return sorted(p.parent.name for p in directory.glob(f"*/{FLAVOR_FILE}")
                  if re.match(NAME_RE, p.parent.name))


def load_all(directory: Path | None = None) -> list[Flavor]:
    return [load_flavor(n, directory) for n in flavor_names(directory)]


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
