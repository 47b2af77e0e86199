"""Study definitions: a base config, a search space over dotted keys, objectives, sampler, pruner.

A study file (YAML, in ``studies/``)::

    name: solver_sweep
    base: configs/quickstart.yaml          # relative to the study file
    overrides: {train.steps: 200}          # applied to every trial (the CPU-sized default)
    space:
      ode_solver.name: {choices: [euler, midpoint, rk4, dopri5]}
      ode_solver.params.steps: {int: [2, 32], log: true, if: {ode_solver.name: [euler, midpoint, rk4]}}
    objectives:
      - {metric: fid_digits_cnn, direction: minimize}
      - {metric: nfe_per_image, direction: minimize}
    sampler: {name: tpe, params: {seed: 0}}
    pruner: {name: median, params: {n_warmup_steps: 100}}
    report_every: 50                       # intermediate validation loss -> pruner (0: never)
    trials: 8                              # finished (COMPLETE or PRUNED) trials to hold
    heartbeat_seconds: 60                  # a trial silent for 2x this is failed and retried
    max_errors_in_a_row: 3                 # one process gives up after this many failures in a row
    seeds: [0, 1, 2, 3, 4]                 # every arm or grid point once per seed (eval.seed = 1234 + seed)
    reference: {coordination.name: none}   # the arm the report's paired table compares with (default: the first)
    bracket: {key: train.lr, grid: [1.2e-3, 5.0e-3, 2.0e-2]}  # each arm at its own bracketed lr (bracket.py;
                                           # a list brackets several keys in turn, each with an optional if:)

With ``seeds``, ``seed`` joins the space, the arms are crossed with the seeds (queued seed by seed:
every arm's seed 0, then seed 1, ...) and ``trials`` defaults to every combination; ``nestar study
report`` then prints each arm's paired difference from the reference arm over the seeds
(``nestar_lab.sweep.paired``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

import optuna
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nestar_lab.config.errors import ConfigError
from nestar_lab.config.overrides import apply_overrides, read_yaml
from nestar_lab.config.validation import _error_lines
from nestar_lab.sweep import checks
from nestar_lab.sweep.bracket import Bracket, as_list, value_for


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ParamSpace(Strict):
    """One searched key: ``choices``, an ``int`` or a ``float`` range (``log``, ``step``), and an
    optional condition ``if: {other.key: [values]}`` under which it is searched at all."""

    choices: list[Any] | None = None
    int_range: tuple[int, int] | None = Field(None, alias="int")
    float_range: tuple[float, float] | None = Field(None, alias="float")
    log: bool = False
    step: float | None = None
    condition: dict[str, list[Any]] = Field(default_factory=dict, alias="if")

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k in (self.choices, self.int_range, self.float_range) if k is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of choices, int: [low, high], float: [low, high]")
        if self.choices is not None:  # what Optuna would refuse only when a trial asks for a value
            if not self.choices:
                raise ValueError("choices: empty; give at least one value")
            return self
        kind, (low, high) = ("int", self.int_range) if self.int_range is not None else ("float", self.float_range)
        if low > high:
            raise ValueError(f"{kind}: [{low}, {high}] has low above high; give [low, high]")
        if self.log and (low <= 0 if kind == "float" else low < 1):
            least = "> 0" if kind == "float" else ">= 1"
            raise ValueError(f"log: a log range needs low {least}; got {kind}: [{low}, {high}]")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step: expected a value > 0, got {self.step}")
        if self.log and self.step not in (None, 1):
            raise ValueError("step: Optuna searches a log range without steps; drop step or log")
        return self

    def holds(self, value: Any) -> bool:
        """Whether the space can propose ``value`` (an arm's value, a condition's)."""
        if self.choices is not None:
            return value in self.choices
        low, high = self.int_range or self.float_range
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        return numeric and low <= value <= high and (self.int_range is None or float(value).is_integer())

    def shown(self) -> str:
        if self.choices is not None:
            return f"choices {self.choices}"
        return f"int: {list(self.int_range)}" if self.int_range is not None else f"float: {list(self.float_range)}"

    def suggest(self, trial: optuna.Trial, key: str) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(key, self.choices)
        if self.int_range is not None:
            step = int(self.step or 1)
            return trial.suggest_int(key, *self.int_range, log=self.log, step=step)
        return trial.suggest_float(key, *self.float_range, log=self.log, step=self.step)


class Objective(Strict):
    """A metric of the results row and whether to minimise or maximise it."""

    metric: str
    direction: Literal["minimize", "maximize"] = "minimize"


class NamedSpec(Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)


SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "grid": optuna.samplers.GridSampler,
    "nsga2": optuna.samplers.NSGAIISampler,
}
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "none": optuna.pruners.NopPruner,
}


SAMPLING_KEYS = ("ode_solver.", "sample.", "eval.", "metrics")
# A module's solver and guidance scale act at sampling only; its network (scale_module) is trained.
_MODULE_SAMPLING_KEY = re.compile(r"modules\.\d+\.(ode_solver(\.|$)|cfg_scale$)")


def is_sampling_key(key: str) -> bool:
    """True for a dotted config key that changes sampling only (training ignores it)."""
    return key.startswith(SAMPLING_KEYS) or _MODULE_SAMPLING_KEY.match(key) is not None


class StudySpec(Strict):
    """A study: what to start from, what to search, what to optimise."""

    name: str
    base: str
    overrides: dict[str, Any] = Field(default_factory=dict)
    space: dict[str, ParamSpace] = Field(default_factory=dict)
    arms: list[dict[str, Any]] = Field(
        default_factory=list, description="explicit trials (values for searched keys), enqueued once"
    )
    objectives: list[Objective] = Field(min_length=1)
    sampler: NamedSpec = NamedSpec(name="tpe", params={"seed": 0})
    pruner: NamedSpec = NamedSpec(name="median")
    report_every: int = Field(0, ge=0, strict=True, description="steps between validation-loss reports (0: none)")
    trials: int = Field(8, ge=1, strict=True, description="default number of finished (COMPLETE or PRUNED) trials for `study run`")
    heartbeat_seconds: int = Field(
        60, ge=1, strict=True, description="a running trial's heartbeat interval; a trial silent for twice this is failed and retried"
    )
    max_errors_in_a_row: int = Field(
        3, ge=1, strict=True, description="trials failed by an error in a row after which one `study run` process gives up"
    )
    output_dir: str = "runs/studies"
    notes: str = ""
    seeds: list[int] = Field(default_factory=list, description="train every arm or grid point once per seed (paired)")
    reference: dict[str, Any] | None = Field(None, description="the arm the paired table compares with (default: the first)")
    bracket: list[Bracket] = Field(default_factory=list, description="each arm at its own bracketed values (searched first)")
    source: Path | None = Field(None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _cross_seeds(cls, raw: Any) -> Any:
        """``seeds``: ``seed`` searched over them, arms crossed with them, ``trials`` defaulting to
        every combination. Idempotent, so a dumped spec validates to itself."""
        if not isinstance(raw, dict) or "seeds" not in raw:
            return raw
        seeds = raw["seeds"]
        if not isinstance(seeds, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
            raise ValueError(f"seeds: expected a list of integers, got {seeds!r}")
        if len(set(seeds)) < 2:
            raise ValueError(f"seeds: {len(set(seeds))} distinct seed(s) give no interval; give at least 2 "
                             f"(5 or more to resolve much)")  # fmt: skip
        space = dict(raw.get("space") or {})
        given = space.get("seed")
        if given is not None and not (isinstance(given, dict) and given.get("choices") == seeds):
            raise ValueError("space.seed: with seeds given the study searches the seed itself; remove space.seed")
        space["seed"] = given or {"choices": seeds}
        arms = list(raw.get("arms") or [])
        if arms and not all(isinstance(a, dict) and "seed" in a for a in arms):
            # seed by seed (every arm's seed 0, then seed 1, ...): a study stopped part-way holds
            # complete pairs, and what drifts while it runs (the machine, a neighbour) falls on every arm
            arms = [{**a, "seed": x} for x in seeds for a in arms if isinstance(a, dict)]
        trials = raw.get("trials")
        if trials is None:
            grid = [len(v.get("choices") or []) for k, v in space.items() if isinstance(v, dict)]
            trials = len(arms) if arms else (math.prod(grid) if all(grid) else None)
        return {**raw, "space": space, "arms": arms} | ({"trials": trials} if trials is not None else {})

    @field_validator("name")
    @classmethod
    def _a_directory_name(cls, name: str) -> str:  # the study's directory, its trials' run names
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError("expected letters, digits, '_', '.' or '-' (it names the study's directory)")
        return name

    @model_validator(mode="after")
    def _known_parts(self):
        if self.sampler.name not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler.name!r} unknown; choose from {', '.join(SAMPLERS)}")
        if self.pruner.name not in PRUNERS:
            raise ValueError(f"pruner {self.pruner.name!r} unknown; choose from {', '.join(PRUNERS)}")
        ranges = [k for k, v in self.space.items() if v.choices is None]
        if self.sampler.name == "grid" and ranges and "search_space" not in self.sampler.params:
            raise ValueError(f"sampler: grid walks lists of values; space.{ranges[0]} is a range (give it choices: "
                             f"[...], or use sampler random or tpe)")  # fmt: skip
        for key, space in self.space.items():
            for other, values in space.condition.items():
                if other not in self.space:
                    raise ValueError(f"space.{key}: condition on {other!r}, which is not searched")
                if not any(self.space[other].holds(v) for v in values):
                    raise ValueError(f"space.{key}: condition {other} in {values} never holds ({other} searches "
                                     f"{self.space[other].shown()}), so {key} would never be searched")  # fmt: skip
        for i, arm in enumerate(self.arms):
            unknown = set(arm) - set(self.space)
            if unknown:
                raise ValueError(f"arms.{i}: keys {sorted(unknown)} are not in the search space")
            for key, value in arm.items():
                if key != "seed" and not self.space[key].holds(value):
                    raise ValueError(f"arms.{i}.{key}: {value!r} is outside the space's {self.space[key].shown()}; "
                                     f"add it to the space or change the arm")  # fmt: skip
        if self.reference is not None:
            if not self.seeds:
                raise ValueError("reference: a paired comparison needs seeds: [..] (at least 2)")
            unknown = set(self.reference) - set(self.space)
            if unknown:
                raise ValueError(f"reference: keys {sorted(unknown)} are not in the search space")
            if self.arms and not any(all(a.get(k) == v for k, v in self.reference.items()) for a in self.arms):
                raise ValueError(f"reference: {self.reference} is none of the arms")
        if not self.space:
            raise ValueError("space: empty; a study must search at least one config key")
        if self.bracket:
            self._check_brackets()
        if self.seeds and len(self.space) == 1 and not self.arms:
            raise ValueError("seeds: the space searches nothing but the seed; add the keys to compare")
        return self

    def _check_brackets(self) -> None:
        if not self.arms:
            raise ValueError("bracket: needs arms (each arm gets its own search of bracket.key)")
        keys = [b.key for b in self.bracket]
        for i, b in enumerate(self.bracket):
            at = "bracket" if len(self.bracket) == 1 else f"bracket.{i}"
            if b.key in self.space or b.key in self.overrides:
                where = "space" if b.key in self.space else "overrides"
                raise ValueError(f"{at}.key: {b.key} is also set in {where}; a bracketed key is "
                                 f"chosen per arm by its search, so give it in one place")  # fmt: skip
            if b.key in keys[:i]:
                raise ValueError(f"{at}.key: {b.key} is bracketed twice; give each key one entry")
            if b.seed in self.seeds:
                raise ValueError(f"{at}.seed: {b.seed} is one of the study's seeds; the search "
                                 f"must train on a seed the comparison does not use")  # fmt: skip
            unknown = sorted(set(b.condition) - set(self.space))
            if unknown:
                raise ValueError(f"{at}.if: {unknown} are not in the search space (an entry applies to arms "
                                 f"by their values)")  # fmt: skip
            if not any(b.applies(arm) for arm in self.arms):
                raise ValueError(f"{at}.if: {b.condition} holds for none of the arms, so {b.key} would never "
                                 f"be searched")  # fmt: skip

    @field_validator("bracket", mode="before")
    @classmethod
    def _one_or_several(cls, raw: Any) -> Any:
        return as_list(raw)

    @property
    def sampling_only(self) -> bool:
        """True when only sampling-time keys are searched: trials then share one training."""
        return bool(self.space) and all(is_sampling_key(k) for k in self.space)

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def study_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def base_path(self) -> Path:
        root = self.source.parent if self.source else Path(".")
        return root / self.base

    def make_sampler(self, stream: int = 0) -> optuna.samplers.BaseSampler:
        """The study's sampler; ``stream`` > 0 offsets a given ``seed`` (``storage.open_study``:
        every process that joins a study, or continues it, draws its own numbers)."""
        params = dict(self.sampler.params)
        if stream and params.get("seed") is not None:
            params["seed"] = int(params["seed"]) + stream
        if self.sampler.name == "grid":
            params.setdefault("search_space", {k: v.choices for k, v in self.space.items()})
        return SAMPLERS[self.sampler.name](**params)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        return PRUNERS[self.pruner.name](**self.pruner.params)


def load_study(name_or_path: str | Path) -> StudySpec:
    """A study by file path, or by name from ``studies/<name>.yaml``."""
    path = Path(name_or_path)
    if not path.suffix:
        path = Path("studies") / f"{name_or_path}.yaml"
    raw = read_yaml(path)
    try:
        spec = StudySpec.model_validate(raw)
    except Exception as exc:  # pydantic ValidationError -> one line per problem
        lines = _error_lines(exc) if hasattr(exc, "errors") else [str(exc)]
        if isinstance(raw, dict) and isinstance(raw.get("bracket"), dict):  # one entry, given as a mapping
            lines = [re.sub(r"^bracket\.0\b", "bracket", line) for line in lines]
        raise ConfigError([f"{path}: {line}" for line in lines]) from None
    spec = spec.model_copy(update={"source": path})
    if not spec.base_path().is_file():
        raise ConfigError([f"{path}: base config {spec.base_path()} not found"])
    problems = checks.strategy_problems(spec) or checks.space_problems(spec) or checks.objective_problems(spec)
    if problems:
        raise ConfigError([f"{path}: {line}" for line in problems])
    return spec


def trial_overrides(spec: StudySpec, trial: optuna.Trial) -> dict[str, Any]:
    """The study's fixed overrides plus this trial's suggestions (conditions respected)."""
    chosen: dict[str, Any] = {}
    for key, space in spec.space.items():  # conditions refer to keys listed before them
        if all(chosen.get(other) in values for other, values in space.condition.items()):
            chosen[key] = space.suggest(trial, key)
    if spec.seeds and "seed" in chosen:  # a seed fixes the evaluation draw too, as bench_quality does
        chosen.setdefault("eval.seed", 1234 + int(chosen["seed"]))
    return {**spec.overrides, **value_for(spec, trial.study, chosen), **chosen}


def apply_dotted(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A trial's ``{dotted.key: value}`` overrides set in ``raw``: :func:`nestar_lab.config.validation.apply_overrides`,
    the one mechanism the CLI's ``--set`` uses too (a changed ``name`` drops the part's previous params)."""
    return apply_overrides(raw, overrides)
