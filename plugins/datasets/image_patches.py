"""RGB crops of the photographs bundled with scikit-image, labelled by their source photograph.

Harder than the digits and still offline: every photograph ships inside scikit-image. The split
is spatial, so no test crop overlaps a training crop: test crops come from the right-most
``test_fraction`` of each (resized) photograph, training crops from the rest.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from nestar_lab.interfaces import Dataset, ImageSplit, Params

PHOTOS = (
    "astronaut", "camera", "chelsea", "coffee", "coins",
    "hubble_deep_field", "immunohistochemistry", "rocket", "moon", "brick",
)  # fmt: skip


def _photo(name: str) -> torch.Tensor:
    """A bundled photograph as a float RGB tensor in [-1, 1], ``(3, H, W)``."""
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return torch.from_numpy(image[..., :3].copy()).permute(2, 0, 1).float() / 127.5 - 1.0


class ImagePatches(Dataset):
    """``crops_per_photo`` random ``crop_size`` crops per photograph; label = photograph index."""

    class Params(Params):
        photos: tuple[str, ...] = PHOTOS
        crop_size: int = Field(16, ge=4)
        short_side: int = Field(128, ge=8, description="photographs are resized so their short side is this")
        crops_per_photo: int = Field(400, ge=2)
        test_fraction: float = Field(0.2, gt=0, lt=1)
        seed: int = 0

        @field_validator("photos")
        @classmethod
        def _bundled(cls, photos):
            import skimage.data

            missing = [p for p in photos if not hasattr(skimage.data, p)]
            if missing:
                raise ValueError(f"not photographs of skimage.data: {missing}")
            if len(set(photos)) != len(photos) or len(photos) < 2:
                raise ValueError("expected at least two distinct photographs")
            return photos

    def __init__(self, params=None):
        super().__init__(params)
        self.num_classes = len(self.params.photos)
        self.image_shape = (3, self.params.crop_size, self.params.crop_size)

    def load_splits(self) -> dict[str, ImageSplit]:
        p = self.params
        gen = torch.Generator().manual_seed(p.seed)
        out = {"train": ([], []), "test": ([], [])}
        for label, name in enumerate(p.photos):
            photo = _photo(name)
            scale = p.short_side / min(photo.shape[1:])
            photo = F.interpolate(photo[None], scale_factor=scale, mode="bilinear", antialias=True)[0].clamp(-1, 1)
            width = photo.shape[2]
            cut = int(round(width * (1 - p.test_fraction)))
            n_test = max(1, int(round(p.crops_per_photo * p.test_fraction)))
            for split, (lo, hi), count in (("train", (0, cut), p.crops_per_photo - n_test), ("test", (cut, width), n_test)):
                if hi - lo < p.crop_size:
                    raise ValueError(f"photo {name!r}: its {split} region is narrower than crop_size {p.crop_size}")
                ys = torch.randint(0, photo.shape[1] - p.crop_size + 1, (count,), generator=gen)
                xs = torch.randint(lo, hi - p.crop_size + 1, (count,), generator=gen)
                crops = torch.stack([photo[:, y : y + p.crop_size, x : x + p.crop_size] for y, x in zip(ys, xs)])
                out[split][0].append(crops)
                out[split][1].append(torch.full((count,), label, dtype=torch.long))
        return {k: ImageSplit(torch.cat(v[0]), torch.cat(v[1])) for k, v in out.items()}
