"""Which rows of the quality benchmark's results store belong to which run: matched by config."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from nestar_lab.run.evaluate import evaluate, trained_on
from nestar_lab.run.results import flatten_config
from nestar_lab.run.train import load_trained


def evaluate_aside(run_dir: Path, cfg) -> dict:
    """The metrics of the trained ``run_dir`` sampled under ``cfg``, recorded nowhere: the run
    keeps its own ``metrics.json`` and grid, no results store gets a row. Where and how the run
    trained comes from ``run_dir`` (the evaluation itself writes into a scratch directory)."""
    with tempfile.TemporaryDirectory() as scratch:
        return evaluate(load_trained(run_dir, cfg=cfg), scratch, record=False) | trained_on(Path(run_dir))


def recorded(runs: pd.DataFrame, cfgs: dict) -> pd.DataFrame:
    """The rows of ``runs`` that are runs of ``cfgs`` (seed -> config), the last per seed.

    A row matches when every flattened config column that both it and the config have agrees
    (metric settings are not among them; an empty cell is no disagreement): a changed variant,
    lr, step or sample count is rerun, a default added since a row was written is not."""
    if "seed" not in runs:  # an empty store
        runs = runs.assign(seed=pd.Series(dtype="int64"))
    hits = []
    for seed, cfg in cfgs.items():
        hit = pd.Series(True, index=runs.index)
        for key, value in flatten_config(cfg).items():
            if key in runs and key not in ("device", "output_dir", "metrics", "loggers") and value is not None:
                col = runs[key]
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    same = np.isclose(pd.to_numeric(col, errors="coerce"), value)
                else:
                    same = col.astype(str) == str(value)
                hit &= col.isna() | same
        hits.append(runs[hit].tail(1))
    return pd.concat([runs.iloc[0:0], *hits])


def provenance(runs: pd.DataFrame) -> str:
    """Where and in which precision the rows' runs trained: ``3 runs on CPU (...) in fp32; 2 not
    recorded`` (rows written before the store recorded ``train_hardware``/``train_precision``, at
    ``train.precision: auto``); a run at a pinned ``train.precision`` is counted in it."""
    if not len(runs):
        return "no runs"
    hardware = runs.get("train_hardware", pd.Series(index=runs.index, dtype=object))
    hardware = hardware.fillna("an unrecorded machine")
    precision = runs.get("train_precision", pd.Series(index=runs.index, dtype=object))
    if "train.precision" in runs:  # a pinned precision is what it resolved to, wherever it ran
        pinned = runs["train.precision"].where(runs["train.precision"].isin(["fp32", "bf16"]))
        precision = precision.fillna(pinned)
    known = hardware.notna() & precision.notna()
    parts = [f"{n} run{'s' * (n != 1)} on {hw} in {prec}"
             for (hw, prec), n in pd.DataFrame({"h": hardware[known], "p": precision[known]}).value_counts().items()]
    if (~known).sum():
        parts.append(f"{int((~known).sum())} not recorded (trained before the store recorded it)")
    return "; ".join(parts)
