"""Contract tests over every scale module, generator and coordination objective."""

from __future__ import annotations

import pytest
import torch
from nestar_plugins.token_orders.orders import CoarseToFine

from nestar_lab.config.registry import get_registry
from nestar_lab.interfaces import CoordinationPair, Rows, ScaleModuleSpec
from nestar_lab.method.schedule import gather_inputs, nested_schedule

reg = get_registry()
SMALL = {"transformer": {"width": 32, "depth": 2, "heads": 2, "prefix_tokens": 2, "head_width": 32, "head_depth": 1}}
# every registered scale module with its defaults (or SMALL), plus the transformer's joint head
MODULES = [(n, {}) for n in reg.names("scale_module")] + [("transformer", {"head": "joint", "head_heads": 2})]
IDS = [f"{n}-{p.get('head', 'default')}" for n, p in MODULES]


def make_module(name, num_stages=3, **params):
    order = CoarseToFine(grid=(8, 8))
    spec = ScaleModuleSpec(token_dim=2, num_classes=10, coords=order.coords, grid=(8, 8), num_stages=num_stages)
    cls = reg.get("scale_module", name)
    torch.manual_seed(0)
    net = cls(cls.Params(**{**SMALL.get(name, {}), **params}), spec=spec).double()
    # heads start at zero output (AdaLN-zero); randomise so the checks see real numbers
    for p in net.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    return net.eval()


def stage_rows(stage):
    return Rows(stage.src_idx, stage.tgt_idx, stage.mask())


