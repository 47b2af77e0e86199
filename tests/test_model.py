"""The model learns, guidance is right, and the sampler keeps its promises."""

from __future__ import annotations

import pytest
import torch

from nestar_lab.method.flow import FlowConfig, data_estimate, guided_velocity, path_sample
from nestar_lab.method.losses import training_losses
from nestar_lab.method.sample import SampleConfig, Sampler, sample_tokens
from nestar_lab.run.experiment import build_experiment


def test_path_conventions():
    x1, x0 = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.allclose(path_sample(x1, x0, torch.zeros(2, 3)).y_t, x0)
    assert torch.allclose(path_sample(x1, x0, torch.ones(2, 3)).y_t, x1)
    assert torch.allclose(path_sample(x1, x0, torch.rand(2, 3)).target, x1 - x0)


def test_the_data_estimate_of_the_true_velocity_is_the_data_and_data_matching_uses_it():
    from nestar_lab.config.registry import get_registry
    from nestar_lab.interfaces import CoordinationPair

    x1, x0, t = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.rand(2, 3)
    path = path_sample(x1, x0, t)
    torch.testing.assert_close(data_estimate(path.y_t, t, path.target), x1)
    cls = get_registry().get("coordination_objective", "data_matching")
    v_fine, v_coarse = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    loss = cls(cls.Params(weight=1.0))([CoordinationPair(1, v_fine, v_coarse, path.y_t, t)])
    weighted = ((1 - t).unsqueeze(-1) ** 2 * (v_fine - v_coarse) ** 2).mean()  # velocity matching x (1 - t)^2
    torch.testing.assert_close(loss, weighted)


