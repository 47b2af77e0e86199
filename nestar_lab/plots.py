"""Quality against speed: one point per run, the Pareto front marked."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

HIGHER_IS_BETTER = ("accuracy", "precision", "recall", "is_", "images_per_sec", "diversity")


def higher_is_better(column: str) -> bool:
    """Whether larger values of a metric are better (accuracy, IS, recall, throughput, ...)."""
    return any(column.startswith(p) or p in column for p in HIGHER_IS_BETTER) and not column.startswith("is_std")


def pareto_mask(x: pd.Series, y: pd.Series, x_high: bool, y_high: bool) -> pd.Series:
    """True for points no other point beats on both axes (ties are kept)."""
    sx = x if x_high else -x
    sy = y if y_high else -y
    keep = []
    for i in range(len(x)):
        dominated = ((sx >= sx.iloc[i]) & (sy >= sy.iloc[i]) & ((sx > sx.iloc[i]) | (sy > sy.iloc[i]))).any()
        keep.append(not dominated)
    return pd.Series(keep, index=x.index)


def plot_tradeoff(df: pd.DataFrame, x: str, y: str, out: str | Path, label: str = "run_id") -> Path:
    """Scatter ``y`` (quality) against ``x`` (cost) for every run, Pareto front joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = df[[x, y, label]].dropna(subset=[x, y])
    if data.empty:
        raise ValueError(f"no run has both {x!r} and {y!r}")
    front = pareto_mask(data[x], data[y], higher_is_better(x), higher_is_better(y))
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    ax.scatter(data[x], data[y], c=["tab:red" if f else "tab:blue" for f in front], zorder=3)
    edge = data[front].sort_values(x)
    ax.plot(edge[x], edge[y], "--", color="tab:red", label="Pareto front", zorder=2)
    for _, row in data.iterrows():
        ax.annotate(str(row[label])[:28], (row[x], row[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"{x} ({'higher' if higher_is_better(x) else 'lower'} is better)")
    ax.set_ylabel(f"{y} ({'higher' if higher_is_better(y) else 'lower'} is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
