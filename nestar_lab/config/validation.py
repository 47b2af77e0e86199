"""Experiment configs: whole-config validation over the schema (``schema.py``), after YAML reading
and dotted overrides (``overrides.py``).

Every part of an experiment is ``{name: ..., params: {...}}``; the plugin's own ``Params``
model validates ``params``. :func:`load_config` checks everything (structure, plugin names,
plugin params, rules across parts) before any work starts and raises :class:`ConfigError`
with one readable line per problem, all in one pass (a rule across parts is checked beside the
field problems whenever none of the fields it reads is among them).

Values are strict: numbers are finite (no ``.inf``/``.nan``), an integer field takes an integer
(not ``true``, not ``"4"``, not ``4.0``), a float field takes a float or an integer, a string is
never read as a number. YAML is read with YAML 1.2 floats, so ``lr: 3e-4`` is a number.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nestar_lab.config.errors import ConfigError
from nestar_lab.config.overrides import apply_overrides, read_yaml
from nestar_lab.config.parts import RULE_SECTIONS, check_compatibility
from nestar_lab.config.registry import PluginError, get_registry
from nestar_lab.config.schema import (
    COMPONENT_KINDS,
    LISTED_KINDS,
    MODULE_PARTS,
    ComponentSpec,
    ExperimentConfig,
    ModuleSettings,
)


def _error_items(err: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted path, readable line)`` for every problem pydantic found."""
    items = []
    for e in err.errors():
        path = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        given = e.get("input")
        given_s = "nothing" if e["type"] == "missing" else repr(given)
        if len(given_s) > 60:
            given_s = given_s[:57] + "..."
        msg = e["msg"].removeprefix("Value error, ")
        if not path and e["type"] == "value_error":  # a check over several fields names them itself
            items.append((path, msg))
            continue
        items.append((path, f"{path or '<config>'}: got {given_s}; {msg[0].lower() + msg[1:]}"))
    return items


def _error_lines(err: ValidationError, prefix: str = "") -> list[str]:
    return [line for _, line in _error_items(err, prefix)]


def _non_finite(value: Any, path: str = "") -> list[tuple[str, float]]:
    """Every inf/nan float inside ``value`` (nested dicts and lists), with its dotted path."""
    if isinstance(value, float) and not math.isfinite(value):
        return [(path, value)]
    if isinstance(value, dict):
        return [hit for k, v in value.items() for hit in _non_finite(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, (list, tuple)):
        return [hit for i, v in enumerate(value) for hit in _non_finite(v, f"{path}.{i}" if path else str(i))]
    return []


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    """JSON types for what YAML or a caller may put in a config (numpy scalars, tuples, paths, dates)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    return str(value)


def strict_validate(model: type[BaseModel], raw: Any, prefix: str, errors: list[str]) -> BaseModel | None:
    """``model`` validated strictly from ``raw``, or None after appending one line per problem to ``errors``.

    Strict: pydantic's strict mode on the JSON form of ``raw`` (so lists still fill tuples and
    strings fill enums, but ``true`` is no integer and ``"4"`` no number), and no inf/nan anywhere.
    """
    raw = _plain(raw)
    bad = _non_finite(raw, prefix)
    errors.extend(f"{path}: got {value!r}; must be a finite number" for path, value in bad)
    text = json.dumps(_finite_or_none(raw), allow_nan=False)
    try:
        model_obj = model.model_validate_json(text, strict=True)
    except ValidationError as exc:
        hidden = [path for path, _ in bad]  # a replaced non-finite value is reported once, above
        errors.extend(
            line for path, line in _error_items(exc, prefix)
            if not any(path == h or path.startswith(h + ".") for h in hidden)
        )  # fmt: skip
        return None
    return None if bad else model_obj


def _as_spec(value: Any) -> ComponentSpec | None:
    try:
        return ComponentSpec.model_validate(value)
    except ValidationError:
        return None  # the structural check reports it


def _component_specs(raw: dict[str, Any], cfg: ExperimentConfig | None) -> list[tuple[str, str, ComponentSpec]]:
    """``(where, kind, spec)`` of every part; from ``raw`` when the structure has problems elsewhere."""
    if cfg is not None:
        parts = [(field, kind, getattr(cfg, field)) for field, kind in COMPONENT_KINDS.items()]
        return parts + [(f"{field}.{i}", kind, spec) for field, kind in LISTED_KINDS.items()
                        for i, spec in enumerate(getattr(cfg, field))]  # fmt: skip
    parts = []
    for field, kind in COMPONENT_KINDS.items():
        default = ExperimentConfig.model_fields[field].default
        spec = _as_spec(raw.get(field, default)) if field in raw or isinstance(default, ComponentSpec) else None
        if spec is not None:
            parts.append((field, kind, spec))
    for field, kind in LISTED_KINDS.items():
        listed = raw.get(field, [])
        for i, value in enumerate(listed if isinstance(listed, list) else []):
            spec = _as_spec(value)
            if spec is not None:
                parts.append((f"{field}.{i}", kind, spec))
    return parts


def _resolve_component(where: str, kind: str, spec: ComponentSpec, errors: list[str]) -> ComponentSpec:
    try:
        cls = get_registry().get(kind, spec.name)
    except PluginError as exc:
        errors.append(f"{where}.name: {exc}")
        return spec
    params = strict_validate(cls.Params, spec.params, f"{where}.params", errors)
    if params is None:
        return spec
    return ComponentSpec.resolved(spec.name, params)  # plugins receive this very ``params``


def _merge_entry(base: Any, over: Any) -> Any:
    """``over`` merged into ``base`` (nested mappings); a part whose ``name`` changes without
    ``params`` drops the base's params, as an override does."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    merged = dict(base)
    if "name" in over and over["name"] != base.get("name") and "params" not in over:
        merged.pop("params", None)
    for key, value in over.items():
        merged[key] = _merge_entry(merged[key], value) if key in merged else value
    return merged


