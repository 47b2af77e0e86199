"""Shared fixtures: offline, a private cache, and a tiny experiment that trains in seconds."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from nestar_lab.config.validation import validate_config

TINY = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "dataset": {"name": "digits"},
    "tokenizer": {"name": "pixels", "params": {"patch_size": 1}},
    "token_order": {"name": "coarse_to_fine"},
    "generator": {"name": "nestar", "params": {"k": 4}},
    "scale_module": {
        "name": "transformer",
        "params": {"width": 32, "depth": 1, "heads": 2, "prefix_tokens": 1, "head_width": 32, "head_depth": 1},
    },
    "ode_solver": {"name": "euler", "params": {"steps": 2}},
    "coordination": {"name": "velocity_matching", "params": {"weight": 0.1}},
    "flow": {"batch_mul": 1},
    "train": {"steps": 6, "batch_size": 32, "warmup_steps": 2, "checkpoint_every": 3, "log_every": 1, "precision": "fp32"},
    "sample": {"cfg_scale": 2.0, "batch_size": 64},
    "eval": {"samples_per_class": 2},
    "metrics": [{"name": "class_accuracy", "params": {"epochs": 2}}, {"name": "nearest_train_distance"}],
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NESTAR_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    torch.manual_seed(0)


@pytest.fixture
def tiny_raw(tmp_path):
    raw = copy.deepcopy(TINY)
    raw["output_dir"] = str(tmp_path / "runs")
    return raw


@pytest.fixture
def tiny_cfg(tiny_raw):
    return validate_config(tiny_raw)


@pytest.fixture
def one_thread():
    """Trials of tiny studies, often run beside other processes: one thread each is fastest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
