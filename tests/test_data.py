"""Training batch sources: memory, streamed items and the latent cache draw the same batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nestar_lab.config.errors import ConfigError
from nestar_lab.config.validation import validate_config
from nestar_lab.run.data import batch_indices, resolve_source, train_batches
from nestar_lab.run.experiment import build_experiment
from nestar_lab.run.latent_cache import LatentCache, build_cache
from nestar_lab.run.rundir import load_checkpoint
from nestar_lab.run.train import train


def _cfg(tiny_raw, **data):
    return validate_config({**tiny_raw, "data": data})


def test_ranks_split_every_global_batch_without_overlap():
    a, b = batch_indices(3, 100, 16, seed=1, rank=0, world=2), batch_indices(3, 100, 16, seed=1, rank=1, world=2)
    assert len(a) == len(b) == 16 and not set(a.tolist()) & set(b.tolist())
    assert torch.equal(batch_indices(3, 100, 32, seed=1), torch.cat([a, b]))  # one process, same global batch


@pytest.mark.parametrize("source", ["stream", "latent_cache"])
def test_sources_give_the_memory_batches(tiny_raw, tmp_path, source):
    memory = build_experiment(_cfg(tiny_raw))
    cfg = _cfg(tiny_raw, source=source, latent_cache=str(tmp_path / "cache"), shard_size=500)
    exp = build_experiment(cfg)
    if source == "latent_cache":
        build_cache(exp, progress=False)
    assert resolve_source(exp) == source
    for (t1, y1), (t2, y2), _ in zip(train_batches(memory, 5), train_batches(exp, 5), range(3)):
        assert torch.equal(y1, y2) and torch.allclose(t1, t2)


def test_latent_cache_resumes_and_refuses_another_tokenizer(tiny_raw, tmp_path):
    cfg = _cfg(tiny_raw, latent_cache=str(tmp_path / "cache"), shard_size=400, hflip=True)
    exp = build_experiment(cfg)
    root = build_cache(exp, progress=False)
    shards = sorted(root.glob("shard-?????.npy"))
    assert len(shards) == 4 and LatentCache.open(root, cfg).views == 2
    before = np.load(shards[2])
    shards[2].unlink()  # as if the job had been killed while writing shard 2
    with pytest.raises(FileNotFoundError, match="unfinished"):
        LatentCache.open(root, cfg)
    stamp = shards[0].stat().st_mtime_ns
    build_cache(exp, progress=False)
    assert np.array_equal(np.load(shards[2]), before) and shards[0].stat().st_mtime_ns == stamp
    stored, _ = LatentCache.open(root, cfg).read(torch.tensor([0]), torch.tensor([1]))
    assert torch.equal(stored, exp.tokenizer.encode(exp.dataset.split("train").images[:1].flip(-1)))
    other = validate_config({**tiny_raw, "tokenizer": {"name": "pixels", "params": {"scale": 0.5}},
                             "data": {"latent_cache": str(root)}})  # fmt: skip
    with pytest.raises(ValueError, match="another tokenizer"):
        LatentCache.open(root, other)


def test_training_from_the_cache_equals_training_from_memory(tiny_raw, tmp_path):
    train(_cfg(tiny_raw), tmp_path / "mem", progress=False)
    cfg = _cfg(tiny_raw, latent_cache=str(tmp_path / "cache"))
    build_cache(build_experiment(cfg), progress=False)
    train(cfg, tmp_path / "cached", progress=False)
    a, b = load_checkpoint(tmp_path / "mem")["model"], load_checkpoint(tmp_path / "cached")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_latent_cache_source_needs_a_path(tiny_raw):
    with pytest.raises(ConfigError, match="data.latent_cache"):
        _cfg(tiny_raw, source="latent_cache")


def test_hflip_flips_about_half_the_batch_the_same_way_in_memory_and_stream(tiny_raw):
    plain = build_experiment(_cfg(tiny_raw))
    flipped, streamed = (build_experiment(_cfg(tiny_raw, hflip=True, source=s)) for s in ("memory", "stream"))
    (t0, _), (t1, _), (t2, _) = (next(train_batches(e, 3)) for e in (plain, flipped, streamed))
    assert torch.equal(t1, t2)
    changed = (t0 != t1).flatten(1).any(1).float().mean()
    assert 0.2 < changed < 0.8  # a symmetric digit may look unchanged, so not exactly half
