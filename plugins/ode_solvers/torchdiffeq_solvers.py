"""ODE solvers backed by torchdiffeq: fixed-grid (euler, midpoint, heun, rk4) and adaptive."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torchdiffeq import odeint

from nestar_lab.interfaces import ODESolver, Params, VelocityFn


class FixedGridSolver(ODESolver):
    """A fixed-step torchdiffeq method on an explicit uniform grid of ``steps`` intervals.

    The grid is passed as ``t`` (not a ``step_size``) so the step count is exact.
    """

    method: ClassVar[str]

    class Params(Params):
        steps: int = Field(16, ge=1, description="solver steps from t=0 to t=1")

    def solve(self, velocity: VelocityFn, y0: torch.Tensor) -> torch.Tensor:
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
    """An adaptive-step torchdiffeq method with error tolerances ``rtol`` / ``atol``."""

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
