"""Is a trained model's quality limited by its sampling settings? A diagnostic over trained runs.

Each ``--vary KEY=V1,V2,..`` changes one sampling key (guidance scale or schedule, ODE solver or
steps, temperature, a module's solver) away from the run's own settings, the others held; every
setting is evaluated with the same evaluation draws as the run's own (the run's ``eval.seed``,
plus ``--eval-seeds`` - 1 more), so each setting's difference from the trained setting is paired
over (run, evaluation seed) and carries no evaluation-draw noise. Several runs (training seeds of
one variant) make the differences say something about the variant, not one model.

    .venv/bin/python benchmarks/bench_sampling.py runs/quality/NestAR_k4-seed2-* \\
        --vary sample.cfg_scale=1,3,4 --vary ode_solver.params.steps=8,32 \\
        --vary sample.cfg_schedule=linear --section sampling_nestar

Only sampling keys may vary (training ignores them; ``nestar_lab.sweep.study.is_sampling_key``).
Nothing is written to a results store. The table goes to ``--out``'s ``--section``. A setting that
helps one variant is no finding about variants until every variant has had the same search
(docs/DESIGN 4c): run it on each variant's runs.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pandas as pd
from quality_store import evaluate_aside
from variants import positive, run_main, write_section

from nestar_lab.config.validation import load_config
from nestar_lab.run.experiment import device_name, pick_device, precision_name
from nestar_lab.run.rundir import CONFIG, load_run_config
from nestar_lab.sweep.paired import differences
from nestar_lab.sweep.study import is_sampling_key

METRICS = {"fid_digits_cnn": ("FID", True), "recall_digits_cnn": ("recall", False),
           "precision_digits_cnn": ("precision", False)}  # fmt: skip


def parse_vary(ap: argparse.ArgumentParser, text: str) -> tuple[str, list[str]]:
    """``KEY=V1,V2``: a sampling key and its values (split on commas), checked before any work."""
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not key or not values.strip():
        ap.error(f"--vary {text!r}: expected KEY=V1,V2,... (e.g. sample.cfg_scale=1,3)")
    if not is_sampling_key(key):
        ap.error(f"--vary {key}: not a sampling key (ode_solver.*, sample.*, modules.N.ode_solver.*, "
                 f"modules.N.cfg_scale); a trained model's other settings cannot change")  # fmt: skip
    return key, [v.strip() for v in values.split(",") if v.strip()]


def settings(varies: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """(label, overrides): the run's own settings first, then each value of each key alone."""
    out = [("trained settings", [])]
    out += [(f"{key}={v}", [f"{key}={v}"]) for key, values in varies for v in values]
    return out


def evaluate_setting(run_dir: Path, overrides: list[str], eval_seed: int, samples_per_class: int) -> tuple[dict, float]:
    """The fidelity metrics of ``run_dir`` under ``overrides`` with one evaluation draw."""
    cfg = load_config(str(run_dir / CONFIG), overrides)
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"seed": eval_seed,
                                                                     "samples_per_class": samples_per_class}),
                                 "metrics": [m for m in cfg.metrics if m.name == "fidelity"] or cfg.metrics,
                                 "loggers": []})  # fmt: skip
    t0 = time.perf_counter()
    row = evaluate_aside(run_dir, cfg)
    return row, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="trained run directories (e.g. one variant's training seeds)")
    ap.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2", help="a sampling key and its values")
    ap.add_argument("--eval-seeds", type=positive, default=1, help="evaluation draws per run (the run's own first)")
    ap.add_argument("--samples-per-class", type=positive, default=None, help="default: each run's own eval setting")
    ap.add_argument("--out", default="docs/benchmarks.md")
    ap.add_argument("--section", default="sampling_diagnostic")
    args = ap.parse_args()
    varies = [parse_vary(ap, v) for v in args.vary]
    if not varies:
        ap.error("--vary: give at least one KEY=V1,V2 to compare with the trained settings")
    runs = [Path(r) for r in args.runs]
    saved = {r: load_run_config(r) for r in runs}  # every path a trained run, before any work
    for r in runs:
        for key, values in varies:  # every value valid for every run's config, before any work
            for v in values:
                load_config(str(r / CONFIG), [f"{key}={v}"])
    rows = []
    for r in runs:
        own = saved[r].eval
        count = args.samples_per_class or own.samples_per_class
        draws = [own.seed] + [9000 + k for k in range(args.eval_seeds - 1)]
        for label, overrides in settings(varies):
            for draw in draws:
                row, took = evaluate_setting(r, overrides, draw, count)
                rows.append({"run": r.name, "setting": label, "eval_seed": draw, "seconds": took,
                             **{m: float(row.get(m, math.nan)) for m in METRICS}})  # fmt: skip
                print(f"[sampling] {r.name} {label} eval seed {draw}: FID {rows[-1]['fid_digits_cnn']:.2f} "
                      f"recall {rows[-1]['recall_digits_cnn']:.3f} ({took:.0f} s)", flush=True)  # fmt: skip
    df = pd.DataFrame(rows)
    body = describe(df, runs, saved, args)
    print(body, flush=True)
    write_section(Path(args.out), args.section, body)


def describe(df: pd.DataFrame, runs: list[Path], saved: dict, args) -> str:
    """Each setting's mean and its paired difference from the trained settings, as markdown."""
    base = df[df["setting"] == "trained settings"].set_index(["run", "eval_seed"])
    heads = ["setting", "FID", *(f"Δ {name} (paired)" for name, _ in METRICS.values()), "s per eval"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for label, group in df.groupby("setting", sort=False):
        g = group.set_index(["run", "eval_seed"])
        cells = [f"{g['fid_digits_cnn'].mean():.2f}"]
        for m, (_, lower) in METRICS.items():
            if label == "trained settings":
                cells.append("(reference)")
                continue
            d = differences((g[m] - base[m]).dropna().tolist())
            cells.append(d.cell(3 if m != "fid_digits_cnn" else 2, lower, "draws") if d.n >= 2 else f"{d.mean:+.3g} (one draw)")
        cells.append(f"{group['seconds'].median():.0f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cfg = saved[runs[0]]
    device = device_name(pick_device(cfg.device))
    own = (f"guidance {cfg.sample.cfg_scale} ({cfg.sample.cfg_schedule}), solver {cfg.ode_solver.name} "
           f"{cfg.ode_solver.params.get('steps', '')} steps, temperature {cfg.sample.temperature}")  # fmt: skip
    pairs = len(base)
    return (f"Device: {device}, sampling in {precision_name(pick_device(cfg.device), cfg.train.precision)}. Runs: "
            f"{', '.join(f'`{r.name}`' for r in runs)} ({cfg.train.steps} training steps); "
            f"trained settings: {own}. Each setting evaluated with the same {pairs} (run, evaluation seed) "
            f"draws as the trained settings, {args.samples_per_class or cfg.eval.samples_per_class} samples per "
            f"class; Δ = setting minus trained settings, paired over those draws (mean [95% t-interval]).\n\n"
            + "\n".join(lines))  # fmt: skip


if __name__ == "__main__":
    run_main(main)  # a path that is no trained run, a value its config refuses: one line, exit 2
