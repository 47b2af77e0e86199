"""The latent cache: the train split encoded once by the tokenizer, in shards, read by training.

Layout of a cache directory::

    meta.json          what was encoded (dataset, tokenizer, flips), shapes, shard size, count
    labels.npy         (N,) int64
    shard-00000.npy    (S, V, C', h, w) float32: V = 2 views (image, flipped) with flips, else 1

``C'`` is whatever :meth:`Tokenizer.encode_for_cache` stores (a VAE's posterior moments, or the
latents). Shards are written through a temporary file and a rename, so an interrupted
``nestar cache-latents`` continues with the first missing shard. Training memory-maps the shards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from nestar_lab.config.schema import ExperimentConfig

META = "meta.json"


def cache_dir_for(cfg: ExperimentConfig) -> Path:
    """The configured cache directory (``data.latent_cache``)."""
    if not cfg.data.latent_cache:
        raise ValueError("data.latent_cache: no cache directory configured; set data.latent_cache=PATH")
    return Path(cfg.data.latent_cache)


def fingerprint(cfg: ExperimentConfig) -> dict:
    """What makes two caches interchangeable: the data, the tokenizer and the flips."""
    return {
        "dataset": cfg.dataset.model_dump(mode="json"),
        "tokenizer": cfg.tokenizer.model_dump(mode="json"),
        "hflip": cfg.data.hflip,
    }


class LatentCache:
    """Read access to a finished cache: ``read(indices, views) -> (stored, labels)``."""

    def __init__(self, root: Path, meta: dict):
        self.root, self.meta = root, meta
        self.views = 2 if meta["fingerprint"]["hflip"] else 1
        self.shard_size = int(meta["shard_size"])
        self.labels = torch.from_numpy(np.load(root / "labels.npy"))
        self._shards: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, root: str | Path, cfg: ExperimentConfig) -> "LatentCache":
        """Open ``root`` for ``cfg``; a missing, unfinished or mismatched cache is a one-line error."""
        root = Path(root)
        hint = f"run `nestar cache-latents CONFIG` with data.latent_cache={root}"
        if not (root / META).is_file():
            raise FileNotFoundError(f"{root}: no latent cache here ({META} missing); {hint}")
        meta = json.loads((root / META).read_text())
        if meta["fingerprint"] != fingerprint(cfg):
            diff = [k for k in meta["fingerprint"] if meta["fingerprint"][k] != fingerprint(cfg).get(k)]
            raise ValueError(f"{root}: latent cache was made for another {'/'.join(diff)} than the config's; {hint}")
        missing = [i for i in range(meta["num_shards"]) if not _shard_path(root, i).is_file()]
        if missing or not (root / "labels.npy").is_file():
            raise FileNotFoundError(f"{root}: latent cache is unfinished ({len(missing)} shards missing); {hint}")
        return cls(root, meta)

    def __len__(self) -> int:
        return int(self.meta["num_items"])

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._shards:
            self._shards[i] = np.load(_shard_path(self.root, i), mmap_mode="r")
        return self._shards[i]

    def read(self, idx: Tensor, views: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Stored tensors ``(B, C', h, w)`` of items ``idx`` (view 0, or ``views[b]``) and labels."""
        idx_np = idx.numpy()
        view_np = np.zeros_like(idx_np) if views is None else views.numpy()
        shard_of, row_of = np.divmod(idx_np, self.shard_size)
        out = np.empty((len(idx_np), *self.meta["stored_shape"]), dtype=np.float32)
        for shard in np.unique(shard_of):  # one gather per shard, not per item
            sel = shard_of == shard
            out[sel] = self._shard(int(shard))[row_of[sel], view_np[sel]]
        return torch.from_numpy(out), self.labels[idx]


def _shard_path(root: Path, i: int) -> Path:
    return root / f"shard-{i:05d}.npy"


@torch.no_grad()
def build_cache(exp, root: str | Path | None = None, progress: bool = True) -> Path:
    """Encode ``exp``'s train split into ``root`` (default ``data.latent_cache``); resumable.

    Returns the directory. Finished shards are kept, so an interrupted job continues where it
    stopped; a directory holding a cache of other data or another tokenizer is an error rather
    than overwritten.
    """
    cfg, dc = exp.cfg, exp.cfg.data
    root = Path(root) if root is not None else cache_dir_for(cfg)
    root.mkdir(parents=True, exist_ok=True)
    meta_path = root / META
    items = exp.dataset.items("train")
    n, size = len(items), dc.shard_size
    num_shards = -(-n // size)
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old["fingerprint"] != fingerprint(cfg) or old["shard_size"] != size or old["num_items"] != n:
            raise ValueError(f"{root}: holds a latent cache of other data, tokenizer or shard size; use another directory")
    exp.tokenizer.eval()
    todo = [i for i in range(num_shards) if not _shard_path(root, i).is_file()]
    done_items = n - sum(min(size, n - i * size) for i in todo)
    bar = tqdm(total=n, initial=done_items, desc="cache-latents", unit="img", disable=not progress)
    for i in todo:
        subset = torch.utils.data.Subset(items, range(i * size, min(n, (i + 1) * size)))
        loader = torch.utils.data.DataLoader(subset, batch_size=dc.cache_batch_size, num_workers=dc.num_workers)
        chunks, labels = [], []
        for images, y in loader:
            images = images.to(exp.device)
            views = [images, images.flip(-1)] if dc.hflip else [images]
            chunks.append(torch.stack([exp.tokenizer.encode_for_cache(v) for v in views], 1).float().cpu())
            labels.append(y.long())
            bar.update(len(y))
        shard = torch.cat(chunks).numpy()
        if not meta_path.is_file():
            _write_meta(root, cfg, n, size, num_shards, list(shard.shape[2:]))
        _atomic_save(_labels_path(root, i), torch.cat(labels).numpy())
        _atomic_save(_shard_path(root, i), shard)  # last: its presence marks the shard done
    bar.close()
    labels = np.concatenate([np.load(_labels_path(root, i)) for i in range(num_shards)])
    _atomic_save(root / "labels.npy", labels)
    return root


def _labels_path(root: Path, i: int) -> Path:
    return root / f"shard-{i:05d}.labels.npy"


def _write_meta(root: Path, cfg, n: int, size: int, num_shards: int, stored_shape: list[int]) -> None:
    meta = {"fingerprint": fingerprint(cfg), "num_items": n, "shard_size": size, "num_shards": num_shards,
            "stored_shape": stored_shape}  # fmt: skip
    tmp = root / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, root / META)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name[: -len(".npy")] + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)