@pytest.mark.parametrize("name,params", MODULES, ids=IDS)
def test_cached_extension_equals_teacher_forced_pass(name, params):
    net = make_module(name, **params)
    stage = nested_schedule(64, 4).stages[2]
    tokens = torch.randn(3, 64, 2, dtype=torch.float64)
    labels = torch.tensor([1, 5, 10])
    full = net(gather_inputs(tokens, stage.src_idx), stage_rows(stage), labels, stage=2)
    cache = net.start_cache(labels, stage=2)
    for s in range(stage.num_steps):
        sl = stage.step_rows(s)
        rows = Rows(stage.src_idx[sl], stage.tgt_idx[sl])
        part = net.extend(gather_inputs(tokens, rows.src_idx), rows, cache)
        torch.testing.assert_close(part, full[:, sl], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,params", MODULES, ids=IDS)
def test_a_patch_sees_only_earlier_patches(name, params):
    net = make_module(name, **params)
    stage = nested_schedule(64, 4).stages[2]
    tokens = torch.randn(2, 64, 2, dtype=torch.float64)
    labels = torch.tensor([3, 4])
    base = net(gather_inputs(tokens, stage.src_idx), stage_rows(stage), labels, stage=2)
    for patch in range(1, 4):  # tokens of patch p feed the rows of step p (patch p+1)
        bumped = tokens.clone()
        bumped[:, 16 * patch : 16 * (patch + 1)] += 1.0
        out = net(gather_inputs(bumped, stage.src_idx), stage_rows(stage), labels, stage=2)
        for s in range(stage.num_steps):
            sl = stage.step_rows(s)
            same = torch.allclose(out[:, sl], base[:, sl], atol=1e-12)
            assert same == (s < patch), f"step {s} after perturbing patch {patch}"


@pytest.mark.parametrize("name,params", MODULES, ids=IDS)
def test_labels_condition_and_velocity_broadcasts(name, params):
    net = make_module(name, **params)
    stage = nested_schedule(64, 4).stages[0]
    x = gather_inputs(torch.randn(2, 64, 2, dtype=torch.float64), stage.src_idx)
    a = net(x, stage_rows(stage), torch.tensor([0, 0]), stage=0)
    b = net(x, stage_rows(stage), torch.tensor([7, 10]), stage=0)
    assert not torch.allclose(a, b)
    y, t = torch.randn(5, 2, 4, 2, dtype=torch.float64), torch.rand(5, 2, 4, dtype=torch.float64)
    v = net.velocity(y, t, a)
    assert v.shape == y.shape
    torch.testing.assert_close(v[3], net.velocity(y[3], t[3], a))


@pytest.mark.parametrize("name,params", MODULES, ids=IDS)
def test_velocity_heads_keep_patches_apart(name, params):
    net = make_module(name, **params)
    cond = torch.randn(2, 8, 32, dtype=torch.float64)
    y, t = torch.randn(2, 8, 2, dtype=torch.float64), torch.rand(2, 8, dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    base = net.velocity(y, t, cond, groups)
    bumped = y.clone()
    bumped[:, 5] += 1.0
    out = net.velocity(bumped, t, cond, groups)
    assert torch.allclose(out[:, :4], base[:, :4]), "a patch must not see another patch's tokens"
    others = [4, 6, 7]
    joint = not torch.allclose(out[:, others], base[:, others])
    assert joint == (params.get("head") == "joint")


@pytest.mark.parametrize("name", reg.names("generator"))
def test_generator_schedules_are_valid(name):
    cls = reg.get("generator", name)
    sched = cls.build_schedule(cls.Params(), 64)
    sched.validate()
    assert sched.sequential_steps >= 1


def pair(v_fine, v_coarse):
    t = torch.rand(v_fine.shape[:-1])
    return CoordinationPair(fine_stage=1, v_fine=v_fine, v_coarse=v_coarse, y_t=torch.randn_like(v_fine), t=t)


@pytest.mark.parametrize("name", reg.names("coordination_objective"))
def test_coordination_objective_contract(name):
    cls = reg.get("coordination_objective", name)
    obj = cls(cls.Params())
    v_coarse = torch.randn(4, 6, 2)
    if not obj.needs_pairs:
        assert float(obj([])) == 0.0
        return
    assert float(obj([pair(v_coarse.clone(), v_coarse)])) == pytest.approx(0.0, abs=1e-12)
    v_fine = torch.randn(4, 6, 2, requires_grad=True)
    loss = obj([pair(v_fine, v_coarse), pair(v_fine * 2, v_coarse)])
    assert loss.dim() == 0 and float(loss.detach()) > 0
    loss.backward()
    assert v_fine.grad is not None and v_fine.grad.abs().sum() > 0


def test_velocity_matching_is_weighted_mse():
    cls = reg.get("coordination_objective", "velocity_matching")
    obj = cls(cls.Params(weight=0.5))
    a, b = torch.zeros(2, 3, 1), torch.ones(2, 3, 1)
    assert float(obj([pair(a, b), pair(a, 2 * b)])) == pytest.approx(0.5 * (1 + 4))


def test_an_objective_reads_the_step_and_the_data_through_its_input(tiny_raw):
    """A coordination loss that needs the step (a weight ramp) is one plugin file: the training
    pass hands every pair its step, data tokens and labels."""
    from nestar_lab.config.validation import validate_config
    from nestar_lab.interfaces import PassOptions
    from nestar_lab.run.experiment import build_experiment

    tiny_raw["coordination"] = {"name": "velocity_matching_ramp", "params": {"weight": 1.0, "ramp_steps": 10}}
    exp = build_experiment(validate_config(tiny_raw))
    split = exp.dataset.split("train")
    tokens, labels = exp.order.flatten(exp.tokenizer.encode(split.images[:8])), split.labels[:8]
    seen, real = [], type(exp.coordination).__call__

    def spy(self, pairs):
        seen.extend(pairs)
        return real(self, pairs)

    coor = {}
    for step in (0, 4, 50, None):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(type(exp.coordination), "__call__", spy)
            rng = torch.Generator().manual_seed(0)
            out = exp.generator.training_losses(tokens, labels, exp.cfg.flow, exp.coordination, rng, PassOptions(step=step))
        coor[step] = float(out.parts["coor"].detach())
    assert coor[0] * 10 == pytest.approx(coor[50]) and coor[4] * 2 == pytest.approx(coor[50]) == pytest.approx(coor[None])
    p = seen[0]
    assert p.step == 0 and p.x1.shape == p.y_t.shape and p.labels.shape == p.t.shape[:1]
    assert torch.equal(p.labels[:8], labels)  # rows are (draw, image), draw-major
