"""Bracketing keys per arm: the rule, and where its choices are kept (``bracket:`` in a study).

A study file may give::

    bracket: {key: train.lr, grid: [1.2e-3, 5.0e-3, 2.0e-2], factor: 4, cap: 3,
              steps: 150, samples_per_class: 20, seed: 100}

so that every arm trains at its own best value of ``key`` rather than one shared value that
suits the reference arm (a comparison at the reference's learning rate favours the reference).
Before any seeded trial, each arm gets a small search of its own (``bracket_search.py``): the
grid's values, each trained ``steps`` steps at ``seed`` (none of the study's seeds) and scored by
the study's first objective on ``samples_per_class`` samples per class. Where the best sits at an
edge the search goes on past it, ``factor`` beyond the best per extension, until the best has a
worse neighbour on both sides (a diverged training counts as worse) or ``cap`` extensions on that
side found none.

``bracket:`` may also be a list, searched in its order, each entry with the values the entries
before it chose (one pass of coordinate search); an entry with ``if: {key: [values]}`` applies only
to the arms whose values match (a coordination weight only where an objective is on)::

    bracket:
      - {key: coordination.params.weight, grid: [0.01, 0.1, 1.0], factor: 10, cap: 2,
         if: {coordination.name: [velocity_matching, data_matching]}}
      - {key: train.lr, grid: [1.2e-3, 5.0e-3, 2.0e-2]}

Each choice is kept in the study's own storage (a user attribute ``bracket KEY ARM``, with the
budget it was found with: the entry, the study's overrides, the base config and the values chosen
before it), so every process and machine sharing the study trains an arm at the same values; a
changed budget, base, arm or earlier choice searches again. The quality benchmark's learning-rate
search (``benchmarks/lr_search.py``) applies the same rule.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nestar_lab.config.errors import ConfigError
from nestar_lab.config.overrides import read_yaml

PREFIX = "bracket "  # study user attribute of an arm's choice: PREFIX + key + " " + arm_key(arm)


class Bracket(BaseModel):
    """One entry of ``bracket:``: the key each arm gets its own bracketed value of, the search's
    budget, and (``if:``) the arms it applies to."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    key: str = Field(description="dotted config key chosen per arm (train.lr, coordination.params.weight)")
    grid: list[float] = Field(min_length=2, description="the first values tried, ascending, all > 0")
    factor: float = Field(4.0, gt=1, description="each extension past an edge: x factor (or / factor)")
    cap: int = Field(3, ge=0, strict=True, description="at most this many extensions on a side")
    steps: int = Field(150, ge=1, strict=True, description="training steps of each search trial")
    samples_per_class: int = Field(20, ge=1, strict=True, description="samples per class scoring a trial")
    seed: int = Field(100, strict=True, description="training seed of every search trial (none of the study's seeds)")
    condition: dict[str, list[Any]] = Field(
        default_factory=dict, alias="if", description="only the arms with these values (default: every arm)"
    )

    @field_validator("grid")
    @classmethod
    def _ascending(cls, grid: list[float]) -> list[float]:
        if any(v <= 0 for v in grid) or any(a >= b for a, b in zip(grid, grid[1:])):
            raise ValueError(f"expected distinct values > 0 in ascending order (searched in log), got {grid}")
        return grid

    @property
    def bounds(self) -> tuple[float, float]:
        """The lowest and highest value the search can reach (every extension taken)."""
        reach = self.factor**self.cap
        return self.grid[0] / reach, self.grid[-1] * reach

    def applies(self, arm: dict[str, Any]) -> bool:
        """Whether the arm (its values) is one this entry brackets."""
        return all(arm.get(k) in values for k, values in self.condition.items())


def as_list(raw: Any) -> Any:
    """``bracket:`` as a list: one mapping is a list of one, absent is empty."""
    return [] if raw is None else [raw] if isinstance(raw, dict) else raw


def arm_key(arm: dict[str, Any]) -> str:
    """An arm's identity among the choices: its values but the seed, as sorted JSON."""
    return json.dumps({k: v for k, v in arm.items() if k not in ("seed", "eval.seed")}, sort_keys=True)


