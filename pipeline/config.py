"""The typed flavor model.

Defaults live in one place, flavors/defaults.yaml; flavors/<name>/flavor.yaml states
only what differs. Both are merged, then validated; a bad file gives one
ConfigError naming the file, each bad field and what is allowed.

Everything is checked here, before anything is built: strict types (no bool for a
number), bounds, formats of names, a kernel command line GRUB cannot misread; the
files themselves must be regular UTF-8 YAML of bounded size and alias expansion,
without duplicate keys, and a flavor's Dockerfile and overlay must lie inside it.
Environment variables are read and checked in one place, core.env (re-exported here).
"""
from __future__ import annotations

import difflib
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from cloud.targets import CloudTargets
from core import env
from core.env import shorten

from .errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
FLAVORS_DIR = REPO_ROOT / "flavors"  # $COS_FLAVORS_DIR overrides (see flavors_dir())
PACKAGES_DIR = REPO_ROOT / "packages"
DEFAULTS_FILE = "defaults.yaml"
FLAVOR_FILE = "flavor.yaml"

NAME_RE = r"^[a-z][a-z0-9-]{0,31}$"  # flavor and package names: also directory and image names
LABEL_RE = r"^[A-Z0-9_]{1,16}$"  # ext4 labels hold 16 bytes; FAT (efi) 11, checked below
MAX_YAML_BYTES = 64 * 1024
MAX_PROBLEMS = 8  # fields listed in one message
MAX_YAML_NODES = 5000  # after alias expansion: a flavor file has a few hundred
# GRUB's script parser treats these specially (quotes, escapes, variables, blocks, comments)
GRUB_SPECIAL = set("{}\\;&|$\"'<>#`")


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _one_line(value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must be one line without control characters")
    return value


def _registry(value: str | None) -> str | None:
    return None if value is None else env.registry(value)


def _mirror(value: str | None) -> str | None:
    return None if value is None else env.url(value, ("http", "https", "file"))


def _cmdline(value: str) -> str:
    _one_line(value)
    bad = sorted(set(value) & GRUB_SPECIAL)
    if bad:
        raise ValueError(f"holds {' '.join(bad)}, which GRUB's config parser reads as syntax; "
                         "use plain key=value words separated by spaces")
    return value


Line = Annotated[str, Field(max_length=200), AfterValidator(_one_line)]
Name = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.+-]{0,63}$")]  # Debian components and packages


class Bootstrap(StrictModel):
    """How to make the base image when it cannot be pulled (Debian-family only)."""
    tool: Literal["mmdebstrap"] = "mmdebstrap"
    suite: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{0,31}$")
    variant: Literal["minbase", "essential", "apt", "required", "important", "standard"] = "minbase"
    mirror: Annotated[str | None, AfterValidator(_mirror)] = Field(
        None, description="default: read from the host's apt sources")
    components: list[Name] = Field(["main"], max_length=16)
    include: list[Name] = Field([], max_length=256)


class BaseImage(StrictModel):
    ref: str = Field(pattern=r"^[a-z0-9][A-Za-z0-9._/:-]{0,200}(@sha256:[0-9a-f]{64})?$",
                     description="image reference to pull, e.g. debian:bookworm")
    bootstrap: Bootstrap | None = None


class ImageOptions(StrictModel):
    repository: str = Field(pattern=r"^[a-z0-9]+([._/-][a-z0-9]+)*$", max_length=128)
    registry: Annotated[str | None, AfterValidator(_registry)] = Field(
        None, description="host[:port][/namespace] to push to; $COS_REGISTRY overrides")
    build_args: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")], Line] = Field(
        {}, max_length=64)


class SquashfsOptions(StrictModel):
    compression: Literal["zstd", "xz", "gzip", "lz4"]
    level: int | None = Field(None, ge=1, le=22)
    block_size: Literal["128K", "256K", "512K", "1M"]

    @property
    def block_bytes(self) -> int:
        return int(self.block_size[:-1]) * (1024 * 1024 if self.block_size.endswith("M") else 1024)


