"""Are samples new? Distance of each image to its nearest training image, generated vs real test."""

from __future__ import annotations

import torch
from pydantic import Field

from nestar_lab.interfaces import EvalContext, Metric, Params


def nearest_distances(queries: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-query RMS pixel distance to the closest reference image."""
    q, r = queries.flatten(1).float(), reference.flatten(1).float()
    out = torch.cat([torch.cdist(chunk, r).min(dim=1).values for chunk in q.split(1024)])
    return out / q.shape[1] ** 0.5


class NearestTrainDistance(Metric):
    """Mean RMS distance from each generated image to its nearest training image, beside the
    same figure for real test images; ``copy_rate`` counts near-exact copies."""

    class Params(Params):
        copy_threshold: float = Field(0.05, ge=0, description="RMS distance (in [-1, 1] units) counted as a copy")

    def names(self, dataset_name: str) -> set[str]:
        return {"nn_train_dist_generated", "nn_train_dist_real_test", "copy_rate"}

    def compute(self, ctx: EvalContext) -> dict[str, float]:
        train = ctx.dataset.split("train").images
        gen_d = nearest_distances(ctx.generated().images, train)
        test_d = nearest_distances(ctx.dataset.split("test").images, train)
        return {
            "nn_train_dist_generated": float(gen_d.mean()),
            "nn_train_dist_real_test": float(test_d.mean()),
            "copy_rate": float((gen_d < self.params.copy_threshold).float().mean()),
        }
