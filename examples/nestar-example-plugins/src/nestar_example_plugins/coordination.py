"""A coordination objective that aligns the directions of adjacent modules' velocities."""

import torch
from pydantic import Field

from nestar_lab.interfaces import CoordinationObjective, CoordinationPair, Params


class CosineMatching(CoordinationObjective):
    """``weight * sum over adjacent pairs of mean(1 - cos(v_fine, v_coarse))``, per token.

    ``v_coarse`` arrives detached (the coarser module is the target); only the direction of the
    finer module's velocity is pulled, its magnitude is left to the flow-matching loss."""

    class Params(Params):
        weight: float = Field(0.1, ge=0, description="lambda_coor")
        eps: float = Field(1e-6, gt=0, description="floor of the velocity norms")

    def __call__(self, pairs: list[CoordinationPair]) -> torch.Tensor:
        def unit(v: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(v, dim=-1, eps=self.params.eps)

        # 1 - cos(a, b) = |a/|a| - b/|b||^2 / 2, exactly 0 when the directions agree
        losses = [0.5 * (unit(p.v_fine) - unit(p.v_coarse)).pow(2).sum(-1).mean() for p in pairs]
        return self.params.weight * torch.stack(losses).sum()
