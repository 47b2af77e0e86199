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


def plot_study(study, objectives: list[str], has_space: bool, out_dir: Path) -> list[Path]:
    """An Optuna study's PNGs in ``out_dir``: optimisation history (first objective), parameter
    importances (two or more complete trials and a search space), the Pareto front (several
    objectives), and the velocity disagreement curves (:func:`plot_disagreement`). A plot that
    cannot be drawn (e.g. too few trials for importances) is skipped with a note on stderr."""
    import sys

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ov

    complete = study.get_trials(states=(TrialState.COMPLETE,))
    first = objectives[0]
    makers = {"history": lambda: ov.plot_optimization_history(study, target=lambda t: t.values[0], target_name=first)}
    if len(complete) >= 2 and has_space:
        makers["importances"] = lambda: ov.plot_param_importances(study, target=lambda t: t.values[0], target_name=first)
    if len(objectives) > 1 and complete:
        makers["pareto"] = lambda: ov.plot_pareto_front(study, target_names=objectives)
    plots = []
    for name, make in makers.items():
        try:
            make()
            path = Path(out_dir) / f"{name}.png"
            plt.gcf().set_size_inches(7, 4.5)
            plt.tight_layout()
            plt.savefig(path, dpi=110)
            plots.append(path)
        except (ValueError, RuntimeError) as exc:  # e.g. too few trials for importances
            print(f"plot {name} skipped: {exc}", file=sys.stderr)
        finally:
            plt.close("all")
    curve = plot_disagreement(study, Path(out_dir) / "disagreement.png")
    return plots + ([curve] if curve else [])


def plot_disagreement(study, path: Path) -> Path | None:
    """Velocity disagreement of adjacent modules over training, one line per trial and pair."""
    import json

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    drawn = False
    for t in study.get_trials(deepcopy=False):
        log = Path(t.user_attrs.get("run_dir", "")) / "train_log.jsonl"
        if not log.is_file():
            continue
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        keys = sorted({k for r in rows for k in r if k.startswith("disagree_")})
        label = ", ".join(f"{k.split('.')[0]}={v}" for k, v in t.params.items()) or f"trial {t.number}"
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*pts), label=f"{label} [{key}]")
            drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel("mean ||v_m - v_(m-1)||^2 on module m-1's tokens")
        ax.set_yscale("log")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(path)
    plt.close(fig)
    return path if drawn else None


def plot_arms(arms: dict[str, dict], columns: list[str], reference: str | None, path: Path) -> Path | None:
    """A seeded study's arms on two objectives: each arm's mean over its seeds with 95% t-intervals
    on both axes (the trade-off with its uncertainty; ``nestar_lab.sweep.paired`` says which
    differences resolve). None with fewer than one arm of two seeds or more."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nestar_lab.sweep.paired import differences

    x_col, y_col = columns
    points = []
    for label, by_seed in arms.items():
        xs = [float(r[x_col]) for r in by_seed.values() if r[x_col] == r[x_col]]
        ys = [float(r[y_col]) for r in by_seed.values() if r[y_col] == r[y_col]]
        if len(xs) >= 2 and len(ys) >= 2:
            px, py = differences(xs), differences(ys)  # differences from 0: the mean and its interval
            points.append((label, px, py))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, px, py in points:
        err_x = [[px.mean - px.lo], [px.hi - px.mean]] if math.isfinite(px.lo) else None
        err_y = [[py.mean - py.lo], [py.hi - py.mean]] if math.isfinite(py.lo) else None
        ax.errorbar(px.mean, py.mean, xerr=err_x, yerr=err_y, fmt="o" if label != reference else "s", capsize=4,
                    label=f"{label} (n={min(px.n, py.n)})" + (" (reference)" if label == reference else ""))  # fmt: skip
    ax.set_xlabel(x_col.removeprefix("objective:"))
    ax.set_ylabel(y_col.removeprefix("objective:"))
    ax.set_title("arms: mean over seeds, 95% t-intervals")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
