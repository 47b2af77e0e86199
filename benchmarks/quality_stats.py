"""Seed statistics for the quality benchmark: mean, spread, 95% intervals, and which
differences against the reference variant the intervals support.

The interval is the t-interval of the mean over a variant's seeds: mean +- t(0.975, n-1) * s / sqrt(n),
with ``s`` the sample standard deviation (n - 1 in the denominator). With 3 seeds t = 4.30, so
the intervals are wide: they say how much a variant's mean could move under another draw of seeds,
not how a single run varies. Intervals are clipped to the metric's range (precision, recall and
class accuracy to [0, 1]).

Paired differences (:func:`paired`): every variant is trained with the same seeds, and a seed
fixes the data order and the evaluation labels and noise, so the per-seed differences
``variant - reference`` carry less noise than two unpaired means. Their 95% t-interval either
excludes 0 (resolved) or, from the observed paired spread, says how many seeds would resolve a
difference of the observed size (:func:`seeds_to_resolve`).
"""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats

from nestar_lab.sweep.paired import MAX_SEEDS, Paired
from nestar_lab.sweep.paired import paired as paired_over_seeds

METRICS = {  # results column -> (table heading, digits shown, lower is better, bounds of the interval)
    "fid_digits_cnn": ("FID (digits CNN)", 1, True, (0.0, math.inf)),
    "precision_digits_cnn": ("precision", 3, False, (0.0, 1.0)),
    "recall_digits_cnn": ("recall", 3, False, (0.0, 1.0)),
    "class_accuracy": ("class accuracy", 3, False, (0.0, 1.0)),
}


def interval(values: pd.Series, bounds=(-math.inf, math.inf)) -> tuple[int, float, float, float, float]:
    """n, mean, sample std, and the 95% t-interval of the mean clipped to the metric's ``bounds``
    (NaN spread for n < 2)."""
    v = values.dropna().astype(float)
    n, mean = len(v), float(v.mean()) if len(v) else math.nan
    if n < 2:
        return n, mean, math.nan, math.nan, math.nan
    std = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return n, mean, std, max(mean - half, bounds[0]), min(mean + half, bounds[1])


