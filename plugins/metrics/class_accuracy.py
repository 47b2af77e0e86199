"""Do generated samples look like their class? A classifier trained on real data decides."""

from __future__ import annotations

import torch
from nestar_plugins.metrics.classifier import cached_classifier, predict
from pydantic import Field

from nestar_lab.interfaces import EvalContext, Metric, Params


class ClassAccuracy(Metric):
    """Accuracy of a cached CNN (trained on the real train split) on generated samples, read
    against their conditioning labels, with its accuracy on the real test split as reference."""

    class Params(Params):
        epochs: int = Field(60, ge=1)
        width: int = Field(32, ge=4)
        seed: int = 0

    def names(self, dataset_name: str) -> set[str]:
        return {"class_accuracy", "class_accuracy_min_class", "class_accuracy_real_test"}

    def compute(self, ctx: EvalContext) -> dict[str, float]:
        p = self.params
        net = cached_classifier(ctx.dataset, ctx.cache_dir, p.epochs, p.width, p.seed)
        samples = ctx.generated()
        test = ctx.dataset.split("test")
        correct = (predict(net, samples.images) == samples.labels).float()
        per_class = torch.stack([correct[samples.labels == c].mean() for c in samples.labels.unique()])
        return {
            "class_accuracy": float(correct.mean()),
            "class_accuracy_min_class": float(per_class.min()),
            "class_accuracy_real_test": float((predict(net, test.images) == test.labels).float().mean()),
        }
