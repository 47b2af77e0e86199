"""Markdown tables for the speed benchmark: one row per variant, costs and ratios explained."""

from __future__ import annotations

import torch
from flops import peak_line

from nestar_lab.run.experiment import device_name


def caption(device: torch.device, bf16: bool, peaks: dict, images: int, repeats: int) -> str:
    """What every speed table shares: device, precision, how FLOPs, passes and time are measured."""
    timing = (f"median of {repeats} timed call(s) after the FLOP-counted one" if repeats else
              "the FLOP-counted call's own time (no warm-up, counter overhead included)")  # fmt: skip
    return (
        f"Device: {device_name(device)}; torch {torch.__version__}; bf16 autocast: {bf16}. "
        f"FLOPs per image are counted by `torch.utils.flop_counter.FlopCounterMode` over one real "
        f"sampling call of {images} image(s) (the warm-up; matmuls and attention, attention "
        f"counted dense, 2 FLOPs per multiply-add, element-wise ops not counted); classifier-free "
        f"guidance runs its conditional and unconditional halves in one batch, so both are counted. "
        f"Sequential passes = context-network passes + NFE per image: the network evaluations on "
        f"one image's critical path, each waiting for the one before. Achieved GFLOP/s = FLOPs per "
        f"image x images/s; sampling img/s: {timing}. {peak_line(peaks, bf16)} Speed-ups are sampling img/s "
        f"ratios within one table, every row measured in this one process."
    )


def _num(x: float) -> str:
    return f"{x:.0f}" if x == int(x) else f"{x:.1f}"


def table(rows: dict[str, dict], bases: tuple[str, ...], peak: float, train: bool = True) -> str:
    """Rows (from ``bench_speed.measure``) as a markdown table, with speed-ups against ``bases``
    (labels that are not rows are skipped) and the fraction of the matmul ``peak`` (FLOP/s)."""
    bases = tuple(b for b in bases if b in rows)
    head = ["variant", "params", "GFLOP / image", "sequential passes (context + NFE)", "NFE / image"]
    head += ["sampling (img/s, median)"] + (["train step (ms, median)"] if train else [])
    head += ["achieved GFLOP/s", "% of matmul peak"] + [f"speed-up vs {b.split(' ')[0]}" for b in bases]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows.items():
        achieved = r["flops_per_image"] * r["img_per_s"]
        cells = [
            label,
            f"{r['params'] / 1e6:.2f}M",
            f"{r['flops_per_image'] / 1e9:,.2f}",
            f"{_num(r['passes'])} ({r['context_passes']} + {_num(r['nfe'])})",
            _num(r["nfe"]),
            f"{r['img_per_s']:.3g}",
        ]
        cells += [f"{r['train_ms']:.0f}"] if train else []
        cells += [f"{achieved / 1e9:,.1f}", f"{100 * achieved / peak:.1f}%"]
        cells += [f"{r['img_per_s'] / rows[b]['img_per_s']:.2f}x" for b in bases]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
