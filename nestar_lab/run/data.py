"""Training batches: where each step's tokens come from.

Every source yields ``(tokens_BND, labels_B)`` for consecutive steps from a start step, and the
items of step ``s`` depend only on the run seed, ``s`` and the rank, so a resumed run reads the
same batches as one that never stopped. Sources (``data.source`` in the config):

- ``memory``: the train split held on the device, encoded per batch (small data, ``pixels``);
- ``stream``: items read lazily through :meth:`Dataset.items` by a DataLoader (``image_folder``);
- ``latent_cache``: latents encoded once by ``nestar cache-latents`` (the tokenizer is not run).

Every source applies ``data.hflip``: memory and stream flip images before encoding, the cache
stores both views and picks one per item.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from nestar_lab.run.experiment import Experiment


def batch_indices(step: int, num_items: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> Tensor:
    """Item indices of ``rank``'s batch at ``step``: one seeded permutation per epoch, cut into
    ``world * batch_size`` global batches (last partial one dropped), this rank's slice of it."""
    global_batch = min(batch_size * world, num_items)
    per_rank = global_batch // world
    if per_rank < 1:
        raise ValueError(f"{num_items} training items cannot fill one batch on each of {world} ranks")
    per_epoch = num_items // global_batch
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    start = k * global_batch + rank * per_rank
    return perm[start : start + per_rank]


def data_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The CPU random stream of a step's data (flips, posterior draws), apart from the model's."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 4099 + rank + 17)


def train_batches(exp: Experiment, start_step: int, rank: int = 0, world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """``(tokens_BND, labels_B)`` on the run's device for steps ``start_step, start_step + 1, ...``."""
    source = resolve_source(exp)
    if source == "latent_cache":
        return _cached_batches(exp, start_step, rank, world)
    if source == "stream":
        return _streamed_batches(exp, start_step, rank, world)
    return _memory_batches(exp, start_step, rank, world)


def resolve_source(exp: Experiment) -> str:
    """``data.source``, with ``auto`` -> ``latent_cache`` when a cache is configured, ``memory``
    for datasets that live in memory, else ``stream``."""
    dc = exp.cfg.data
    if dc.source != "auto":
        return dc.source
    if dc.latent_cache:
        return "latent_cache"
    return "memory" if exp.dataset.in_memory else "stream"


def _memory_batches(exp: Experiment, step: int, rank: int, world: int):
    split = exp.dataset.split("train")
    images, labels = split.images.to(exp.device), split.labels.to(exp.device)
    bs, seed = exp.cfg.train.batch_size, exp.cfg.seed
    while True:
        idx = batch_indices(step, len(labels), bs, seed, rank, world).to(exp.device)
        yield _encode(exp, images[idx], step, rank), labels[idx]
        step += 1


def _encode(exp: Experiment, images: Tensor, step: int, rank: int) -> Tensor:
    """Tokens of a batch of images, each flipped left-right with probability 1/2 when ``data.hflip``."""
    if exp.cfg.data.hflip:
        flip = torch.rand(len(images), generator=data_generator(exp.cfg.seed, step, rank)) < 0.5
        images = torch.where(flip.to(images.device)[:, None, None, None], images.flip(-1), images)
    with torch.no_grad():
        return exp.order.flatten(exp.tokenizer.encode(images))


class _StepBatches(torch.utils.data.Sampler):
    """Index lists of consecutive steps from ``start`` (a DataLoader ``batch_sampler``)."""

    def __init__(self, start: int, num_items: int, batch_size: int, seed: int, rank: int, world: int):
        self.start, self.args = start, (num_items, batch_size, seed, rank, world)

    def __iter__(self):
        step = self.start
        while True:
            yield batch_indices(step, *self.args).tolist()
            step += 1


def _streamed_batches(exp: Experiment, step: int, rank: int, world: int):
    items = exp.dataset.items("train")
    dc = exp.cfg.data
    loader = torch.utils.data.DataLoader(
        items,
        batch_sampler=_StepBatches(step, len(items), exp.cfg.train.batch_size, exp.cfg.seed, rank, world),
        num_workers=dc.num_workers,
        pin_memory=exp.device.type == "cuda",
        persistent_workers=dc.num_workers > 0,
    )
    for images, labels in loader:
        images, labels = images.to(exp.device, non_blocking=True), labels.to(exp.device, non_blocking=True)
        yield _encode(exp, images, step, rank), labels
        step += 1


def _cached_batches(exp: Experiment, step: int, rank: int, world: int):
    from nestar_lab.run.latent_cache import LatentCache, cache_dir_for

    cache = LatentCache.open(cache_dir_for(exp.cfg), exp.cfg)
    bs, seed = exp.cfg.train.batch_size, exp.cfg.seed
    while True:
        rng = data_generator(seed, step, rank)
        idx = batch_indices(step, len(cache), bs, seed, rank, world)
        view = None
        if cache.views > 1:  # MAR's flip augmentation: one of the cached views per item
            view = torch.randint(cache.views, (len(idx),), generator=rng)
        stored, labels = cache.read(idx, view)
        with torch.no_grad():
            latents = exp.tokenizer.latents_from_cache(stored.to(exp.device), generator=_device_rng(rng, exp.device))
            tokens = exp.order.flatten(latents)
        yield tokens, labels.to(exp.device)
        step += 1


def _device_rng(cpu_rng: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from ``cpu_rng`` (posterior draws happen on the device)."""
    seed = int(torch.randint(2**62, (), generator=cpu_rng))
    return torch.Generator(device=device).manual_seed(seed)
