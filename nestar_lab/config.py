"""Experiment configs: strict pydantic models, dotted overrides, and whole-config validation.

Every part of an experiment is ``{name: ..., params: {...}}``; the plugin's own ``Params``
model validates ``params``. :func:`load_config` checks everything (structure, plugin names,
plugin params, rules across parts) before any work starts and raises :class:`ConfigError`
with one readable line per problem, all problems of the structure and of every plugin's params
in one pass (rules across parts are checked once every part is valid on its own).

Values are strict: numbers are finite (no ``.inf``/``.nan``), an integer field takes an integer
(not ``true``, not ``"4"``, not ``4.0``), a float field takes a float or an integer, a string is
never read as a number. YAML is read with YAML 1.2 floats, so ``lr: 3e-4`` is a number.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nestar_lab.errors import BadInput
from nestar_lab.parts import check_compatibility
from nestar_lab.registry import PluginError, get_registry
from nestar_lab.schema import (  # noqa: F401  (re-exported: the config API lives here)
    Strict,
    ComponentSpec,
    TrainConfig,
    SampleConfig,
    EvalConfig,
    DataConfig,
    DistributedConfig,
    PartSettings,
    ModuleSettings,
    MODULE_PARTS,
    COMPONENT_KINDS,
    ExperimentConfig,
)


class ConfigError(BadInput, ValueError):
    """A config is invalid; ``lines`` holds one readable line per problem (exit code 2)."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("\n".join(lines))


def _error_items(err: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted path, readable line)`` for every problem pydantic found."""
    items = []
    for e in err.errors():
        path = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        given = e.get("input")
        given_s = "nothing" if e["type"] == "missing" else repr(given)
        if len(given_s) > 60:
            given_s = given_s[:57] + "..."
        items.append((path, f"{path or '<config>'}: got {given_s}; {e['msg'][0].lower() + e['msg'][1:]}"))
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


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply dotted overrides to a raw config dict, in place, and return it.

    The one override mechanism: the CLI's ``--set``, studies (fixed overrides, arms and trial
    suggestions) and the benchmarks all go through it. ``overrides`` is a list of ``KEY=VALUE``
    strings (``--set``: each VALUE is parsed as YAML with YAML 1.2 floats, so ``3e-4`` is a
    float, ``null`` is None and ``'{name: rk4, params: {steps: 4}}'`` a mapping) or a mapping
    ``{KEY: value}`` whose values are used as they are (a study's overrides). One call is one
    list or one mapping. The rules:

    - ``KEY`` is dotted. A number indexes a list, whose item must exist
      (``metrics.0.params.epochs=5``), or names a numbered key of a mapping
      (``modules.3.ode_solver.params.steps=4``); mappings missing on the way are created.
    - A value replaces what the key held; mappings are replaced, never merged:
      ``ode_solver.params='{rtol: 1e-3}'`` leaves exactly those params (the plugin's defaults
      fill the rest), ``ode_solver='{name: rk4, params: {steps: 4}}'`` replaces the whole part.
      Set ``ode_solver.params.rtol=1e-3`` to change one param and keep the others.
    - Changing the ``name`` of a part (any ``{name, params}`` mapping below the top level:
      ``ode_solver``, ``coordination``, ``dataset``, ``metrics.N``, ``modules.M.ode_solver``...)
      drops the params the part had before this call, since they belonged to the previous plugin;
      params given in the same call, before or after the name, are kept. Setting the name the
      part already has keeps its params.
    - A malformed override is a :class:`ConfigError` of one line naming it: no ``=``, an empty
      key part, a value that is not valid YAML, a key through a value that is neither a mapping
      nor a list, a list index out of range. ``raw`` is left unchanged then.
    """
    items = _parse_overrides([overrides] if isinstance(overrides, str) else overrides)
    work = copy.deepcopy(raw)
    renamed: dict[tuple[str, ...], Any] = {}  # part path -> the name it gets in this call (the last one)
    for _, parts, value in items:
        if len(parts) >= 2 and parts[-1] == "name":
            renamed[tuple(parts[:-1])] = value
    for path, name in renamed.items():
        part = _lookup(work, path)
        if isinstance(part, dict) and "params" in part and name != part.get("name", _default_name(work, path)):
            del part["params"]  # the previous plugin's; params given in this call are set below
    for label, parts, value in items:
        _set_dotted(work, parts, value, label)
    raw.clear()
    raw.update(work)
    return raw


def _parse_overrides(overrides: list[str] | dict[str, Any]) -> list[tuple[str, list[str], Any]]:
    """``(label for errors, key parts, value)`` of every override; ``--set`` values parsed as YAML."""
    if isinstance(overrides, dict):
        pairs = [(f"override {key}", str(key), value, False) for key, value in overrides.items()]
    else:
        pairs = []
        for item in overrides:
            shown = item if "\n" not in item else repr(item)  # the error stays one line
            if "=" not in item:
                raise ConfigError([f"--set {shown}: expected KEY=VALUE, e.g. generator.params.k=4"])
            key, value = item.split("=", 1)
            pairs.append((f"--set {shown}", key, value, True))
    items = []
    for label, key, value, parse in pairs:
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError([f"{label}: empty part in {key.strip()!r}; expected e.g. generator.params.k=4"])
        if parse:
            try:
                value = _parse_value(value)
            except yaml.YAMLError as exc:
                raise ConfigError([f"{label}: the value is not valid YAML ({str(exc).splitlines()[0]})"]) from None
        items.append((label, parts, value))
    return items


