"""Comparisons that hold (DESIGN.md 4c): train as you sample, one shared patch solve, a real
diffusion transformer for `dit`, and MAR's per-image orders and mask-ratio law for `mar`."""

from __future__ import annotations

import inspect

import pytest
import torch

from nestar_lab.config.validation import validate_config
from nestar_lab.method.flow import FlowConfig
from nestar_lab.method.sample import Sampler
from nestar_lab.run.experiment import build_experiment

GENERATORS = {  # name -> (generator params, scale-module params)
    "nestar": ({"k": 4}, {}),
    "nestar-joint": ({"k": 4}, {"head": "joint", "head_heads": 2}),
    "ar": ({}, {}),
    "mar": ({"steps": 8}, {}),
    "dit": ({}, {}),
    "var": ({}, {"head": "joint", "head_heads": 2}),
}


def build(tiny_raw, key, **sample):
    params, module = GENERATORS[key]
    tiny_raw["generator"] = {"name": key.split("-")[0], "params": params}
    tiny_raw["scale_module"]["params"].update(module)
    tiny_raw["sample"].update(sample)
    exp = build_experiment(validate_config(tiny_raw))
    for p in exp.generator.parameters():  # zero-initialised gates would hide the dependencies
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return exp


def record_times(gen, monkeypatch):
    """Spy on every velocity call of training: (t, groups) as the network sees them."""
    seen = []
    for net in gen.nets:
        target = net.velocity if hasattr(net, "velocity") else net.forward
        name = "velocity" if hasattr(net, "velocity") else "forward"

        def spy(*args, _orig=target, **kwargs):
            t = args[1]
            groups = args[3] if len(args) > 3 else kwargs.get("groups_L")
            seen.append((t.detach().clone(), groups))
            return _orig(*args, **kwargs)

        monkeypatch.setattr(net, name, spy)
    return seen


@pytest.mark.parametrize("key", ["nestar-joint", "var", "dit"])
def test_joint_heads_train_with_one_time_per_patch(tiny_raw, monkeypatch, key):
    exp = build(tiny_raw, key)
    seen = record_times(exp.generator, monkeypatch)
    tokens = torch.randn(3, 64, 1)
    exp.generator.training_losses(tokens, torch.tensor([0, 1, 2]), FlowConfig(batch_mul=2), exp.coordination,
                                  torch.Generator().manual_seed(0))  # fmt: skip
    assert seen
    for t, groups in seen:  # t: (..., B, L)
        groups = torch.zeros(t.shape[-1], dtype=torch.long) if groups is None else groups
        for g in groups.unique():
            in_patch = t[..., groups == g]
            assert torch.equal(in_patch, in_patch[..., :1].expand_as(in_patch)), f"{key}: times vary within patch {g}"
        assert t.flatten(0, -2).std(0).max() > 0  # images (and draws) differ


def test_per_token_heads_train_with_a_time_per_token(tiny_raw, monkeypatch):
    exp = build(tiny_raw, "nestar")
    seen = record_times(exp.generator, monkeypatch)
    exp.generator.training_losses(torch.randn(2, 64, 1), torch.tensor([0, 1]), FlowConfig(), exp.coordination,
                                  torch.Generator().manual_seed(0))  # fmt: skip
    t, _ = seen[-1]
    assert t[0, 0].unique().numel() == t.shape[-1]


@pytest.mark.parametrize("key", list(GENERATORS))
def test_every_sampler_solves_its_patches_through_the_shared_helper(tiny_raw, key):
    exp = build(tiny_raw, key)
    calls = []
    integrate = exp.solver.integrate

    def spy(velocity, y0):
        calls.append(inspect.stack()[1].function)
        return integrate(velocity, y0)

    exp.solver.integrate = spy
    samples = Sampler(exp.generator.eval(), exp.tokenizer, exp.order, exp.sampling_plan())(torch.tensor([1, 2]))
    assert calls and set(calls) == {"solve_patch"}
    stats = samples.stats
    assert len(calls) == stats.sequential_steps and stats.nfe_per_image == 2 * len(calls)  # euler, 2 steps
    expected_passes = 0 if key == "dit" else stats.sequential_steps
    assert stats.context_passes == expected_passes
    assert stats.sequential_passes == expected_passes + stats.nfe_per_image


