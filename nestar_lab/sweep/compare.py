"""``nestar table --by KEY --reference VALUE``: any results store as a paired comparison.

The rows of a store (the runs of a study, of ``bench_quality.py``, of your own loop) are grouped
by ``--by``; each group is paired with the reference group over the ``seed`` both have (a seed
fixes initialisation, data order and evaluation draw), and every metric gets the group's mean with
its 95% t-interval and its paired difference from the reference (``nestar_lab.sweep.paired``):
resolved, or the seeds the observed paired spread says would resolve it. A run evaluated more
than once with the same settings counts once, with its last row; two rows of one group at one
seed (two runs, or one run evaluated with other sampling settings) are refused: which one pairs
is not ours to guess, and ``--where`` or another ``--by`` column says it.
"""

from __future__ import annotations

import math

import pandas as pd

from nestar_lab.config.errors import BadInput
from nestar_lab.run import results
from nestar_lab.sweep.paired import Paired, differences, paired


def group_label(keys: tuple, columns: list[str]) -> str:
    """``none`` for one ``--by`` column, ``coordination=none, k=4`` for several."""
    if len(columns) == 1:
        return str(keys[0])
    return ", ".join(f"{c}={v}" for c, v in zip(columns, keys))


def runs_by_group(df: pd.DataFrame, by_cols: list[str]) -> dict[str, tuple[tuple, pd.DataFrame]]:
    """``{label: (the group's values, its rows indexed by seed)}``, one row per run and setting."""
    if "seed" not in df.columns:
        raise BadInput("--reference: the results have no 'seed' column to pair runs on")
    same_eval = [c for c in ("run_id", "config_hash") if c in df.columns]
    if same_eval:  # a run evaluated again with the same settings: its last row
        df = df.drop_duplicates(same_eval, keep="last")
    groups: dict[str, tuple[tuple, pd.DataFrame]] = {}
    for keys, rows in df.groupby(by_cols, dropna=False, sort=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        groups[group_label(keys, by_cols)] = (keys, rows.set_index("seed"))
    return groups


def check_one_run_per_seed(groups: dict[str, tuple[tuple, pd.DataFrame]]) -> None:
    """One line naming the first group with two runs at one seed (they cannot be paired)."""
    for label, (_, rows) in groups.items():
        twice = rows.index[rows.index.duplicated()].tolist()
        if twice:
            raise BadInput(f"--reference: group {label!r} has more than one run at seed {twice[0]}; "
                           f"narrow the rows with --where (or --by another column) so that each seed is one run")  # fmt: skip


def find_reference(reference: str, groups: dict[str, tuple[tuple, pd.DataFrame]], by_cols: list[str],
                   df: pd.DataFrame) -> str:  # fmt: skip
    """The group ``--reference`` names: ``VALUE`` (a value of the one ``--by`` column, or of any of
    several when that picks one group) or ``COL=VALUE,...``; values compared as text (``4``
    matches ``4.0``). One line naming it and the groups present when it picks none or several."""
    wanted: list[tuple[int | None, str]] = []  # (index into by_cols or None: any column, value)
    for part in reference.split(","):
        col, sep, value = part.partition("=")
        if sep:
            name = results.resolve_column(df, col.strip())
            if name not in by_cols:
                raise BadInput(f"--reference {reference!r}: {name} is not a --by column ({', '.join(by_cols)})")
            wanted.append((by_cols.index(name), value.strip()))
        else:
            wanted.append((None, part.strip()))
    hits = [label for label, (keys, _) in groups.items()
            if all(any(_same(keys[i], v) for i in (range(len(keys)) if at is None else [at])) for at, v in wanted)]
    if len(hits) == 1:
        return hits[0]
    shown = ", ".join(repr(x) for x in groups) or "none"
    what = "no runs" if not hits else f"{len(hits)} groups ({', '.join(map(repr, hits))}); name one with COL=VALUE"
    raise BadInput(f"--reference {reference!r}: {what} with {'/'.join(by_cols)} = {reference!r} in the results; "
                   f"groups present: {shown}")  # fmt: skip


def _same(key, text: str) -> bool:
    if str(key) == text:
        return True
    try:
        return float(key) == float(text)
    except (TypeError, ValueError):
        return False


def compare(df: pd.DataFrame, where: list[str], by: list[str], reference: str, metrics: list[str]) -> pd.DataFrame:
    """One row per group and metric: seeds, mean, 95% interval of the mean, and the paired
    difference from the reference group (n, mean, interval, resolved, seeds needed)."""
    if not by:
        raise BadInput("--reference: give --by too (the column(s) whose values are compared, e.g. --by coordination)")
    df = results.select(df, where)
    if df.empty:
        raise BadInput("--reference: no runs left after --where; nothing to compare")
    by_cols = [results.resolve_column(df, b) for b in by]
    metric_cols = [results.resolve_column(df, m) for m in metrics] if metrics else _numeric_metrics(df)
    same = {} if metrics else _same_in_every_run(df, metric_cols)  # nothing to compare: named once below
    metric_cols = [m for m in metric_cols if m not in same]
    groups = runs_by_group(df, by_cols)
    ref = find_reference(reference, groups, by_cols, df)  # a reference not in the results, named first
    check_one_run_per_seed(groups)
    ref_rows = groups[ref][1]
    rows = []
    for label, (_, g) in groups.items():
        for m in metric_cols:
            values = pd.to_numeric(g[m], errors="coerce")
            own = differences(values.dropna().tolist())  # the mean's interval: differences from 0
            d = paired(values.to_dict(), pd.to_numeric(ref_rows[m], errors="coerce").to_dict()) \
                if label != ref else None  # fmt: skip
            rows.append({"group": label, "metric": m, "seeds": int(values.notna().sum()), "mean": own.mean,
                         "lo": own.lo, "hi": own.hi, "reference": ref,
                         "diff_seeds": d.n if d else None, "diff": d.mean if d else None,
                         "diff_lo": d.lo if d else None, "diff_hi": d.hi if d else None,
                         "resolved": d.resolved if d else None,
                         "seeds_needed": d.seeds_needed if d else None})  # fmt: skip
    out = pd.DataFrame(rows)
    out.attrs["same_in_every_run"] = same
    return out


def _same_in_every_run(df: pd.DataFrame, metric_cols: list[str]) -> dict[str, float]:
    """The metrics every run has, with one value (the real data's own scores, the NFE of one
    sampler): no difference to show, so the table names them once instead of a column of zeros."""
    same = {}
    for m in metric_cols:
        values = pd.to_numeric(df[m], errors="coerce")
        if values.notna().all() and values.nunique() == 1:
            same[m] = float(values.iloc[0])
    if len(same) == len(metric_cols):  # everything equal: show it all rather than an empty table
        return {}
    return same


def _numeric_metrics(df: pd.DataFrame) -> list[str]:
    cols = [c for c in results.metric_columns(df) if c != "run_id" and pd.api.types.is_numeric_dtype(df[c])]
    if not cols:
        raise BadInput("--reference: the results have no numeric metric columns")
    return cols


def to_markdown(out: pd.DataFrame) -> str:
    """The comparison as two markdown tables: each group's means, then the paired differences."""
    metrics = list(dict.fromkeys(out["metric"]))
    ref = out["reference"].iloc[0]
    by_group = {g: rows.set_index("metric") for g, rows in out.groupby("group", sort=False)}
    head = ["group", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, rows in by_group.items():
        cells = [_mean_cell(rows.loc[m]) for m in metrics]
        lines.append(f"| {g}{' (reference)' if g == ref else ''} | " + " | ".join(cells) + " |")
    means = "Mean [95% t-interval] (seeds):\n\n" + "\n".join(lines)
    lines = ["| " + " | ".join(["group", *(f"Δ {m}" for m in metrics)]) + " |", "|" + "---|" * len(head)]
    for g, rows in by_group.items():
        if g != ref:
            lines.append(f"| {g} | " + " | ".join(_diff_cell(rows.loc[m]) for m in metrics) + " |")
    diffs = (f"Paired differences from {ref} (group minus reference over the seeds both have; "
             f"mean [95% t-interval]):\n\n" + "\n".join(lines))  # fmt: skip
    same = out.attrs.get("same_in_every_run") or {}
    if same:
        diffs += "\n\nThe same in every run (left out): " + ", ".join(f"{m} {_fmt(v)}" for m, v in same.items())
    return means + "\n\n" + diffs


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _mean_cell(r: pd.Series) -> str:
    if r["seeds"] < 2:
        return f"{_fmt(r['mean'])} (1 seed)" if r["seeds"] else "n/a"
    return f"{_fmt(r['mean'])} [{_fmt(r['lo'])}, {_fmt(r['hi'])}] ({int(r['seeds'])})"


def _diff_cell(r: pd.Series) -> str:
    """The paired cell, read as higher or lower (a results store does not say which is better)."""
    d = Paired(int(r["diff_seeds"]), r["diff"], math.nan, r["diff_lo"], r["diff_hi"],
               None if pd.isna(r["seeds_needed"]) else int(r["seeds_needed"]))  # fmt: skip
    return d.cell(None, None)