def _number_modules(raw: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    """``raw`` with ``modules:`` keyed by integers. YAML makes ``3:`` an integer key, a dotted
    override (``--set modules.3.cfg_scale=1``) and a dumped config a string one; an entry given
    both ways is merged, the string one (the override) over the integer one."""
    modules = raw.get("modules")
    if not isinstance(modules, dict):
        return raw  # absent, or the structural check reports it
    numbered: dict[int, Any] = {}
    for key in sorted(modules, key=lambda k: isinstance(k, str)):  # integer keys first (stable)
        text = str(key).strip()
        if isinstance(key, bool) or not text.isdigit() or int(text) < 1:
            errors.append(f"modules.{key}: expected a module number (1 = the first module); got {key!r}")
            continue
        n = int(text)
        numbered[n] = _merge_entry(numbered[n], modules[key]) if n in numbered else modules[key]
    return {**raw, "modules": numbered}


class _ModulesOnly(BaseModel):
    model_config = ConfigDict(extra="ignore")
    modules: dict[int, ModuleSettings] = Field(default_factory=dict)


def _check_module_parts(
    raw: dict[str, Any], cfg: ExperimentConfig | None, shared: dict[str, ComponentSpec], errors: list[str]
) -> None:
    """Each module's parts, merged over the shared parts (``shared``), validated like them, in the
    same pass as the rest (a part whose shared settings failed is not reported again). Module
    numbers are checked against the schedule with the rules across parts (``experiment``)."""
    if cfg is not None:
        modules = cfg.modules
    else:  # the structure has problems elsewhere: the module entries alone (their own problems are reported)
        alone = strict_validate(_ModulesOnly, {"modules": raw.get("modules") or {}}, "", [])
        modules = alone.modules if alone is not None else {}
    for number, entry in sorted(modules.items()):
        for part in MODULE_PARTS:
            change = getattr(entry, part)
            if change is None or part not in shared or any(e.startswith(f"{part}.") for e in errors):
                continue
            where = f"modules.{number}.{part}"
            change.remember(shared[part], _resolve_component(where, COMPONENT_KINDS[part], change.over(shared[part]), errors))


def validate_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw config dict completely; raise :class:`ConfigError` listing every problem.

    One pass reports the problems of the structure and of every part's params together, and the
    rules across parts (e.g. token count against ``k``) beside them when none of the fields a
    rule reads is among the problems (see :func:`_rules_beside`).
    """
    if not isinstance(raw, dict):
        raise ConfigError([f"<config>: expected a mapping of config sections, got {type(raw).__name__}"])
    cfg, errors = _fields(raw)
    if errors:
        raise ConfigError(list(dict.fromkeys(errors + _rules_beside(raw, errors))))
    errors = check_compatibility(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


def _fields(raw: dict[str, Any]) -> tuple[ExperimentConfig | None, list[str]]:
    """The config with every part's params resolved, or None and one line per problem of the
    structure and the parts' params (the rules across parts not checked)."""
    errors: list[str] = []
    raw = _number_modules(raw, errors)
    cfg = strict_validate(ExperimentConfig, raw, "", errors)
    resolved = {where: _resolve_component(where, kind, spec, errors) for where, kind, spec in _component_specs(raw, cfg)}
    _check_module_parts(raw, cfg, resolved, errors)
    if errors or cfg is None:
        return None, list(dict.fromkeys(errors))  # a non-finite plugin param is seen by both passes
    updates: dict[str, Any] = {field: resolved[field] for field in COMPONENT_KINDS}
    for field in LISTED_KINDS:
        updates[field] = [resolved[f"{field}.{i}"] for i in range(len(getattr(cfg, field)))]
    return cfg.model_copy(update=updates), []


def _rules_beside(raw: dict[str, Any], errors: list[str]) -> list[str]:
    """The rules across parts, checked in the same pass as field problems when no field they
    read (``RULE_SECTIONS``) is among them: the bad fields are dropped (their defaults fill in,
    and no rule reads them), so a rule reports what it will report once they are fixed."""
    paths = [line.split(":", 1)[0].strip() for line in errors]
    if any(not p or p.startswith("<") or p.split(".")[0] in RULE_SECTIONS for p in paths):
        return []
    trimmed = copy.deepcopy(raw)
    for path in paths:
        _drop(trimmed, path.split("."))
    cfg, still = _fields(trimmed)
    return check_compatibility(cfg) if cfg is not None and not still else []


def _drop(raw: Any, keys: list[str]) -> None:
    """Remove the entry at the dotted ``keys`` from nested mappings and lists, if it is there."""
    for key in keys[:-1]:
        if isinstance(raw, dict) and key in raw:
            raw = raw[key]
        elif isinstance(raw, list) and key.isdigit() and int(key) < len(raw):
            raw = raw[int(key)]
        else:
            return
    if isinstance(raw, dict):
        raw.pop(keys[-1], None)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate an experiment config file."""
    return validate_config(apply_overrides(read_yaml(path), overrides or []))


def dump_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config (reloadable with :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
