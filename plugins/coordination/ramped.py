"""Velocity matching whose weight ramps up over training: an objective that reads the step."""

from __future__ import annotations

import torch
from pydantic import Field

from nestar_lab.interfaces import CoordinationObjective, CoordinationPair, Params


class RampedVelocityMatching(CoordinationObjective):
    """``velocity_matching`` with lambda rising linearly from ``weight / ramp_steps`` at step 0 to
    ``weight`` at ``ramp_steps`` and after: the modules first learn their own flows, then are
    pulled into agreement. Reads the step from its input (``CoordinationPair.step``); outside
    training (no step) the full weight applies."""

    class Params(Params):
        weight: float = Field(0.1, ge=0, description="lambda_coor once the ramp is over")
        ramp_steps: int = Field(1000, ge=1, description="training steps over which lambda rises to weight")

    def lam(self, step: int | None) -> float:
        """lambda at ``step`` (a Python number: no device work)."""
        if step is None:
            return self.params.weight
        return self.params.weight * min(1.0, (step + 1) / self.params.ramp_steps)

    def __call__(self, pairs: list[CoordinationPair]) -> torch.Tensor:
        losses = [(p.v_fine - p.v_coarse).pow(2).mean() for p in pairs]
        return self.lam(pairs[0].step) * torch.stack(losses).sum()
