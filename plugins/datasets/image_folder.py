"""Class-labelled photographs in the ImageNet folder layout, decoded lazily from disk.

``root/<train_dir>/<class>/<image>`` and ``root/<test_dir>/<class>/<image>``; the class index is
the position of the folder name among the sorted train class folders. Images get ADM's centre
crop (``center_crop_arr`` of ADM and MAR). An unreadable file is skipped, never fatal.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image
from pydantic import Field, field_validator

from nestar_lab.interfaces import Dataset, ImageSplit, Params

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


def center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """ADM's centre crop: halve with BOX while the short side >= 2R, BICUBIC to short side R, crop."""
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - resolution) // 2, (image.size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def load_image(path: str, resolution: int) -> torch.Tensor:
    """One file as RGB, centre-cropped, float ``(3, R, R)`` in [-1, 1]."""
    with Image.open(path) as image:
        image = center_crop(image.convert("RGB"), resolution)
    array = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1.0


class FolderItems(torch.utils.data.Dataset):
    """Map-style, picklable view of one split: ``[i] -> (image (3, R, R), label)``.

    A file that cannot be decoded is replaced by the next readable one, ``(i + 1) mod len``, and
    recorded once in ``skipped_files`` (per process: each DataLoader worker keeps its own list).
    Paths are stored as one numpy bytes array so forked workers do not copy them on access.
    """

    def __init__(self, folder: str, relpaths: np.ndarray, labels: np.ndarray, resolution: int):
        self.folder, self.relpaths, self.labels, self.resolution = folder, relpaths, labels, resolution
        self.skipped_files: list[str] = []
        self._bad: set[int] = set()

    @property
    def skipped(self) -> int:
        return len(self.skipped_files)

    def path(self, i: int) -> str:
        return os.path.join(self.folder, os.fsdecode(self.relpaths[i]))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n, error = len(self), None
        for k in ((int(i) + j) % n for j in range(n)):
            if k in self._bad:
                continue
            try:
                return load_image(self.path(k), self.resolution), int(self.labels[k])
            except Exception as e:  # decoders raise OSError, ValueError, SyntaxError, bomb errors...
                error, count = e, len(self._bad) + 1
                self._bad.add(k)
                self.skipped_files.append(self.path(k))
                if count & (count - 1) == 0:  # the first, then every power of two: no flood
                    warnings.warn(f"image_folder: skipped unreadable {self.path(k)} ({type(e).__name__}: {e}); "
                                  f"{count} skipped so far, the first {self.skipped_files[0]}", stacklevel=2)
        raise RuntimeError(f"no readable image among the {n} files under {self.folder}") from error


class ImageFolder(Dataset):
    """ImageNet-style folders, one per class; ``test`` reads ``test_dir`` with the train classes."""

    in_memory = False  # training streams items() (or reads the latent cache)

    class Params(Params):
        root: str
        resolution: int = Field(256, ge=8)
        train_dir: str = "train"
        test_dir: str = "val"
        extensions: tuple[str, ...] = EXTENSIONS
        max_in_memory: int = Field(50000, ge=1, description="split() refuses more images than this")
        max_per_class: int | None = Field(None, ge=1, description="the first files (sorted) of each class")

        @field_validator("extensions")
        @classmethod
        def _lowercase_dotted(cls, extensions):
            if not extensions or any(not e.startswith(".") or e != e.lower() for e in extensions):
                raise ValueError(f"extensions must be lowercase and start with '.': {extensions}")
            return extensions

    def __init__(self, params=None):
        super().__init__(params)
        p = self.params
        self._layout = f"expected {p.root}/{p.train_dir}/<class>/<image> and {p.root}/{p.test_dir}/<class>/<image>"
        for folder in (p.root, os.path.join(p.root, p.train_dir)):
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"image_folder: no folder {folder}; {self._layout}")
        self.classes = self._class_dirs(os.path.join(p.root, p.train_dir))
        if not self.classes:
            raise FileNotFoundError(f"image_folder: no class folders in {p.root}/{p.train_dir}; {self._layout}")
        self.class_index = {c: i for i, c in enumerate(self.classes)}
        self.num_classes = len(self.classes)
        self.image_shape = (3, p.resolution, p.resolution)
        self._items: dict[str, FolderItems] = {}
        self._loaded: dict[str, ImageSplit] = {}

    @staticmethod
    def _class_dirs(folder: str) -> list[str]:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))

    def items(self, name: str) -> FolderItems:
        """The split's files, listed on first use (no decoding), read lazily."""
        if name not in self.SPLITS:
            raise ValueError(f"{type(self).__name__} has splits {', '.join(self.SPLITS)}; not {name!r}")
        if name not in self._items:
            folder = os.path.join(self.params.root, self.params.train_dir if name == "train" else self.params.test_dir)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"image_folder: no folder {folder}; {self._layout}")
            relpaths, labels = [], []
            for cls in self._class_dirs(folder):
                if cls not in self.class_index:
                    raise ValueError(f"image_folder: class folder {os.path.join(folder, cls)} is not a class of "
                                     f"{self.params.train_dir} ({self.num_classes} classes)")
                files = sorted(e.name for e in os.scandir(os.path.join(folder, cls))
                               if e.is_file() and os.path.splitext(e.name)[1].lower() in self.params.extensions)
                files = files[: self.params.max_per_class]
                relpaths += [os.fsencode(os.path.join(cls, f)) for f in files]
                labels += [self.class_index[cls]] * len(files)
            if not relpaths:
                raise FileNotFoundError(f"image_folder: no {'/'.join(self.params.extensions)} files in {folder}")
            self._items[name] = FolderItems(folder, np.array(relpaths), np.array(labels, dtype=np.int64),
                                            self.params.resolution)
        return self._items[name]

    def labels(self, name: str) -> torch.Tensor:
        """Labels of the listed files, without decoding (a skipped file keeps its own label here)."""
        return torch.from_numpy(self.items(name).labels)

    def split(self, name: str) -> ImageSplit:
        """The split in memory, read through :meth:`items` (same skipping), at most ``max_in_memory``."""
        items = self.items(name)
        if name not in self._loaded:
            if len(items) > self.params.max_in_memory:
                raise ValueError(f"image_folder: split {name!r} has {len(items)} images, more than max_in_memory="
                                 f"{self.params.max_in_memory}; raise it, set max_per_class, or read items({name!r})")
            images, labels = torch.empty(len(items), *self.image_shape), torch.empty(len(items), dtype=torch.long)
            for i in range(len(items)):
                images[i], labels[i] = items[i]
            self._loaded[name] = ImageSplit(images, labels)
        return self._loaded[name]

    def load_splits(self) -> dict[str, ImageSplit]:
        return {name: self.split(name) for name in self.SPLITS}
