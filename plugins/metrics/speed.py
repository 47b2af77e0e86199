"""Sampling speed and cost: seconds per image, images/s, NFE, steps, peak memory, parameters."""

from __future__ import annotations

import resource
import statistics
import sys

import torch
from pydantic import Field

from nestar_lab.interfaces import EvalContext, Metric, Params


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated memory, or the process's max resident set size on the CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class Speed(Metric):
    """Times sampling ``batch_size`` images ``repeats`` times after ``warmup`` calls; reports the
    median. Also NFE per image (in all and per module: ``nfe_module_1``, ...), sequential steps,
    peak memory and the parameter count."""

    class Params(Params):
        batch_size: int = Field(64, ge=1)
        repeats: int = Field(3, ge=1)
        warmup: int = Field(1, ge=0)

    def names(self, dataset_name: str) -> set[str]:
        """Also ``nfe_module_<i>`` per module (the evaluation's row has those whatever its metrics)."""
        return {"sec_per_image", "images_per_sec", "speed_batch_size", "nfe_per_image", "sequential_steps",
                "peak_memory_mb", "num_parameters"}  # fmt: skip

    def compute(self, ctx: EvalContext) -> dict[str, float]:
        p = self.params
        labels = torch.arange(p.batch_size) % ctx.dataset.num_classes
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        for i in range(p.warmup):
            ctx.sampler(labels, seed=i, batch_size=p.batch_size)
        runs = [ctx.sampler(labels, seed=100 + i, batch_size=p.batch_size) for i in range(p.repeats)]
        seconds = statistics.median(r.stats.seconds for r in runs)
        stats = runs[0].stats
        params = sum(q.numel() for q in ctx.model.parameters()) if ctx.model is not None else float("nan")
        return {
            "sec_per_image": seconds / p.batch_size,
            "images_per_sec": p.batch_size / seconds,
            "speed_batch_size": float(p.batch_size),
            "nfe_per_image": float(stats.nfe_per_image),
            **{f"nfe_module_{i + 1}": float(nfe) for i, nfe in enumerate(stats.nfe_per_module)},
            "sequential_steps": float(stats.sequential_steps),
            "peak_memory_mb": peak_memory_mb(ctx.device),
            "num_parameters": float(params),
        }
