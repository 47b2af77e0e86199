"""What generated images are compared with: a dataset split, an image folder, or an ``.npz`` in
the layout of ADM's reference batches (``VIRTUAL_imagenet256_labeled.npz``).

ADM (Dhariwal & Nichol 2021) publishes per dataset an ``.npz`` with ``mu`` (D,) and ``sigma``
(D, D), the statistics of Inception pool features of the training set, and ``arr_0``, reference
images (N, H, W, 3) uint8 for precision/recall. MAR, VAR and NestAR report FID against these
statistics. The ``fidelity`` metric reads such a file; ``nestar ref-stats`` writes one from a split.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from nestar_plugins.metrics.extractors import (
    ExtractorChoice,
    Uint8Images,
    Uint8Items,
    cached,
    choose_extractor,
    digest,
    extract,
    layer_for,
)  # fmt: skip
from torch.utils.data import Dataset as TorchDataset
from torch_fidelity.metric_fid import fid_features_to_statistics

ADM_HINT = ("ADM's reference batch (VIRTUAL_imagenet256_labeled.npz, from openai/guided-diffusion's evaluations), "
            "or a file from `nestar ref-stats CONFIG --out FILE.npz`")  # fmt: skip


def _layout(dim: int) -> str:
    return f"an .npz with mu ({dim},), sigma ({dim}, {dim}) and optionally arr_0 images (N, H, W, 3) uint8"


def _header(archive: zipfile.ZipFile, name: str) -> tuple[tuple, np.dtype]:
    """Shape and dtype of one array of an .npz, read without loading it."""
    with archive.open(name) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return tuple(shape), dtype


def check_reference_file(path: str | Path, dim: int, extractor: str) -> int:
    """Validate an ADM-layout file against ``dim``-d features; the number of ``arr_0`` images
    (0 when it has none). Every problem is a one-line error naming the file and what was expected."""
    path, layout = Path(path), _layout(dim)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: reference statistics not found (expected {layout}: {ADM_HINT})")
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = {n[:-4]: _header(archive, n) for n in archive.namelist() if n.endswith(".npy")}
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a readable .npz ({type(exc).__name__}); expected {layout}") from None
    for key in ("mu", "sigma"):
        if key not in arrays:
            raise ValueError(f"{path}: no '{key}' array (has {sorted(arrays) or 'none'}); expected {layout}")
    (mu, mu_t), (sigma, sigma_t) = arrays["mu"], arrays["sigma"]
    if mu != (dim,) or sigma != (dim, dim) or mu_t.kind != "f" or sigma_t.kind != "f":
        raise ValueError(f"{path}: mu is {mu} {mu_t}, sigma {sigma} {sigma_t}; the {extractor} extractor's "
                         f"features are {dim}-d, so expected float mu ({dim},) and sigma ({dim}, {dim})")  # fmt: skip
    if "arr_0" not in arrays:
        return 0
    shape, dtype = arrays["arr_0"]
    if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8 or shape[0] < 2:
        raise ValueError(f"{path}: arr_0 is {shape} {dtype}; expected at least 2 reference images (N, H, W, 3) "
                         f"uint8 (NHWC, RGB), or no arr_0")  # fmt: skip
    return int(shape[0])


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``mu`` and ``sigma`` of a checked file, as float64."""
    with np.load(path) as f:
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu or sigma holds non-finite values")
    return mu, sigma


class NpzImages(TorchDataset):
    """A file's ``arr_0`` (N, H, W, 3) served as uint8 ``(3, H, W)`` tensors (loaded on first use)."""

    def __init__(self, path: str | Path, n: int):
        self.path, self.n, self.array = path, n, None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.array is None:
            with np.load(self.path) as f:
                self.array = f["arr_0"]
        return torch.from_numpy(np.ascontiguousarray(self.array[i].transpose(2, 0, 1)))


