"""Sync-free sampling, before and after: the fixed-step solvers' native integration against
torchdiffeq's fixed grid, on the same model in the same process.

For each model and step count, one sampling call is run twice per path: ``native`` (the built-in
fixed-step solvers: stage times built on the device, Python-float step sizes) and ``torchdiffeq``
(the same tableau through ``torchdiffeq.odeint``, which compares grid points as tensors). Reported
per call: the tensor-to-Python conversions (``__bool__``, ``item``, ``__float__``, ``__int__``,
``__index__``, ``tolist``; on a GPU each is a host-device sync), the median wall time of
``--repeats`` calls, images/s and the ratio, and GFLOP/s as a fraction of the device's fp32 (or
bf16) matmul peak measured in the same run. On a CPU there is no device to wait for, so the time
columns change little; the conversion counts are the point, and a GPU run shows the time::

    .venv/bin/python benchmarks/bench_sync.py                                  # quickstart, CPU
    .venv/bin/python benchmarks/bench_sync.py --models quickstart,NestAR-B --images 16 --steps 4,16 \
        --section sync_free_gpu                                                # GPU session
"""

from __future__ import annotations

import argparse
import contextlib
import platform
from pathlib import Path

import paper_size
import torch
from flops import count_flops, has_fast_bf16, matmul_peaks, median_seconds
from nestar_plugins.ode_solvers.torchdiffeq_solvers import FixedGridSolver
from variants import CONFIG, write_section

from nestar_lab.config.validation import load_config
from nestar_lab.method.sample import Sampler, SamplingPlan
from nestar_lab.run.evaluate import make_sampler
from nestar_lab.run.experiment import autocast_factory, build_experiment, pick_device, use_bf16

CONVERSIONS = ("__bool__", "item", "__float__", "__int__", "__index__", "tolist")


@contextlib.contextmanager
def counting_conversions():
    """Count tensor -> Python conversions inside the block: ``with counting_conversions() as n``."""
    count = [0]
    saved = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def wrap(original):
        def counted(*args, **kwargs):
            count[0] += 1
            return original(*args, **kwargs)

        return counted

    for name, original in saved.items():
        setattr(torch.Tensor, name, wrap(original))
    try:
        yield count
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def solver_path(path: str):
    """``native``: as shipped; ``torchdiffeq``: every fixed-step solver through ``odeint``."""
    if path == "native":
        yield
        return
    saved = FixedGridSolver._tableau
    FixedGridSolver._tableau = lambda self: None
    try:
        yield
    finally:
        FixedGridSolver._tableau = saved


def quickstart_sampler(device, steps: int, precision: str):
    cfg = load_config(CONFIG, [f"ode_solver.params.steps={steps}", f"device={device.type}", f"train.precision={precision}"])
    exp = build_experiment(cfg)
    exp.generator.eval()
    sampler = make_sampler(exp)  # the run's own sampler: per-module solvers and guidance included
    return sampler, exp.dataset.num_classes, use_bf16(device, precision)


def paper_sampler(model: str, device, steps: int, precision: str):
    cfg = paper_size.load(model, [f"ode_solver.params.steps={steps}", f"train.precision={precision}"])
    gen, order = paper_size.build_generator(cfg)
    gen = gen.to(device).eval()
    tokenizer = paper_size.get_registry().get("tokenizer", "pixels")(image_shape=paper_size.LATENT)
    stages = range(len(gen.schedule.stages))  # per module: its ``modules:`` solver and guidance
    solvers = [paper_size.make("ode_solver", cfg.module_part("ode_solver", i)) for i in stages]
    plan = SamplingPlan.build(solvers, [cfg.module_sample(i) for i in stages], device, autocast_factory(device, precision))
    sampler = Sampler(gen, tokenizer, order, plan)
    return sampler, paper_size.NUM_CLASSES, use_bf16(device, precision)


def measure(make, images: int, repeats: int, device) -> list[dict]:
    rows = []
    for path in ("native", "torchdiffeq"):
        sampler, classes, bf16 = make()
        labels = torch.arange(images) % classes
        with solver_path(path):
            _, flops = count_flops(lambda: sampler(labels, seed=0))  # also the warm-up
            with counting_conversions() as conversions:
                sampler(labels, seed=0)
            seconds = median_seconds(lambda: sampler(labels, seed=0), repeats, device)
        rows.append({"path": path, "conversions": conversions[0], "seconds": seconds, "img_per_s": images / seconds,
                     "gflop_per_s": flops / seconds / 1e9, "bf16": bf16})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="quickstart", help="comma-separated: quickstart, NestAR-B, NestAR-L")
    ap.add_argument("--steps", default="8,32", help="comma-separated solver step counts")
    ap.add_argument("--images", type=int, default=20, help="images per sampling call")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--out", default="docs/benchmarks.md")
    ap.add_argument("--section", default="sync_free", help="marked section of --out to replace")
    args = ap.parse_args()
    device = pick_device(args.device)
    peaks = matmul_peaks(device, need_bf16=args.precision == "bf16")
    lines = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        for steps in [int(s) for s in args.steps.split(",")]:
            if model == "quickstart":
                make = lambda: quickstart_sampler(device, steps, args.precision)  # noqa: E731
            else:
                make = lambda: paper_sampler(model, device, steps, args.precision)  # noqa: E731
            rows = measure(make, args.images, args.repeats, device)
            native, old = rows
            peak = peaks["bf16"] if native["bf16"] and peaks["bf16"] else peaks["fp32"]
            for r in rows:
                lines.append(f"| {model} | {steps} | {r['path']} | {r['conversions']} | {r['seconds'] * 1e3:.0f} | "
                             f"{r['img_per_s']:.3g} | {old['seconds'] / r['seconds']:.2f}x | "
                             f"{100 * r['gflop_per_s'] * 1e9 / peak:.1f}% |")  # fmt: skip
                print(lines[-1], flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    peak_txt = f"fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s" + (f", bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s" if peaks["bf16"] else "")
    body = "\n".join([
        f"Device: {name}; torch {torch.__version__}; {args.images} images per call, median of {args.repeats} timed calls "
        f"after a FLOP-counted warm-up; matmul peak measured in this run: {peak_txt} (fast bf16: {has_fast_bf16(device)}).",
        "",
        "| model | solver steps | fixed-step path | tensor->Python conversions per call | call (ms, median) | img/s | speed-up vs torchdiffeq | % of matmul peak |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
    ])  # fmt: skip
    write_section(Path(args.out), args.section, body)


if __name__ == "__main__":
    main()
