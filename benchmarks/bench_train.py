"""Training step time and MFU at paper size: NestAR-B (or -L) against DiT and MAR matched on total
parameters, one process, random weights and random latents (n = 256 tokens of dim 16, 1000
classes), the library's own step (``nestar_lab.run.train.train_step``: label dropout, every module's
flow loss and the coordination loss, backward, clipping, fused AdamW, EMA).

FLOPs are counted, not estimated: ``FlopCounterMode`` over one whole step (forward and backward;
matmuls and attention, 2 per multiply-add). MFU = counted FLOPs per step / median step time /
the bf16 (or fp32) matmul peak measured in the same run. Steps are timed with a device sync
around each, after warm-up. Writes the ``train_paper`` section of docs/benchmarks.md::

    .venv/bin/python benchmarks/bench_train.py --batch 64                  # on a GPU (bf16)
    .venv/bin/python benchmarks/bench_train.py --batch 2 --width-scale 0.0625 --steps 2 --out /tmp/t.md  # CPU smoke
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import paper_size
import torch
from flops import count_flops, matmul_peaks, median_seconds
from variants import write_section

from nestar_lab.config.parts import make
from nestar_lab.run.experiment import Experiment, device_name, pick_device, use_bf16
from nestar_lab.run.optim import make_optimizer
from nestar_lab.run.train import train_step


def measure(model: str, overrides: list[str], args) -> dict:
    cfg = paper_size.load(model, overrides + [f"train.precision={args.precision}", f"train.batch_size={args.batch}"])
    device = pick_device(args.device)
    gen, order = paper_size.build_generator(cfg)
    gen = gen.to(device).train()
    exp = Experiment(cfg=cfg, device=device, dataset=SimpleNamespace(num_classes=paper_size.NUM_CLASSES),
                     tokenizer=None, order=order, generator=gen, solver=None,
                     coordination=make("coordination_objective", cfg.coordination), metrics=[], solvers=[])  # fmt: skip
    opt, ema = make_optimizer(exp)
    g = torch.Generator(device=device).manual_seed(0)
    tokens = torch.randn(args.batch, 256, paper_size.LATENT[0], generator=g, device=device)
    labels = torch.randint(0, paper_size.NUM_CLASSES, (args.batch,), generator=g, device=device)
    step = iter(range(1, 10**9))  # never a logging step's extra disagreement pass (log_every divides 0 only)

    def one() -> None:
        train_step(exp, opt, ema, tokens, labels, next(step))

    _, flops = count_flops(one)
    for _ in range(args.warmup):
        one()
    seconds = median_seconds(one, args.steps, device)
    row = {"params": sum(p.numel() for p in gen.parameters()), "flops": flops, "ms": 1000 * seconds,
           "bf16": use_bf16(device, cfg.train.precision), "device": device,
           "width": cfg.scale_module.params["width"]}  # fmt: skip
    del exp, gen, opt, ema
    if device.type == "cuda":
        row["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="NestAR-B", choices=sorted(paper_size.CONFIGS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--width-scale", type=float, default=1.0, help="shrink every width (smoke runs only)")
    ap.add_argument("--out", default="docs/benchmarks.md")
    ap.add_argument("--section", default="train_paper")
    args = ap.parse_args()
    device = pick_device(args.device)
    peaks = matmul_peaks(device, None, need_bf16=args.precision == "bf16")
    rows = {}
    for label, ov in paper_size.plans(args.model, "total", args.width_scale).items():
        rows[label] = measure(args.model, ov, args)
        print(label, {k: v for k, v in rows[label].items() if k != "device"}, flush=True)
    first = next(iter(rows.values()))
    peak = peaks["bf16" if first["bf16"] else "fp32"]
    base = next(iter(rows))
    lines = ["| variant | params | width | GFLOP / step (counted) | step (ms, median) | achieved TFLOP/s | MFU "
             f"| step time vs {base} |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, r in rows.items():
        achieved = r["flops"] / (r["ms"] / 1000)
        lines.append(f"| {label} | {r['params'] / 1e6:.1f}M | {r['width']} | {r['flops'] / 1e9:,.0f} | {r['ms']:.1f} | "
                     f"{achieved / 1e12:.2f} | {100 * achieved / peak:.1f}% | {r['ms'] / rows[base]['ms']:.2f}x |")  # fmt: skip
    smoke = f" SMOKE RUN: widths scaled by {args.width_scale}, not paper size." if args.width_scale != 1.0 else ""
    memory = ", ".join(f"{k} {r['peak_mb']:,.0f} MiB" for k, r in rows.items() if "peak_mb" in r)
    body = (f"Training step at paper size, batch {args.batch}, random weights and latents (n = 256 tokens of dim "
            f"16), {args.model}'s config (its coordination loss and flow batch_mul); baselines matched on total "
            f"parameters.{smoke} Device: {device_name(device)}; torch {torch.__version__}; bf16 autocast: "
            f"{first['bf16']}; matmul peak measured in this run: {peak / 1e12:.1f} TFLOP/s "
            f"({'bf16' if first['bf16'] else 'fp32'}). FLOPs counted by `FlopCounterMode` over one whole step "
            f"(forward + backward); median of {args.steps} timed steps after {args.warmup} warm-up."
            + (f" Peak GPU memory: {memory}." if memory else "") + "\n\n" + "\n".join(lines))  # fmt: skip
    print(body)
    write_section(Path(args.out), args.section, body)


if __name__ == "__main__":
    main()
