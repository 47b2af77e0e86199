"""The training pass's options are a typed, frozen hand-off (issue 11), and a generator with one
stage refuses a stage it does not have instead of ignoring it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nestar_lab.interfaces import PassOptions
from nestar_lab.method.flow import FlowConfig


def test_pass_options_are_frozen_and_hashable_sets():
    opts = PassOptions(stages={1, 0}, measure_disagreement=True)
    assert opts.stages == frozenset({0, 1}) and hash(opts)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.stages = None
    PassOptions().check_one_stage("X")
    PassOptions(stages={0}).check_one_stage("X")
    with pytest.raises(ValueError, match="X trains one stage"):
        PassOptions(stages={1}).check_one_stage("X")


def test_mar_refuses_a_stage_it_does_not_have(tiny_raw):
    from nestar_lab.config.validation import validate_config
    from nestar_lab.run.experiment import build_experiment

    tiny_raw["generator"] = {"name": "mar", "params": {"steps": 8}}
    tiny_raw["coordination"] = {"name": "none"}
    exp = build_experiment(validate_config(tiny_raw))
    tokens, labels = torch.randn(2, exp.order.num_tokens, exp.tokenizer.latent_shape[0]), torch.tensor([0, 1])
    out = exp.generator(tokens, labels, FlowConfig(), None, torch.Generator(), PassOptions(stages={0}))
    assert torch.isfinite(out.total)
    with pytest.raises(ValueError, match="MAR trains one stage"):
        exp.generator(tokens, labels, FlowConfig(), None, torch.Generator(), PassOptions(stages={1}))


def test_training_hands_the_generator_typed_options(tiny_raw, tmp_path, monkeypatch):
    """Progressive training passes each step's stage and the logging steps' measurement."""
    from nestar_lab.config.validation import validate_config
    from nestar_lab.method.generator import Generator
    from nestar_lab.run.train import train

    tiny_raw["train"].update(steps=4, log_every=2, checkpoint_every=4, module_schedule="progressive",
                             progressive_fraction=0.5)  # fmt: skip
    seen = []
    forward = Generator.forward

    def spy(self, *args):
        seen.append(args[-1])
        return forward(self, *args)

    monkeypatch.setattr(Generator, "forward", spy)
    cfg = validate_config(tiny_raw)
    result = train(cfg, tmp_path / "run", progress=False)
    training = [o for o in seen if isinstance(o, PassOptions)]
    assert len(training) == 4 == result.steps
    assert [o.measure_disagreement for o in training] == [False, True, False, True]
    assert [o.stages for o in training[2:]] == [None, None]  # joint after the progressive half
    assert all(len(o.stages) == 1 for o in training[:2]) and training[0].stages == {0}