class Partition(StrictModel):
    label: str = Field(pattern=LABEL_RE)
    size_mib: int = Field(ge=0, le=1024 * 1024, description="0 means: the rest of the disk")


class DiskLayout(StrictModel):
    bios_boot_mib: int = Field(ge=1, le=64)
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

    @field_validator("efi", "oem", "recovery", "state")
    @classmethod
    def _sized(cls, part: Partition) -> Partition:
        # only the last partition (persistent) may take "the rest of the disk"
        if part.size_mib < 8:
            raise ValueError(f"size_mib must be at least 8 (got {part.size_mib}); 0 (the rest) only for persistent")
        return part


class BootOptions(StrictModel):
    live_label: str = Field(pattern=LABEL_RE)
    cmdline: Annotated[str, Field(max_length=1024), AfterValidator(_cmdline)]
    # EFI through the distro's signed shim/GRUB out of the image (pipeline/bootchain.py);
    # false: an unsigned GRUB made with the host's grub-mkimage (no Secure Boot)
    secure_boot: bool = True


class UpgradeChannel(StrictModel):
    """Written into the image as /etc/cos/upgrade.yaml: what `cos-upgrade` with no image takes."""
    repository: str = Field(pattern=r"^[A-Za-z0-9.-]+(:[0-9]+)?/[a-z0-9]+([._/-][a-z0-9]+)*$", max_length=255,
                            description="REGISTRY/NAME the flavor's images are pushed to")
    tags: str | None = Field(None, pattern=r"^[A-Za-z0-9_.*?\[\]-]{1,128}$",
                             description="glob over the tags; default <flavor>-*-<arch> (what push tags)")


class Flavor(StrictModel):
    name: str = Field(pattern=NAME_RE)
    description: Line
    distro: Literal["opensuse", "fedora", "ubuntu", "debian"]
    version: str = Field(pattern=r"^[0-9]+\.[0-9]+\.[0-9]+([.+~-][0-9A-Za-z.+~-]+)?$", max_length=64)
    arch: Literal["x86_64", "arm64"]
    base: BaseImage
    packages: list[Annotated[str, Field(pattern=NAME_RE)]] = Field(min_length=1, max_length=64)
    image: ImageOptions
    squashfs: SquashfsOptions
    boot: BootOptions
    disk: DiskLayout
    clouds: CloudTargets = CloudTargets()
    upgrade: UpgradeChannel | None = None

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
        """Every input of the docker build, sorted (flavor.yaml is config, not context).
        Symlinks are not followed: docker sends them as links (see context_links)."""
        return sorted([*self.common_dockerfiles,
                       *(p for p in self.source.rglob("*")
                         if p.is_file() and not p.is_symlink() and p.name != FLAVOR_FILE)])

    @cached_property
    def context_links(self) -> dict[str, str]:
        """The build context's symlinks and their targets, read without following them
        (a link to /etc/shadow is a link in the image, never a host file we read)."""
        return {str(p.relative_to(self.source)): os.readlink(p)
                for p in sorted(self.source.rglob("*")) if p.is_symlink()}


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


class _Loader(yaml.SafeLoader):
    """safe_load that refuses duplicate keys (YAML would keep the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line)
            except TypeError:
                continue  # an unhashable key: SafeLoader's own error names it
            if first != key_node.start_mark.line and key != "<<":
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {shorten(key)} (first on line {first + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int], path: set[int]) -> int:
    """Nodes after alias expansion (an alias is the same node object again): an alias
    bomb is a few lines that expand to millions."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in path:
        raise yaml.YAMLError("an alias refers to itself (recursive)")
    path.add(id(node))
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(n, memo, path) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo, path) + _expanded_size(v, memo, path) for k, v in node.value)
    path.discard(id(node))
    memo[id(node)] = min(size, MAX_YAML_NODES + 1)
    return memo[id(node)]


