"""Running the bracketing searches (``bracket.py`` has the rule): one small Optuna study per arm
and ``bracket:`` entry, run by ``nestar study run`` before the study's own trials, each an
ordinary study in the study's storage with its runs under ``<study_dir>/brackets/`` (resumable;
``nestar study report <its study.yaml> --storage URL`` reads it). With ``--workers`` the arms
search side by side, one process per group of arms (``python -m nestar_lab.sweep.bracket_search``)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import signal
import sys
from typing import Any, Sequence

import optuna
import yaml

from nestar_lab.config.overrides import read_yaml
from nestar_lab.config.validation import dump_config, validate_config
from nestar_lab.sweep.bracket import (
    Bracket,
    budget_of,
    distinct_arms,
    load_entries,
    neighbours,
    next_value,
    store,
    trial_scores,
    walk,
)
from nestar_lab.sweep.storage import StudyFailed, fail_stale
from nestar_lab.sweep.study import NamedSpec, ParamSpace, StudySpec, apply_dotted
from nestar_lab.sweep.tuning import Objective, run_study
from nestar_lab.sweep.workers import how_it_ended, run_processes, visible_gpus, worker_env


def extend(study: optuna.Study, spec: StudySpec, key: str, grid: list[float], factor: float, cap: int,
           label: str, sign: float = 1.0) -> tuple[float, dict[float, float]]:  # fmt: skip
    """Score ``grid`` (``study``'s trials, run already) and extend past the edge where the best sits
    until it is bracketed (``bracket.next_value``), one trial of ``spec`` per extension; a resumed
    search finds the values it already ran. Returns the best value and every value's score (``sign``
    x objective: lower is better). :class:`StudyFailed` when a value has no score (a trial failed for
    another reason than divergence) or every training diverged: nothing is decided then."""
    tried = list(grid)
    while True:
        scores = trial_scores(study, key, tried, sign)
        missing = [v for v in tried if v not in scores]
        if missing or all(math.isinf(v) for v in scores.values()):
            errors = [t.user_attrs.get("error") or t.user_attrs.get("invalid") for t in study.trials if t.user_attrs]
            raise StudyFailed(f"{label}: {key} search incomplete (values without a score: "
                               f"{missing or 'all diverged'}; {errors}); nothing stored, "
                               f"see {spec.study_dir}")  # fmt: skip
        value = next_value(scores, grid, factor, cap)
        if value is None:
            return min(scores, key=scores.get), scores
        tried.append(value)
        if value not in trial_scores(study, key, [value], sign):
            print(f"[bracket] {label}: best {key} {min(scores, key=scores.get):g} at an edge; trying {value:g}",
                  file=sys.stderr, flush=True)  # fmt: skip
            fail_stale(study)  # a dead process's trial at this value is queued again, not left RUNNING
            study.enqueue_trial({key: value}, skip_if_exists=True)
            objective = Objective(spec)
            study.optimize(objective, n_trials=1, catch=(Exception,))
            if objective.interrupted is not None:  # its trial is queued again: a re-run goes on from it
                code = getattr(objective.interrupted, "exit_code", None) or 128 + signal.SIGINT
                raise StudyFailed(f"{label}: {key} search interrupted at {value:g}; re-run the same command to go on",
                                  exit_code=code)  # fmt: skip


def search_metrics(cfg, objective: str) -> list[dict[str, Any]]:
    """The config's metrics that give ``objective`` (a search scores nothing else), or all of them
    when a metric cannot say before computing."""
    from nestar_lab.config.parts import make

    keep = []
    for entry in cfg.metrics:
        names = make("metric", entry).names(cfg.dataset.name)
        if names is None:
            return [m.model_dump(mode="json") for m in cfg.metrics]
        if objective in names:
            keep.append(entry.model_dump(mode="json"))
    return keep


def arm_study(spec: StudySpec, arm: dict[str, Any], b: Bracket, before: dict[str, Any], storage: str) -> StudySpec:
    """The arm's search of ``b.key``: base = the study's base with its overrides, the arm's values and
    those the entries before ``b`` chose (``before``), written to the search's directory; trials =
    the grid, scored by the study's first objective. It lives in the study's own ``storage`` (named
    after the study), so processes sharing the study share it."""
    root = spec.study_dir / "brackets"
    shown = json.dumps({**arm, **before}, sort_keys=True, default=str)
    name = f"{spec.name}.bracket.{b.key}-{hashlib.sha256(shown.encode()).hexdigest()[:8]}"
    study_dir = root / name
    study_dir.mkdir(parents=True, exist_ok=True)
    cfg = validate_config(apply_dotted(copy.deepcopy(read_yaml(spec.base_path())), {**spec.overrides, **arm, **before}))
    dump_config(cfg, study_dir / "base.yaml")
    objective = spec.objectives[0]
    sub = StudySpec(
        name=name,
        base="base.yaml",
        overrides={"train.steps": b.steps, "eval.samples_per_class": b.samples_per_class, "seed": b.seed,
                   "metrics": search_metrics(cfg, objective.metric)},  # fmt: skip
        space={b.key: ParamSpace(float_range=b.bounds, log=True)},
        arms=[{b.key: v} for v in b.grid],
        objectives=[objective],
        sampler=NamedSpec(name="random", params={"seed": 0}),
        pruner=NamedSpec(name="none"),
        trials=len(b.grid),
        max_errors_in_a_row=1,  # a failed value is not replaced by a random one: the search stops
        output_dir=str(root.resolve()),
        notes=f"bracketing {b.key} for arm {shown} of study {spec.name}; its storage: {storage} "
              f"(nestar study report THIS_FILE --storage URL)",
    )
    source = study_dir / "study.yaml"
    source.write_text(yaml.safe_dump(sub.model_dump(mode="json", by_alias=True, exclude={"source"}, exclude_none=True),
                                     sort_keys=False))  # fmt: skip
    return sub.model_copy(update={"source": source})


def search_brackets(spec: StudySpec, study: optuna.Study, storage: str, workers: int = 1,
                    only: Sequence[int] | None = None) -> dict[str, Any]:  # fmt: skip
    """Every arm's bracketed values, searched where ``study`` lacks them for this budget (each arm's
    entries in ``bracket:``'s order, each choice kept in the study's storage as its search
    finishes). An arm's searches depend only on its own earlier choices, so with ``workers`` > 1
    the arms search side by side in up to ``workers`` processes (:func:`search_in_processes`).
    ``only``: the indices (into ``bracket.distinct_arms``) of the arms to search here. Returns the
    study's choices."""
    arms = distinct_arms(spec.arms)
    todo = [i for i, arm in enumerate(arms) if (only is None or i in only) and walk(spec, study, arm)[1]]
    if workers > 1 and len(todo) > 1:
        search_in_processes(spec, storage, todo, workers)
        return load_entries(study)
    sign = 1.0 if spec.objectives[0].direction == "minimize" else -1.0
    base = read_yaml(spec.base_path())
    for arm in (arms[i] for i in todo):
        label = ", ".join(f"{k}={v}" for k, v in arm.items()) or "(base)"
        while True:
            _, missing = walk(spec, study, arm)
            if not missing:
                break
            b, before = missing[0]
            sub = arm_study(spec, arm, b, before, storage)
            given = "".join(f", {k}={v:g}" for k, v in before.items())
            print(f"[bracket] {spec.name}: {b.key} for {label}{given} ({len(b.grid)}+ trials x {b.steps} steps)",
                  file=sys.stderr, flush=True)  # fmt: skip
            search = run_study(sub, trials=sub.trials, storage=storage)
            best, scores = extend(search, sub, b.key, list(b.grid), b.factor, b.cap, label, sign)
            objective = {v: (sign * x if math.isfinite(x) else None) for v, x in scores.items()}  # None: diverged
            entry = {"arm": arm, "key": b.key, "value": best, "neighbours": neighbours(scores, best),
                     "scores": sorted(objective.items()), "objective": spec.objectives[0].metric,
                     "budget": budget_of(b, dict(spec.overrides), base, before), "search": sub.name}  # fmt: skip
            print(f"[bracket] {label}: {b.key} {best:g}", file=sys.stderr, flush=True)
            store(study, b, arm, entry)
    return load_entries(study)


