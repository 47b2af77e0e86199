"""Training step time and sampling throughput of the quickstart model and its variants.

Every variant runs in this one process at a matched parameter count (the baselines' widths are
chosen to be closest to NestAR k=4's), with the same tokenizer, data, solver and guidance:
`ar`, `mar`, `dit`, `var` (see benchmarks/variants.py and docs/baselines.md). Times are medians
over repeats after warm-up; the table reports sampling speed-ups against MAR, DiT and AR measured
in the same process. ``--tokens 256`` runs the paper's token count on 16x16 image_patches.
Writes a markdown table into docs/benchmarks.md between the markers of its section.

    .venv/bin/python benchmarks/bench_speed.py [--tokens 64|256] [--train-steps 20] [--repeats 3] [--images 100]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from nestar_lab.config import load_config
from nestar_lab.data import train_batches
from nestar_lab.evaluate import make_sampler
from nestar_lab.experiment import build_experiment, use_bf16
from nestar_lab.train import make_optimizer, train_step
from variants import CONFIG, baselines, plans, write_section

def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(overrides: list[str], args) -> dict:
    cfg = load_config(CONFIG, overrides + [f"device={args.device}"])
    exp = build_experiment(cfg)
    batches = train_batches(exp, 0)  # the training loop's own batches, step 0, 1, ...
    opt, ema = make_optimizer(exp)
    exp.generator.train()
    step = iter(range(10**9))
    train_s = median_time(lambda: train_step(exp, opt, ema, *next(batches), next(step)), args.train_steps, warmup=5)
    exp.generator.eval()
    sampler = make_sampler(exp)
    sample_labels = torch.arange(args.images) % exp.dataset.num_classes
    last = {}

    def sample():
        last["s"] = sampler(sample_labels, seed=0)

    sample_s = median_time(sample, args.repeats)
    st = last["s"].stats
    return {
        "params": sum(p.numel() for p in exp.generator.parameters()),
        "train_ms": 1000 * train_s,
        "img_per_s": args.images / sample_s,
        "steps": st.sequential_steps,
        "nfe": st.nfe_per_image,
        "bf16": use_bf16(exp.device, cfg.train.precision),
        "device": str(exp.device),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="docs/benchmarks.md")
    ap.add_argument("--tokens", type=int, choices=[64, 256], default=64, help="64: digits; 256: 16x16 image_patches")
    args = ap.parse_args()
    rows = {}
    for label, ov in plans(args.tokens).items():
        rows[label] = measure(ov, args)
        print(label, {k: round(v, 2) if isinstance(v, float) else v for k, v in rows[label].items()}, flush=True)
    bases = baselines(args.tokens)
    base = rows[bases[0]]
    dev = base["device"]
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    lines = [
        f"n = {args.tokens} tokens. Device: {name}; torch {torch.__version__}; bf16 autocast: {base['bf16']}; "
        f"batch {load_config(CONFIG).train.batch_size} for training, {args.images} images per sampling call.",
        "",
        "| variant | params | sequential steps | NFE / image | train step (ms, median) | sampling (img/s, median) | "
        + " | ".join(f"speed-up vs {b.split(' ')[0]}" for b in bases) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(bases),
    ]
    for label, r in rows.items():
        ratios = " | ".join(f"{r['img_per_s'] / rows[b]['img_per_s']:.2f}x" for b in bases)
        lines.append(
            f"| {label} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['nfe']:g} | {r['train_ms']:.0f} | "
            f"{r['img_per_s']:.1f} | {ratios} |"
        )
    table = "\n".join(lines)
    print(table)
    write_section(Path(args.out), "speed" if args.tokens == 64 else f"speed{args.tokens}", table)


if __name__ == "__main__":
    main()
