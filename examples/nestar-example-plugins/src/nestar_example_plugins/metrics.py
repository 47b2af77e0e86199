"""A cheap metric: how far each class's mean generated image is from its mean real image."""

import torch
from pydantic import Field

from nestar_lab.interfaces import EvalContext, Metric, Params


class MeanImageRMS(Metric):
    """Per class, the RMS distance between the mean generated image and the mean real image of the
    ``reference`` split, averaged over classes (``mean_image_rms_<dataset>``), beside the same for
    the other real split (``mean_image_rms_<dataset>_real``, the floor set by sampling noise).
    A first-moment check: it catches shifted or washed-out classes, not missing modes."""

    class Params(Params):
        reference: str = Field("train", pattern="^(train|test)$")

    def compute(self, ctx: EvalContext) -> dict[str, float]:
        gen = ctx.generated()
        ref = ctx.dataset.split(self.params.reference)
        other = ctx.dataset.split("test" if self.params.reference == "train" else "train")
        gaps, floors = [], []
        for c in gen.labels.unique().tolist():
            target = ref.images[ref.labels == c].float().mean(0)
            gaps.append((gen.images[gen.labels == c].float().mean(0) - target).pow(2).mean().sqrt())
            held_out = other.images[other.labels == c]
            if len(held_out):
                floors.append((held_out.float().mean(0) - target).pow(2).mean().sqrt())
        tag = ctx.dataset_name
        out = {f"mean_image_rms_{tag}": float(torch.stack(gaps).mean())}
        if floors:
            out[f"mean_image_rms_{tag}_real"] = float(torch.stack(floors).mean())
        return out