def budget_of(bracket: Bracket, overrides: dict[str, Any], base: dict[str, Any],
              before: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """What a stored choice depends on: the search's budget, the study's fixed overrides, the base
    config (hashed) and the values the entries before it chose; a stored choice that depends on
    anything else is searched again."""
    digest = hashlib.sha256(json.dumps(base, sort_keys=True, default=str).encode()).hexdigest()[:12]
    fixed = json.loads(json.dumps(overrides, default=str))
    budget = {**bracket.model_dump(mode="json", by_alias=True), "overrides": fixed, "base": digest}
    return budget | ({"before": dict(before)} if before else {})


def distinct_arms(arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A study's arms with the seed left out, each once, in order."""
    seen: dict[str, dict[str, Any]] = {}
    for arm in arms:
        seen.setdefault(arm_key(arm), {k: v for k, v in arm.items() if k not in ("seed", "eval.seed")})
    return list(seen.values())


def attribute(bracket: Bracket, arm: dict[str, Any]) -> str:
    """The study user attribute holding the arm's choice of ``bracket.key``."""
    return f"{PREFIX}{bracket.key} {arm_key(arm)}"


def walk(spec, study, arm: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[Bracket, dict[str, Any]]]]:
    """The arm's stored choices for this budget, in ``spec.bracket``'s order, and the searches it
    still needs (each entry that applies from the first unchosen one on, with the values chosen
    before it; a later entry's budget depends on the earlier choices, so it waits for them)."""
    entries = study.user_attrs if study is not None else {}
    base = read_yaml(spec.base_path())
    chosen: dict[str, Any] = {}
    for i, b in enumerate(spec.bracket):
        if not b.applies(arm):
            continue
        entry = entries.get(attribute(b, arm))
        if not entry or entry.get("budget") != budget_of(b, dict(spec.overrides), base, chosen):
            later = [(c, dict(chosen)) for c in spec.bracket[i:] if c.applies(arm)]
            return chosen, later
        chosen[b.key] = float(entry["value"])
    return chosen, []


def pending(spec, study) -> list[tuple[dict[str, Any], Bracket]]:
    """Every search the study's arms (seed left out) still need before their trials: ``(arm,
    entry)`` pairs, none when ``study`` (``None``: not created yet) holds every choice."""
    return [(arm, b) for arm in distinct_arms(spec.arms) for b, _ in walk(spec, study, arm)[1]]


def value_for(spec, study, chosen: dict[str, Any]) -> dict[str, Any]:
    """``{key: value}`` of every entry applying to the arm ``chosen`` (its searched values), ``{}``
    for a study without ``bracket``; :class:`ConfigError` when a search has not run for this budget."""
    if not spec.bracket:
        return {}
    arm = {k: v for k, v in chosen.items() if k not in ("seed", "eval.seed")}
    values, missing = walk(spec, study, arm)
    if missing:
        raise ConfigError([f"bracket: no {missing[0][0].key} chosen yet for arm {arm_key(arm)} with this budget; "
                           f"`nestar study run` searches it before the study's trials "
                           f"(nestar_lab.sweep.bracket_search.search_brackets)"])  # fmt: skip
    return values


def load_entries(study) -> dict[str, Any]:
    """The choices ``study`` holds: ``KEY ARM`` -> {arm, key, value, scores, neighbours, budget, search}."""
    if study is None:
        return {}
    return {k[len(PREFIX):]: v for k, v in study.user_attrs.items() if k.startswith(PREFIX)}


def store(study, bracket: Bracket, arm: dict[str, Any], entry: dict[str, Any]) -> None:
    """Keep the arm's choice in the study's storage (seen by every process sharing it)."""
    study.set_user_attr(attribute(bracket, arm), entry)


def neighbours(scores: dict[float, float], best: float) -> dict[str, float | None]:
    """The best value's neighbours among those tried (``None`` past an edge)."""
    ordered = sorted(scores)
    i = ordered.index(best)
    return {"below": ordered[i - 1] if i else None, "above": ordered[i + 1] if i + 1 < len(ordered) else None}


def next_value(scores: dict[float, float], grid: list[float], factor: float, cap: int) -> float | None:
    """The next value to try (``scores``: lower is better): past the edge where the best sits,
    ``factor`` beyond it (2 significant digits); ``None`` when the best is bracketed, or that
    side's extensions reached ``cap``. A lone value looks above first."""
    best = min(scores, key=scores.get)
    around = neighbours(scores, best)
    if around["above"] is None:
        side, step = [v for v in scores if v > max(grid)], factor
    elif around["below"] is None:
        side, step = [v for v in scores if v < min(grid)], 1 / factor
    else:
        return None
    if len(side) >= cap:
        return None
    return float(f"{best * step:.2g}")


def describe(around: dict[str, Any], cap: int) -> str:
    """``bracketed by 0.0012 and 0.02``, or which edge the search stopped at (``cap`` reached)."""
    below, above = around.get("below"), around.get("above")
    if below is not None and above is not None:
        return f"bracketed by {below:g} and {above:g}"
    edge = "largest" if above is None else "smallest"
    return f"NOT bracketed: the {edge} tried after {cap} extensions"


def diverged(error: str) -> bool:
    """Whether a failed trial's recorded error is a training that went non-finite."""
    return error.startswith("TrainingFailed:") and "finite" in error


def trial_scores(study, key: str, values: list[float], sign: float = 1.0) -> dict[float, float]:
    """value -> ``sign`` x objective (lower is better) for every value of ``values`` that has an
    outcome in ``study``: a finished trial's, or ``inf`` where its training diverged (a valid, bad
    score). Values lost to an interruption, or failed for another reason, have none: a search is
    then incomplete rather than silently decided among fewer values."""
    import optuna

    scores: dict[float, float] = {}
    for trial in study.get_trials(deepcopy=False):
        value = trial.params.get(key)
        if value not in values:
            continue
        if trial.state == optuna.trial.TrialState.COMPLETE and trial.value is not None:
            scores[value] = min(scores.get(value, math.inf), sign * float(trial.value))
        elif trial.state == optuna.trial.TrialState.FAIL and diverged(str(trial.user_attrs.get("error", ""))):
            scores.setdefault(value, math.inf)
    return scores
