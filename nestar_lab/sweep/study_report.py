"""A study's report: the trials joined to their runs' metrics, the best trial(s) and the plots
(``nestar study report``; plotting in ``plots.py``)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from nestar_lab.run import results
from nestar_lab.sweep.storage import check_storage, open_study
from nestar_lab.sweep.study import StudySpec

if TYPE_CHECKING:  # annotations only (pandas is imported where tables are made)
    import pandas as pd


def trials_table(study: optuna.Study, spec: StudySpec):
    """Trials (number, state, params, objectives, run id, reasons) joined to their runs' metrics.

    ``objective:<metric>`` holds a COMPLETE trial's objective value (NaN otherwise: optuna
    stores a pruned trial's last intermediate value as its value, which is a validation loss,
    not the objective); ``last_val_loss`` and ``last_val_loss_step`` hold the last intermediate
    value any trial reported (what a pruned trial was pruned on); ``retry_of`` names the lost
    trial a retry re-runs."""
    import pandas as pd

    from nestar_lab.run import results

    names = [o.metric for o in spec.objectives]
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        row.update({f"param:{k}": v for k, v in t.params.items()})
        complete = t.state == TrialState.COMPLETE and t.values is not None
        for i, name in enumerate(names):
            row[f"objective:{name}"] = t.values[i] if complete and i < len(t.values) else float("nan")
        last = max(t.intermediate_values) if t.intermediate_values else None
        row["last_val_loss"] = t.intermediate_values[last] if last is not None else float("nan")
        row["last_val_loss_step"] = last
        # a finished trial shows no reason to stop (a retry of an interrupted trial inherits its origin's)
        hidden = {"run_dir", "run_name", *(("interrupted", "error") if t.state == TrialState.COMPLETE else ())}
        row.update({k: v for k, v in t.user_attrs.items() if k not in hidden and v is not None})
        if t.datetime_start and t.datetime_complete:
            row["seconds"] = (t.datetime_complete - t.datetime_start).total_seconds()
        rows.append(row)
    df = pd.DataFrame(rows)
    runs = results.load(spec.study_dir)
    if "run_id" in df.columns and not runs.empty:
        metric_cols = [m for m in names if m in runs.columns]
        extra = [c for c in ("class_accuracy", "sec_per_image", "nfe_per_image") if c in runs.columns]
        keep = ["run_id", *dict.fromkeys(metric_cols + extra)]
        df = df.merge(runs[keep].drop_duplicates("run_id", keep="last"), on="run_id", how="left")
        # a resumed retry shares its lost origin's run: the run's metrics are the retry's
        df.loc[df["state"] != "COMPLETE", keep[1:]] = float("nan")
    return df


def arm_label(params: dict[str, Any]) -> str:
    """An arm's name in the paired table: its searched values but the seed, ``key=value, ...``; a
    number reads the same whatever its type (a trials table with a waiting trial holds k=4 as 4.0)."""
    return ", ".join(f"{k}={_shown(v)}" for k, v in params.items() if k not in ("seed", "eval.seed")) or "(base)"


def _shown(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def paired_table(table: pd.DataFrame, spec: StudySpec, study: optuna.Study | None = None) -> str | None:
    """With ``spec.seeds``: each arm's paired difference from the reference arm (``spec.reference``,
    default the first arm) on every objective, over the seeds both completed, as markdown; the
    interval either resolves the difference or says how many seeds would (``nestar_lab.sweep.paired``).
    ``None`` for a study without seeds."""
    if not spec.seeds or table.empty or "param:seed" not in table:
        return None
    from nestar_lab.sweep.paired import differences, paired

    arms, ref_label = arms_by_seed(table, spec)
    if ref_label not in arms:
        return f"(no completed trials of the reference arm {ref_label}: nothing to compare with)"
    heads = ["arm", "seeds done", *(f"{o.metric} mean [95% CI]" for o in spec.objectives)]
    means = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for label, by_seed in arms.items():  # each arm's own mean and t-interval, beside the differences
        cells = []
        for o in spec.objectives:
            own = differences([float(r[f"objective:{o.metric}"]) for r in by_seed.values()])
            cells.append(f"{own.mean:.4g}" if own.n < 2 else f"{own.mean:.4g} [{own.lo:.4g}, {own.hi:.4g}]")
        means.append(f"| {label}{' (reference)' if label == ref_label else ''} | {len(by_seed)} | " + " | ".join(cells) + " |")
    heads = ["arm", "seeds done", *(f"Δ {o.metric} ({o.direction})" for o in spec.objectives)]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for label, by_seed in arms.items():
        if label == ref_label:
            continue
        cells = []
        for o in spec.objectives:
            col = f"objective:{o.metric}"
            diff = paired({s: r[col] for s, r in by_seed.items()}, {s: r[col] for s, r in arms[ref_label].items()})
            cells.append(diff.cell(3, o.direction == "minimize"))
        lines.append(f"| {label} | {len(by_seed)} | " + " | ".join(cells) + " |")
    head = f"Paired differences from {ref_label} (arm minus reference, per seed; mean [95% t-interval]):\n\n"
    notes = [n for n in (brackets_note(spec, study), grid_edges(done_rows(table), spec), timing_note(table, spec)) if n]
    return ("Each arm over its seeds (mean [95% t-interval]):\n\n" + "\n".join(means) + "\n\n"
            + head + "\n".join(lines) + "".join(f"\n\n{n}" for n in notes))


def brackets_note(spec: StudySpec, study: optuna.Study) -> str | None:
    """With ``bracket:``: each arm's chosen values and their brackets (kept in the study's storage)."""
    if not spec.bracket:
        return None
    from nestar_lab.sweep.bracket import attribute, describe, distinct_arms, walk

    arms = distinct_arms(spec.arms)
    chosen = [walk(spec, study, arm)[0] for arm in arms]  # each arm's current choices, read once
    stored = study.user_attrs
    notes = []
    for i, b in enumerate(spec.bracket):
        lines = []
        for arm, current in zip(arms, chosen):
            if not b.applies(arm):
                continue
            entry = stored.get(attribute(b, arm))
            if entry is None:
                lines.append(f"- {arm_label(arm)}: not searched yet")
                continue
            stale = "" if b.key in current else " (searched with another budget, base or earlier choice: stale)"
            value = f"{b.key} {entry['value']:g}, {describe(entry['neighbours'], b.cap)}"
            lines.append(f"- {arm_label(arm)}: {value}{stale}")
        then = f", with the {', '.join(c.key for c in spec.bracket[:i])} chosen above" if i else ""
        notes.append(f"Each arm's {b.key}, bracketed by its own search ({len(b.grid)}+ trials of {b.steps} steps at "
                     f"seed {b.seed}, scored by {spec.objectives[0].metric} on {b.samples_per_class} samples per "
                     f"class{then}):\n\n" + "\n".join(lines))  # fmt: skip
    return "\n\n".join(notes)


TIMINGS = ("sec_per_image", "images_per_sec")  # objectives timed inside each trial


def timing_note(table: pd.DataFrame, spec: StudySpec) -> str | None:
    """A timing objective measured by several processes (``--workers`` side by side, each beside
    another's training, or resumed in another session): how to re-time it in one."""
    timed = [o.metric for o in spec.objectives if o.metric in TIMINGS]
    done = done_rows(table)
    workers = done["worker"].nunique() if "worker" in done else 0
    if not timed or workers < 2:
        return None
    reference = reference_arm(spec)
    columns = {key: results.column_of(key) for key in reference}
    by = ",".join(columns.values())
    ref = next(iter(reference.values())) if len(reference) == 1 else ",".join(
        f"{columns[k]}={v}" for k, v in reference.items())  # fmt: skip
    return (f"{' and '.join(timed)} were timed inside each trial, by {workers} processes (side by side with "
            f"--workers, or in different sessions): identical samplers differ by several percent between such "
            f"timings. Timed again in one process, in rotated rounds: `OMP_NUM_THREADS=1 .venv/bin/python "
            f"benchmarks/bench_retime.py {spec.study_dir} --by {by} --reference {ref}`.")


def reference_arm(spec: StudySpec) -> dict[str, Any]:
    """The arm the paired table compares with: ``spec.reference``, default the first arm (no seed)."""
    return spec.reference or {k: v for k, v in (spec.arms[0] if spec.arms else {}).items() if k != "seed"}


def done_rows(table: pd.DataFrame) -> pd.DataFrame:
    return table[table["state"] == "COMPLETE"]


def grid_edges(done: pd.DataFrame, spec: StudySpec) -> str | None:
    """For each searched real-valued key with three or more choices (a weight, a learning rate): the
    value with the best mean first objective, per setting of the other searched keys, and whether
    it lies inside the grid (bracketed) or at its edge (the optimum may lie beyond)."""
    objective = spec.objectives[0]
    col = f"objective:{objective.metric}"
    notes = []
    for key, space in spec.space.items():
        choices = space.choices or []
        numeric = [c for c in choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
        if key == "seed" or len(numeric) < 3 or len(numeric) != len(choices) or f"param:{key}" not in done:
            continue
        if all(isinstance(c, int) for c in numeric):  # a count (k, a depth): its grid is the question, not a search
            continue
        others = [c for c in done.columns if c.startswith("param:") and c not in (f"param:{key}", "param:seed")]
        rows = done[done[f"param:{key}"].notna()]
        for setting, group in rows.groupby(others, dropna=False) if others else [((), rows)]:
            means = group.groupby(f"param:{key}")[col].mean().dropna()
            if means.empty:
                continue
            best = means.idxmin() if objective.direction == "minimize" else means.idxmax()
            where = "inside the grid (bracketed)" if min(numeric) < best < max(numeric) else \
                "at the grid's edge: not bracketed, the optimum may lie beyond"  # fmt: skip
            label = ", ".join(f"{k[len('param:'):]}={v}" for k, v in zip(others, setting if isinstance(setting, tuple) else (setting,)))
            notes.append(f"- {key}{f' ({label})' if label else ''}: best {objective.metric} at {best:g} "
                         f"of {sorted(numeric)}, {where}")  # fmt: skip
    return "Grid edges (by mean over seeds):\n\n" + "\n".join(notes) if notes else None


def arms_by_seed(table: pd.DataFrame, spec: StudySpec) -> tuple[dict[str, dict[int, Any]], str | None]:
    """The COMPLETE trials of a seeded study as ``{arm label: {seed: row}}``, and the reference
    arm's label (``spec.reference``, default the first arm)."""
    done = table[table["state"] == "COMPLETE"]
    keys = [c for c in done.columns if c.startswith("param:") and c != "param:seed"]
    arms: dict[str, dict[int, Any]] = {}
    for _, row in done.iterrows():
        params = {k[len("param:"):]: row[k] for k in keys if row[k] == row[k]}  # NaN: a key not searched here
        arms.setdefault(arm_label(params), {})[int(row["param:seed"])] = row
    reference = reference_arm(spec)
    return arms, arm_label(reference) if reference else next(iter(arms), None)


@dataclass(frozen=True)
class StudyReport:
    """What :func:`report` made: the best trial(s), the joined trials table (also written to
    ``table_path``) and the PNG plots, all under ``out_dir``."""

    study: optuna.Study
    best: list[optuna.trial.FrozenTrial]  # the best trial, or the Pareto front's; empty before any completes
    table: pd.DataFrame  # :func:`trials_table`
    table_path: Path  # trials.csv
    plots: list[Path]
    out_dir: Path
    paired: str | None = None  # :func:`paired_table` (studies with seeds)


def report(spec: StudySpec, storage: str | None = None, out_dir: str | Path | None = None) -> StudyReport:
    """Best trial(s), the joined table (``trials.csv``), and PNG plots (history, importances,
    Pareto front, velocity disagreement: :func:`nestar_lab.sweep.plots.plot_study`)."""
    from nestar_lab.sweep.plots import plot_study

    if storage:
        check_storage(storage)
    study = open_study(spec, storage)
    out_dir = Path(out_dir or spec.study_dir / "report")
    out_dir.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    best = study.best_trials if complete else []
    plots = plot_study(study, [o.metric for o in spec.objectives], bool(spec.space), out_dir)
    table = trials_table(study, spec)
    table_path = out_dir / "trials.csv"
    table.to_csv(table_path, index=False)
    paired_md = paired_table(table, spec, study)
    if paired_md is not None:
        (out_dir / "paired.md").write_text(paired_md + "\n")
        if len(spec.objectives) == 2:  # each arm's mean of both objectives with its 95% intervals
            from nestar_lab.sweep.plots import plot_arms

            arms, ref_label = arms_by_seed(table, spec)
            drawn = plot_arms(arms, [f"objective:{o.metric}" for o in spec.objectives], ref_label, out_dir / "arms.png")
            plots += [drawn] if drawn else []
    return StudyReport(study=study, best=list(best), table=table, table_path=table_path, plots=plots, out_dir=out_dir,
                       paired=paired_md)  # fmt: skip
