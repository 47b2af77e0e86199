"""Quality of every generator variant on the digits: same tuning, several seeds, intervals.

Variants: ``variants.plans()`` (matched total parameter count) plus AR in the quickstart's own
token order (coarse_to_fine), so that one AR/NestAR pair shares its order. For each variant:

1. its learning rate comes from the same small search (``lr_search.py``: an Optuna study per
   variant over ``train.lr``, one grid of arms, a fixed budget of steps and samples), stored in
   ``<out-dir>/lr.json`` and reused by reruns;
2. it is trained and evaluated once per seed (``seed`` and ``eval.seed = 1234 + seed``) through
   the library (``train``, ``load_trained``, ``evaluate``); one row per seed goes to the results
   store ``<out-dir>/results.csv``. A run already in the store (same variant, lr, seed, steps,
   samples: see ``recorded``) is skipped; one interrupted in training resumes from its checkpoint.

The summary (mean ± std [95% t-interval] per metric) goes to ``<out-dir>/summary.csv`` and, as a
markdown table with the interval comparisons against NestAR k=4, into the "quality" section of
``--out``::

    .venv/bin/python benchmarks/bench_quality.py [--steps 300] [--seeds 0,1,2] [--variants "NestAR k=4,AR,MAR"]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import lr_search
import quality_stats
from nestar_lab import results
from nestar_lab.config import load_config, read_yaml
from nestar_lab.evaluate import evaluate
from nestar_lab.results import config_hash, flatten_config
from nestar_lab.rundir import CHECKPOINT
from nestar_lab.train import load_trained, train
from variants import CONFIG, MATCH_TO, count_params, matched, plans, write_section

SEC_PER_STEP, SEC_PER_EVAL, SEC_PER_SEARCH_EVAL = 0.6, 40.0, 15.0  # 2-core CPU, for the estimate only


def all_plans() -> dict[str, list[str]]:
    """``plans()`` plus AR in the quickstart's token order, width matched like the others."""
    table = plans()
    order = read_yaml(CONFIG).get("token_order", {}).get("name", "raster")
    label = f"AR ({order})"
    if order != "raster" and label not in table:
        table[label] = matched(["generator.name=ar", "generator.params={}"], count_params(table[MATCH_TO]))
    return table


def slug(label: str) -> str:
    """A run-name for a label: ``AR (coarse_to_fine)`` -> ``AR_coarse_to_fine``."""
    keep = label.replace(" (", "_").replace(")", "").replace(", ", "-").replace(",", "-")
    return keep.replace(" ", "_").replace("=", "")


def selected(table: dict[str, list[str]], wanted: list[str]) -> dict[str, list[str]]:
    """Labels named in ``wanted`` exactly or by their part before `` (``; all when empty."""
    return {k: v for k, v in table.items() if not wanted or any(k == w or k.startswith(w + " (") for w in wanted)}


def seeded_config(overrides: list[str], lr: float, seed: int, args, label: str):
    return load_config(CONFIG, overrides + [
        f"train.lr={lr}", f"train.steps={args.steps}", f"eval.samples_per_class={args.samples_per_class}",
        f"seed={seed}", f"eval.seed={1234 + seed}", f"output_dir={args.out_dir}", f"name={slug(label)}",
    ])  # fmt: skip


def configs(table: dict[str, list[str]], label: str, lr: float, seeds: list[int], args) -> dict:
    """seed -> the seeded run's config for ``label`` at ``lr``."""
    return {seed: seeded_config(table[label], lr, seed, args, label) for seed in seeds}


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
            if key in runs and key not in ("device", "output_dir", "metrics") and value is not None:
                col = runs[key]
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    same = np.isclose(pd.to_numeric(col, errors="coerce"), value)
                else:
                    same = col.astype(str) == str(value)
                hit &= col.isna() | same
        hits.append(runs[hit].tail(1))
    return pd.concat([runs.iloc[0:0], *hits])


