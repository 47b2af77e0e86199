"""The training loop: checkpoints, resume equals an uninterrupted run, signals."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from nestar_lab.cli import main
from nestar_lab.config.schema import TrainConfig
from nestar_lab.run.data import batch_indices
from nestar_lab.run.optim import lr_factor
from nestar_lab.run.rundir import load_checkpoint, load_run_config
from nestar_lab.run.train import TrainingInterrupted, train


def test_resume_equals_uninterrupted(tiny_cfg, tmp_path):
    straight = train(tiny_cfg, tmp_path / "straight", progress=False)
    with pytest.raises(TrainingInterrupted, match="resume with: nestar train --resume"):
        train(tiny_cfg, tmp_path / "broken", stop_at_step=4, progress=False)
    assert load_checkpoint(tmp_path / "broken")["step"] == 4
    resumed = train(tiny_cfg, tmp_path / "broken", resume=True, progress=False)
    assert resumed.steps == straight.steps == tiny_cfg.train.steps
    a, b = load_checkpoint(straight.run_dir), load_checkpoint(resumed.run_dir)
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"


def test_run_dir_holds_resolved_config_and_safe_checkpoint(tiny_cfg, tmp_path):
    result = train(tiny_cfg, tmp_path / "run", progress=False)
    cfg = load_run_config(result.run_dir)
    assert cfg == tiny_cfg
    assert (result.run_dir / "provenance.json").is_file()
    assert not list(result.run_dir.glob("*.tmp"))
    torch.load(result.run_dir / "checkpoint.pt", weights_only=True)  # loads without pickled code


def test_sigint_checkpoints_and_exits(tiny_raw, tmp_path):
    from nestar_lab.config.validation import validate_config

    tiny_raw["train"]["steps"] = 10_000
    cfg = validate_config(tiny_raw)
    timer = threading.Timer(3.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(TrainingInterrupted) as info:
            train(cfg, tmp_path / "sig", progress=False)
    finally:
        timer.cancel()
    step = load_checkpoint(tmp_path / "sig")["step"]
    assert 0 < step == info.value.step < 10_000


def test_cli_resume_of_a_finished_run_is_a_no_op(tiny_cfg, tmp_path, capsys):
    run = train(tiny_cfg, tmp_path / "done", progress=False).run_dir
    assert main(["train", "--resume", str(run)]) == 0
    assert "already finished (6 steps); nothing to do" in capsys.readouterr().out


def test_lr_schedule():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(50, TrainConfig(steps=100, warmup_steps=10, lr_schedule="constant")) == 1.0


def test_batches_cover_an_epoch_without_repeats():
    seen = torch.cat([batch_indices(s, 100, 32, seed=1) for s in range(3)])
    assert len(set(seen.tolist())) == 96
    assert torch.equal(batch_indices(5, 100, 32, 1), batch_indices(5, 100, 32, 1))


def test_weight_decay_spares_biases_norms_embeddings_and_learned_tokens(tiny_raw):
    from nestar_lab.config.validation import validate_config
    from nestar_lab.run.experiment import build_experiment
    from nestar_lab.run.optim import make_optimizer

    tiny_raw["train"]["weight_decay"] = 0.05
    exp = build_experiment(validate_config(tiny_raw))
    opt, _ = make_optimizer(exp)
    names = {id(p): n for n, p in exp.generator.named_parameters()}
    by_decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    decayed, spared = by_decay[0.05], by_decay[0.0]
    assert decayed and spared and not decayed & spared
    assert decayed | spared == set(names.values()), "every parameter is optimised exactly once"
    modules = dict(exp.generator.named_modules())
    for name in decayed:
        owner, attr = name.rsplit(".", 1)
        assert attr == "weight" and isinstance(modules[owner], torch.nn.Linear), name
    assert any(name.endswith("bias") for name in spared)
    assert any("label_emb" in name for name in spared)  # embeddings
    assert any(isinstance(modules.get(n.rsplit(".", 1)[0]), torch.nn.LayerNorm) for n in spared)  # norms
