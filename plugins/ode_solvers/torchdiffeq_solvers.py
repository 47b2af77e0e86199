"""ODE solvers: fixed-step Runge-Kutta methods integrated natively over a precomputed grid
(euler, midpoint, heun, rk4), and adaptive methods on torchdiffeq (dopri5, bosh3).

Why the fixed-step methods do not go through ``torchdiffeq.odeint``: its fixed-grid loop moves the
time grid to the state's device and compares grid points as tensors (``t1 >= t[j]``, the
interpolation's ``t == t0``), about four tensor-to-Python conversions per step; on a GPU each is a
host-device sync in the sampler's hottest loop. Here the stage times are built on the state's
device once per solve, indexed by Python integers (views, no copy), and the step size is a Python
float, so a solve issues kernels only: its number of conversions does not grow with ``steps``.
The tableaus are torchdiffeq's (rk4 is its 3/8-rule variant); a contract test checks that every
native method matches ``odeint`` with the same method. A subclass that names only a torchdiffeq
``method`` without a ``tableau`` runs through ``odeint`` (correct, with its per-step syncs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pydantic import Field
from torchdiffeq import odeint

from nestar_lab.interfaces import ODESolver, Params, VelocityFn


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta method: stage ``i`` evaluates ``v(t0 + c[i] h, y0 + h sum_j a[i][j] k_j)``
    and the step is ``y0 + h sum_i b[i] k_i``."""

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]  # row i holds a[i][0..i-1]
    b: tuple[float, ...]

    def __post_init__(self):
        n = len(self.b)
        if len(self.c) != n or len(self.a) != n or any(len(row) != i for i, row in enumerate(self.a)):
            raise ValueError(f"tableau: c, a and b must describe {n} explicit stages (a[i] holding i weights)")


TABLEAUS = {  # torchdiffeq's fixed-grid methods, by their torchdiffeq names
    "euler": Tableau(c=(0.0,), a=((),), b=(1.0,)),
    "midpoint": Tableau(c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0)),
    "heun2": Tableau(c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5)),
    "rk4": Tableau(
        c=(0.0, 1 / 3, 2 / 3, 1.0),
        a=((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
        b=(1 / 8, 3 / 8, 3 / 8, 1 / 8),
    ),
}


def stage_times(tableau: Tableau, steps: int, like: torch.Tensor) -> torch.Tensor:
    """``(stages, steps)`` evaluation times on ``like``'s device and dtype, built there (no host data)."""
    grid = torch.linspace(0.0, 1.0, steps + 1, device=like.device, dtype=like.dtype)
    h = 1.0 / steps
    rows = [grid[1:] if c == 1.0 else grid[:-1] + c * h for c in tableau.c]  # c = 1 lands on the grid
    return torch.stack(rows)


def integrate_rk(tableau: Tableau, velocity: VelocityFn, y0: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` uniform steps of ``tableau`` from t = 0 to 1; ``velocity`` gets 0-dim tensor times."""
    times, h = stage_times(tableau, steps, y0), 1.0 / steps
    y = y0
    for i in range(steps):
        ks: list[torch.Tensor] = []
        for weights, t in zip(tableau.a, times[:, i]):
            y_s = y
            for w, k in zip(weights, ks):
                if w:
                    y_s = y_s + (h * w) * k
            ks.append(velocity(t, y_s))
        y = y + sum((h * w) * k for w, k in zip(tableau.b, ks) if w)
    return y


class FixedGridSolver(ODESolver):
    """A fixed-step explicit Runge-Kutta method over a uniform grid of ``steps`` intervals.

    Subclasses set ``tableau`` (native, sync-free), or only ``method`` (a torchdiffeq fixed-grid
    name): a known name uses its tableau natively, another runs through ``odeint``."""

    method: ClassVar[str]
    tableau: ClassVar[Tableau | None] = None

    class Params(Params):
        steps: int = Field(16, ge=1, description="solver steps from t=0 to t=1")

    def _tableau(self) -> Tableau | None:
        return self.tableau or TABLEAUS.get(getattr(self, "method", ""))

    def evaluations(self) -> int | None:
        """Stages x steps for a native tableau; ``None`` through ``odeint`` (counted as it runs)."""
        tableau = self._tableau()
        return None if tableau is None else len(tableau.b) * self.params.steps

    def solve(self, velocity: VelocityFn, y0: torch.Tensor) -> torch.Tensor:
        tableau = self._tableau()
        if tableau is not None:
            return integrate_rk(tableau, velocity, y0, self.params.steps)
        grid = torch.linspace(0.0, 1.0, self.params.steps + 1, device=y0.device, dtype=y0.dtype)
        return odeint(velocity, y0, grid, method=self.method)[-1]


class Euler(FixedGridSolver):
    """Explicit Euler: 1 velocity evaluation per step, first order."""

    method = "euler"


class Midpoint(FixedGridSolver):
    """Explicit midpoint: 2 evaluations per step, second order."""

    method = "midpoint"


class Heun(FixedGridSolver):
    """Heun's method (trapezoidal predictor-corrector): 2 evaluations per step, second order."""

    method = "heun2"


class RK4(FixedGridSolver):
    """Classical Runge-Kutta (torchdiffeq's 3/8-rule variant): 4 evaluations per step, fourth order."""

    method = "rk4"


class AdaptiveSolver(ODESolver):
    """An adaptive-step torchdiffeq method with error tolerances ``rtol`` / ``atol``. Step-size
    control decides on the host, so these sync with the device at every step by design."""

    method: ClassVar[str]

    class Params(Params):
        rtol: float = Field(1e-3, gt=0)
        atol: float = Field(1e-4, gt=0)

    def solve(self, velocity: VelocityFn, y0: torch.Tensor) -> torch.Tensor:
        span = torch.tensor([0.0, 1.0], device=y0.device, dtype=y0.dtype)
        return odeint(velocity, y0, span, method=self.method, rtol=self.params.rtol, atol=self.params.atol)[-1]


class Dopri5(AdaptiveSolver):
    """Dormand-Prince 5(4), adaptive."""

    method = "dopri5"


class Bosh3(AdaptiveSolver):
    """Bogacki-Shampine 3(2), adaptive; cheaper per step than dopri5."""

    method = "bosh3"
