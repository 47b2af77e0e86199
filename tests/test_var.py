"""The `var` generator: next-scale prediction over a pyramid of the latent grid."""

from __future__ import annotations

import pytest
import torch
from nestar_plugins.generators.var import VAR
from nestar_plugins.token_orders.orders import CoarseToFine
from pydantic import ValidationError

from nestar_lab.config.registry import get_registry
from nestar_lab.config.validation import validate_config
from nestar_lab.interfaces import PassOptions, Rows, ScaleModuleSpec
from nestar_lab.method.flow import FlowConfig
from nestar_lab.method.sample import SampleConfig, Sampler, SamplingPlan
from nestar_lab.run.experiment import build_experiment

reg = get_registry()
SMALL = {"width": 32, "depth": 2, "heads": 2, "prefix_tokens": 2, "head_width": 32, "head_depth": 1}


def make_var(grid, scales=None, **module):
    """A VAR over an ``h x w`` grid of 2-dim tokens in coarse-to-fine order (not raster, so the
    token <-> grid mapping is exercised)."""
    params = VAR.Params(scales=scales)
    n = grid[0] * grid[1]
    order = CoarseToFine(grid=grid)
    stages = len(VAR.build_schedule(params, n).stages)
    spec = ScaleModuleSpec(token_dim=2, num_classes=10, coords=order.coords, grid=grid, num_stages=stages)
    cls = reg.get("scale_module", "transformer")
    torch.manual_seed(0)
    gen = VAR(params, num_tokens=n, make_module=lambda stage=0: cls(cls.Params(**SMALL, **module), spec=spec))
    for p in gen.parameters():  # AdaLN-zero heads output zeros; randomise for real numbers
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    return gen.eval(), order


def euler(steps=2):
    cls = reg.get("ode_solver", "euler")
    return cls(cls.Params(steps=steps))


def test_trains_on_digits_and_samples_four_steps(tiny_raw):
    tiny_raw["generator"] = {"name": "var", "params": {}}
    tiny_raw["coordination"] = {"name": "none"}
    exp = build_experiment(validate_config(tiny_raw))
    gen = exp.generator
    assert gen.scales == (1, 2, 4, 8) and gen.schedule.sequential_steps == 4 and len(gen.nets) == 1
    split = exp.dataset.split("train")
    tokens = exp.order.flatten(exp.tokenizer.encode(split.images[:16]))
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        rng = torch.Generator().manual_seed(step % 4)  # a fixed set of noise draws
        out = gen.training_losses(tokens, split.labels[:16], FlowConfig(batch_mul=2), None, rng)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        losses.append(float(out.total.detach()))
    assert set(out.parts) == {"flow_1", "mse_1x1", "mse_2x2", "mse_4x4", "mse_8x8"}
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])
    samples = Sampler(gen.eval(), exp.tokenizer, exp.order, exp.sampling_plan())(torch.tensor([3, 4, 5]))
    assert samples.images.shape == (3, 1, 8, 8)
    assert samples.stats.sequential_steps == 4 and samples.stats.nfe_per_image == 4 * 2  # euler, 2 steps


def test_pyramid_targets_and_token_mapping():
    gen, order = make_var((8, 8))
    tokens = torch.randn(3, 64, 2)
    x_in, x1 = gen.pyramid(tokens)
    assert x_in.shape == x1.shape == (3, 85, 2)
    grid = order.unflatten(tokens)
    torch.testing.assert_close(x1[:, 21:], grid.flatten(2).transpose(1, 2))  # last scale: the latent
    torch.testing.assert_close(x1[:, 0], grid.mean((2, 3)))  # first scale: the 1x1 average
    assert (x_in[:, 0] == 0).all()  # the first scale is fed by the start embedding
    torch.testing.assert_close(x_in[:, 1:5], x1[:, :1].expand(-1, 4, -1))  # 1x1 upsampled to 2x2