def test_loss_goes_down_on_a_small_batch(tiny_cfg):
    exp = build_experiment(tiny_cfg)
    gen = exp.generator
    split = exp.dataset.split("train")
    tokens = exp.order.flatten(exp.tokenizer.encode(split.images[:16]))
    labels = split.labels[:16]
    opt = torch.optim.Adam(gen.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        rng = torch.Generator().manual_seed(step % 4)  # a fixed set of noise draws
        out = training_losses(gen, tokens, labels, FlowConfig(batch_mul=2), exp.coordination, rng)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        losses.append(float(out.total.detach()))
    assert set(out.parts) == {"flow_1", "flow_2", "flow_3", "coor"}
    assert sum(losses[-4:]) < 0.6 * sum(losses[:4])


def test_no_coordination_skips_the_partner_rows(tiny_raw):
    from nestar_lab.config.validation import validate_config

    tiny_raw["coordination"] = {"name": "none"}
    exp = build_experiment(validate_config(tiny_raw))
    tokens = torch.randn(2, 64, 1)
    out = training_losses(exp.generator, tokens, torch.tensor([0, 1]), FlowConfig(), exp.coordination, torch.Generator())
    assert "coor" not in out.parts


def test_guidance_of_one_equals_the_conditional_velocity():
    head = lambda y, t, c: y * c + t.unsqueeze(-1)  # noqa: E731
    y, cond_c, cond_u = torch.randn(3, 4, 2), torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    t = torch.tensor(0.3)
    both = torch.cat([cond_c, cond_u])
    conditional = guided_velocity(head, cond_c, 1.0)(t, y)
    torch.testing.assert_close(conditional, head(y, t.expand(3, 4), cond_c))
    w = 3.0
    v_c, v_u = head(y, t.expand(3, 4), cond_c), head(y, t.expand(3, 4), cond_u)
    torch.testing.assert_close(guided_velocity(head, both, w)(t, y), v_u + w * (v_c - v_u))
    # with w = 1 the batched form reduces to the conditional velocity as well
    torch.testing.assert_close(guided_velocity(head, both, 1.0 + 1e-12)(t, y), conditional)


def test_linear_guidance_schedule():
    cfg = SampleConfig(cfg_scale=3.0, cfg_schedule="linear")
    assert cfg.scale_at(0, 64) == 1.0 and cfg.scale_at(64, 64) == 3.0
    assert SampleConfig(cfg_scale=3.0).scale_at(5, 64) == 3.0


@pytest.mark.parametrize("k", [2, 4, 8])
def test_sampler_stats_and_every_token_written(tiny_raw, k):
    from nestar_lab.config.validation import validate_config

    tiny_raw["generator"]["params"]["k"] = k
    exp = build_experiment(validate_config(tiny_raw))
    M = len(exp.generator.schedule.stages)
    sampler = Sampler(exp.generator.eval(), exp.tokenizer, exp.order, exp.sampling_plan())
    samples = sampler(torch.tensor([0, 1, 2]), seed=0)
    assert samples.images.shape == (3, 1, 8, 8)
    assert samples.stats.sequential_steps == k + (M - 1) * (k - 1)
    assert samples.stats.nfe_per_image == samples.stats.sequential_steps * 2  # euler, 2 steps
    out = sample_tokens(exp.generator, torch.tensor([4, 5]), exp.sampling_plan(), torch.Generator().manual_seed(0), 1)
    assert (out.tokens != 0).all(), "every token must be generated"
    assert out.context_passes == samples.stats.context_passes == samples.stats.sequential_steps


def test_sampling_is_seeded_and_labels_matter(tiny_cfg):
    exp = build_experiment(tiny_cfg)
    for p in exp.generator.parameters():  # a non-trivial untrained network
        torch.nn.init.normal_(p, std=0.2)
    sampler = Sampler(exp.generator.eval(), exp.tokenizer, exp.order, exp.sampling_plan())
    a = sampler(torch.tensor([1, 2]), seed=3).images
    assert torch.equal(a, sampler(torch.tensor([1, 2]), seed=3).images)
    assert not torch.equal(a, sampler(torch.tensor([1, 2]), seed=4).images)
    assert not torch.equal(a, sampler(torch.tensor([7, 8]), seed=3).images)


def test_shared_weights_use_one_module_for_every_stage(tiny_raw):
    from nestar_lab.config.validation import validate_config

    separate = build_experiment(validate_config(tiny_raw)).generator
    tiny_raw["generator"]["params"]["share_weights"] = True
    shared = build_experiment(validate_config(tiny_raw)).generator
    assert len(separate.nets) == 3 and len(shared.nets) == 1
    assert shared.net(0) is shared.net(2)
    n_sep = sum(p.numel() for p in separate.parameters())
    assert sum(p.numel() for p in shared.parameters()) * 3 == n_sep
    coordination = build_experiment(validate_config(tiny_raw)).coordination
    out = training_losses(shared, torch.randn(2, 64, 1), torch.tensor([0, 10]), FlowConfig(), coordination, torch.Generator())
    out.total.backward()
    assert all(p.grad is not None for p in shared.parameters() if p.requires_grad)


@pytest.mark.parametrize("generator,params,steps", [("ar", {}, 64), ("dit", {}, 1), ("mar", {"steps": 8}, 8)])
def test_baseline_schedules_sample_with_their_step_counts(tiny_raw, generator, params, steps):
    from nestar_lab.config.validation import validate_config

    tiny_raw["generator"] = {"name": generator, "params": params}
    if generator != "mar":  # MAR keeps its per-token head
        tiny_raw["scale_module"]["params"].update(head="joint", head_heads=2)
    exp = build_experiment(validate_config(tiny_raw))
    out = exp.generator.training_losses(
        torch.randn(2, 64, 1), torch.tensor([0, 1]), FlowConfig(), exp.coordination, torch.Generator()
    )
    assert set(out.parts) == {"flow_1"}
    out.total.backward()
    samples = Sampler(exp.generator.eval(), exp.tokenizer, exp.order, exp.sampling_plan())(torch.tensor([3, 4]))
    assert samples.images.shape == (2, 1, 8, 8)
    assert samples.stats.sequential_steps == steps and samples.stats.nfe_per_image == 2 * steps


def test_mar_reveals_every_token_once_on_a_cosine_schedule():
    from nestar_plugins.generators.mar import reveal_counts

    counts = reveal_counts(64, 8)
    assert counts[-1] == 64 and all(b > a for a, b in zip([0, *counts], counts))
    assert counts[0] < 64 / 8 < 64 - counts[-2]  # few tokens first, many at the end (cosine)
    assert reveal_counts(5, 5) == [1, 2, 3, 4, 5]


def _module_loss(tiny_raw, num: int, **module_params):
    """The training loss of a fresh tiny NestAR whose scale module gets ``module_params``."""
    from nestar_lab.config.validation import validate_config
    from nestar_lab.run.experiment import build_experiment

    raw = {**tiny_raw, "scale_module": {**tiny_raw["scale_module"]}}
    raw["scale_module"]["params"] = {**raw["scale_module"]["params"], **module_params}
    exp = build_experiment(validate_config(raw))
    split = exp.dataset.split("train")
    tokens = exp.order.flatten(exp.tokenizer.encode(split.images[:num]))
    rng = torch.Generator().manual_seed(0)
    return exp, exp.generator(tokens, split.labels[:num], FlowConfig(batch_mul=1), None, rng).total


def test_gradient_checkpointing_gives_the_same_gradients(tiny_raw):
    grads = []
    for recompute in (False, True):
        exp, loss = _module_loss(tiny_raw, 8, grad_checkpointing=recompute)
        loss.backward()
        grads.append([p.grad.clone() for p in exp.generator.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_cpu_bf16_attention_runs_in_fp32_and_matches_fp32():
    """Under CPU bf16 autocast the attention kernel computes in fp32 (its bf16 backward is slow) and
    hands back bf16; values and gradients agree with fp32 attention up to bf16 rounding."""
    from nestar_plugins.scale_modules.layers import Attention

    torch.manual_seed(0)
    attn = Attention(32, 4)
    x = torch.randn(3, 10, 32)
    mask = torch.tril(torch.ones(10, 10, dtype=torch.bool))
    ref = attn(x, mask)
    ref.square().sum().backward()
    ref_grad = attn.qkv.weight.grad.clone()
    attn.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x, mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    out.float().square().sum().backward()
    assert torch.nn.functional.cosine_similarity(attn.qkv.weight.grad.flatten(), ref_grad.flatten(), dim=0) > 0.99
    torch.testing.assert_close(attn(x, None), attn(x, torch.ones(10, 10, dtype=torch.bool)))  # no mask: all rows


def test_flex_attention_block_masks_match_sdpa(tiny_raw):
    """The FlexAttention path (the default on CUDA) equals SDPA with the dense mask; checked
    here in eager mode on the CPU."""
    import warnings

    from nestar_plugins.scale_modules.flex import flex_available

    if not flex_available():
        pytest.skip("this torch has no FlexAttention")
    outs = []
    for attention in ("sdpa", "flex"):
        with warnings.catch_warnings(), torch.no_grad():  # FlexAttention has no CPU backward
            warnings.simplefilter("ignore")  # eager FlexAttention warns that it is not compiled
            outs.append(_module_loss(tiny_raw, 4, attention=attention)[1])
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_flex_block_masks_are_cached_by_content(monkeypatch):
    """Equal layouts carried by different Rows objects share one block mask; a repeated Rows
    object is a pure cache hit (no hashing); a different layout builds its own."""
    from nestar_plugins.scale_modules import flex

    built, hashed = [], []
    monkeypatch.setattr(flex, "block_mask", lambda dense: built.append(dense.clone()) or object())
    real_key = flex.mask_key
    monkeypatch.setattr(flex, "mask_key", lambda dense: hashed.append(1) or real_key(dense))
    masks = flex.BlockMasks()
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    rows_a, rows_b, rows_c = object(), object(), object()
    first = masks.get(rows_a, causal)
    for _ in range(5):  # every training step reuses the stage's Rows
        assert masks.get(rows_a, causal.clone()) is first
    assert masks.get(rows_b, causal.clone()) is first, "same content, another Rows: no rebuild"
    assert masks.get(rows_c, torch.ones(6, 6, dtype=torch.bool)) is not first
    assert len(built) == masks.built == 2 and len(hashed) == 3


def test_compile_flag_traces_training_and_sampling(tiny_raw):
    """``train.compile`` compiles the scale modules' parts; the eager backend checks that
    training and KV-cached sampling trace through torch.compile without changing results."""
    from nestar_lab.config.validation import validate_config
    from nestar_lab.run.evaluate import make_sampler
    from nestar_lab.run.experiment import build_experiment

    results = []
    for compiled in (False, True):
        raw = {**tiny_raw, "train": {**tiny_raw["train"], "compile": compiled, "compile_backend": "eager"}}
        exp = build_experiment(validate_config(raw))
        split = exp.dataset.split("train")
        tokens = exp.order.flatten(exp.tokenizer.encode(split.images[:4]))
        loss = exp.generator(tokens, split.labels[:4], FlowConfig(batch_mul=1), None, torch.Generator().manual_seed(0)).total
        images = make_sampler(exp)(torch.arange(3), seed=0).images
        results.append((loss.detach(), images))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-4)