def summarize(runs: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """One row per variant (column ``variant``, in ``order``) with n and per-metric mean/std/CI."""
    rows = []
    for label in order:
        group = runs[runs["variant"] == label]
        if group.empty:
            continue
        row = {"variant": label, "lr": float(group["train.lr"].iloc[0]), "seeds": len(group),
               "seed_list": " ".join(str(s) for s in sorted(group["seed"])),
               "steps": int(group["train.steps"].iloc[0]),
               "num_parameters": int(group["num_parameters"].iloc[0]) if "num_parameters" in group else None}  # fmt: skip
        for col in METRICS:
            if col in group:
                _, *values = interval(group[col], METRICS[col][3])
                row.update(zip((f"{col}_mean", f"{col}_std", f"{col}_ci_lo", f"{col}_ci_hi"), values))
        rows.append(row)
    return pd.DataFrame(rows)


def cell(row: pd.Series, col: str) -> str:
    """``mean +- std [lo, hi]`` for one metric of one summary row."""
    digits = METRICS[col][1]
    mean = row.get(f"{col}_mean", math.nan)
    if mean is None or math.isnan(mean):
        return "n/a"
    if math.isnan(row[f"{col}_std"]):
        return f"{mean:.{digits}f} (one seed)"
    return (f"{mean:.{digits}f} ± {row[f'{col}_std']:.{digits}f} "
            f"[{row[f'{col}_ci_lo']:.{digits}f}, {row[f'{col}_ci_hi']:.{digits}f}]")  # fmt: skip


def markdown(summary: pd.DataFrame) -> str:
    """The quality table: variant, lr chosen, seeds, each metric as mean ± std [95% CI], steps."""
    heads = ["variant", "lr chosen", "seeds", *(METRICS[c][0] for c in METRICS), "steps", "params"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for _, row in summary.iterrows():
        params = f"{row['num_parameters'] / 1e6:.2f}M" if pd.notna(row.get("num_parameters")) else "n/a"
        cells = [row["variant"], f"{row['lr']:.2g}", f"{row['seeds']} ({row['seed_list']})",
                 *(cell(row, c) for c in METRICS), str(row["steps"]), params]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(a: pd.Series, b: pd.Series, col: str) -> str:
    """What the 95% intervals of ``a`` and ``b`` support for one metric."""
    lo_a, hi_a = a.get(f"{col}_ci_lo"), a.get(f"{col}_ci_hi")
    lo_b, hi_b = b.get(f"{col}_ci_lo"), b.get(f"{col}_ci_hi")
    if any(v is None or math.isnan(v) for v in (lo_a, hi_a, lo_b, hi_b)):
        return "no interval (fewer than 2 seeds)"
    if hi_a >= lo_b and hi_b >= lo_a:
        return "intervals overlap: no difference claimed"
    lower = a["variant"] if hi_a < lo_b else b["variant"]
    better = lower if METRICS[col][2] else (b["variant"] if lower == a["variant"] else a["variant"])
    return f"intervals disjoint: {better} better"


def comparisons(summary: pd.DataFrame, reference: str) -> list[str]:
    """One line per variant against ``reference``: the verdict of the intervals on every metric."""
    if summary.empty or reference not in set(summary["variant"]):
        return [f"(no rows for {reference}: nothing to compare against)"]
    ref = summary[summary["variant"] == reference].iloc[0]
    lines = []
    for _, row in summary[summary["variant"] != reference].iterrows():
        parts = [f"{METRICS[c][0]} {verdict(row, ref, c)}" for c in METRICS if f"{c}_mean" in row]
        lines.append(f"- {row['variant']} vs {reference}: " + "; ".join(parts))
    return lines


# ------------------------------------------------------------------ paired differences
def paired(runs: pd.DataFrame, variant: str, reference: str, col: str) -> Paired:
    """Paired difference of ``col`` between ``variant`` and ``reference`` over their common seeds
    (``nestar_lab.sweep.paired``: every variant is trained with the same seeds, data order and
    evaluation draw per seed)."""

    def by_seed(label: str) -> dict:
        rows = runs[runs["variant"] == label].drop_duplicates("seed", keep="last")
        return dict(zip(rows["seed"], rows[col]))

    return paired_over_seeds(by_seed(variant), by_seed(reference))


def paired_cell(p: Paired, col: str) -> str:
    """``+1.2 [-0.3, 2.7]`` with the reading, in the metric's own direction."""
    return p.cell(METRICS[col][1], METRICS[col][2])


COST_METRICS = ("fid_digits_cnn", "recall_digits_cnn")  # the headline's questions: what resolving them costs


def resolving_cost(ps: dict[str, Paired], hours_per_seed: float | None) -> str:
    """What resolving the unresolved FID and recall differences would cost: the seeds the observed
    paired spread asks for beyond those run, and (``hours_per_seed``: one run of the variant and
    one of the reference) the hours here."""
    if all(p.n < 2 for p in ps.values()):
        return "fewer than 2 common seeds: no estimate yet"
    parts = []
    for col, p in ps.items():
        if col not in COST_METRICS or p.n < 2 or p.resolved or p.seeds_needed is None:
            continue
        name = METRICS[col][0].split(" (")[0]
        if p.seeds_needed > MAX_SEEDS:
            parts.append(f"{name}: more than {MAX_SEEDS} seeds")
            continue
        more = p.seeds_needed - p.n
        when = f", about {more * hours_per_seed:.1f} h here" if hours_per_seed else ""
        parts.append(f"{name}: {more} more seed{'s' * (more != 1)}{when}")
    return "; ".join(parts) or "nothing unresolved"


def paired_markdown(runs: pd.DataFrame, order: list[str], reference: str,
                    run_hours: dict[str, float] | None = None) -> str:  # fmt: skip
    """One row per variant: its paired difference from ``reference`` on every metric (variant
    minus reference; better/worse in the metric's own direction), and what resolving FID and
    recall would cost (``run_hours``: hours of one seeded run per variant, measured here)."""
    present = set(runs["variant"]) if "variant" in runs else set()
    if reference not in present:
        raise ValueError(f"reference variant {reference!r} has no runs in the results; run it first "
                         f"(present: {', '.join(sorted(present)) or 'none'})")  # fmt: skip
    cols = [c for c in METRICS if c in runs]
    heads = ["variant", "common seeds", *(f"Δ {METRICS[c][0]}" for c in cols), "to resolve FID and recall"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for label in order:
        if label == reference or label not in present:
            continue
        ps = {c: paired(runs, label, reference, c) for c in cols}
        hours = run_hours[label] + run_hours[reference] if run_hours and label in run_hours and reference in run_hours \
            else None  # fmt: skip
        n = next(iter(ps.values())).n
        cells = [label, str(n), *(paired_cell(p, c) for c, p in ps.items()), resolving_cost(ps, hours)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
