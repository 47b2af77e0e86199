"""The same learning-rate search for every quality variant, run through the study machinery.

Each variant gets one Optuna study (``nestar_lab.sweep.tuning.run_study``): its base config is the
variant's resolved config (``variants.CONFIG``, the frozen quickstart, plus the variant's
overrides, written to the study directory), the searched key is ``train.lr`` (log-uniform over
``LR_RANGE``), and the trials are the same log-spaced grid of arms for every variant, trained for
the same few steps with a search seed kept apart from the benchmark's seeds, and scored by FID on
a few samples. The chosen learning rate per variant (and every trial's score) goes to
``lr.json``; a variant whose search with the same budget is already there is not searched again,
and an interrupted search resumes from its study storage.

Bracketing (the rule of ``nestar_lab.sweep.bracket``, which studies' ``bracket:`` applies too):
when the best learning rate is the grid's largest (smallest), the search goes on past that edge,
one arm at a time, each ``BRACKET_FACTOR`` beyond the best so far, until the best has a worse
neighbour on both sides (a diverged training counts as worse), or ``BRACKET_CAP`` extensions on
that side found none; ``lr.json`` and the table state each variant's bracket.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from nestar_lab.config.validation import dump_config, load_config
from nestar_lab.sweep import bracket
from nestar_lab.sweep.bracket_search import extend
from nestar_lab.sweep.study import NamedSpec, Objective, ParamSpace, StudySpec
from nestar_lab.sweep.tuning import run_study

LR_RANGE = (3.0e-4, 5.0e-3)  # the first grid; a search extends past an edge where its best lr sits
BRACKET_FACTOR, BRACKET_CAP = 4.0, 3  # each extension x4 (or /4); at most 3 on a side
LR_BOUNDS = (LR_RANGE[0] / BRACKET_FACTOR**BRACKET_CAP, LR_RANGE[1] * BRACKET_FACTOR**BRACKET_CAP)
SEARCH_SEED = 100  # training seed of every search trial: none of the benchmark's seeds
OBJECTIVE = "fid_digits_cnn"
SEARCH_METRICS = [  # FID only: the search's evaluations stay cheap
    {"name": "fidelity", "params": {"extractor": "dataset_cnn", "reference": "train", "isc": False,
                                    "kid": False, "prc": False, "real_baseline": False}},
]  # fmt: skip


def lr_grid(trials: int) -> list[float]:
    """``trials`` learning rates spaced evenly in log over ``LR_RANGE`` (2 significant digits)."""
    lo, hi = (math.log(v) for v in LR_RANGE)
    if trials == 1:
        return [float(f"{math.exp((lo + hi) / 2):.2g}")]
    return [float(f"{math.exp(lo + (hi - lo) * i / (trials - 1)):.2g}") for i in range(trials)]


def budget(trials: int, steps: int, samples_per_class: int) -> dict[str, Any]:
    """What every variant's search spends; stored with its result and stated in the table."""
    return {"grid": lr_grid(trials), "steps": steps, "samples_per_class": samples_per_class,
            "objective": OBJECTIVE, "seed": SEARCH_SEED,
            "bracket": {"factor": BRACKET_FACTOR, "cap": BRACKET_CAP}}  # fmt: skip


def describe(b: dict[str, Any]) -> str:
    """One line for a caption: the search every variant got."""
    grid = ", ".join(f"{v:g}" for v in b["grid"])
    return (f"Learning rate per variant: the best of a first grid of {len(b['grid'])} trials (lr in {{{grid}}}), "
            f"extended past an edge x{BRACKET_FACTOR:g} at a time (at most {BRACKET_CAP} per side) until the best "
            f"has a worse neighbour on both sides; each trial {b['steps']} steps at seed {b['seed']}, scored by "
            f"{b['objective']} on {b['samples_per_class']} samples per class (an Optuna study per variant, same "
            f"rule for all)")  # fmt: skip


def make_spec(config: str, slug: str, overrides: list[str], b: dict[str, Any], root: Path) -> StudySpec:
    """The variant's study: base = its resolved config, trials = the grid's arms."""
    tag = hashlib.sha256(json.dumps(overrides).encode()).hexdigest()[:6]  # the variant's definition
    name = f"lr_{slug}_{tag}_t{len(b['grid'])}_s{b['steps']}_n{b['samples_per_class']}"
    study_dir = root / name
    study_dir.mkdir(parents=True, exist_ok=True)
    dump_config(load_config(config, overrides), study_dir / "base.yaml")
    spec = StudySpec(
        name=name,
        base="base.yaml",
        overrides={"train.steps": b["steps"], "eval.samples_per_class": b["samples_per_class"],
                   "seed": b["seed"], "metrics": SEARCH_METRICS},  # fmt: skip
        space={"train.lr": ParamSpace(float_range=LR_BOUNDS, log=True)},  # room for the extensions
        arms=[{"train.lr": lr} for lr in b["grid"]],
        objectives=[Objective(metric=b["objective"], direction="minimize")],
        sampler=NamedSpec(name="random", params={"seed": 0}),
        pruner=NamedSpec(name="none"),
        trials=len(b["grid"]),
        output_dir=str(root),
    )
    source = study_dir / "study.yaml"  # `nestar study report <source>` reads the study back
    dumped = spec.model_dump(mode="json", by_alias=True, exclude={"source"}, exclude_none=True)
    dumped["output_dir"] = str(root.resolve())
    source.write_text(yaml.safe_dump(dumped, sort_keys=False))
    return spec.model_copy(update={"source": source})


def load_chosen(path: Path) -> dict[str, Any]:
    """``lr.json``: label -> {lr, budget, overrides, trials (lr, FID), study_dir}."""
    return json.loads(path.read_text()) if path.is_file() else {}


def current(entry: dict[str, Any], overrides: list[str], b: dict[str, Any]) -> bool:
    """Whether a stored search is for this variant's definition and this budget."""
    return entry.get("budget") == b and entry.get("overrides") == overrides


def describe_bracket(entry: dict[str, Any]) -> str:
    """``bracketed by 1.2e-3 and 2e-2``, or which edge it is stuck at (the cap was reached)."""
    return bracket.describe(entry.get("bracket") or {}, BRACKET_CAP)


def choose_lr(config: str, label: str, slug: str, overrides: list[str], b: dict[str, Any], root: Path,
              store: Path) -> float:  # fmt: skip
    """The variant's learning rate: from ``store`` when searched with budget ``b``, else searched now
    (``config`` plus ``overrides`` is the variant; its study lives under ``root``)."""
    chosen = load_chosen(store)
    if current(chosen.get(label, {}), overrides, b):
        return float(chosen[label]["lr"])
    spec = make_spec(config, slug, overrides, b, root)
    study = run_study(spec, trials=spec.trials)
    best, scores = extend(study, spec, "train.lr", list(b["grid"]), BRACKET_FACTOR, BRACKET_CAP, label)
    entry = {"lr": best, "budget": b, "overrides": overrides, "trials": sorted(scores.items()),
             "bracket": bracket.neighbours(scores, best), "study_dir": str(spec.study_dir)}  # fmt: skip
    chosen = load_chosen(store) | {label: entry}  # reread: another process may have added a variant
    store.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.with_name(f"{store.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(chosen, indent=1) + "\n")
    tmp.replace(store)
    return float(entry["lr"])
