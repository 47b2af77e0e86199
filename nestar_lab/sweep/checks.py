"""What a study file is checked for when it loads, before any trial trains (``study.load_study``):
the sampler and pruner Optuna would refuse, every value the space (and each arm, and a bracket's
search) can propose on the base config, and objectives no evaluation of the config gives. Each
problem is one line naming the field; ``spec`` is a ``study.StudySpec``."""

from __future__ import annotations

import copy
import difflib
import warnings
from typing import Any

from nestar_lab.config.errors import ConfigError
from nestar_lab.config.overrides import apply_overrides, read_yaml


def strategy_problems(spec) -> list[str]:
    """The sampler and pruner built from their params, before any study exists: a param Optuna
    does not take, or a value it refuses, is one line naming ``sampler.params``/``pruner.params``."""
    lines = []
    for field, make in (("sampler", spec.make_sampler), ("pruner", spec.make_pruner)):
        try:
            with warnings.catch_warnings():  # experimental-feature notices: not problems
                warnings.simplefilter("ignore")
                make()
        except (TypeError, ValueError) as exc:
            name = getattr(spec, field).name
            lines.append(f"{field}.params: optuna's {name!r} {field} refuses {dict(getattr(spec, field).params)}: "
                         f"{str(exc).splitlines()[0]}")  # fmt: skip
    return lines


def objective_problems(spec) -> list[str]:
    """Each objective that no evaluation of the study's config gives (a misspelt metric, or one of
    a metric the config does not run), one line naming it, before any trial trains: found after
    training it would fail every trial. Skipped where the trials vary the metrics or the dataset
    (checked when a trial runs) or a metric cannot name its keys before computing."""
    varied = [*spec.space, *(key for arm in spec.arms for key in arm)]
    if any(key == "metrics" or key.startswith(("metrics.", "dataset")) for key in varied):
        return []
    from nestar_lab.config.validation import validate_config
    from nestar_lab.run.evaluate import unknown_metrics

    cfg = validate_config(apply_overrides(read_yaml(spec.base_path()), dict(spec.overrides)))
    missing, names = unknown_metrics(cfg, [o.metric for o in spec.objectives])
    lines = []
    for i, objective in enumerate(spec.objectives):
        if objective.metric in missing:
            close = difflib.get_close_matches(objective.metric, sorted(names), n=3)
            hint = f"did you mean {' or '.join(close)}" if close else f"its metrics give {', '.join(sorted(names))}"
            lines.append(f"objectives.{i}.metric: no evaluation of this study's config gives {objective.metric!r}; "
                         f"{hint}")  # fmt: skip
    return lines


def space_problems(spec) -> list[str]:
    """Every point the study can propose, checked on the base before any trial: the fixed
    overrides, each searched key at each of its choices or at both ends of its range (set alone
    on the base, with the keys of its condition at their first allowed values), and each arm.
    One line per problem, naming the key or arm. What fails only in a combination of searched
    values is found when a trial proposes it (the trial fails and ``study run`` exits 2)."""
    from nestar_lab.config.validation import validate_config

    base = read_yaml(spec.base_path())

    def problems(overrides: dict[str, Any]) -> list[str]:
        try:
            validate_config(apply_overrides(copy.deepcopy(base), overrides))  # it sets in place
        except ConfigError as exc:
            return exc.lines
        except ValueError as exc:  # an override that cannot be applied (a key under a non-mapping)
            return [str(exc)]
        return []

    def explain(kind: str, where: str, keys: list[str], line: str) -> str:
        path = line.split(":", 1)[0]
        if "extra inputs are not permitted" in line:  # once per key, whatever value it had
            key = next((k for k in keys if k == path or k.startswith(path + ".")), path)
            return (f"{kind}.{key}: not a field of the base config {spec.base}; check the spelling "
                    f"(`nestar describe` and the README list the config's sections)")  # fmt: skip
        return f"{where}: {line}"

    fixed = problems(dict(spec.overrides))
    if fixed:
        return list(dict.fromkeys(explain("overrides", "overrides", list(spec.overrides), line) for line in fixed))
    lines: list[str] = []
    for key, space in spec.space.items():
        condition = {other: values[0] for other, values in space.condition.items() if values}
        for value in candidate_values(space):
            point = {**spec.overrides, **condition, key: value}
            lines += [explain("space", f"space.{key}={value!r}", [key], line) for line in problems(point)]
    for b in spec.bracket:  # every value its search can try, on the base with the arms' values it applies to
        condition = {other: values[0] for other, values in b.condition.items() if values}
        for value in sorted({*b.grid, *b.bounds}):
            point = {**spec.overrides, **condition, b.key: value}
            lines += [explain("bracket", f"bracket.key {b.key}={value:g}", [b.key], line)
                      for line in problems(point)]  # fmt: skip
    arms = {repr({k: v for k, v in arm.items() if not spec.seeds or k != "seed"}): arm for arm in spec.arms}
    for shown, arm in arms.items():  # an arm crossed with the seeds is checked once
        lines += [explain("arms", f"arms {shown}", list(arm), line) for line in problems({**spec.overrides, **arm})]
    return list(dict.fromkeys(lines))


def candidate_values(space) -> list[Any]:
    """What the space can propose at its edges: every choice, or a range's two ends (the upper
    one as the step reaches it)."""
    if space.choices is not None:
        return list(space.choices)
    low, high = space.int_range or space.float_range
    if space.step and high > low:
        high = low + int((high - low) // space.step) * space.step
        high = int(high) if space.int_range else high
    return [low, high] if high != low else [low]
