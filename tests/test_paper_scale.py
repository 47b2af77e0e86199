"""The paper's pipeline at toy size: image folders, a (random, small) KL-16, the latent cache,
training from it, Inception-free fidelity against a streamed reference; the paper configs."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from nestar_lab.cli import main
from nestar_lab.config.errors import ConfigError
from nestar_lab.config.parts import make
from nestar_lab.config.registry import get_registry
from nestar_lab.config.validation import load_config
from nestar_lab.interfaces import EvalContext, Samples, SampleStats

PAPER_CONFIGS = sorted(Path(__file__).parents[1].glob("studies/configs/imagenet256/*.yaml"))


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 6), ("val", 2)):
        for c, colour in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200))):
            d = tmp_path / "imagenet" / split / f"n0{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                a = np.clip(rng.normal(colour, 40, (24, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i}.png")
    return tmp_path / "imagenet"


def toy_raw(tiny_raw, folder, tmp_path):
    raw = copy.deepcopy(tiny_raw)
    raw.update(
        dataset={"name": "image_folder", "params": {"root": str(folder), "resolution": 16}},
        tokenizer={"name": "kl16", "params": {"weights": None, "block_out_channels": [32, 32], "layers_per_block": 1}},
        data={"latent_cache": str(tmp_path / "cache"), "hflip": True, "shard_size": 8, "cache_batch_size": 4},
        metrics=[],
    )
    raw["train"].update(steps=2, batch_size=6)
    return raw


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_paper_configs_validate_with_local_files(path, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kl16 without weights warns that its latents are meaningless
        cfg = load_config(path, [f"dataset.params.root={folder}", "tokenizer.params.weights=null"])
    assert cfg.tokenizer.name == "kl16" and cfg.eval.samples_per_class * 1000 == 50_000
    fidelity = next(m for m in cfg.metrics if m.name == "fidelity")  # the papers' protocol: ADM's reference batch
    assert fidelity.params["extractor"] == "inception"
    assert fidelity.params["reference"] == "data/VIRTUAL_imagenet256_labeled.npz"
    with pytest.raises(FileNotFoundError, match="VIRTUAL_imagenet256_labeled.npz: reference statistics not found"):
        make("metric", fidelity)  # named when the experiment is built, before training or sampling
    adm = folder.parent / "adm.npz"  # the layout of ADM's file (its arr_0 holds 10k 256 px images)
    np.savez(adm, mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32), arr_0=np.zeros((2, 16, 16, 3), np.uint8))
    make("metric", fidelity.model_copy(update={"params": {**fidelity.params, "reference": str(adm)}}))
    with pytest.raises(ConfigError, match="data/imagenet"):  # shipped paths are placeholders: named in the error
        load_config(path)


def test_cache_latents_then_train_from_the_cache(tiny_raw, folder, tmp_path):
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(toy_raw(tiny_raw, folder, tmp_path)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["cache-latents", str(config)]) == 0
        meta = yaml.safe_load((tmp_path / "cache" / "meta.json").read_text())
        assert meta["num_items"] == 18 and meta["num_shards"] == 3 and meta["stored_shape"] == [32, 8, 8]
        assert main(["cache-latents", str(config)]) == 0  # finished: nothing to redo
        assert main(["train", str(config), "--run-dir", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_fidelity_streams_a_reference_too_large_for_memory(folder, tmp_path):
    dataset_cls = get_registry().get("dataset", "image_folder")
    ds = dataset_cls(dataset_cls.Params(root=str(folder), resolution=16))
    assert not ds.in_memory  # the reference streams through items(), as ImageNet's must
    metric_cls = get_registry().get("metric", "fidelity")
    metric = metric_cls(metric_cls.Params(classifier_epochs=2, isc=False, prc=False, real_baseline=True))

    def sampler(labels, seed=0, batch_size=None):
        return Samples(torch.rand(len(labels), 3, 16, 16) * 2 - 1, labels, SampleStats(len(labels), 1, 1, 1.0))

    ctx = EvalContext(dataset=ds, sampler=sampler, device=torch.device("cpu"), cache_dir=tmp_path / "c",
                      dataset_name="toy", samples_per_class=2)  # fmt: skip
    out = metric.compute(ctx)
    assert np.isfinite(out["fid_toy_cnn"]) and np.isfinite(out["fid_toy_cnn_real"])
    assert list((tmp_path / "c" / "fidelity").glob("nestar-toy-train-*"))