def search_in_processes(spec: StudySpec, storage: str, todo: list[int], workers: int) -> None:
    """The arms ``todo`` (indices into ``distinct_arms``) dealt round-robin to ``min(workers,
    len(todo))`` processes (``python -m nestar_lab.sweep.bracket_search``), each with its share of
    the cores (a GPU each where several are visible), as ``--workers`` shares the trials.
    :class:`StudyFailed` when one did not finish (the others' choices are kept) or on SIGTERM/Ctrl-C
    (each process stops at a checkpoint; its search trial is queued again)."""
    n = min(workers, len(todo))
    groups = [todo[i::n] for i in range(n)]
    gpus = visible_gpus()
    commands = [([sys.executable, "-m", "nestar_lab.sweep.bracket_search", str(spec.source), storage,
                  ",".join(map(str, group))], worker_env(i, n, gpus)) for i, group in enumerate(groups)]  # fmt: skip
    print(f"[bracket] {spec.name}: {len(todo)} arms' searches in {n} processes side by side", file=sys.stderr,
          flush=True)  # fmt: skip
    procs, codes, stopped = run_processes(commands)
    if stopped:
        raise StudyFailed(f"study {spec.name}: bracketing searches interrupted ({signal.Signals(stopped[0]).name}); "
                          "each search's trial is queued again: re-run the same command to go on",
                          exit_code=128 + stopped[0])  # fmt: skip
    died = [f"the search of arm(s) {','.join(map(str, g))} (pid {p.pid}) {how_it_ended(c)}"
            for g, p, c in zip(groups, procs, codes) if c]  # fmt: skip
    if died:
        code = next((c for c in codes if c > 0), 1)  # a process's own exit code (a signal's death: 1)
        raise StudyFailed("; ".join(died) + "; its error is above, the other choices are kept: re-run the same "
                          "command to go on", exit_code=code)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """``python -m nestar_lab.sweep.bracket_search STUDY_FILE STORAGE ARMS``: search the arms ARMS
    (comma-separated indices into ``distinct_arms``) in this process, as :func:`search_in_processes`
    starts it. Errors end as one line on stderr and an exit code, as ``nestar`` does."""
    from nestar_lab.config.errors import describe
    from nestar_lab.sweep.storage import open_study
    from nestar_lab.sweep.study import load_study

    source, storage, arms = argv if argv is not None else sys.argv[1:]
    try:
        spec = load_study(source)
        search_brackets(spec, open_study(spec, storage), storage, only=[int(a) for a in arms.split(",")])
    except (Exception, KeyboardInterrupt) as exc:
        code, lines = describe(exc)
        for line in lines:
            print(line, file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
