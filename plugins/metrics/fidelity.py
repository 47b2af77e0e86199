"""FID, Inception Score, KID and precision/recall (torch-fidelity's implementations), in memory."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Literal

from nestar_plugins.metrics.extractors import Uint8Images, choose_extractor, extract, feature_dim, layer_for
from nestar_plugins.metrics.reference_stats import (
    FileReference,
    Reference,
    check_reference_file,
    split_images,
    write_split_reference,
)  # fmt: skip
from pydantic import Field
from torch.utils.data import Dataset as TorchDataset
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.utils import prepare_input_from_id

from nestar_lab.interfaces import EvalContext, Metric, Params

SPLITS = ("train", "test")


class Fidelity(Metric):
    """torch-fidelity metrics of generated samples against a reference: a dataset split, a folder
    of images, or an ``.npz`` of reference statistics in ADM's layout (the papers' protocol).

    ``extractor: dataset_cnn`` uses a small CNN trained on the dataset's train split (its logits
    for IS, its penultimate layer for FID/KID/PR), named ``<dataset>_cnn`` in the results;
    ``inception`` uses torch-fidelity's inception-v3-compat with weights from a local file.
    Reference features are cached on disk, keyed by the split's content and the extractor.
    Precision/recall use a seeded subset of at most ``prc_reference_limit`` reference images
    (its k-NN radii cost reference x reference distances); FID and KID use the whole split.
    """

    class Params(Params):
        extractor: Literal["dataset_cnn", "inception"] = "dataset_cnn"
        reference: str = Field("train", description="dataset split, a folder of images, or an ADM-layout .npz")
        fid: bool = True
        isc: bool = True
        kid: bool = True
        prc: bool = True
        batch_size: int = Field(256, ge=1)
        kid_subset_size: int = Field(1000, ge=2, description="clamped to the number of samples")
        kid_subsets: int = Field(50, ge=1)
        prc_neighborhood: int = Field(3, ge=1)
        prc_reference_limit: int = Field(10000, ge=2, description="precision/recall reference images (seeded subset)")
        prc_reference_seed: int = Field(0, description="seed of that subset")
        inception_weights: str | None = Field(None, description="local weights file (or $NESTAR_INCEPTION_WEIGHTS)")
        classifier_epochs: int = Field(60, ge=1)
        classifier_width: int = Field(32, ge=4)
        real_baseline: bool = Field(True, description="also score real held-out images (keys *_real)")

    def __init__(self, params: Params | None = None):
        super().__init__(params)
        p = self.params
        if p.reference.endswith(".npz"):  # checked when the experiment is built: before training or sampling
            check_reference_file(p.reference, feature_dim(p.extractor, p.classifier_width), p.extractor)

    def names(self, dataset_name: str) -> set[str]:
        p = self.params
        tag = "inception" if p.extractor == "inception" else f"{dataset_name}_cnn"
        groups = {"isc": ("is", "is_std"), "fid": ("fid",), "kid": ("kid", "kid_std"), "prc": ("precision", "recall")}
        names = {f"{k}_{tag}" for m, keys in groups.items() if getattr(p, m) for k in keys}
        return names | {f"{k}_real" for k in names} if p.real_baseline else names

    def compute(self, ctx: EvalContext) -> dict[str, float]:
        p = self.params
        samples = ctx.generated()
        if samples.images.shape[0] < 2:
            raise ValueError(f"fidelity: needs at least 2 generated images, got {samples.images.shape[0]}")
        expected = tuple(ctx.dataset.image_shape)
        if tuple(samples.images.shape[1:]) != expected:
            raise ValueError(f"fidelity: generated images are {tuple(samples.images.shape[1:])}, the dataset's {expected}")
        choice = choose_extractor(p, ctx.dataset, ctx.dataset_name, ctx.cache_dir)
        reference = self._reference(ctx, choice)
        out = self._score(ctx, Uint8Images(samples.images, choice.needs_rgb), reference, choice)
        if p.real_baseline:
            # the same numbers for real held-out images: what a perfect generator would score
            other = "train" if p.reference == "test" else "test"
            held_out, _ = split_images(ctx.dataset, other, choice.needs_rgb, limit=samples.images.shape[0])
            real = self._score(ctx, held_out, reference, choice)
            out.update({f"{k}_real": v for k, v in real.items()})
        return out

    def write_reference(self, dataset, dataset_name: str, split: str, out: str, device, cache_dir) -> str:
        """``nestar ref-stats``: write ``split``'s statistics and bounded images in ADM's layout."""
        return write_split_reference(self.params, dataset, dataset_name, split, out, device, cache_dir)

    def _score(self, ctx, images: TorchDataset, reference: Reference, choice) -> dict[str, float]:
        p = self.params
        want = {m: layer_for(choice, m) for m in ("isc", "fid", "kid", "prc") if getattr(p, m)}
        if not want:
            return {}
        feats = extract(choice, images, want.values(), ctx.device, p.batch_size)
        out: dict[str, float] = {}
        if p.isc:
            isc = isc_features_to_metric(feats[want["isc"]])
            out["is"], out["is_std"] = isc["inception_score_mean"], isc["inception_score_std"]
        gen = feats.get(layer_for(choice, "fid"))
        if p.fid:
            stats = fid_features_to_statistics(gen)
            mine = {k: v.astype("float64") for k, v in stats.items()}
            mu, sigma = reference.stats()
            out["fid"] = fid_statistics_to_metric(mine, {"mu": mu, "sigma": sigma}, False)["frechet_inception_distance"]
        if p.kid:
            out.update(self._kid(gen, reference))
        if p.prc:
            out.update(self._prc(gen, reference, ctx.device))
        return {f"{k}_{choice.tag}": float(v) for k, v in out.items()}

    def _kid(self, gen, reference: Reference) -> dict[str, float]:
        p, ref = self.params, reference.features()
        if ref is None:
            return self._not_computable(reference, "kid", "kid_std")
        subset = min(p.kid_subset_size, len(gen), len(ref))
        kid = kid_features_to_metric(gen, ref, kid_subsets=p.kid_subsets, kid_subset_size=subset, verbose=False)
        return {"kid": kid["kernel_inception_distance_mean"], "kid_std": kid["kernel_inception_distance_std"]}

    def _prc(self, gen, reference: Reference, device) -> dict[str, float]:
        ref = reference.prc_features()
        if ref is None:
            return self._not_computable(reference, "precision", "recall")
        out = prc_features_to_metric(gen.to(device), ref.to(device), prc_neighborhood=self.params.prc_neighborhood,
                                     save_cpu_ram=True, verbose=False)  # fmt: skip
        return {"precision": out["precision"], "recall": out["recall"]}

    @staticmethod
    def _not_computable(reference: Reference, *keys: str) -> dict[str, float]:
        """NaN (recorded, never a wrong number) and a warning saying why."""
        warnings.warn(f"fidelity: {', '.join(keys)} not computable: {reference.missing} (they need reference "
                      f"images; `nestar ref-stats` writes a file with them)", stacklevel=3)  # fmt: skip
        return {k: math.nan for k in keys}

    def _reference(self, ctx: EvalContext, choice) -> Reference:
        p = self.params
        opts = {"cache_dir": ctx.cache_dir, "device": ctx.device, "batch_size": p.batch_size,
                "prc_reference_limit": p.prc_reference_limit, "prc_reference_seed": p.prc_reference_seed}  # fmt: skip
        if p.reference in SPLITS:
            images, key = split_images(ctx.dataset, p.reference, choice.needs_rgb)
            return Reference(choice, images, f"{ctx.dataset_name}-{key}", opts)
        if p.reference.endswith(".npz"):
            return FileReference(choice, p.reference, feature_dim(p.extractor, p.classifier_width), opts)
        if not Path(p.reference).is_dir():
            raise FileNotFoundError(f"fidelity: reference {p.reference!r} is neither a split (train, test), "
                                    f"a folder, nor an ADM-layout .npz")  # fmt: skip
        return Reference(choice, prepare_input_from_id(1, input1=p.reference, verbose=False), None, opts)
