"""Feature extractors for torch-fidelity: Inception from a local file, or a per-dataset CNN.

Both are selected by name; every metric value carries the extractor's tag in its name
(``fid_inception``, ``fid_digits_cnn``) so numbers from different extractors are never compared
by accident. Also here: the images as the extractors see them (uint8 ``(C, H, W)``), feature
extraction, and the on-disk cache of reference features and statistics.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from nestar_plugins.metrics.classifier import SmallCNN, cached_classifier
from torch import Tensor
from torch.utils.data import Dataset as TorchDataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import (
    cache_lookup_one_recompute_on_miss,
    create_feature_extractor,
    get_featuresdict_from_dataset,
)  # fmt: skip

INCEPTION_ENV = "NESTAR_INCEPTION_WEIGHTS"
INCEPTION_HINT = (
    "torch-fidelity's pt_inception-2015-12-05-6726825d.pth, from "
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
CNN_EXTRACTOR = "nestar-dataset-cnn"


class DatasetCNNFeatures(FeatureExtractorBase):
    """torch-fidelity wrapper of a :class:`SmallCNN`: ``logits`` (IS) and ``penultimate`` (FID,
    KID, precision/recall). The architecture is read from the weights file it is given."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"{CNN_EXTRACTOR} needs feature_extractor_weights_path")
        payload = torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True)
        meta = payload["meta"]
        self.net = SmallCNN(int(meta[0]), int(meta[1]), int(meta[2]))
        self.net.load_state_dict(payload["state"])
        self.net.eval()

    @staticmethod
    def get_provided_features_list():
        return "logits", "penultimate"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

    def forward(self, x: Tensor):
        images = x.float() / 127.5 - 1.0
        wanted = self.net.body[0].in_channels
        if images.shape[1] != wanted:  # e.g. RGB images from a folder for a grey-scale dataset
            images = images.mean(1, keepdim=True) if wanted == 1 else images.expand(-1, wanted, -1, -1)
        features = self.net.features(images)
        out = {"penultimate": features, "logits": self.net.fc(features)}
        return tuple(out[name].double() for name in self.features_list)


def ensure_registered() -> None:
    """Register our extractor with torch-fidelity once per process."""
    if CNN_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(CNN_EXTRACTOR, DatasetCNNFeatures)


def export_cnn(net: SmallCNN, path: Path) -> Path:
    """Write a classifier in the format :class:`DatasetCNNFeatures` loads (tensors only)."""
    if not path.is_file():
        channels = net.body[0].in_channels
        meta = torch.tensor([channels, net.fc.out_features, net.body[0].out_channels])
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"meta": meta, "state": net.state_dict()}, tmp)
        tmp.replace(path)
    return path


@dataclass(frozen=True)
class ExtractorChoice:
    """What torch-fidelity is told: extractor name, weights file, channels it needs, and our tag."""

    fidelity_name: str
    weights_path: str
    tag: str
    needs_rgb: bool


def choose_extractor(params, dataset, dataset_name: str, cache_dir) -> ExtractorChoice:
    """The extractor a ``fidelity`` metric's params name: ``inception`` (local weights) or
    ``dataset_cnn`` (a classifier trained once on ``dataset``'s train split, cached)."""
    if params.extractor == "inception":
        return ExtractorChoice("inception-v3-compat", inception_weights(params.inception_weights), "inception", True)
    ensure_registered()
    net = cached_classifier(dataset, cache_dir, params.classifier_epochs, params.classifier_width, 0)
    path = export_cnn(net, Path(cache_dir) / f"extractor-{dataset_name}-{digest(*net.state_dict().values())}.pt")
    return ExtractorChoice(CNN_EXTRACTOR, str(path), f"{dataset_name}_cnn", False)


def feature_dim(extractor: str, classifier_width: int) -> int:
    """Width of the features FID, KID and precision/recall use: Inception's pool3 (2048) or the
    dataset CNN's penultimate layer (``4 * classifier_width``, see :class:`SmallCNN`)."""
    return 2048 if extractor == "inception" else 4 * classifier_width


def layer_for(choice: ExtractorChoice, metric: str) -> str:
    """The extractor's feature layer for ``metric`` (``isc``, ``fid``, ``kid``, ``prc``)."""
    return FEATURE_EXTRACTORS_REGISTRY[choice.fidelity_name].get_default_feature_layer_for_metric(metric)


def extract(choice: ExtractorChoice, images: TorchDataset, layers: Iterable[str], device, batch_size: int) -> dict:
    """Features ``{layer: (N, D) tensor}`` of a dataset of uint8 ``(C, H, W)`` images."""
    cuda = torch.device(device).type == "cuda"
    net = create_feature_extractor(choice.fidelity_name, sorted(set(layers)), cuda=cuda,
                                   feature_extractor_weights_path=choice.weights_path, verbose=False)  # fmt: skip
    return get_featuresdict_from_dataset(images, net, batch_size, cuda, True, sys.stderr.isatty())


def cached(name: str, cache_dir, recompute: Callable):
    """``recompute()``, saved under ``cache_dir/fidelity/name.pt`` and loaded from there next time."""
    root = str(Path(cache_dir) / "fidelity")
    return cache_lookup_one_recompute_on_miss(name, recompute, cache=True, cache_root=root, verbose=False)


def digest(*parts) -> str:
    """A short content hash of tensors, arrays and strings."""
    h = hashlib.sha256()
    for p in parts:
        p = p.numpy() if torch.is_tensor(p) else p
        h.update(p.tobytes() if hasattr(p, "tobytes") else str(p).encode())
    return h.hexdigest()[:16]


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] as uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class Uint8Images(TorchDataset):
    """Images in [-1, 1] served as uint8 ``(C, H, W)`` tensors, as torch-fidelity expects;
    ``rgb``: grey-scale images are repeated to 3 channels (what Inception needs)."""

    def __init__(self, images: Tensor, rgb: bool):
        images = to_uint8(images)
        self.images = images.expand(-1, 3, -1, -1) if rgb and images.shape[1] == 1 else images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


class Uint8Items(TorchDataset):
    """A dataset's lazily read items (``Dataset.items``) as uint8 images: reference sets too
    large for memory (``image_folder``) stream through the extractor once, then are cached."""

    def __init__(self, items, limit: int | None = None):
        self.items, self.n = items, len(items) if limit is None else min(limit, len(items))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tensor:
        return to_uint8(self.items[i][0])


def inception_weights(path: str | None) -> str:
    """The local Inception weights file (param, else ``$NESTAR_INCEPTION_WEIGHTS``); never downloads."""
    path = path or os.environ.get(INCEPTION_ENV)
    if not path:
        raise FileNotFoundError(
            f"the inception extractor needs local weights: set metric param inception_weights or ${INCEPTION_ENV} "
            f"to {INCEPTION_HINT}"
        )
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: Inception weights file not found (expected {INCEPTION_HINT})")
    _check_inception(path)
    return str(path)


def _check_inception(path: str) -> None:
    """Fail in one line when a file is not torch-fidelity's Inception state dict."""
    key, shape = "Conv2d_1a_3x3.conv.weight", (32, 3, 3, 3)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable weights file ({type(exc).__name__})") from None
    got = tuple(state[key].shape) if isinstance(state, dict) and key in state else None
    if got != shape:
        raise ValueError(f"{path}: not Inception weights ({key} is {got}, expected {shape}; use {INCEPTION_HINT})")
