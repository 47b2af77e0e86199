"""Guidance chosen per variant by one rule, after training: the quality benchmark's second table.

Every variant samples with classifier-free guidance, and the scale moves FID more than most
differences between variants (NestAR k=4 seed 2: FID 14.8 at 2.0, 4.6 at 1.0; docs/benchmarks.md,
"Sampling settings"). A comparison at one fixed scale measures how each variant reacts to that
scale as much as its quality, so each variant also gets its own scale, chosen by the same rule:

- every seeded run is evaluated at each scale of ``GRID`` (the variant's own guidance schedule:
  MAR's linear ramp ends at the scale) with two evaluation draws: a *selection* draw
  (``eval.seed = 9000 + seed``) and the *reported* draw (``1234 + seed``, the run's own);
- a variant's scale is the one with the lowest mean FID over its seeds' selection draws; the
  table reports the reported draws at that scale, so the choice and the figure do not share noise;
- a choice at the grid's top is reported as such (not bracketed); 1.0 (no guidance) is the
  natural bottom.

Sampling needs no retraining, so each run costs ``2 x len(GRID) - 1`` evaluations on top (the
trained setting's reported draw is the run's own row). Rows go to the same results store, told
apart by ``sample.cfg_scale`` and ``eval.seed``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from quality_store import evaluate_aside, recorded

from nestar_lab.run import results
from nestar_lab.run.experiment import device_name, pick_device

GRID = (1.0, 1.25, 1.5, 2.0, 3.0)
SELECT = 9000  # selection draw: eval.seed = SELECT + seed
REPORT = 1234  # reported draw: eval.seed = REPORT + seed (the seeded run's own)


def guided(cfg, scale: float, draw: int):
    """``cfg`` sampled at guidance ``scale`` with evaluation seed ``draw`` (no loggers), with the
    metrics the tables read (:func:`grid_metrics`)."""
    return cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"cfg_scale": float(scale)}),
                                  "eval": cfg.eval.model_copy(update={"seed": int(draw)}), "loggers": [],
                                  "metrics": grid_metrics(cfg.metrics)})  # fmt: skip


def grid_metrics(metrics: list) -> list:
    """A grid evaluation's metrics: the run's, less ``speed`` (it samples 400 more images per
    evaluation: a third of MAR's evaluation time) and less ``fidelity``'s real baseline (the same
    held-out images every time; the run's own row has it). The tables read FID, precision, recall
    and class accuracy; rows match their run by config, whatever the metrics (``recorded``)."""
    out = []
    for m in metrics:
        if m.name == "speed":
            continue
        if m.name == "fidelity":
            m = m.model_copy(update={"params": {**m.params, "real_baseline": False}})
        out.append(m)
    return out


def evaluations(cfg, grid=GRID) -> list:
    """The configs a seeded run ``cfg`` is evaluated at: each scale x (selection, reported) draw,
    but the run's own row (its trained scale, the reported draw)."""
    seed = cfg.seed
    out = []
    for scale in grid:
        for draw in (SELECT + seed, REPORT + seed):
            if draw == REPORT + seed and abs(scale - cfg.sample.cfg_scale) < 1e-9:
                continue
            out.append(guided(cfg, scale, draw))
    return out


def missing(store: pd.DataFrame, cfg, grid=GRID) -> int:
    """How many of the seeded run ``cfg``'s grid evaluations the store lacks."""
    return sum(not len(recorded(store, {g.seed: g})) for g in evaluations(cfg, grid))


def evaluate_grid(cfg, run_dir: Path, out_dir: Path, grid=GRID, log=print) -> int:
    """Evaluate the trained ``run_dir`` at every config of :func:`evaluations` not yet in the
    store of ``out_dir`` and record each row under the run's id; returns how many were new."""
    new = 0
    for g in evaluations(cfg, grid):
        if len(recorded(results.load(out_dir), {g.seed: g})):
            continue
        row = evaluate_aside(run_dir, g)
        results.append_run(g, run_dir, row, device=device_name(pick_device(g.device)))
        new += 1
        log(f"[guidance] {run_dir.name}: scale {g.sample.cfg_scale:g}, eval seed {g.eval.seed}: "
            f"FID {row.get('fid_digits_cnn', float('nan')):.2f}")  # fmt: skip
    return new


def choose(store: pd.DataFrame, cfgs: dict, grid=GRID) -> tuple[float | None, dict[float, float], list[int]]:
    """The variant's scale: lowest mean FID over the seeds whose selection draws cover the whole
    grid; returns (scale or None, {scale: mean selection FID}, those seeds)."""
    by_scale: dict[float, dict[int, float]] = {s: {} for s in grid}
    for seed, cfg in cfgs.items():
        for scale in grid:
            hit = recorded(store, {seed: guided(cfg, scale, SELECT + seed)})
            if len(hit):
                by_scale[scale][seed] = float(hit["fid_digits_cnn"].iloc[0])
    seeds = sorted(set.intersection(*(set(v) for v in by_scale.values()))) if by_scale else []
    if not seeds:
        return None, {}, []
    means = {s: sum(v[x] for x in seeds) / len(seeds) for s, v in by_scale.items()}
    return min(grid, key=lambda s: (means[s], s)), means, seeds


def reported(store: pd.DataFrame, cfgs: dict, scale: float) -> pd.DataFrame:
    """The reported-draw rows of the seeded runs ``cfgs`` at ``scale`` (one per seed found); a
    grid row's parameter count (its evaluation ran no ``speed`` metric) from its run's own row."""
    rows = recorded(store, {seed: guided(cfg, scale, REPORT + seed) for seed, cfg in cfgs.items()})
    if len(rows) and "num_parameters" in store:
        counts = store.dropna(subset=["num_parameters"]).groupby("run_id")["num_parameters"].first()
        rows = rows.assign(num_parameters=rows["num_parameters"].fillna(rows["run_id"].map(counts)))
    return rows


def describe_choice(label: str, scale: float, means: dict[float, float], seeds: list[int], grid=GRID) -> str:
    edge = " (the grid's top: not bracketed)" if scale == max(grid) else ""
    shown = ", ".join(f"{s:g} -> {m:.1f}" for s, m in means.items())
    return f"{label}: {scale:g}{edge} (mean selection-draw FID over seeds {' '.join(map(str, seeds))}: {shown})"
