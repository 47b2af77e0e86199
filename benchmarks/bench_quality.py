"""Quality of every generator variant on the digits: same tuning, several seeds, intervals.

Variants: ``variants.plans()`` (matched total parameter count, each derived from the quickstart as
frozen in ``benchmarks/configs/variants_base.yaml``) plus AR in the quickstart's own
token order (coarse_to_fine), so that one AR/NestAR pair shares its order. For each variant:

1. its learning rate comes from the same small search (``lr_search.py``: an Optuna study per
   variant over ``train.lr``, one grid of arms, a fixed budget of steps and samples), stored in
   ``<out-dir>/lr.json`` and reused by reruns; every search runs before any seeded run;
2. seed by seed (every variant's seed 0, then every variant's seed 1, ...: each finished round
   adds one paired difference per variant and rewrites the table), it is trained and evaluated once per seed (``seed`` and ``eval.seed = 1234 + seed``) through
   the library (``train``, ``load_trained``, ``evaluate``); one row per seed goes to the results
   store ``<out-dir>/results.csv``. A run already in the store (same variant, lr, seed, steps,
   samples: see ``recorded``) is skipped; one interrupted in training resumes from its checkpoint.

The store (``results.csv``, ``lr.json``, ``summary.csv``) defaults to ``benchmarks/results/quality``,
which git tracks, so a table too long for one sitting continues from a later checkout; the run
directories and checkpoints go to ``--runs-dir`` (default ``runs/<store's name>``, not tracked).

The summary (mean ± std [95% t-interval] per metric) goes to ``<out-dir>/summary.csv`` and, as a
markdown table with the interval comparisons against NestAR k=4, into the "quality" section of
``--out``::

    .venv/bin/python benchmarks/bench_quality.py [--steps 300] [--seeds 0,1,2] [--variants "NestAR k=4,AR,MAR"]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import guidance
import lr_search
import pandas as pd
import quality_stats
from quality_store import evaluate_aside, provenance, recorded
from variants import CONFIG, MATCH_TO, count_params, matched, plans, positive, run_main, write_section

from nestar_lab.config.overrides import read_yaml
from nestar_lab.config.validation import load_config
from nestar_lab.run import results
from nestar_lab.run.evaluate import evaluate, time_sampling
from nestar_lab.run.experiment import device_name, pick_device
from nestar_lab.run.results import config_hash
from nestar_lab.run.rundir import CHECKPOINT, check_writable
from nestar_lab.run.train import load_trained, time_step, train

SEC_PER_SEARCH_EVAL = 15.0  # 2-core CPU, for the estimate only
#: an evaluation's metrics (features, FID, precision/recall, the classifiers) per sample, beside
#: its sampling (timed per variant): NestAR k=4 at 100 per class, one thread of the Xeon, took
#: 7.5 s, of which 4.4 s sampling the 1000 images and 1.8 s the speed metric's 400
SEC_METRICS_PER_SAMPLE = 0.0015


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
    """The seeded run's config: the variant at its learning rate, ``seed`` (data order and
    evaluation draw), and one precision for every run of the table (``--precision``, fp32 by
    default: ``auto`` would train in bf16 on a CPU with fast bf16 and in fp32 on one without, and
    a seed's pair would then differ in precision as well as in variant)."""
    device = [f"device={args.device}"] if getattr(args, "device", "auto") != "auto" else []
    return load_config(CONFIG, overrides + device + [
        f"train.precision={getattr(args, 'precision', 'fp32')}",
        f"train.lr={lr}", f"train.steps={args.steps}", f"eval.samples_per_class={args.samples_per_class}",
        f"seed={seed}", f"eval.seed={1234 + seed}", f"output_dir={args.out_dir}", f"name={slug(label)}",
    ])  # fmt: skip


def configs(table: dict[str, list[str]], label: str, lr: float, seeds: list[int], args) -> dict:
    """seed -> the seeded run's config for ``label`` at ``lr``."""
    return {seed: seeded_config(table[label], lr, seed, args, label) for seed in seeds}


def run_dir_of(label: str, cfg, args) -> Path:
    return runs_dir(args) / f"{slug(label)}-seed{cfg.seed}-{config_hash(cfg)[:6]}"


def needs_training(store: pd.DataFrame, cfg, run_dir: Path, grid) -> bool:
    """Not in the store, or in it without its guidance grid and without a trained run to evaluate."""
    if not len(recorded(store, {cfg.seed: cfg})):
        return True
    return bool(guidance.missing(store, cfg, grid)) and not (run_dir / "train_summary.json").is_file()


def run_one(cfg, run_dir: Path) -> dict:
    """Train (or resume, or reuse a finished training) and evaluate: one results row."""
    if (run_dir / "train_summary.json").is_file():
        pass  # trained; only the evaluation was missing
    elif (run_dir / CHECKPOINT).is_file():
        train(cfg, run_dir, resume=True, progress=False)
    else:
        train(cfg, run_dir, progress=False, overwrite=True)  # a run killed before its first checkpoint
    return evaluate(load_trained(run_dir), run_dir)


def runs_dir(args) -> Path:
    """Where the seeded runs' directories go: apart from the (tracked) results store."""
    return Path(args.runs_dir) if args.runs_dir else Path("runs") / Path(args.out_dir).name


def minutes(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds > 5400 else f"{seconds / 60:.0f} min"


_TIMED: dict[str, tuple[float, float, float]] = {}  # label -> (s/step, s/own evaluation, s/grid evaluation)


def timed(table: dict[str, list[str]], label: str, args) -> tuple[float, float, float]:
    """A variant's training step and its evaluations, timed on this machine: an evaluation is
    its sampling (seconds per image timed, x the images) and its metrics; the run's own also
    samples the ``speed`` metric's images, a grid evaluation does not (``guidance.grid_metrics``).
    MAR samples about 7x slower per image than NestAR here, so one figure for all would misstate
    what each variant's runs cost."""
    if label not in _TIMED:
        cfg = seeded_config(table[label], 1e-3, 0, args, "timing")
        per_image, classes = time_sampling(cfg)
        images = classes * args.samples_per_class
        grid_s = images * (per_image + SEC_METRICS_PER_SAMPLE)
        _TIMED[label] = (time_step(cfg), grid_s + speed_images(cfg) * per_image, grid_s)
    return _TIMED[label]


def speed_images(cfg) -> int:
    """The images a config's ``speed`` metric samples (warm-up and timed calls)."""
    return sum((m.params.get("warmup", 1) + m.params.get("repeats", 3)) * m.params.get("batch_size", 64)
               for m in cfg.metrics if m.name == "speed")  # fmt: skip


def evaluations_per_run(args) -> int:
    """The run's own evaluation and the guidance grid's: each scale x 2 draws, but the own one."""
    return 2 * len(args.grid) if args.grid else 1


def run_hours(table: dict[str, list[str]], labels, args) -> dict[str, float]:
    """Hours of one seeded run of each variant here: its steps at a step timed on this machine,
    its own evaluation and the guidance grid's, at evaluations timed here."""
    hours = {}
    for label in labels:
        step_s, own_s, grid_s = timed(table, label, args)
        hours[label] = (args.steps * step_s + own_s + (evaluations_per_run(args) - 1) * grid_s) / 3600
    return hours


def left_to_train(todo: dict[str, list[str]], lrs: dict[str, float], seeds: list[int], args,
                  store: pd.DataFrame) -> list[tuple[int, str]]:  # fmt: skip
    """The (seed, variant) runs that still need training, in the order they will run."""
    left = []
    for seed in seeds:
        for label in todo:
            cfg = seeded_config(todo[label], lrs[label], seed, args, label)
            if needs_training(store, cfg, run_dir_of(label, cfg, args), args.grid):
                left.append((seed, label))
    return left


def estimate(todo: dict[str, list[str]], seeds: list[int], args, b: dict) -> str:
    """What this invocation will run (finished searches and recorded runs left out) and how long."""
    searched, store = lr_search.load_chosen(Path(args.out_dir) / "lr.json"), results.load(args.out_dir)
    searches = [k for k in todo if not lr_search.current(searched.get(k, {}), todo[k], b)]
    known = {k: v for k, v in todo.items() if k not in searches}  # not searched yet: every seed is left
    runs = left_to_train(known, {k: searched[k]["lr"] for k in known}, seeds, args, store)
    left = {k: len(seeds) if k in searches else sum(label == k for _, label in runs) for k in todo}
    missing = sum(left.values())
    busy = [k for k in todo if left[k] or k in searches]
    hours = run_hours(todo, busy, args)
    search_s = sum(args.lr_trials * (args.lr_steps * timed(todo, k, args)[0] + SEC_PER_SEARCH_EVAL) for k in searches)
    runs_s = sum(left[k] * hours[k] * 3600 for k in busy)
    each = ", ".join(f"{k} {timed(todo, k, args)[0]:.2f} s/step + {timed(todo, k, args)[2]:.0f} s/evaluation"
                     for k in busy)  # fmt: skip
    return (f"{len(todo)} variants ({', '.join(todo)}), seeds {seeds}, {args.steps} steps, "
            f"{args.samples_per_class} samples/class. To run: {len(searches)} lr searches x {args.lr_trials}+ "
            f"trials x {args.lr_steps} steps (more where a learning rate must be bracketed), {missing} seeded runs "
            f"x {args.steps} steps = {missing * args.steps} training steps, each run evaluated "
            f"{evaluations_per_run(args)} times (guidance grid x 2 draws). Estimate from a step and an evaluation "
            f"timed here ({each or 'nothing left'}): searches {minutes(search_s)} + seeded runs "
            f"{minutes(runs_s)} = {minutes(search_s + runs_s)}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=positive, default=1200,
                    help="training steps of each seeded run (default: 2x the quickstart's 600, past early training)")
    ap.add_argument("--samples-per-class", type=positive, default=50, help="evaluation samples per class")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated training seeds (at least 2; 5 or more to resolve much)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    ap.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                    help="training and sampling precision of every seeded run (default fp32: the same on every "
                         "machine, so seeds trained on different machines pair; auto differs by CPU)")
    ap.add_argument("--variants", default="", help='comma-separated labels, or their part before " (" (default: all)')
    ap.add_argument("--lr-trials", type=positive, default=3, help="learning rates of the first grid (log-spaced)")
    ap.add_argument("--lr-steps", type=positive, default=150, help="training steps of each learning-rate trial")
    ap.add_argument("--lr-samples-per-class", type=positive, default=20, help="samples per class scoring each trial")
    ap.add_argument("--eval-noise", metavar="RUN_DIR", default=None,
                    help="train nothing: FID's spread over evaluation seeds for one trained run, per sample count")
    ap.add_argument("--eval-seeds", type=positive, default=5, help="--eval-noise: evaluation seeds per count")
    ap.add_argument("--counts", default="20,50,100", help="--eval-noise: samples per class to try")
    ap.add_argument("--out", default="docs/benchmarks.md", help='markdown file whose "quality" section is replaced')
    ap.add_argument("--out-dir", default="benchmarks/results/quality",
                    help="results store, lr.json, summary.csv (the default is tracked by git, so a table "
                         "continues in a later checkout)")
    ap.add_argument("--runs-dir", default=None,
                    help="run directories and checkpoints (default: runs/<out-dir's name>, not tracked)")
    ap.add_argument("--section", default="quality", help="marked section of --out to replace")
    ap.add_argument("--summary-only", action="store_true",
                    help="train nothing: rewrite summary.csv and the markdown section from the runs already stored")
    ap.add_argument("--guidance", default=",".join(f"{g:g}" for g in guidance.GRID),
                    help='guidance scales each trained run is evaluated at (the second table); "" for none')
    ap.add_argument("--guidance-only", action="store_true",
                    help="train nothing: evaluate the trained runs in --runs-dir at the --guidance scales")
    args = ap.parse_args()
    args.grid = parse_grid(ap, args.guidance)
    if args.eval_noise:
        return eval_noise(args)
    seeds = parse_seeds(ap, args.seeds)
    out_dir = Path(args.out_dir)
    table = all_plans()
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [w for w in wanted if not selected(table, [w])]
    if unknown:
        near = [k for k in table if any(k.startswith(w) for w in unknown)]  # "NestAR" -> its variants
        hint = f"did you mean {' or '.join(repr(k) for k in near)}? " if near else ""
        ap.error(f"--variants: {', '.join(map(repr, unknown))} match no variant exactly or by its part "
                 f"before ' ('; {hint}variants: {', '.join(table)}")  # fmt: skip
    todo = selected(table, wanted)
    if len(seeds) < 5:
        print(f"warning: {len(seeds)} seeds; paired intervals need about 5 or more to resolve a difference", flush=True)
    b = lr_search.budget(args.lr_trials, args.lr_steps, args.lr_samples_per_class)
    check_writable(out_dir, "--out-dir")  # every place a result goes, before any search or training
    check_writable(Path(args.out).resolve().parent, "--out")
    if not args.summary_only:
        check_writable(runs_dir(args), "--runs-dir")
    if args.summary_only:
        return write_summary(args, table, seeds, b)
    store = out_dir / "lr.json"
    if args.guidance_only:
        return guidance_only(args, table, todo, seeds, b)
    print(estimate(todo, seeds, args, b), flush=True)
    lrs = {}
    for label, overrides in todo.items():  # every search first: the seeded runs then go seed by seed
        t0 = time.perf_counter()
        lrs[label] = lr_search.choose_lr(CONFIG, label, slug(label), overrides, b, runs_dir(args) / "lr_search", store)
        trials = lr_search.load_chosen(store)[label]["trials"]
        scores = ", ".join(f"{x:g} -> {y:.1f}" for x, y in trials)
        print(f"[lr] {label}: lr {lrs[label]:g} (trial lr -> FID: {scores}; {time.perf_counter() - t0:.0f} s)",
              flush=True)  # fmt: skip
    start, total = time.perf_counter(), len(todo) * len(seeds)
    hours, rows = run_hours(todo, list(todo), args), results.load(out_dir)
    to_train = left_to_train(todo, lrs, seeds, args, rows)  # what the time left is made of
    done, took = 0, []  # took: (seconds, estimated seconds) of each run trained from scratch here
    for seed in seeds:  # seed-major: each finished round adds one paired difference for every variant
        for label in todo:
            done += 1
            cfg = seeded_config(todo[label], lrs[label], seed, args, label)
            run_dir = run_dir_of(label, cfg, args)
            rows = results.load(out_dir)
            if len(recorded(rows, {seed: cfg})):
                if not guidance.missing(rows, cfg, args.grid):
                    print(f"[{done}/{total}] {label} seed {seed}: in the results store, skipped", flush=True)
                    continue
                if (run_dir / "train_summary.json").is_file():  # trained here: only its grid rows are missing
                    guidance.evaluate_grid(cfg, run_dir, out_dir, args.grid)
                    continue
                print(f"[{done}/{total}] {label} seed {seed}: in the store without its guidance grid and without "
                      f"its checkpoint: trained again", flush=True)  # fmt: skip
            t1, fresh = time.perf_counter(), not (run_dir / CHECKPOINT).is_file()
            row = run_one(cfg, run_dir)
            guidance.evaluate_grid(cfg, run_dir, out_dir, args.grid)
            if fresh:  # a resumed run's time says little about a whole one
                took.append((time.perf_counter() - t1, hours[label] * 3600))
            if (seed, label) in to_train:
                to_train.remove((seed, label))
            elapsed = time.perf_counter() - start
            # each variant's timed estimate, scaled by how this session's whole runs compared with theirs
            pace = sum(t for t, _ in took) / sum(e for _, e in took) if took else 1.0
            left = pace * sum(hours[lab] * 3600 for _, lab in to_train)
            fid, acc = row.get("fid_digits_cnn", float("nan")), row.get("class_accuracy", float("nan"))
            paced = f"x{pace:.2f} as measured on {len(took)} whole run(s)" if took else "as timed before the runs"
            print(f"[{done}/{total}] {label} seed {seed}: FID {fid:.2f}, class acc {acc:.3f} in "
                  f"{time.perf_counter() - t1:.0f} s; elapsed {minutes(elapsed)}, about {minutes(left)} of seeded "
                  f"runs left ({len(to_train)} runs, each variant's estimate {paced})", flush=True)  # fmt: skip
        if MATCH_TO in todo:
            write_summary(args, table, seeds, b)  # the table so far, after every round
    write_summary(args, table, seeds, b)


def guided_section(args, table, chosen: dict, seeds: list[int], store: pd.DataFrame) -> str:
    """The second table: every variant at its own guidance scale (``guidance.py``'s rule), with
    the same statistics; empty until some run has been evaluated over the whole grid."""
    if not args.grid:
        return ""
    picks, found = [], []
    for label, v in chosen.items():
        cfgs = configs(table, label, v["lr"], seeds, args)
        scale, means, chosen_on = guidance.choose(store, cfgs, args.grid)
        if scale is None:
            continue
        picks.append(guidance.describe_choice(label, scale, means, chosen_on, args.grid))
        on_grid = {seed: cfg for seed, cfg in cfgs.items() if seed in chosen_on}  # a grid half done: not yet
        found.append(guidance.reported(store, on_grid, scale).assign(variant=label))
    if not picks:
        return ""
    runs = pd.concat(found)
    summary = quality_stats.summarize(runs, list(table))
    present = set(runs["variant"])
    if MATCH_TO not in present or present == {MATCH_TO}:
        paired = f"(no paired differences yet: guided runs of {', '.join(sorted(present))} only)"
    else:
        paired = quality_stats.paired_markdown(runs, list(table), MATCH_TO, run_hours(table, present, args))
    return (f"\n\n**At each variant's own guidance scale** (grid {', '.join(f'{g:g}' for g in args.grid)}; a "
            f"variant's scale has the lowest mean FID over its seeds' selection draws, eval seed 9000 + seed; the "
            f"cells are the reported draws, eval seed 1234 + seed, at that scale; only seeds whose runs were "
            f"evaluated over the grid; `benchmarks/guidance.py`). Scales chosen: " + "; ".join(picks) + ".\n\n"
            + quality_stats.markdown(summary)
            + f"\n\nPaired differences from {MATCH_TO}, each at its own scale:\n\n" + paired)  # fmt: skip


def parse_grid(ap: argparse.ArgumentParser, text: str) -> tuple[float, ...]:
    """``--guidance``: distinct scales of at least 1 (no guidance), at least two, or none at all."""
    if not text.strip():
        return ()
    try:
        grid = tuple(sorted({float(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        ap.error(f"--guidance: expected comma-separated numbers, got {text!r}")
    if len(grid) < 2 or grid[0] < 1.0:
        ap.error(f"--guidance {text!r}: give at least two scales, none below 1.0 (1.0: no guidance)")
    return grid


def guidance_only(args, table, todo, seeds, b) -> None:
    """Evaluate every trained seeded run of ``todo`` found in ``--runs-dir`` at the guidance grid
    (rows it already has are skipped), then rewrite the tables."""
    chosen = lr_search.load_chosen(Path(args.out_dir) / "lr.json")
    for label in todo:
        if label not in chosen:
            print(f"[guidance] {label}: no learning rate chosen yet, skipped", flush=True)
            continue
        for seed, cfg in configs(todo, label, chosen[label]["lr"], seeds, args).items():
            run_dir = run_dir_of(label, cfg, args)
            if (run_dir / "train_summary.json").is_file():
                guidance.evaluate_grid(cfg, run_dir, Path(args.out_dir), args.grid)
    write_summary(args, table, seeds, b)


def parse_seeds(ap: argparse.ArgumentParser, text: str) -> list[int]:
    """``--seeds``: distinct integers, at least two (one seed gives no interval): checked before any work."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds: expected comma-separated integers, got {text!r}")
    if len(set(seeds)) != len(seeds):
        ap.error(f"--seeds: {text!r} repeats a seed")
    if len(seeds) < 2:
        ap.error(f"--seeds: {len(seeds)} seed(s) give no interval; give at least 2 (5 or more to resolve much)")
    return seeds


def eval_noise(args) -> None:
    """How much FID moves when only the evaluation draw changes (labels and sampling noise), for
    one trained run, at each sample count: the spread the evaluation adds to every seeded run's
    FID, next to the spread between training seeds. Writes the ``quality_eval_noise`` section."""
    run_dir = Path(args.eval_noise)
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    base = load_trained(run_dir).cfg
    lines = ["| samples per class | FID over evaluation seeds: mean ± std (min-max) | seconds per evaluation |",
             "|---|---|---|"]  # fmt: skip
    for count in counts:
        fids, took = [], []
        for k in range(args.eval_seeds):
            cfg = base.model_copy(update={"eval": base.eval.model_copy(update={"samples_per_class": count,
                                                                               "seed": 9000 + k})})  # fmt: skip
            cfg = cfg.model_copy(update={"metrics": [m for m in cfg.metrics if m.name == "fidelity"] or cfg.metrics})
            t0 = time.perf_counter()
            row = evaluate_aside(run_dir, cfg)
            took.append(time.perf_counter() - t0)
            fids.append(float(row["fid_digits_cnn"]))
            print(f"[eval-noise] {count}/class, eval seed {9000 + k}: FID {fids[-1]:.2f} ({took[-1]:.0f} s)", flush=True)
        f = pd.Series(fids)
        lines.append(f"| {count} | {f.mean():.2f} ± {f.std(ddof=1):.2f} ({f.min():.2f}-{f.max():.2f}) | "
                     f"{sum(took) / len(took):.0f} |")  # fmt: skip
    body = (f"One trained run (`{shown_path(run_dir)}`, {base.train.steps} steps), evaluated {args.eval_seeds} times "
            f"per sample count with evaluation seeds 9000-{9000 + args.eval_seeds - 1} (labels and sampling noise "
            f"change, the weights do not); `fid_digits_cnn` against the train split.\n\n" + "\n".join(lines))  # fmt: skip
    print(body, flush=True)
    write_section(Path(args.out), "quality_eval_noise", body)


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
    device = device_name(pick_device(args.device))
    if MATCH_TO not in set(runs["variant"]):
        raise SystemExit(f"error: the reference variant {MATCH_TO!r} has no runs in {out_dir / 'results.csv'} "
                         f"for seeds {seeds}; run it first (--variants \"{MATCH_TO}\")")  # fmt: skip
    lines = quality_stats.comparisons(summary, MATCH_TO)
    shown = shown_path(out_dir)
    brackets = "; ".join(f"{k}: lr {v['lr']:g}, {lr_search.describe_bracket(v)}" for k, v in chosen.items())
    hours = run_hours(table, sorted(set(runs["variant"])), args)
    paired = quality_stats.paired_markdown(runs, list(table), MATCH_TO, hours)
    body = (f"Trained: {provenance(runs)}; every seeded run trains and samples in {args.precision} "
            f"(`--precision`). Table and timed step written on {device}. "
            f"Each variant: {args.steps} training steps per seed at its own learning rate, "
            f"{args.samples_per_class} samples per class, seeds {', '.join(map(str, seeds))} (training seed; "
            f"eval seed 1234 + seed); parameter counts matched to {MATCH_TO}'s (widths chosen by "
            f"`variants.plans()`); AR (coarse_to_fine) shares NestAR's token order, AR (raster) and MAR use "
            f"raster. Cells: mean ± sample std [95% t-interval of the mean]. "
            f"{lr_search.describe(b)}. Per-seed rows: "
            f"`{shown}/results.csv`; this table as numbers: `{shown}/summary.csv`.\n\n"
            + quality_stats.markdown(summary)
            + f"\n\nLearning rates and their brackets: {brackets}."
            + f"\n\nPaired differences from {MATCH_TO} (variant minus {MATCH_TO} over the seeds both have, same "
            f"data order and evaluation draw per seed; mean [95% t-interval]; resolved when the interval excludes "
            f"0, otherwise the seeds the observed paired spread says would resolve a difference of the observed "
            f"size; the last column: the seeds that would take beyond those run, and their hours at one run of "
            f"each variant measured from a training step timed here, evaluations included):\n\n" + paired
            + f"\n\nUnpaired, for reference: what the per-variant 95% intervals support against {MATCH_TO} "
            f"(overlap: no difference claimed):\n\n" + "\n".join(lines)
            + guided_section(args, table, chosen, seeds, store))  # fmt: skip
    print(body, flush=True)
    write_section(Path(args.out), args.section, body)


if __name__ == "__main__":
    run_main(main)