def _read_text(path: Path) -> str:
    """The file's text: a regular file, of bounded size, in UTF-8."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{_rel(path)}: file not found", "every flavor directory needs a flavor.yaml") from None
    except OSError as exc:
        raise ConfigError(f"{_rel(path)}: cannot read: {exc.strerror}", "check the file's permissions") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ConfigError(f"{_rel(path)}: is {kind}", "it must be a YAML file")
    if st.st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{_rel(path)}: {st.st_size} bytes; a flavor file holds at most {MAX_YAML_BYTES}",
                          "state only what differs from defaults.yaml")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{_rel(path)}: not UTF-8 (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r})",
                          "save the file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{_rel(path)}: cannot read: {exc.strerror}", "check the file's permissions") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    text = _read_text(path)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}, set()) > MAX_YAML_NODES:
            raise ConfigError(f"{_rel(path)}: expands to more than {MAX_YAML_NODES} YAML nodes (aliases?)",
                              "write the values out; a flavor file needs no aliases")
        data = (loader.construct_document(node) if node is not None else None) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        raise ConfigError(f"{_rel(path)}{line}: not valid YAML: {str(getattr(exc, 'problem', None) or exc)[:200]}",
                          "fix the YAML at that place (each key once, `key: value`)") from None
    except RecursionError:
        raise ConfigError(f"{_rel(path)}: nested too deeply", "a flavor file is a few levels deep") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{_rel(path)}: expected a mapping of fields at the top level, "
                          f"got {type(data).__name__}", "write one `field: value` per line")
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
    shown = "" if err["type"] == "missing" or isinstance(got, dict) else f" (got {shorten(got)})"
    return f"{field}: {err['msg'][:200]}{shown}"


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
        errors = exc.errors()
        for err in errors[:MAX_PROBLEMS]:
            origin = flavor_path if _has_path(own, err["loc"]) or not _has_path(defaults, err["loc"]) \
                else defaults_path
            problems.append(f"{_rel(origin)}: {_describe(err)}")
        if len(errors) > MAX_PROBLEMS:
            problems.append(f"... and {len(errors) - MAX_PROBLEMS} more")
        raise ConfigError(f"invalid flavor '{name}':\n  - " + "\n  - ".join(problems),
                          f"fix the field(s) above in {_rel(flavor_path)}; nothing was built") from None
    if not (directory / name / "Dockerfile").is_file():
        raise ConfigError(f"{_rel(directory / name)}: no Dockerfile",
                          "each flavor directory needs a Dockerfile beside flavor.yaml")
    _inside(directory / name, "Dockerfile", "overlay", FLAVOR_FILE)
    return flavor


def _inside(source: Path, *names: str) -> None:
    """A flavor's own files must not lead out of it (a symlink to a host file would make
    that file part of the build). Links inside overlay/ are kept as links, not followed."""
    root = source.resolve()
    for name in names:
        path = source / name
        if (path.exists() or path.is_symlink()) and not path.resolve().is_relative_to(root):
            raise ConfigError(f"{_rel(path)}: resolves outside the flavor directory "
                              f"(to {shorten(str(path.resolve()))})",
                              f"put a real {name} inside {_rel(source)}")


def flavor_names(directory: Path | None = None) -> list[str]:
    directory = directory or flavors_dir()
    names = sorted(p.parent.name for p in directory.glob(f"*/{FLAVOR_FILE}"))
    bad = [n for n in names if not re.match(NAME_RE, n)]
    if bad:
        raise ConfigError(f"{_rel(directory / bad[0])}: {shorten(bad[0])} is not a valid flavor name",
                          "rename the directory: lower-case letters, digits and -, starting with a letter, "
                          "at most 32")
    return names


def load_all(directory: Path | None = None) -> list[Flavor]:
    return [load_flavor(n, directory) for n in flavor_names(directory)]


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
