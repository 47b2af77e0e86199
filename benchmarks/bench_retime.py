"""Sampling speed of a study's trained runs, re-timed in one quiet process, paired over seeds.

A study's ``sec_per_image`` is timed where each trial ran: with ``--workers 2`` beside another
worker's training, sometimes in another session, and (in studies queued before the seed-by-seed
order of 2026-12-07) arm after arm. Identical samplers then differ by several percent, and by arm
(docs/benchmarks.md, the coordination ablation). This loads every run of a results store (a
study's: ``runs/studies/NAME``), warms each sampler up with a FLOP-counted call, then times them
in rounds, every run once per round and the order rotated each round, so drift and neighbours
fall on every arm alike; a run's time is its median. The table gives each ``--by`` group's FLOPs,
NFE and sequential passes per image, seconds per image (mean [95% t-interval] over seeds), its
paired difference from ``--reference`` and the speed-up (reference time / group time: the
geometric mean of the per-seed ratios, with its 95% interval), and the achieved GFLOP/s as a
share of a matmul peak measured in the same run.

    .venv/bin/python benchmarks/bench_retime.py runs/studies/k_ablation --by generator.k --reference 4 \\
        --section k_ablation_speed

Run it alone (the caption gives the load average it started under); ``OMP_NUM_THREADS`` sets the
threads (the caption says how many). The store is only read. A fixed-step solver's cost does not
depend on the weights; an adaptive one's does, which is why every run is timed, not one per arm.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import torch
from flops import _sync, count_flops, matmul_peaks, peak_line
from variants import positive, run_main, write_section

from nestar_lab.config.errors import BadInput
from nestar_lab.run import results
from nestar_lab.run.evaluate import make_sampler
from nestar_lab.run.experiment import device_name, pick_device, precision_name
from nestar_lab.run.rundir import load_run_config
from nestar_lab.run.train import load_trained
from nestar_lab.sweep.compare import check_one_run_per_seed, find_reference, runs_by_group
from nestar_lab.sweep.paired import differences


def runs_to_time(store: str, by: list[str], reference: str, where: list[str],
                 quality: str | None = None) -> tuple[dict, str, list[str], dict]:  # fmt: skip
    """``{group: {seed: run_dir}}``, the reference group, the ``--by`` columns and (``quality``: a
    metric of the store, for the plot) ``{group: {seed: value}}``; bad input is one line before
    anything is loaded."""
    if not Path(store).is_dir():
        raise BadInput(f"{store}: no such directory (a results store, e.g. runs/studies/k_ablation)")
    df = results.select(results.load(store), where)
    if df.empty:
        raise BadInput(f"{results.results_path(store)}: no runs (after --where)" if where else
                       f"{results.results_path(store)}: no runs yet")  # fmt: skip
    if "run_dir" not in df.columns:
        raise BadInput(f"{results.results_path(store)}: no run_dir column; its rows cannot be loaded again")
    by_cols = [results.resolve_column(df, b) for b in by]
    quality_col = results.resolve_column(df, quality) if quality else None
    groups = runs_by_group(df, by_cols)
    ref = find_reference(reference, groups, by_cols, df)
    check_one_run_per_seed(groups)
    runs = {label: {seed: Path(d) for seed, d in rows["run_dir"].items()} for label, (_, rows) in groups.items()}
    for label, seeds in runs.items():
        for seed, d in seeds.items():
            if not (d / "checkpoint.pt").is_file():
                raise BadInput(f"{d}: no checkpoint.pt (group {label}, seed {seed}); "
                               f"the store lists a run that is gone")  # fmt: skip
    scores = {label: rows[quality_col].to_dict() for label, (_, rows) in groups.items()} if quality_col else {}
    return runs, ref, by_cols, scores


def time_runs(runs: dict, images: int, rounds: int, device: torch.device) -> dict:
    """Per run: FLOPs, NFE and passes per image from a counted warm-up call, then the median of
    ``rounds`` timed calls, each round visiting every run once in an order rotated by one; and the
    precision it sampled in (its own ``train.precision`` on this device)."""
    loaded, order = {}, [(g, s) for g, seeds in runs.items() for s in sorted(seeds)]
    for key in order:
        run_dir = runs[key[0]][key[1]]
        saved = load_run_config(run_dir)
        exp = load_trained(run_dir, cfg=saved.model_copy(update={"device": device.type}))
        sampler = make_sampler(exp)
        labels = torch.arange(images, device=exp.device) % exp.dataset.num_classes
        call = (lambda sampler=sampler, labels=labels: sampler(labels, 1))
        samples, flops = count_flops(call)
        st = samples.stats
        loaded[key] = {"call": call, "flops": flops / images, "nfe": st.nfe_per_image, "passes": st.sequential_passes,
                       "precision": precision_name(device, saved.train.precision), "times": []}  # fmt: skip
    for r in range(rounds):
        for key in order[r % len(order):] + order[: r % len(order)]:
            _sync(device)
            t0 = time.perf_counter()
            loaded[key]["call"]()
            _sync(device)
            loaded[key]["times"].append(time.perf_counter() - t0)
    return {key: {**{k: v for k, v in m.items() if k not in ("call", "times")},
                  "sec_per_image": statistics.median(m["times"]) / images} for key, m in loaded.items()}  # fmt: skip


def markdown(timed: dict, runs: dict, ref: str, by_cols: list[str], peaks: dict) -> str:
    def f(x: float) -> str:
        return f"{x:.3g}"

    head = (f"| {'/'.join(by_cols)} | seeds | MFLOPs per image | NFE per image | sequential passes | ms per image "
            f"[95% CI] | Δ ms per image from {ref}, paired | speed-up over {ref} (geometric mean [95% CI]) | "
            f"precision | GFLOP/s | % of its peak |")  # fmt: skip
    lines = [head, "|" + "---|" * 11]
    ref_times = {s: timed[(ref, s)]["sec_per_image"] for s in runs[ref]}
    for label, seeds in runs.items():
        rows = [timed[(label, s)] for s in sorted(seeds)]
        ms = differences([1e3 * r["sec_per_image"] for r in rows])
        mean_ms = f"{ms.mean:.3f} [{ms.lo:.3f}, {ms.hi:.3f}]" if ms.n >= 2 else f"{ms.mean:.3f} (1 seed)"
        common = [s for s in sorted(seeds) if s in ref_times]
        if label == ref:
            delta = speed = "(reference)"
        else:
            d = differences([1e3 * (timed[(label, s)]["sec_per_image"] - ref_times[s]) for s in common])
            delta = d.cell(3, True)
            logs = differences([math.log(ref_times[s] / timed[(label, s)]["sec_per_image"]) for s in common])
            speed = (f"{math.exp(logs.mean):.2f}x [{math.exp(logs.lo):.2f}, {math.exp(logs.hi):.2f}]" if logs.n >= 2
                     else f"{math.exp(logs.mean):.2f}x (1 seed)" if logs.n else "n/a (no common seed)")  # fmt: skip
        flops = statistics.mean(r["flops"] for r in rows)
        rate = flops / statistics.mean(r["sec_per_image"] for r in rows)
        precision = rows[0]["precision"]
        share = f"{100 * rate / peaks[precision]:.1f}%" if peaks.get(precision) else "n/a"
        lines.append(f"| {label}{' (reference)' if label == ref else ''} | {len(rows)} | {flops / 1e6:.1f} | "
                     f"{f(rows[0]['nfe'])} | {f(rows[0]['passes'])} | {mean_ms} | {delta} | {speed} | "
                     f"{precision} | {rate / 1e9:.1f} | {share} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", help="a results store (a directory with results.csv), e.g. runs/studies/k_ablation")
    ap.add_argument("--by", required=True, help="the column(s) whose values are compared, e.g. generator.k")
    ap.add_argument("--reference", required=True, help="the group the others are paired with, e.g. 4")
    ap.add_argument("--where", action="append", default=[], help="COLUMN=VALUE: only these rows (repeatable)")
    ap.add_argument("--images", type=positive, default=100, help="images per timed sampling call (default 100)")
    ap.add_argument("--rounds", type=positive, default=5, help="timed calls per run, one per round (default 5)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="docs/benchmarks.md")
    ap.add_argument("--plot", default=None, metavar="PNG",
                    help="also draw each group's --quality against its re-timed ms per image, means with 95%% "
                         "intervals (the study report's arms.png, with these times)")  # fmt: skip
    ap.add_argument("--quality", default="fid_digits_cnn", help="the store's metric on the plot's other axis")
    ap.add_argument("--section", default=None, help="write the table into this marked section of --out "
                                                     "(default: print it only)")  # fmt: skip
    args = ap.parse_args()
    by = [b.strip() for b in args.by.split(",")]
    runs, ref, by_cols, scores = runs_to_time(args.store, by, args.reference, args.where, args.plot and args.quality)
    device = pick_device(args.device)
    count = sum(len(s) for s in runs.values())
    load = os.getloadavg()[0]  # what else ran on the cores, for the caption
    print(f"timing {count} runs x {args.rounds} rounds of {args.images} images on {device_name(device)}")
    timed = time_runs(runs, args.images, args.rounds, device)
    bf16 = any(t["precision"] == "bf16" for t in timed.values())
    peaks = matmul_peaks(device, need_bf16=bf16)
    body = "\n\n".join([
        f"Device: {device_name(device)}; load average {load:.1f} when it started ({os.cpu_count()} cores). "
        f"Runs: every run of `{results.results_path(args.store)}` ({count}), sampled with its own settings "
        f"(trained weights, each in its own precision), {args.images} images per call; after a "
        f"FLOP-counted warm-up call each, {args.rounds} rounds, every run once per round in an order rotated "
        f"by one; a run's time is its median. Means and intervals over seeds (95% t); the speed-up is the "
        f"geometric mean of the per-seed ratios {ref} time / group time. {peak_line(peaks, bf16)}",
        markdown(timed, runs, ref, by_cols, peaks),
    ])  # fmt: skip
    print(body)
    if args.section:
        write_section(Path(args.out), args.section, body)
        print(f"wrote section {args.section} of {args.out}")
    if args.plot:
        from nestar_lab.sweep.plots import plot_arms

        ms = "ms per image (re-timed)"
        arms = {label: {seed: {args.quality: scores[label].get(seed, math.nan),
                               ms: 1e3 * timed[(label, seed)]["sec_per_image"]} for seed in seeds}
                for label, seeds in runs.items()}  # fmt: skip
        drawn = plot_arms(arms, [args.quality, ms], ref, Path(args.plot))
        print(f"wrote {drawn}" if drawn else "no plot: no group has two seeds")


if __name__ == "__main__":
    run_main(main)
