"""Reading config YAML and the one override mechanism (``--set``, studies, benchmarks): dotted
keys into a raw config dict, before validation (``config.py``)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from nestar_lab.config.errors import ConfigError
from nestar_lab.config.schema import ComponentSpec, ExperimentConfig


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
    """PyYAML's safe loader with YAML 1.2 floats (``3e-4`` and ``1.0e5`` are numbers, not strings)
    that refuses a key given twice in one mapping (YAML says keys are unique; PyYAML would keep
    the last value without a word)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = seen.get(key)
                except TypeError:  # an unhashable key: PyYAML reports it itself
                    continue
                if earlier is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1}, first on line "
                        f"{earlier + 1}): keep one", key_node.start_mark)  # fmt: skip
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


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
        if path.is_dir():
            what = "a directory, not a config file"
        elif path.exists():  # a FIFO, a device such as /dev/null, a socket
            what = "not a regular file (a pipe, device or socket); give a YAML config file"
        else:
            what = "no such config file"
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
