"""Sampling and training cost of NestAR and the baselines, every row measured in one process.

Every row reports parameters, FLOPs per image (counted over a real sampling call), sequential
network passes on an image's critical path (context passes + NFE), NFE per image, sampling img/s
and training step ms (medians after warm-up), and the achieved GFLOP/s as a fraction of a matmul
peak measured on the same device in the same run. Speed-ups against MAR, DiT and AR are ratios
within one table. Two matchings, both written (``benchmarks/variants.py``):

- ``total``: the baselines' widths matched to NestAR k=4's total parameter count, so each of
  NestAR's M modules is about 1/M the size of the one network a baseline runs;
- ``per_step``: every variant runs the same scale module (each NestAR module as wide and deep as
  a baseline's network), so the ratios show the schedule's own effect.

The quickstart's variants (derived from the quickstart as frozen in
``benchmarks/configs/variants_base.yaml``; tokenizer, data, solver, guidance shared; ``--tokens 256`` runs 16x16
``image_patches``, the paper's token count) write the ``speed`` / ``speed256`` sections of
docs/benchmarks.md. ``--paper-size`` times NestAR-B and NestAR-L (studies/configs/imagenet256)
against MAR (S=64) and DiT (50 steps) at the same parameter counts on n = 256 tokens of dim 16
with random weights (``benchmarks/paper_size.py``; sampling only) into the ``speed_paper``
section (``--section`` picks another marked section). ``benchmarks/gpu_checks.sh`` runs every GPU
table in one go. The final tables:

    .venv/bin/python benchmarks/bench_speed.py --tokens 64 --train-steps 10 --repeats 3
    .venv/bin/python benchmarks/bench_speed.py --tokens 256 --train-steps 4 --repeats 2 --images 50
    .venv/bin/python benchmarks/bench_speed.py --paper-size --images 16 --repeats 3   # on a GPU
    .venv/bin/python benchmarks/bench_speed.py --paper-size --images 64 --repeats 1 --section speed_paper_b64
    .venv/bin/python benchmarks/bench_speed.py --paper-size --models NestAR-B --images 256 --repeats 1 \
        --section speed_paper_b256                                                   # GPU, throughput
    .venv/bin/python benchmarks/bench_speed.py --paper-size --images 1 --repeats 1    # 2-core CPU, fp32: 1-1.5 h

(``--repeats 0`` times the FLOP-counted call itself, halving a CPU run, but with no warm-up and
the counter's per-op overhead included, which slows NestAR's many small steps most.)
Smoke runs (write to /tmp, not the docs): ``--train-steps 1 --repeats 1 --images 4
--variants "NestAR k=4,MAR,DiT" --out /tmp/b.md``; ``--paper-size --models NestAR-B --images 1
--width-scale 0.0625 --out /tmp/b.md`` (widths shrunk 16x: checks the path, not paper size).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import paper_size
import torch
from flops import matmul_peaks, median_seconds, sampling_costs
from speed_table import caption, table
from variants import CONFIG, MATCH_TO, MATCHES, baselines, count_params, plans, write_section

from nestar_lab.config.validation import load_config
from nestar_lab.run.data import train_batches
from nestar_lab.run.evaluate import make_sampler
from nestar_lab.run.experiment import build_experiment, pick_device, use_bf16
from nestar_lab.run.optim import make_optimizer
from nestar_lab.run.train import train_step


def measure(overrides: list[str], args) -> dict:
    """One variant of the quickstart: training step time, then sampling costs."""
    precision = [f"train.precision={args.precision}"] if args.precision else []
    cfg = load_config(CONFIG, overrides + [f"device={args.device}"] + precision)
    exp = build_experiment(cfg)
    batches = train_batches(exp, 0)  # the training loop's own batches, step 0, 1, ...
    opt, ema = make_optimizer(exp)
    exp.generator.train()
    step = iter(range(10**9))

    def one_step():
        train_step(exp, opt, ema, *next(batches), next(step))

    for _ in range(min(5, args.train_steps)):  # warm-up
        one_step()
    train_s = median_seconds(one_step, args.train_steps, exp.device)
    exp.generator.eval()
    sampler = make_sampler(exp)
    labels = torch.arange(args.images) % exp.dataset.num_classes
    row = {"params": sum(p.numel() for p in exp.generator.parameters()), "train_ms": 1000 * train_s,
           "bf16": use_bf16(exp.device, cfg.train.precision), "device": exp.device}  # fmt: skip
    row.update(sampling_costs(lambda: sampler(labels, seed=0), args.images, args.repeats, exp.device))
    return row


def _show(label: str, row: dict) -> None:
    keep = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "device"}
    print(label, keep, flush=True)


def run_quickstart(args, peaks: dict) -> tuple[str, str]:
    """Both matchings of the quickstart variants: the section key and its markdown."""
    cfg = load_config(CONFIG)
    sm = ", ".join(f"{k} {cfg.scale_module.params[k]}" for k in ("width", "depth", "heads", "head_width", "head_depth"))
    what = {"total": f"{MATCH_TO}'s {count_params(plans(args.tokens, 'per_step')[MATCH_TO]) / 1e6:.2f}M parameters",
            "per_step": f"the quickstart's scale module ({sm})"}  # fmt: skip
    parts, first = [], None
    for match in args.match:
        rows = {}
        for label, ov in plans(args.tokens, match).items():
            if not args.variants or any(label == v or label.startswith(v + " (") for v in args.variants):
                rows[label] = measure(ov, args)
                _show(f"[{match}] {label}", rows[label])
        first = first or rows[next(iter(rows))]
        peak = peaks["bf16" if first["bf16"] else "fp32"]
        title = MATCHES[match][0].upper() + MATCHES[match][1:]
        parts.append(f"**{title}**: {what[match]}.\n\n" + table(rows, baselines(args.tokens), peak))
    head = (f"n = {args.tokens} tokens; batch {cfg.train.batch_size} for training, {args.images} images per "
            f"sampling call. " + caption(first["device"], first["bf16"], peaks, args.images, args.repeats))  # fmt: skip
    return ("speed" if args.tokens == 64 else f"speed{args.tokens}"), "\n\n".join([head, *parts])


PATHS = {"off": "eager", "auto": "captured"}  # --capture mode -> the tables' name for it


def run_paper(args, peaks: dict) -> tuple[str, str]:
    """NestAR-B/-L against MAR and DiT at paper size: the section key and its markdown. With
    ``--capture both`` every variant runs eager and captured, in one table each (captured is
    compared with captured, eager with eager), then each variant's captured / eager ratio."""
    start, parts, first = time.perf_counter(), [], None
    for model in args.models:
        for match in args.match:
            by_mode = {}
            for mode in args.capture:
                rows = {}
                args.capture_mode = mode
                for label, ov in paper_size.plans(model, match, args.width_scale).items():

                    def log(msg: str) -> None:
                        print(f"[{time.perf_counter() - start:6.0f} s] {model} {match} {PATHS[mode]} / {label}: {msg}",
                              flush=True)  # fmt: skip

                    known = by_mode[args.capture[0]][label]["flops_per_image"] if by_mode else None  # same work
                    rows[label] = paper_size.measure(model, ov, args, log, flops_per_image=known)
                by_mode[mode] = rows
                first = first or rows[next(iter(rows))]
                peak = peaks["bf16" if first["bf16"] else "fp32"]
                widths = ", ".join(f"{label}: width {r['width']}" for label, r in rows.items())
                title = paper_size.MATCHES[match].format(model=model)
                ran = "captured" if all(r["captured"] for r in rows.values()) else "eager"
                held = ", ".join(f"{k} {r['graph_mb']:,.0f} MiB" for k, r in rows.items())
                graphs = f" GPU memory taken by the recorded CUDA graphs: {held}." if ran == "captured" else ""
                parts.append(f"**{model}, {title}, sampling {ran}** ({widths}).{graphs}\n\n"
                             + table(rows, paper_size.BASES, peak, train=False))  # fmt: skip
            if len(by_mode) == 2:
                eager, captured = by_mode["off"], by_mode["auto"]
                ratios = ", ".join(f"{k} {captured[k]['img_per_s'] / eager[k]['img_per_s']:.2f}x" for k in eager)
                parts.append(f"Captured / eager sampling img/s ({model}, same process): {ratios}.")
    smoke = f" SMOKE RUN: widths scaled by {args.width_scale}, not paper size." if args.width_scale != 1.0 else ""
    shared = caption(first["device"], first["bf16"], peaks, args.images, args.repeats)
    head = f"{paper_size.setting(args.models[0])}{smoke} {shared}"
    return "speed_paper", "\n\n".join([head, *parts])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, choices=[64, 256], default=64, help="64: digits; 256: 16x16 image_patches")
    ap.add_argument("--train-steps", type=int, default=20, help="timed training steps (after up to 5 warm-up)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed sampling calls after the FLOP-counted one (default 3; paper size 1; 0: time the counted call)")  # fmt: skip
    ap.add_argument("--images", type=int, default=None, help="images per sampling call (default 100; paper size 2)")
    ap.add_argument("--match", default=None, help="comma-separated: total, per_step (default both; paper size total)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=None,
                    help="default: the quickstart's (auto); paper size: auto (the configs' bf16 only where fast)")  # fmt: skip
    ap.add_argument("--peak-size", type=int, default=None, help="matmul size for the peak (default 2048 CPU, 8192 CUDA)")
    ap.add_argument("--paper-size", action="store_true", help="NestAR-B/-L against MAR and DiT at paper size")
    ap.add_argument("--variants", default="", help='quickstart: comma-separated labels or their part before " (" (default: all)')
    ap.add_argument("--models", default="NestAR-B,NestAR-L", help="paper size: which models")
    ap.add_argument("--width-scale", type=float, default=1.0, help="paper size: shrink every width (smoke runs only)")
    ap.add_argument("--capture", choices=["off", "auto", "both"], default=None,
                    help="paper size: eager (off), captured where possible (auto), or both tables "
                         "(default: both on CUDA, off elsewhere)")  # fmt: skip
    ap.add_argument("--out", default="docs/benchmarks.md")
    ap.add_argument("--section", default=None,
                    help="marked section of --out to replace (default: speed, speed256 or speed_paper)")
    args = ap.parse_args()
    args.repeats = args.repeats if args.repeats is not None else (1 if args.paper_size else 3)
    args.images = args.images or (2 if args.paper_size else 100)
    args.match = (args.match or ("total" if args.paper_size else "total,per_step")).split(",")
    args.models = args.models.split(",")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if bad := [m for m in args.match if m not in MATCHES] + [m for m in args.models if m not in paper_size.CONFIGS]:
        ap.error(f"unknown --match or --models value(s): {', '.join(bad)}")
    device = pick_device(args.device)
    args.capture = args.capture or ("both" if device.type == "cuda" else "off")
    args.capture = ["off", "auto"] if args.capture == "both" else [args.capture]
    args.capture_mode = args.capture[0]
    peaks = matmul_peaks(device, args.peak_size, need_bf16=args.precision == "bf16")
    print("matmul peaks (GFLOP/s):", {k: (v / 1e9 if k != "size" and v else v) for k, v in peaks.items()}, flush=True)
    key, body = (run_paper if args.paper_size else run_quickstart)(args, peaks)
    print(body)
    write_section(Path(args.out), args.section or key, body)


if __name__ == "__main__":
    main()