def run_one(cfg, run_dir: Path) -> dict:
    """Train (or resume, or reuse a finished training) and evaluate: one results row."""
    if (run_dir / "train_summary.json").is_file():
        pass  # trained; only the evaluation was missing
    elif (run_dir / CHECKPOINT).is_file():
        train(cfg, run_dir, resume=True, progress=False)
    else:
        train(cfg, run_dir, progress=False, overwrite=True)  # a run killed before its first checkpoint
    return evaluate(load_trained(run_dir), run_dir)


def minutes(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds > 5400 else f"{seconds / 60:.0f} min"


def estimate(todo: dict[str, list[str]], seeds: list[int], args, b: dict) -> str:
    """What this invocation will run (finished searches and recorded runs left out) and how long."""
    searched, store = lr_search.load_chosen(Path(args.out_dir) / "lr.json"), results.load(args.out_dir)
    searches = [k for k in todo if not lr_search.current(searched.get(k, {}), todo[k], b)]
    recorded_runs = sum(len(recorded(store, configs(todo, k, searched[k]["lr"], seeds, args)))
                        for k in todo if k not in searches)  # fmt: skip
    missing = len(todo) * len(seeds) - recorded_runs
    search_s = len(searches) * args.lr_trials * (args.lr_steps * SEC_PER_STEP + SEC_PER_SEARCH_EVAL)
    runs_s = missing * (args.steps * SEC_PER_STEP + SEC_PER_EVAL)
    return (f"{len(todo)} variants ({', '.join(todo)}), seeds {seeds}, {args.steps} steps, "
            f"{args.samples_per_class} samples/class. To run: {len(searches)} lr searches x {args.lr_trials} "
            f"trials x {args.lr_steps} steps, {missing} seeded runs. Estimate on an idle 2-core CPU "
            f"(~{SEC_PER_STEP} s/step, ~{SEC_PER_EVAL:.0f} s/evaluation): searches {minutes(search_s)} + "
            f"seeded runs {minutes(runs_s)} = {minutes(search_s + runs_s)}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="training steps of each seeded run")
    ap.add_argument("--samples-per-class", type=int, default=50, help="evaluation samples per class")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (at least 3 for intervals)")
    ap.add_argument("--variants", default="", help='comma-separated labels, or their part before " (" (default: all)')
    ap.add_argument("--lr-trials", type=int, default=4, help="learning rates tried per variant (log-spaced grid)")
    ap.add_argument("--lr-steps", type=int, default=150, help="training steps of each learning-rate trial")
    ap.add_argument("--lr-samples-per-class", type=int, default=20, help="samples per class scoring each trial")
    ap.add_argument("--out", default="docs/benchmarks.md", help='markdown file whose "quality" section is replaced')
    ap.add_argument("--out-dir", default="runs/bench_quality", help="results store, lr.json, summary.csv")
    ap.add_argument("--summary-only", action="store_true",
                    help="train nothing: rewrite summary.csv and the markdown section from the runs already stored")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out_dir = Path(args.out_dir)
    table = all_plans()
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [w for w in wanted if not selected(table, [w])]
    if unknown:
        raise SystemExit(f"--variants: {', '.join(unknown)} match none of: {', '.join(table)}")
    todo = selected(table, wanted)
    if len(seeds) < 3:
        print(f"warning: {len(seeds)} seed(s); the 95% intervals need at least 3 to mean much", flush=True)
    b = lr_search.budget(args.lr_trials, args.lr_steps, args.lr_samples_per_class)
    if args.summary_only:
        return write_summary(args, table, seeds, b)
    store = out_dir / "lr.json"
    print(estimate(todo, seeds, args, b), flush=True)
    start, total = time.perf_counter(), len(todo) * len(seeds)
    done, took = 0, []
    for label, overrides in todo.items():
        t0 = time.perf_counter()
        lr = lr_search.choose_lr(CONFIG, label, slug(label), overrides, b, out_dir / "lr_search", store)
        trials = lr_search.load_chosen(store)[label]["trials"]
        scores = ", ".join(f"{x:g} -> {y:.1f}" for x, y in trials)
        print(f"[lr] {label}: lr {lr:g} (trial lr -> FID: {scores}; {time.perf_counter() - t0:.0f} s)", flush=True)
        cfgs = configs(todo, label, lr, seeds, args)
        have = set(recorded(results.load(out_dir), cfgs)["seed"])
        for seed, cfg in cfgs.items():
            done += 1
            if seed in have:
                print(f"[{done}/{total}] {label} seed {seed}: in the results store, skipped", flush=True)
                continue
            t1 = time.perf_counter()
            row = run_one(cfg, out_dir / f"{slug(label)}-seed{seed}-{config_hash(cfg)[:6]}")
            took.append(time.perf_counter() - t1)
            elapsed = time.perf_counter() - start
            left = (total - done) * sum(took) / len(took)  # at this session's measured rate
            fid, acc = row.get("fid_digits_cnn", float("nan")), row.get("class_accuracy", float("nan"))
            print(f"[{done}/{total}] {label} seed {seed}: FID {fid:.2f}, class acc {acc:.3f} in {took[-1]:.0f} s; "
                  f"elapsed {minutes(elapsed)}, about {minutes(left)} of seeded runs left (+ searches)", flush=True)  # fmt: skip
    write_summary(args, table, seeds, b)


def grid_edges(summary: pd.DataFrame, grid: list[float]) -> str:
    """A caveat naming the variants whose chosen lr is the grid's smallest or largest arm: for
    them the search cannot tell whether an lr beyond the grid would do better."""
    if summary.empty or len(grid) < 2:
        return ""
    lo, hi = min(grid), max(grid)
    names = [f"{v} (lr {lr:g}, the {'largest' if lr == hi else 'smallest'} tried)"
             for v, lr in zip(summary["variant"], summary["lr"]) if lr in (lo, hi)]  # fmt: skip
    if not names:
        return ""
    return ("Chosen at an edge of the learning-rate grid: " + "; ".join(names)
            + ". For these the search cannot tell whether a learning rate beyond the grid would do better.")


def shown_path(path: Path) -> str:
    """``path`` as the docs show it: relative to the working directory when it lies inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def write_summary(args, table: dict[str, list[str]], seeds: list[int], b: dict) -> None:
    """Every variant with a chosen lr and rows for these seeds (this run's and earlier ones')."""
    out_dir = Path(args.out_dir)
    chosen = lr_search.load_chosen(out_dir / "lr.json")
    chosen = {k: v for k, v in chosen.items() if k in table and lr_search.current(v, table[k], b)}
    store = results.load(out_dir)
    found = [recorded(store, configs(table, k, v["lr"], seeds, args)).assign(variant=k) for k, v in chosen.items()]
    runs = pd.concat([store.iloc[0:0].assign(variant=[]), *found])
    summary = quality_stats.summarize(runs, list(table))
    summary.to_csv(out_dir / "summary.csv", index=False)
    cpu = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu
    lines = quality_stats.comparisons(summary, MATCH_TO)
    shown = shown_path(out_dir)
    edges = grid_edges(summary, b["grid"])
    body = (f"Device: {device}. Each variant: {args.steps} training steps per seed at its own learning rate, "
            f"{args.samples_per_class} samples per class, seeds {', '.join(map(str, seeds))} (training seed; "
            f"eval seed 1234 + seed); parameter counts matched to {MATCH_TO}'s (widths chosen by "
            f"`variants.plans()`); AR (coarse_to_fine) shares NestAR's token order, AR (raster) and MAR use "
            f"raster. Cells: mean ± sample std [95% t-interval of the mean]. "
            f"{lr_search.describe(b)}. Per-seed rows: "
            f"`{shown}/results.csv`; this table as numbers: `{shown}/summary.csv`.\n\n"
            + quality_stats.markdown(summary)
            + f"\n\nWhat the 95% intervals support against {MATCH_TO} (overlap: no difference claimed):\n\n"
            + "\n".join(lines)
            + (f"\n\n{edges}" if edges else ""))  # fmt: skip
    print(body, flush=True)
    write_section(Path(args.out), "quality", body)


if __name__ == "__main__":
    main()
