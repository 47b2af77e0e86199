"""A small CNN classifier of a dataset's classes, trained once on its train split and cached."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nestar_lab.interfaces import Dataset

ARCH_VERSION = 1  # bump when the network or its training changes: invalidates caches


class SmallCNN(nn.Module):
    """Two conv blocks and a linear layer; ``features`` is the penultimate layer."""

    def __init__(self, channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * width * 16, 4 * width), nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Linear(4 * width, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))


def fingerprint(dataset: Dataset, settings: dict) -> str:
    """A short hash of the train split's bytes and the classifier's settings."""
    split = dataset.split("train")
    h = hashlib.sha256()
    h.update(split.images.numpy().tobytes())
    h.update(split.labels.numpy().tobytes())
    h.update(repr(sorted(settings.items())).encode())
    h.update(f"arch{ARCH_VERSION}".encode())
    return h.hexdigest()[:16]


def _shift(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random translation by up to one pixel (padding with the background value)."""
    dy, dx = (torch.randint(-1, 2, (2,), generator=gen)).tolist()
    x = F.pad(x, (1, 1, 1, 1), value=-1.0)
    h, w = x.shape[-2] - 2, x.shape[-1] - 2
    return x[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def train_classifier(dataset: Dataset, epochs: int, width: int, seed: int) -> SmallCNN:
    """Fit the classifier on the train split (Adam, light translation augmentation)."""
    split = dataset.split("train")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = SmallCNN(split.images.shape[1], dataset.num_classes, width)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    n = len(split)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(128):
            loss = F.cross_entropy(net(_shift(split.images[idx], gen)), split.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def cached_classifier(dataset: Dataset, cache_dir: Path, epochs: int, width: int, seed: int) -> SmallCNN:
    """The classifier for ``dataset``, loaded from ``cache_dir`` or trained and saved there."""
    settings = {"epochs": epochs, "width": width, "seed": seed}
    path = Path(cache_dir) / f"classifier-{type(dataset).__name__.lower()}-{fingerprint(dataset, settings)}.pt"
    split = dataset.split("train")
    if path.is_file():
        net = SmallCNN(split.images.shape[1], dataset.num_classes, width)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.eval()
    net = train_classifier(dataset, epochs, width, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(net.state_dict(), tmp)
    tmp.replace(path)
    return net


@torch.no_grad()
def predict(net: SmallCNN, images: Tensor) -> Tensor:
    """Predicted classes of images in [-1, 1]."""
    return torch.cat([net(chunk.float()).argmax(1) for chunk in images.split(512)])
