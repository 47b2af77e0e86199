"""scikit-learn's 8x8 handwritten digits: 1797 real images, 10 classes, ships with the package."""

from __future__ import annotations

import torch
from pydantic import Field

from nestar_lab.interfaces import Dataset, ImageSplit, Params


class Digits(Dataset):
    """``load_digits`` scaled from 0..16 to [-1, 1], split by a fixed seeded permutation."""

    num_classes = 10
    image_shape = (1, 8, 8)

    class Params(Params):
        test_fraction: float = Field(0.2, gt=0, lt=1)
        split_seed: int = 0

    def load_splits(self) -> dict[str, ImageSplit]:
        from sklearn.datasets import load_digits

        data = load_digits()
        images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
        labels = torch.tensor(data.target, dtype=torch.long)
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.params.split_seed))
        n_test = int(round(len(labels) * self.params.test_fraction))
        test, train = perm[:n_test], perm[n_test:]
        return {"train": ImageSplit(images[train], labels[train]), "test": ImageSplit(images[test], labels[test])}
