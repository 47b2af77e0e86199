"""Flow matching: t = 0 is noise, t = 1 is data; y_t = t x1 + (1 - t) x0; target v = x1 - x0."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor


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


def guided_velocity(
    head: Callable[[Tensor, Tensor, Tensor], Tensor], cond: Tensor, cfg_scale: float
) -> Callable[[Tensor, Tensor], Tensor]:
    """A velocity field ``(t, y) -> v`` for an ODE solver, with classifier-free guidance.

    ``cond`` is ``(2B, L, D)`` (conditional rows first, then unconditional) when
    ``cfg_scale != 1`` and ``(B, L, D)`` otherwise. Both halves go through ``head`` in one
    batched call: ``v = v_u + w (v_c - v_u)``. The scalar ``t`` is broadcast to every token.
    """
    guided = cfg_scale != 1.0

    def velocity(t: Tensor, y_BLd: Tensor) -> Tensor:
        y = torch.cat([y_BLd, y_BLd]) if guided else y_BLd
        t_BL = t.to(y.dtype).expand(y.shape[:-1])
        v = head(y, t_BL, cond).float()
        if not guided:
            return v
        v_c, v_u = v.chunk(2)
        return v_u + cfg_scale * (v_c - v_u)

    return velocity