def _index(part: str) -> int | None:
    return int(part) if re.fullmatch(r"[0-9]+", part) else None


def _key_in(node: dict[Any, Any], part: str) -> Any:
    """The key of ``node`` that ``part`` names: ``"3"`` is the YAML key ``3`` when that exists."""
    if part not in node and _index(part) is not None and _index(part) in node:
        return _index(part)
    return part


def _lookup(raw: Any, path: tuple[str, ...]) -> Any:
    """The value at ``path`` (key parts), or None where there is none."""
    node = raw
    for part in path:
        if isinstance(node, dict):
            node = node.get(_key_in(node, part))
        elif isinstance(node, list) and _index(part) is not None and _index(part) < len(node):
            node = node[_index(part)]
        else:
            return None
    return node


def _default_name(raw: dict[str, Any], path: tuple[str, ...]) -> str | None:
    """The plugin a part uses when it names none: a top-level part's default (``ode_solver``:
    euler); a module's part (``modules.3.ode_solver``) the shared part's."""
    if len(path) == 3 and path[0] == "modules":
        shared, default = raw.get(path[2]), _default_name(raw, path[2:])
        return shared.get("name", default) if isinstance(shared, dict) else default
    field = ExperimentConfig.model_fields.get(path[0]) if len(path) == 1 else None
    return field.default.name if field is not None and isinstance(field.default, ComponentSpec) else None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _set_dotted(raw: dict[str, Any], parts: list[str], value: Any, label: str) -> None:
    """Set ``value`` at the key ``parts`` of ``raw`` (see :func:`apply_overrides`)."""
    node: Any = raw
    for i, part in enumerate(parts):
        here = ".".join(parts[: i + 1])
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not node:
                raise ConfigError([f"{label}: {here}: the list is empty"])
            key: Any = _index(part)
            if key is None or key >= len(node):
                raise ConfigError([f"{label}: {here}: the list has {len(node)} items (indices 0..{len(node) - 1})"])
        elif isinstance(node, dict):
            key = _key_in(node, part)
            if key not in node and _index(part) is not None:
                key = _index(part)  # as YAML reads ``3:``
            if not last and node.get(key) is None:
                node[key] = {}
        else:
            raise ConfigError([f"{label}: {'.'.join(parts[:i])} is {_short(node)}, not a mapping or a list"])
        if last:
            node[key] = value
        else:
            node = node[key]


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``3e-4`` and ``1.0e5`` are numbers, not strings."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """YAML text as Python values (safe; YAML 1.2 floats)."""
    return yaml.load(text, Loader=_Yaml12Loader)


def _parse_value(text: str) -> Any:
    """YAML scalars and flow collections (``3e-4`` is a float, ``true`` a bool, ``[1, 2]`` a list)."""
    return load_yaml(text)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, or a one-line :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        what = "a directory, not a config file" if path.is_dir() else "no such config file"
        raise ConfigError([f"{path}: {what}"])
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML ({str(exc).splitlines()[0]})"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not a text file; expected a YAML config"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot be read ({exc.strerror or exc})"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: expected a mapping of config sections, got {type(raw).__name__}"])
    return raw


def _as_spec(value: Any) -> ComponentSpec | None:
    try:
        return ComponentSpec.model_validate(value)
    except ValidationError:
        return None  # the structural check reports it


def _component_specs(raw: dict[str, Any], cfg: ExperimentConfig | None) -> list[tuple[str, str, ComponentSpec]]:
    """``(where, kind, spec)`` of every part; from ``raw`` when the structure has problems elsewhere."""
    if cfg is not None:
        parts = [(field, kind, getattr(cfg, field)) for field, kind in COMPONENT_KINDS.items()]
        return parts + [(f"metrics.{i}", "metric", spec) for i, spec in enumerate(cfg.metrics)]
    parts = []
    for field, kind in COMPONENT_KINDS.items():
        default = ExperimentConfig.model_fields[field].default
        spec = _as_spec(raw.get(field, default)) if field in raw or isinstance(default, ComponentSpec) else None
        if spec is not None:
            parts.append((field, kind, spec))
    metrics = raw.get("metrics", [])
    for i, value in enumerate(metrics if isinstance(metrics, list) else []):
        spec = _as_spec(value)
        if spec is not None:
            parts.append((f"metrics.{i}", "metric", spec))
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

    One pass reports the problems of the structure and of every part's params together; the
    rules across parts (e.g. token count against ``k``) run once every part is valid.
    """
    if not isinstance(raw, dict):
        raise ConfigError([f"<config>: expected a mapping of config sections, got {type(raw).__name__}"])
    errors: list[str] = []
    raw = _number_modules(raw, errors)
    cfg = strict_validate(ExperimentConfig, raw, "", errors)
    resolved = {where: _resolve_component(where, kind, spec, errors) for where, kind, spec in _component_specs(raw, cfg)}
    _check_module_parts(raw, cfg, resolved, errors)
    if errors or cfg is None:
        raise ConfigError(list(dict.fromkeys(errors)))  # a non-finite plugin param is seen by both passes
    updates: dict[str, Any] = {field: resolved[field] for field in COMPONENT_KINDS}
    updates["metrics"] = [resolved[f"metrics.{i}"] for i in range(len(cfg.metrics))]
    cfg = cfg.model_copy(update=updates)
    errors = check_compatibility(cfg)
    if errors:
        raise ConfigError(errors)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate an experiment config file."""
    return validate_config(apply_overrides(read_yaml(path), overrides or []))


def dump_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the resolved config (reloadable with :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
