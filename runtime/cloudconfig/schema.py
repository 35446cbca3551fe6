"""A cloud-config document (the yip subset) parsed into typed steps.

Parsing never raises for bad input: a document that cannot be read carries `errors`
(reported in every stage, since its stage is unknown), and a step with a bad value
carries its own `errors` (reported when its stage runs, and the step is not run)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from .spec import SpecError, mapping, opt_string
from .steps import BY_KEY, Plugin

BOOT_STAGES = ("rootfs", "initramfs", "fs", "boot", "network", "reconcile")
TOOL_STAGES = ("after-install", "after-deploy", "after-upgrade", "after-reset")
# every stage a document may name, boot stages in the order a boot runs them
BOOT_ORDER = tuple(f"{s}{suffix}" for s in BOOT_STAGES for suffix in (".before", "", ".after"))
ALL_STAGES = BOOT_ORDER + TOOL_STAGES
DOCUMENT_KEYS = {"name", "stages"}
STEP_KEYS = {"name", "if"} | set(BY_KEY)


def expand(stage: str) -> list[str]:
    """What `cos-setup STAGE` runs: a boot stage with its .before and .after, or exactly
    the one named (`rootfs.after`, `after-deploy`)."""
    if stage in BOOT_STAGES:
        return [f"{stage}.before", stage, f"{stage}.after"]
    if stage in ALL_STAGES:
        return [stage]
    raise SpecError(f"unknown stage '{stage}' (known: {', '.join(BOOT_STAGES + TOOL_STAGES)}, "
                    "each boot stage also as .before/.after)")


@dataclass(frozen=True)
class Action:
    plugin: Plugin
    spec: Any


@dataclass
class Step:
    name: str
    condition: str | None = None
    actions: list[Action] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@dataclass
class Document:
    source: str                       # the file, URL or datasource it came from
    name: str = ""
    stages: dict[str, list[Step]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def parse_step(raw: Any, where: str, index: int) -> Step:
    default_name = f"step {index + 1}"
    try:
        spec = mapping(raw, where)
    except SpecError as exc:
        return Step(default_name, errors=[str(exc)])
    name = str(spec.get("name") or default_name)
    step = Step(name)
    unknown = [k for k in spec if k not in STEP_KEYS]
    if unknown:
        step.errors.append(f"unknown key{'s' if len(unknown) > 1 else ''} "
                           f"{', '.join(repr(k) for k in unknown)} (known: {', '.join(sorted(STEP_KEYS))})")
    try:
        step.condition = opt_string(spec.get("if"), "if")
    except SpecError as exc:
        step.errors.append(str(exc))
    for plugin in BY_KEY.values():  # in plugin order, whatever the order in the YAML
        if plugin.key in spec and spec[plugin.key] is not None:
            try:
                step.actions.append(Action(plugin, plugin.parse(spec[plugin.key], plugin.key)))
            except SpecError as exc:
                step.errors.append(str(exc))
    return step


def from_mapping(data: Any, source: str) -> Document:
    doc = Document(source)
    if data is None:
        return doc
    try:
        top = mapping(data, "document", DOCUMENT_KEYS)
        doc.name = opt_string(top.get("name"), "name") or ""
        stages = mapping(top.get("stages") or {}, "stages")
    except SpecError as exc:
        doc.errors.append(str(exc))
        return doc
    for stage, steps in stages.items():
        if stage not in ALL_STAGES:
            doc.errors.append(f"stages: unknown stage '{stage}' (known: {', '.join(ALL_STAGES)})")
            continue
        if not isinstance(steps, list):
            doc.errors.append(f"stages.{stage}: expected a list of steps")
            continue
        doc.stages[stage] = [parse_step(raw, f"stages.{stage}[{i}]", i) for i, raw in enumerate(steps)]
    return doc


def load_yaml(text: str, source: str) -> Any:
    """YAML of one document; raises SpecError with the line of a syntax error."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"invalid YAML{at}: {problem}") from None


def parse_document(text: str, source: str) -> Document:
    try:
        return from_mapping(load_yaml(text, source), source)
    except SpecError as exc:
        return Document(source, errors=[str(exc)])
