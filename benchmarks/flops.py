"""What a benchmark row costs: FLOPs counted over a real call, medians of timed calls, and the
device's matmul peak measured in the same process."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from nestar_lab.run.experiment import cpu_has_fast_bf16


def _cpu_sdpa_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    """The CPU's fused attention kernel, which torch's counter has no formula for: counted as
    the CUDA kernels are (dense QK^T and AV; masked-out scores are computed all the same)."""
    return sdpa_flop_count(query, key, value)


def _custom_formulas() -> dict:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {} if op is None else {op: _cpu_sdpa_flops}


def count_flops(fn: Callable[[], object]) -> tuple[object, int]:
    """``fn()``'s result and the FLOPs it ran: matmuls, convolutions and attention, 2 per
    multiply-add (``torch.utils.flop_counter.FlopCounterMode``; element-wise ops not counted).
    Everything that runs in the call is counted, so a batch holding CFG's conditional and
    unconditional halves counts both."""
    with FlopCounterMode(display=False, custom_mapping=_custom_formulas()) as counter:
        out = fn()
    return out, int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``repeats`` calls (warm up first: this does not)."""
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls have a hardware path here (without one a CPU's bf16 matmul runs
    tens of times slower than fp32, and measuring its 'peak' would take minutes)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """FLOP/s of a ``size`` x ``size`` matmul in ``dtype``: median of ``repeats`` timings after a
    warm-up, each timing enough back-to-back matmuls to last about 50 ms."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    one = median_seconds(lambda: torch.mm(a, b), 2, device)  # the first call is the warm-up
    inner = max(1, math.ceil(0.05 / max(one, 1e-9)))

    def run():
        for _ in range(inner):
            torch.mm(a, b)

    return inner * 2 * size**3 / median_seconds(run, repeats, device)


def matmul_peaks(device: torch.device, size: int | None = None, need_bf16: bool = False) -> dict:
    """The device's measured bf16 and fp32 matmul peaks (FLOP/s; bf16 ``None``: no fast path here
    and not ``need_bf16``, so not measured) and the matrix size (default 2048 CPU, 8192 CUDA)."""
    size = size or (8192 if device.type == "cuda" else 2048)
    bf16 = matmul_peak(device, torch.bfloat16, size) if need_bf16 or has_fast_bf16(device) else None
    return {"size": size, "bf16": bf16, "fp32": matmul_peak(device, torch.float32, size)}


def peak_line(peaks: dict, bf16: bool) -> str:
    """One sentence for a table caption: both peaks and which one the fractions use."""
    size = peaks["size"]
    bf = f"{peaks['bf16'] / 1e9:,.0f} GFLOP/s" if peaks["bf16"] else "not measured (no fast bf16 path on this device)"
    return (f"Matmul peak measured in this run ({size}x{size} matmul, median): bf16 {bf}, "
            f"fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s; the '% of peak' column uses the "
            f"{'bf16' if bf16 else 'fp32'} peak, the precision the rows ran in.")  # fmt: skip


def sampling_costs(sample: Callable[[], object], images: int, repeats: int, device: torch.device,
                   counted: Callable[[], object] | None = None, warmup: int = 0,
                   flops_per_image: float | None = None) -> dict:  # fmt: skip
    """Cost of a sampling call that makes ``images`` images and returns ``Samples``: FLOPs per
    image from one counted call (which is also the warm-up), then the median of ``repeats``
    timed calls (``repeats=0``: the counted call's own time, for runs too slow to repeat);
    sequential network passes per image = context passes + NFE. ``counted``: the call whose
    FLOPs are counted, when ``sample`` would count more than its work on a first call (a
    captured sampler warms up and records its graphs), then ``warmup`` untimed calls.
    ``flops_per_image`` known (the same work counted in another row): no counting, the first
    call is a plain warm-up."""
    _sync(device)
    t0 = time.perf_counter()
    if flops_per_image is None:
        samples, flops = count_flops(counted or sample)
    else:
        samples, flops = sample(), flops_per_image * images
    _sync(device)
    counted_s = time.perf_counter() - t0
    for _ in range(warmup):
        samples = sample()
    seconds = median_seconds(sample, repeats, device) if repeats else counted_s
    st = samples.stats
    return {
        "flops_per_image": flops / images,
        "img_per_s": images / seconds,
        "context_passes": st.context_passes,
        "nfe": st.nfe_per_image,
        "passes": st.sequential_passes,
    }
