"""Paired differences over seeds: what a comparison of two variants (or two study arms) trained
with the same seeds can claim.

A seed fixes a run's initialisation, data order and evaluation draw, so ``a - b`` per seed
removes what the two runs share, and the 95% t-interval of those differences is narrower than
two unpaired intervals. It either excludes 0 (resolved) or, from the observed paired spread, says
how many seeds would resolve a difference of the observed size (:func:`seeds_to_resolve`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

MAX_SEEDS = 50  # beyond this the seeds needed are reported as "> 50"


@dataclass(frozen=True)
class Paired:
    """``a - b`` over common seeds: mean, sample std, 95% t-interval, and (when the interval holds
    0) the seeds the observed spread says would resolve a difference of the observed size."""

    n: int
    mean: float
    std: float
    lo: float
    hi: float
    seeds_needed: int | None  # None: resolved, or no estimate (fewer than 2 seeds, no spread)

    @property
    def resolved(self) -> bool:
        return self.n >= 2 and (self.lo > 0 or self.hi < 0)

    def cell(self, digits: int | None, lower_is_better: bool | None, unit: str = "seeds") -> str:
        """``+1.2 [-0.3, +2.7]`` and the reading: better or worse (``lower_is_better`` None: higher
        or lower), or what resolving would take, counted in ``unit`` (what the differences are paired
        over). ``digits`` None: 4 significant digits."""
        if self.n < 2:
            return f"n/a (fewer than 2 common {unit})"
        f = (lambda x: f"{x:+.{digits}f}") if digits is not None else (lambda x: f"{x:+.4g}")
        diff = f"{f(self.mean)} [{f(self.lo)}, {f(self.hi)}]"
        if self.resolved:
            if lower_is_better is None:
                return f"{diff}, resolved: {'lower' if self.mean < 0 else 'higher'}"
            return f"{diff}, resolved: {'better' if (self.mean < 0) == lower_is_better else 'worse'}"
        if self.seeds_needed is None:
            return f"{diff}, not resolved"
        need = f"> {MAX_SEEDS}" if self.seeds_needed > MAX_SEEDS else f"about {self.seeds_needed}"
        return f"{diff}, not resolved at {self.n} {unit}; {need} would be needed"


def _t(n: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, n - 1))


def seeds_to_resolve(mean: float, std: float) -> int | None:
    """The smallest n whose 95% t-interval half-width, t(0.975, n-1) std / sqrt(n), is below
    |mean|; ``MAX_SEEDS + 1`` when even ``MAX_SEEDS`` is not enough; ``None`` without spread or
    difference to go on."""
    if not (std > 0) or mean == 0 or math.isnan(mean):
        return None
    for n in range(2, MAX_SEEDS + 1):
        if _t(n) * std / math.sqrt(n) < abs(mean):
            return n
    return MAX_SEEDS + 1


def paired(a: dict, b: dict) -> Paired:
    """Paired difference ``a[seed] - b[seed]`` over the seeds both have (NaN values left out)."""
    d = [float(a[s]) - float(b[s]) for s in a if s in b and _finite(a[s]) and _finite(b[s])]
    return differences(d)


def differences(d: Iterable[float]) -> Paired:
    """The :class:`Paired` summary of per-seed differences ``d``."""
    d = list(d)
    n = len(d)
    if n < 2:
        return Paired(n, d[0] if n else math.nan, math.nan, math.nan, math.nan, None)
    mean = sum(d) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = _t(n) * std / math.sqrt(n)
    lo, hi = mean - half, mean + half
    resolved = lo > 0 or hi < 0
    return Paired(n, mean, std, lo, hi, None if resolved else seeds_to_resolve(mean, std))


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
