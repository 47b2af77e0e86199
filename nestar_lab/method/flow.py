"""Flow matching: t = 0 is noise, t = 1 is data; y_t = t x1 + (1 - t) x0; target v = x1 - x0."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from nestar_lab.interfaces import ODESolver, SolveResult
from nestar_lab.method.capture import CaptureMode, static_solve
from nestar_lab.method.capture import resolve as capture_resolve


class FlowConfig(BaseModel):
    """How training draws times and how many (noise, time) draws each token gets per step."""

    model_config = ConfigDict(extra="forbid")

    time_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    batch_mul: int = Field(4, ge=1, description="noise/time draws per token per step (cheap: head only)")


@dataclass(frozen=True)
class PathSample:
    """A point on the straight path between noise ``x0`` and data ``x1`` at time ``t``."""

    x0: Tensor
    x1: Tensor
    t: Tensor  # shape of x1 without the last (feature) dimension
    y_t: Tensor
    target: Tensor

    def rows(self, idx: Tensor) -> PathSample:
        """The sample restricted to rows ``idx`` of the row dimension (dim 2 of ``(mul, B, L, ...)``)."""
        return PathSample(*(getattr(self, f)[:, :, idx] for f in ("x0", "x1", "t", "y_t", "target")))


def sample_times(shape: tuple[int, ...], cfg: FlowConfig, rng: torch.Generator, device) -> Tensor:
    """Training times in (0, 1): uniform, or sigmoid of a normal (logit-normal)."""
    if cfg.time_sampling == "uniform":
        return torch.rand(shape, generator=rng, device=device)
    z = torch.randn(shape, generator=rng, device=device)
    return torch.sigmoid(cfg.logit_mean + cfg.logit_std * z)


def path_sample(x1: Tensor, x0: Tensor, t: Tensor) -> PathSample:
    """The interpolant and its velocity target."""
    tt = t.unsqueeze(-1)
    return PathSample(x0=x0, x1=x1, t=t, y_t=tt * x1 + (1 - tt) * x0, target=x1 - x0)


def data_estimate(y_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """The one-step data estimate ``x1_hat = y_t + (1 - t) v`` of a velocity ``v`` at ``(y_t, t)``
    (exact for the straight path when ``v`` is the true velocity); ``t`` lacks the feature dim."""
    return y_t + (1 - t).unsqueeze(-1) * v


def draw_path(
    x1_BLd: Tensor, flow: FlowConfig, rng: torch.Generator, groups_L: Tensor | None, draws: int | None = None
) -> PathSample:
    """THE training draw of (noise, time) pairs, shared by every generator: ``draws``
    (default ``flow.batch_mul``) draws per token, returned as ``(draws, B, L, d)``.

    Train as you sample: with ``groups_L`` (the patch id of each row) every token of a patch
    gets the patch's one time, as a joint head sees at sampling, where a patch is integrated
    at one shared ``t``; ``None`` draws a time per token (per-token heads, which see one token
    at a time, so per-token times only add variety). Noise is always per token.
    """
    mul = flow.batch_mul if draws is None else draws
    B, L, _ = x1_BLd.shape
    x1 = x1_BLd.expand(mul, -1, -1, -1)
    x0 = torch.randn(x1.shape, generator=rng, device=x1.device, dtype=x1.dtype)
    t = sample_times((mul, B, L), flow, rng, x1.device)
    if groups_L is not None:  # each row takes the time of its patch's first row (no host sync)
        first_L = (groups_L[:, None] == groups_L[None, :]).int().argmax(dim=1)
        t = t[..., first_L]
    return path_sample(x1, x0, t.to(x1.dtype))


def with_null_labels(labels_B: Tensor, null: int) -> Tensor:
    """``(2B,)`` labels: the conditional ones, then the null label for the unconditional half."""
    return torch.cat([labels_B, torch.full_like(labels_B, null)])


def solve_patch(
    solver: ODESolver,
    head: Callable[[Tensor, Tensor, Tensor], Tensor],
    cond: Tensor,
    shape_BLd: tuple[int, int, int],
    *,
    cfg_scale: float,
    temperature: float,
    rng: torch.Generator,
    autocast=contextlib.nullcontext,
    capture: CaptureMode | bool = "off",
) -> SolveResult:
    """THE guided solve of one patch, shared by every generator's sampler.

    Draws the patch's noise at ``temperature`` with ``rng``, integrates ``head``'s velocity field
    from t = 0 to 1 with batched classifier-free guidance, and returns the end point with its NFE
    (from the solver). ``cond`` is whatever ``head`` conditions on (a scale module's rows, or
    labels for a diffusion transformer), with the conditional batch first and, when guidance is
    on, the unconditional batch after it (``2B`` leading); at ``cfg_scale == 1`` the
    unconditional half is dropped, not computed.

    ``capture`` (``sample.capture``): ``auto`` replays the solve as one CUDA graph where that is
    possible (CUDA and a fixed-step solver; :mod:`nestar_lab.method.capture`), ``on`` insists, ``off``
    runs eagerly; ``True`` takes the static-buffer path on any device (graph on CUDA only). The
    noise is drawn here, outside any graph, so captured and eager solves see the same noise.
    """
    B = shape_BLd[0]
    if cfg_scale == 1.0 and cond.shape[0] == 2 * B:
        cond = cond[:B]
    elif cfg_scale != 1.0 and cond.shape[0] != 2 * B:
        raise ValueError(f"cfg_scale {cfg_scale} needs conditional and unconditional rows ({2 * B}); got {cond.shape[0]}")
    x0 = temperature * torch.randn(shape_BLd, generator=rng, device=cond.device)
    if capture_resolve(capture, solver, cond.device):
        return static_solve(solver, head, guided_velocity, cond, x0, autocast)(cond, x0, cfg_scale)

    def run(y, t, c):
        with autocast():
            return head(y, t, c)

    return solver.integrate(guided_velocity(run, cond, cfg_scale), x0)


def guided_velocity(
    head: Callable[[Tensor, Tensor, Tensor], Tensor], cond: Tensor, cfg_scale: float | Tensor
) -> Callable[[Tensor, Tensor], Tensor]:
    """A velocity field ``(t, y) -> v`` for an ODE solver, with classifier-free guidance.

    ``cond`` has ``2B`` leading rows (conditional first, then unconditional) when guided and
    ``B`` otherwise: guidance is read from the shapes, never from a device value, so
    ``cfg_scale`` may be a device tensor (a captured solve's). Both halves go through ``head`` in
    one batched call: ``v = v_u + w (v_c - v_u)``. The scalar ``t`` is broadcast to every token.
    """

    def velocity(t: Tensor, y_BLd: Tensor) -> Tensor:
        guided = cond.shape[0] == 2 * y_BLd.shape[0]
        y = torch.cat([y_BLd, y_BLd]) if guided else y_BLd
        t_BL = t.to(y.dtype).expand(y.shape[:-1])
        v = head(y, t_BL, cond).float()
        if not guided:
            return v
        v_c, v_u = v.chunk(2)
        return v_u + cfg_scale * (v_c - v_u)

    return velocity
