"""Bracketing one key per arm: the rule, and where its choices are kept (``bracket:`` in a study).

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
side found none. Each arm's choice is kept in the study's own storage (a user attribute
``bracket {arm}``, with the budget it was found with), so every process and machine sharing the
study trains an arm at the same value; a changed budget, base or arm searches again. The quality
benchmark's learning-rate search (``benchmarks/lr_search.py``) applies the same rule.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nestar_lab.config.errors import ConfigError
from nestar_lab.config.overrides import read_yaml

PREFIX = "bracket "  # study user attribute of an arm's choice: PREFIX + arm_key(arm)


class Bracket(BaseModel):
    """``bracket:``: the key every arm gets its own bracketed value of, and the search's budget."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(description="dotted config key chosen per arm (train.lr, coordination.params.weight)")
    grid: list[float] = Field(min_length=2, description="the first values tried, ascending, all > 0")
    factor: float = Field(4.0, gt=1, description="each extension past an edge: x factor (or / factor)")
    cap: int = Field(3, ge=0, strict=True, description="at most this many extensions on a side")
    steps: int = Field(150, ge=1, strict=True, description="training steps of each search trial")
    samples_per_class: int = Field(20, ge=1, strict=True, description="samples per class scoring a trial")
    seed: int = Field(100, strict=True, description="training seed of every search trial (none of the study's seeds)")

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


def arm_key(arm: dict[str, Any]) -> str:
    """An arm's identity among the choices: its values but the seed, as sorted JSON."""
    return json.dumps({k: v for k, v in arm.items() if k not in ("seed", "eval.seed")}, sort_keys=True)


def budget_of(bracket: Bracket, overrides: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """What a stored choice depends on: the search's budget, the study's fixed overrides and the
    base config (hashed); a stored choice with another budget is searched again."""
    digest = hashlib.sha256(json.dumps(base, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return {**bracket.model_dump(mode="json"), "overrides": json.loads(json.dumps(overrides, default=str)),
            "base": digest}  # fmt: skip


def distinct_arms(arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A study's arms with the seed left out, each once, in order."""
    seen: dict[str, dict[str, Any]] = {}
    for arm in arms:
        seen.setdefault(arm_key(arm), {k: v for k, v in arm.items() if k not in ("seed", "eval.seed")})
    return list(seen.values())


def study_budget(spec) -> dict[str, Any]:
    """:func:`budget_of` for a study (a ``StudySpec`` with a ``bracket``)."""
    return budget_of(spec.bracket, dict(spec.overrides), read_yaml(spec.base_path()))


def pending(spec, study) -> list[dict[str, Any]]:
    """The study's arms (seed left out) whose bracketed value ``study`` (``None``: not created yet)
    does not hold for the study's budget."""
    if spec.bracket is None:
        return []
    entries, budget = load_entries(study), study_budget(spec)
    return [arm for arm in distinct_arms(spec.arms) if chosen_value(entries, arm, budget) is None]


def value_for(spec, study, chosen: dict[str, Any]) -> dict[str, Any]:
    """``{key: value}`` for a trial of the arm ``chosen`` (its searched values), ``{}`` for a study
    without ``bracket``; :class:`ConfigError` when the arm's search has not run for this budget."""
    if spec.bracket is None:
        return {}
    value = chosen_value(load_entries(study), chosen, study_budget(spec))
    if value is None:
        raise ConfigError([f"bracket: no {spec.bracket.key} chosen yet for arm {arm_key(chosen)} with this budget; "
                           f"`nestar study run` searches it before the study's trials "
                           f"(nestar_lab.sweep.bracket_search.search_brackets)"])  # fmt: skip
    return {spec.bracket.key: value}


def load_entries(study) -> dict[str, Any]:
    """The choices ``study`` holds: arm key -> {arm, key, value, scores, neighbours, budget, search}."""
    if study is None:
        return {}
    return {k[len(PREFIX):]: v for k, v in study.user_attrs.items() if k.startswith(PREFIX)}


def store(study, arm: dict[str, Any], entry: dict[str, Any]) -> None:
    """Keep the arm's choice in the study's storage (seen by every process sharing it)."""
    study.set_user_attr(PREFIX + arm_key(arm), entry)


def chosen_value(entries: dict[str, Any], arm: dict[str, Any], budget: dict[str, Any]) -> float | None:
    """The arm's bracketed value when searched with ``budget``, else ``None``."""
    entry = entries.get(arm_key(arm))
    return float(entry["value"]) if entry and entry.get("budget") == budget else None


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
