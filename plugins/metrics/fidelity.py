"""FID, Inception Score, KID and precision/recall through torch-fidelity, computed in memory."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch.utils.data import Dataset as TorchDataset

from nestar_lab.interfaces import EvalContext, Metric, Params
from nestar_plugins.metrics.classifier import cached_classifier
from nestar_plugins.metrics.extractors import CNN_EXTRACTOR, ensure_registered, export_cnn, inception_weights


class Uint8Images(TorchDataset):
    """Images in [-1, 1] served as uint8 ``(C, H, W)`` tensors, as torch-fidelity expects."""

    def __init__(self, images: torch.Tensor, rgb: bool):
        images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        self.images = images.expand(-1, 3, -1, -1) if rgb and images.shape[1] == 1 else images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class Uint8Items(TorchDataset):
    """A dataset's lazily read items (``Dataset.items``) as uint8 images: reference sets too
    large for memory (``image_folder``) stream through torch-fidelity once, then are cached."""

    def __init__(self, items, limit: int | None = None):
        self.items, self.n = items, len(items) if limit is None else min(limit, len(items))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self.items[i][0]
        return ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.numpy().tobytes() if torch.is_tensor(p) else str(p).encode())
    return h.hexdigest()[:16]


class Fidelity(Metric):
    """torch-fidelity metrics of generated samples against a reference split (or image folder).

    ``extractor: dataset_cnn`` uses a small CNN trained on the dataset's train split (its logits
    for IS, its penultimate layer for FID/KID/PR), named ``<dataset>_cnn`` in the results;
    ``inception`` uses torch-fidelity's inception-v3-compat with weights from a local file.
    Reference features are cached on disk, keyed by the split's content and the extractor.
    """

    class Params(Params):
        extractor: Literal["dataset_cnn", "inception"] = "dataset_cnn"
        reference: str = Field("train", description="dataset split, or a folder of reference images")
        fid: bool = True
        isc: bool = True
        kid: bool = True
        prc: bool = True
        batch_size: int = Field(256, ge=1)
        kid_subset_size: int = Field(1000, ge=2, description="clamped to the number of samples")
        kid_subsets: int = Field(50, ge=1)
        prc_neighborhood: int = Field(3, ge=1)
        inception_weights: str | None = Field(None, description="local weights file (or $NESTAR_INCEPTION_WEIGHTS)")
        classifier_epochs: int = Field(60, ge=1)
        classifier_width: int = Field(32, ge=4)
        real_baseline: bool = Field(True, description="also score real held-out images (keys *_real)")

    def compute(self, ctx: EvalContext) -> dict[str, float]:
        p = self.params
        samples = ctx.generated()
        if samples.images.shape[0] < 2:
            raise ValueError(f"fidelity: needs at least 2 generated images, got {samples.images.shape[0]}")
        expected = tuple(ctx.dataset.image_shape)
        if tuple(samples.images.shape[1:]) != expected:
            raise ValueError(f"fidelity: generated images are {tuple(samples.images.shape[1:])}, the dataset's {expected}")
        name, weights, tag, rgb = self._extractor(ctx)
        reference, ref_key = self._reference(ctx, rgb)
        out = self._score(ctx, samples.images, reference, ref_key, name, weights, tag, rgb)
        if p.real_baseline:
            # the same numbers for real held-out images: what a perfect generator would score
            other = "train" if p.reference == "test" else "test"
            n = samples.images.shape[0]
            if ctx.dataset.in_memory:
                held_out = Uint8Images(ctx.dataset.split(other).images[:n], rgb)
            else:
                held_out = Uint8Items(ctx.dataset.items(other), limit=n)
            real = self._score(ctx, held_out, reference, ref_key, name, weights, tag, rgb)
            out.update({f"{k}_real": v for k, v in real.items()})
        return out

    def _score(self, ctx, images, reference, ref_key, name, weights, tag, rgb) -> dict[str, float]:
        p = self.params
        n_ref = len(reference) if isinstance(reference, TorchDataset) else None
        images = images if isinstance(images, TorchDataset) else Uint8Images(images, rgb)
        subset = min(p.kid_subset_size, len(images), n_ref or p.kid_subset_size)
        import torch_fidelity

        raw = torch_fidelity.calculate_metrics(
            input1=images,
            input2=reference,
            cuda=ctx.device.type == "cuda",
            save_cpu_ram=True,
            batch_size=p.batch_size,
            fid=p.fid, isc=p.isc, kid=p.kid, prc=p.prc,
            feature_extractor=name,
            feature_extractor_weights_path=weights,
            kid_subset_size=subset,
            kid_subsets=p.kid_subsets,
            prc_neighborhood=p.prc_neighborhood,
            cache=ref_key is not None,
            cache_root=str(Path(ctx.cache_dir) / "fidelity"),
            input2_cache_name=f"nestar-{ref_key}-{_digest(name, weights)}" if ref_key else None,
            verbose=sys.stderr.isatty(),
        )  # fmt: skip
        keys = {
            "frechet_inception_distance": "fid", "inception_score_mean": "is", "inception_score_std": "is_std",
            "kernel_inception_distance_mean": "kid", "kernel_inception_distance_std": "kid_std",
            "precision": "precision", "recall": "recall",
        }  # fmt: skip
        return {f"{short}_{tag}": float(raw[key]) for key, short in keys.items() if key in raw}

    def _extractor(self, ctx: EvalContext) -> tuple[str, str, str, bool]:
        p = self.params
        if p.extractor == "inception":
            return "inception-v3-compat", inception_weights(p.inception_weights), "inception", True
        ensure_registered()
        net = cached_classifier(ctx.dataset, ctx.cache_dir, p.classifier_epochs, p.classifier_width, 0)
        digest = _digest(*[v for v in net.state_dict().values()])
        path = export_cnn(net, Path(ctx.cache_dir) / f"extractor-{ctx.dataset_name}-{digest}.pt")
        return CNN_EXTRACTOR, str(path), f"{ctx.dataset_name}_cnn", False

    def _reference(self, ctx: EvalContext, rgb: bool):
        ref = self.params.reference
        if ref in ("train", "test") and not ctx.dataset.in_memory:
            items = ctx.dataset.items(ref)
            key = f"{ctx.dataset_name}-{ref}-{_digest(ctx.dataset.params.model_dump_json(), len(items))}"
            return Uint8Items(items), key
        if ref in ("train", "test"):
            split = ctx.dataset.split(ref)
            key = f"{ctx.dataset_name}-{ref}-{_digest(split.images, split.labels)}"
            return Uint8Images(split.images, rgb), key
        if not Path(ref).is_dir():
            raise FileNotFoundError(f"fidelity: reference {ref!r} is neither a split (train, test) nor a folder")
        return ref, None
