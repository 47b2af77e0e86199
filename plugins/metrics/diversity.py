"""Within-class diversity: how spread out samples of one class are, relative to real images."""

from __future__ import annotations

import torch
from nestar_plugins.metrics.classifier import cached_classifier
from pydantic import Field

from nestar_lab.interfaces import EvalContext, Metric, Params


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over all distinct pairs."""
    n = features.shape[0]
    if n < 2:
        return float("nan")
    d = torch.cdist(features, features)
    return float(d.sum() / (n * (n - 1)))


class WithinClassDiversity(Metric):
    """Per class, mean pairwise distance of generated samples' CNN features divided by the same
    for real test images of that class; averaged over classes. About 1: as diverse as real data;
    well below 1: mode collapse within classes. Features: the dataset CNN's penultimate layer."""

    class Params(Params):
        classifier_epochs: int = Field(60, ge=1)
        classifier_width: int = Field(32, ge=4)
        reference: str = Field("test", pattern="^(train|test)$")

    def names(self, dataset_name: str) -> set[str]:
        return {f"diversity_ratio_{dataset_name}_cnn", f"diversity_{dataset_name}_cnn"}

    def compute(self, ctx: EvalContext) -> dict[str, float]:
        p = self.params
        net = cached_classifier(ctx.dataset, ctx.cache_dir, p.classifier_epochs, p.classifier_width, 0)
        gen, real = ctx.generated(), ctx.dataset.split(p.reference)
        with torch.no_grad():
            gen_f, real_f = net.features(gen.images.float()), net.features(real.images.float())
        ratios, gen_d = [], []
        for c in gen.labels.unique().tolist():
            g = mean_pairwise_distance(gen_f[gen.labels == c])
            r = mean_pairwise_distance(real_f[real.labels == c])
            gen_d.append(g)
            if r == r and r > 0:
                ratios.append(g / r)
        tag = f"{ctx.dataset_name}_cnn"
        return {
            f"diversity_ratio_{tag}": float(torch.tensor(ratios).mean()) if ratios else float("nan"),
            f"diversity_{tag}": float(torch.tensor(gen_d).nanmean()),
        }