@pytest.mark.parametrize("head", ["mlp", "joint"])
def test_sixteen_by_sixteen_samples_five_scales_with_guidance(head):
    gen, _ = make_var((16, 16), head=head, head_heads=2)
    assert gen.scales == (1, 2, 4, 8, 16) and gen.schedule.sequential_steps == 5
    cfg = SampleConfig(cfg_scale=2.0, cfg_schedule="linear")
    rng = torch.Generator().manual_seed(0)
    out = gen.sample_tokens(torch.tensor([1, 2]), SamplingPlan.shared(euler(3), cfg, 5, "cpu"), rng, 2)
    tokens, nfe = out.tokens, out.nfe
    assert out.context_passes == 5
    assert tokens.shape == (2, 256, 2) and torch.isfinite(tokens).all() and (tokens != 0).all()
    assert nfe == 5 * 3
    out = gen.training_losses(tokens, torch.tensor([0, 10]), FlowConfig(batch_mul=2), None, torch.Generator())
    out.total.backward()
    assert torch.isfinite(out.total)


def test_a_scale_sees_only_itself_and_coarser_scales():
    gen, _ = make_var((8, 8))
    rows, net = gen._pyramid_rows(torch.device("cpu")), gen.net(0)
    x_in, labels = torch.randn(2, 85, 2), torch.tensor([1, 2])
    base = net(x_in, rows, labels, stage=0)
    for k, (a, b) in enumerate(gen.bounds[1:], start=1):
        bumped = x_in.clone()
        bumped[:, a:b] += 1.0
        out = net(bumped, rows, labels, stage=0)
        for j, (c, d) in enumerate(gen.bounds):
            same = torch.allclose(out[:, c:d], base[:, c:d], atol=1e-6)
            assert same == (j < k), f"scale {j} after perturbing scale {k}'s input"


def test_cached_extension_equals_the_teacher_forced_pass():
    gen, _ = make_var((8, 8))
    rows, net = gen._pyramid_rows(torch.device("cpu")), gen.net(0)
    x_in, labels = torch.randn(2, 85, 2), torch.tensor([1, 10])
    full = net(x_in, rows, labels, stage=0)
    cache = net.start_cache(labels, stage=0)
    for a, b in gen.bounds:
        sl = slice(a, b)
        part = net.extend(x_in[:, sl], Rows(rows.src_idx[sl], rows.tgt_idx[sl], coords=rows.coords[sl],
                                            stages=rows.stages[sl]), cache)  # fmt: skip
        torch.testing.assert_close(part, full[:, sl], rtol=1e-4, atol=1e-5)


def test_custom_scales_and_progressive_stages():
    gen, _ = make_var((6, 6), scales=[1, 3, 6])
    assert gen.schedule.sequential_steps == 3
    out = gen.sample_tokens(torch.tensor([0]), SamplingPlan.shared(euler(1), SampleConfig(cfg_scale=1.0), 3, "cpu"),
                            torch.Generator(), 2)  # fmt: skip
    tokens, nfe = out.tokens, out.nfe
    assert tokens.shape == (1, 36, 2) and nfe == 3
    out = gen.training_losses(torch.randn(2, 36, 2), torch.tensor([0, 1]), FlowConfig(), None, torch.Generator(),
                              PassOptions(stages={0}))  # fmt: skip
    torch.testing.assert_close(out.parts["flow_1"], out.parts["mse_1x1"])


def test_grids_and_scales_it_cannot_take_are_clear_errors():
    with pytest.raises(ValueError, match="square"):
        VAR.build_schedule(VAR.Params(), 32)
    with pytest.raises(ValueError, match="square"):
        make_var((4, 16))
    with pytest.raises(ValueError, match="power-of-two"):
        VAR.build_schedule(VAR.Params(), 36)
    with pytest.raises(ValueError, match="last scale"):
        VAR.build_schedule(VAR.Params(scales=[1, 2, 4]), 36)
    with pytest.raises(ValidationError, match="increasing"):
        VAR.Params(scales=[1, 4, 2, 8])