def test_dit_denoises_with_its_transformer_at_every_solver_step(tiny_raw):
    exp = build(tiny_raw, "dit")
    net = exp.generator.nets[0]
    y = torch.randn(2, 64, 1, requires_grad=True)
    v = net(y, torch.full((2, 64), 0.3), torch.tensor([1, 2]))
    v[0, 5].sum().backward()
    assert y.grad[0].abs().sum(-1).gt(0).sum() > 1, "the velocity of one token depends on the other noisy tokens"
    assert y.grad[1].abs().sum() == 0, "images do not see each other"
    passes = []
    net.blocks[0].register_forward_hook(lambda *a: passes.append(1))
    for steps, want in ((3, 3), (6, 6)):
        passes.clear()
        exp.solvers = [type(exp.solver)(type(exp.solver).Params(steps=steps))]
        stats = Sampler(exp.generator.eval(), exp.tokenizer, exp.order, exp.sampling_plan())(torch.tensor([1])).stats
        assert len(passes) == want and stats.nfe_per_image == want  # CFG halves run in one batched pass
    assert not hasattr(net, "start_cache"), "nothing is cached in diffusion"


def test_dit_is_sized_by_the_scale_module(tiny_raw):
    small = sum(p.numel() for p in build(tiny_raw, "dit").generator.parameters())
    tiny_raw["scale_module"]["params"]["width"] = 64
    assert sum(p.numel() for p in build(tiny_raw, "dit").generator.parameters()) > 3 * small


def test_mar_masks_a_random_order_per_image_with_no_mask_object(tiny_raw, monkeypatch):
    exp = build(tiny_raw, "mar")
    net, seen = exp.generator.net(0), []
    forward = net.forward

    def spy(x, rows, labels, stage):
        seen.append(rows)
        return forward(x, rows, labels, stage)

    monkeypatch.setattr(net, "forward", spy)
    exp.generator.training_losses(torch.randn(4, 64, 1), torch.arange(4), FlowConfig(), None, torch.Generator().manual_seed(1))
    rows = seen[-1]
    assert rows.mask is None and rows.src_idx.shape == (4, 64)
    known = rows.src_idx >= 0
    assert len({tuple(k.tolist()) for k in known}) == 4, "each image has its own order"
    assert len(set(known.sum(1).tolist())) == 1, "one mask ratio per batch, as in MAR"
    seen.clear()
    samples = Sampler(exp.generator.eval(), exp.tokenizer, exp.order, exp.sampling_plan())(torch.tensor([3, 3]))
    first_reveal = seen[1].src_idx >= 0  # after step 1: which tokens each image knows
    assert not torch.equal(first_reveal[0], first_reveal[1]), "sampling orders differ per image too"
    assert all(r.mask is None for r in seen) and samples.stats.context_passes == 8


def test_mar_mask_ratio_is_its_truncated_normal():
    from nestar_plugins.generators.mar import mask_ratio

    rng = torch.Generator().manual_seed(0)
    draws = torch.stack([mask_ratio(rng, "cpu", 0.7, 0.25) for _ in range(20000)])
    assert draws.min() >= 0.7 and draws.max() <= 1.0
    # mean of N(1, 0.25) truncated to [0.7, 1]: 1 + 0.25 (phi(-1.2) - phi(0)) / (Phi(0) - Phi(-1.2)) = 0.8670
    assert abs(draws.mean().item() - 0.8670) < 0.005
    assert (draws > 0.95).float().mean() > (draws < 0.75).float().mean()  # mass piles up near 1


def test_mar_training_step_has_no_host_sync(tiny_raw, monkeypatch):
    exp = build(tiny_raw, "mar")
    conversions = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=orig, _n=name: conversions.append(_n) or _o(self, *a))
    out = exp.generator.training_losses(torch.randn(2, 64, 1), torch.tensor([0, 1]), FlowConfig(), None, torch.Generator())
    monkeypatch.undo()
    assert conversions == [] and torch.isfinite(out.total)


def test_mar_refuses_a_joint_head(tiny_raw):
    params, _ = GENERATORS["mar"]
    tiny_raw["generator"] = {"name": "mar", "params": params}
    tiny_raw["scale_module"]["params"].update(head="joint", head_heads=2)
    with pytest.raises(ValueError, match="per-token head"):
        build_experiment(validate_config(tiny_raw))
