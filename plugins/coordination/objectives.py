"""Coordination objectives: how adjacent modules are pulled into agreement in training."""

from __future__ import annotations

import torch
from pydantic import Field

from nestar_lab.interfaces import CoordinationObjective, CoordinationPair, Params
from nestar_lab.method.flow import data_estimate


class NoCoordination(CoordinationObjective):
    """No coordination: modules train independently (the ablation baseline)."""

    needs_pairs = False

    def __call__(self, pairs: list[CoordinationPair]) -> torch.Tensor:
        return torch.zeros(())


class VelocityMatching(CoordinationObjective):
    """Our reading of L_coor: lambda * sum over adjacent pairs of mean ||v_fine - sg(v_coarse)||^2.

    The finer module is asked for its velocity on the tokens the coarser module generates, at
    the same noise, time and teacher-forced context; the coarser prediction is the target.
    """

    class Params(Params):
        weight: float = Field(0.1, ge=0, description="lambda_coor")

    def __call__(self, pairs: list[CoordinationPair]) -> torch.Tensor:
        losses = [(p.v_fine - p.v_coarse).pow(2).mean() for p in pairs]
        return self.params.weight * torch.stack(losses).sum()


class DataMatching(CoordinationObjective):
    """Match one-step data estimates x1_hat = y_t + (1 - t) v instead of velocities.

    Equal to velocity matching weighted by (1 - t)^2: agreement matters most near the noise
    end, where the estimate depends most on the velocity.
    """

    class Params(Params):
        weight: float = Field(0.1, ge=0, description="lambda_coor")

    def __call__(self, pairs: list[CoordinationPair]) -> torch.Tensor:
        losses = [
            (data_estimate(p.y_t, p.t, p.v_fine) - data_estimate(p.y_t, p.t, p.v_coarse)).pow(2).mean() for p in pairs
        ]
        return self.params.weight * torch.stack(losses).sum()