def reference_subset(n: int, limit: int, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded subset of at most ``limit`` of ``n`` items (all when ``n <= limit``)."""
    if n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


class Reference:
    """Statistics (FID) and features (KID; precision/recall, bounded) of a reference, made lazily and
    cached on disk under ``name`` when it has one. ``features()`` is ``None`` where they cannot be
    computed (an ``.npz`` without ``arr_0``); ``missing`` says why."""

    def __init__(self, choice: ExtractorChoice, images: TorchDataset | None, name: str | None, opts: dict):
        self.choice, self.images, self.opts, self.missing = choice, images, opts, ""
        self.layer = layer_for(choice, "fid")
        self.name = f"nestar-{name}-{digest(choice.fidelity_name, choice.weights_path)}" if name else None
        self._memo: dict[str, object] = {}

    def _get(self, what: str, recompute):
        if what not in self._memo:
            name = f"{self.name}-{what}-{self.layer}" if self.name else None
            self._memo[what] = cached(name, self.opts["cache_dir"], recompute) if name else recompute()
        return self._memo[what]

    def features(self) -> torch.Tensor | None:
        def recompute():
            o = self.opts
            return extract(self.choice, self.images, [self.layer], o["device"], o["batch_size"])[self.layer]

        return self._get("features", recompute)

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        stats = self._get("stats", lambda: fid_features_to_statistics(self.features()))
        return stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64)

    def prc_features(self) -> torch.Tensor | None:
        limit, seed = self.opts["prc_reference_limit"], self.opts["prc_reference_seed"]
        if len(self.images) <= limit:
            return self.features()
        return self._get(f"prc{limit}s{seed}", lambda: self.features()[reference_subset(len(self.images), limit, seed)])


class FileReference(Reference):
    """An ADM-layout ``.npz``: FID from its ``mu``/``sigma``; KID and precision/recall against all of
    its ``arr_0`` images (the file is the bounded reference set), or not computable without them."""

    def __init__(self, choice: ExtractorChoice, path: str, dim: int, opts: dict):
        n = check_reference_file(path, dim, choice.tag)
        self.path, (self.mu, self.sigma) = path, load_stats(path)
        super().__init__(choice, NpzImages(path, n) if n else None, f"npz-{digest(self.mu, self.sigma, n)}", opts)
        self.missing = "" if n else f"{path} has no arr_0 reference images"

    def features(self):
        return super().features() if self.images is not None else None

    def stats(self):
        return self.mu, self.sigma

    def prc_features(self):
        return self.features()


def split_images(dataset, split: str, rgb: bool, limit: int | None = None) -> tuple[TorchDataset, str]:
    """A split as uint8 images, and a key naming its content (the dataset's params for a split
    streamed from disk, where hashing 1.28M images would cost as much as their features)."""
    if not dataset.in_memory:
        items = dataset.items(split)
        return Uint8Items(items, limit), f"{split}-{digest(dataset.params.model_dump_json(), len(items))}"
    s = dataset.split(split)
    return Uint8Images(s.images[:limit], rgb), f"{split}-{digest(s.images, s.labels)}"


def write_split_reference(params, dataset, dataset_name: str, split: str, out: str | Path, device, cache_dir) -> str:
    """Write ``out`` in the ADM layout from ``split``, with the extractor of a ``fidelity`` metric's
    ``params``: ``mu``/``sigma`` of all its images, ``arr_0`` a seeded subset of at most
    ``prc_reference_limit`` images (uint8 NHWC, 3 channels). Returns a one-line summary."""
    choice = choose_extractor(params, dataset, dataset_name, cache_dir)
    images, key = split_images(dataset, split, choice.needs_rgb)  # as the metric sees them: one cache
    opts = {"cache_dir": cache_dir, "device": device, "batch_size": params.batch_size}
    mu, sigma = Reference(choice, images, f"{dataset_name}-{key}", opts).stats()
    idx = reference_subset(len(images), params.prc_reference_limit, params.prc_reference_seed)
    chw = torch.stack([images[int(i)] for i in idx])
    nhwc = chw.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous().numpy()  # grey -> RGB, as Inception sees it
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, arr_0=nhwc)
    os.replace(tmp, out)
    return (f"{out}: mu {mu.shape}, sigma {sigma.shape} of {len(images)} {split} images ({choice.tag}), "
            f"arr_0 {nhwc.shape} uint8")  # fmt: skip
