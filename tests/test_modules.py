"""Per-module settings (``modules:``): sizes, solvers and guidance per module, NFE per module,
validation, overrides and ``nestar describe``."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

import nestar_lab.method.sample as sample_module
from nestar_lab.cli import main
from nestar_lab.config.errors import ConfigError
from nestar_lab.config.registry import get_registry
from nestar_lab.config.validation import dump_config, load_config, validate_config
from nestar_lab.method.flow import FlowConfig
from nestar_lab.method.sample import Sampler
from nestar_lab.run.experiment import build_experiment


def with_modules(raw: dict, modules: dict) -> dict:
    raw = copy.deepcopy(raw)
    raw["modules"] = modules
    return raw


def sampler(exp) -> Sampler:
    return Sampler(exp.generator.eval(), exp.tokenizer, exp.order, exp.sampling_plan())


def count(net) -> int:
    return sum(p.numel() for p in net.parameters())


def config_error(raw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    return info.value.lines


def test_a_bigger_first_module_has_more_parameters_in_module_1_only(tiny_raw):
    base = build_experiment(validate_config(tiny_raw)).generator
    modules = {1: {"scale_module": {"params": {"depth": 3, "width": 48}}}}
    big = build_experiment(validate_config(with_modules(tiny_raw, modules))).generator
    assert (big.net(0).params.depth, big.net(0).params.width) == (3, 48)
    assert big.net(0).params.heads == base.net(0).params.heads  # the shared params still apply
    assert count(big.net(0)) > count(base.net(0))
    assert [count(big.net(i)) for i in (1, 2)] == [count(base.net(i)) for i in (1, 2)]
    # modules of different widths train together, coordination included (module 2 on module 1's rows)
    exp = build_experiment(validate_config(with_modules(tiny_raw, modules)))
    tokens, labels = torch.randn(2, 64, 1), torch.tensor([0, 3])
    out = exp.generator.training_losses(tokens, labels, FlowConfig(), exp.coordination, torch.Generator())
    assert "coor" in out.parts and torch.isfinite(out.total)
    out.total.backward()
    assert all(p.grad is not None for p in exp.generator.net(0).parameters() if p.requires_grad)


def test_the_last_modules_solver_changes_its_nfe_only(tiny_raw):
    base = sampler(build_experiment(validate_config(tiny_raw)))(torch.tensor([1, 2])).stats
    assert base.nfe_per_module == [4 * 2, 3 * 2, 3 * 2]  # euler, 2 steps: patches x steps
    modules = {3: {"ode_solver": {"name": "midpoint", "params": {"steps": 4}}}}
    exp = build_experiment(validate_config(with_modules(tiny_raw, modules)))
    assert exp.solvers[0] is exp.solvers[1] is exp.solver and exp.solvers[2].params.steps == 4
    stats = sampler(exp)(torch.tensor([1, 2])).stats
    assert stats.nfe_per_module == [8, 6, 3 * 4 * 2]  # midpoint: 2 evaluations per step
    assert stats.nfe_per_image == sum(stats.nfe_per_module)
    # a name change without params takes the new solver's defaults (midpoint: 16 steps)
    exp = build_experiment(validate_config(with_modules(tiny_raw, {3: {"ode_solver": {"name": "midpoint"}}})))
    assert sampler(exp)(torch.tensor([1])).stats.nfe_per_module == [8, 6, 3 * 16 * 2]
    # params only: merged over the shared solver's
    exp = build_experiment(validate_config(with_modules(tiny_raw, {1: {"ode_solver": {"params": {"steps": 5}}}})))
    assert sampler(exp)(torch.tensor([1])).stats.nfe_per_module == [4 * 5, 6, 6]


def test_per_module_cfg_scale_reaches_the_solve(tiny_raw, monkeypatch):
    tiny_raw["sample"]["cfg_scale"] = 2.0
    calls = []
    solve = sample_module.solve_patch

    def spy(solver, head, cond, shape, **kw):
        calls.append((kw["cfg_scale"], cond.shape[0], shape[0]))
        return solve(solver, head, cond, shape, **kw)

    monkeypatch.setattr(sample_module, "solve_patch", spy)

    def tokens(raw, seed=0):
        exp = build_experiment(validate_config(raw))
        torch.manual_seed(1)
        for p in exp.generator.parameters():  # a non-trivial network: guidance must matter
            torch.nn.init.normal_(p, std=0.2)
        return sampler(exp)(torch.tensor([1, 2]), seed=seed).images

    guided = tokens(tiny_raw)
    calls.clear()
    mixed = tokens(with_modules(tiny_raw, {2: {"cfg_scale": 1.0}, 3: {"cfg_scale": 3.5}}))
    # module 1: 4 patches at 2.0 (cond + uncond rows), module 2: 3 at 1.0 (conditional rows
    # only: the unconditional half is never computed), module 3: 3 at 3.5
    assert calls == [(2.0, 4, 2)] * 4 + [(1.0, 2, 2)] * 3 + [(3.5, 4, 2)] * 3
    assert not torch.allclose(mixed, guided)
    # cfg 1.0 on every module is the conditional velocity: the same as sample.cfg_scale 1.0
    unguided = dict(copy.deepcopy(tiny_raw), sample={**tiny_raw["sample"], "cfg_scale": 1.0})
    per_module = with_modules(tiny_raw, {m: {"cfg_scale": 1.0} for m in (1, 2, 3)})
    torch.testing.assert_close(tokens(per_module), tokens(unguided))


def test_speed_and_evaluation_report_nfe_per_module(tiny_raw):
    from nestar_lab.config.registry import get_registry
    from nestar_lab.interfaces import EvalContext
    from nestar_lab.run.evaluate import make_sampler

    exp = build_experiment(validate_config(with_modules(tiny_raw, {3: {"ode_solver": {"params": {"steps": 1}}}})))
    exp.generator.eval()
    speed_cls = get_registry().get("metric", "speed")
    ctx = EvalContext(exp.dataset, make_sampler(exp), exp.device, cache_dir=None, model=exp.generator)
    row = speed_cls(speed_cls.Params(batch_size=2, repeats=1, warmup=0)).compute(ctx)
    assert (row["nfe_module_1"], row["nfe_module_2"], row["nfe_module_3"]) == (8.0, 6.0, 3.0)
    assert row["nfe_per_image"] == 17.0


@pytest.mark.parametrize(
    "modules,expected",
    [
        ({4: {"cfg_scale": 1.0}}, "modules.4: nestar has 3 modules here (modules.1..3)"),
        ({0: {"cfg_scale": 1.0}}, "modules.0: expected a module number (1 = the first module); got 0"),
        ({"first": {"cfg_scale": 1.0}}, "modules.first: expected a module number"),
        ({1: {"steps": 4}}, "modules.1.steps: got 4; extra inputs are not permitted"),
        ({1: {"ode_solver": {"params": {"rtol": 0.1}}}}, "modules.1.ode_solver.params.rtol: got 0.1; extra inputs"),
        ({3: {"ode_solver": {"name": "nope"}}}, "modules.3.ode_solver.name: "),
        ({2: {"scale_module": {"params": {"heads": 3}}}}, "modules.2.scale_module.params: got"),
        ({2: {"scale_module": {"params": {"depth": 0}}}}, "modules.2.scale_module.params.depth: got 0; input should"),
        ({2: {"cfg_scale": -1.0}}, "modules.2.cfg_scale: got -1.0; input should be greater than or equal to 0"),
        ({2: {"cfg_scale": "2"}}, "modules.2.cfg_scale: got '2'; input should be a valid number"),
    ],
)
def test_bad_module_entries_are_one_line_each(tiny_raw, modules, expected):
    lines = config_error(with_modules(tiny_raw, modules))
    assert len(lines) == 1 and lines[0].startswith(expected), lines


def test_per_module_sizes_need_a_network_per_module(tiny_raw):
    tiny_raw["generator"]["params"]["share_weights"] = True
    lines = config_error(with_modules(tiny_raw, {1: {"scale_module": {"params": {"depth": 2}}}}))
    assert len(lines) == 1
    assert lines[0].startswith("modules.1.scale_module: one network runs all 3 modules (share_weights)")
    validate_config(with_modules(tiny_raw, {1: {"ode_solver": {"params": {"steps": 4}}, "cfg_scale": 1.0}}))  # fine


def test_problems_of_modules_and_shared_parts_are_reported_together_once(tiny_raw):
    tiny_raw["train"]["lr"] = -1
    tiny_raw["ode_solver"]["params"]["steps"] = 0  # the module's merge would repeat this: reported once
    modules = {1: {"ode_solver": {"params": {}}, "scale_module": {"params": {"depth": 0}}}}
    lines = config_error(with_modules(tiny_raw, modules))
    assert sorted(line.split(":")[0] for line in lines) == [
        "modules.1.scale_module.params.depth", "ode_solver.params.steps", "train.lr"
    ]  # fmt: skip


@pytest.mark.parametrize("generator", [{"name": "ar"}, {"name": "dit"}, {"name": "mar", "params": {"steps": 4}}])
def test_baselines_with_one_stage_accept_modules_1_only(tiny_raw, generator):
    tiny_raw["generator"] = generator
    modules = {1: {"scale_module": {"params": {"depth": 2}}, "ode_solver": {"params": {"steps": 3}}, "cfg_scale": 1.5}}
    cfg = validate_config(with_modules(tiny_raw, modules))
    exp = build_experiment(cfg)
    net = exp.generator.nets[0]
    assert len(exp.generator.nets) == 1 and len(net.blocks) == 2
    stats = sampler(exp)(torch.tensor([1])).stats
    assert stats.nfe_per_module == [stats.nfe_per_image] and stats.nfe_per_image % 3 == 0
    lines = config_error(with_modules(tiny_raw, {2: {"cfg_scale": 1.0}}))
    assert lines == [f"modules.2: {generator['name']} has 1 module here (modules.1..1)"]


def test_var_takes_a_solver_per_scale_but_one_size(tiny_raw):
    tiny_raw["generator"] = {"name": "var"}
    modules = {4: {"ode_solver": {"params": {"steps": 5}}, "cfg_scale": 1.0}}
    exp = build_experiment(validate_config(with_modules(tiny_raw, modules)))
    stats = sampler(exp)(torch.tensor([1, 2])).stats
    assert stats.nfe_per_module == [2, 2, 2, 5]  # scales 1, 2, 4, 8
    lines = config_error(with_modules(tiny_raw, {1: {"scale_module": {"params": {"depth": 2}}}}))
    assert lines[0].startswith("modules.1.scale_module: one network runs all 4 modules")


def test_set_reaches_module_entries_through_load_config(tiny_raw, tmp_path):
    path = tmp_path / "cfg.yaml"
    midpoint = {"ode_solver": {"name": "midpoint", "params": {"steps": 2}}}
    path.write_text(yaml.safe_dump(with_modules(tiny_raw, {3: midpoint})))
    cfg = load_config(path, ["modules.3.ode_solver.params.steps=4", "modules.1.scale_module.params.depth=2",
                             "modules.2.cfg_scale=1.5"])  # fmt: skip
    assert cfg.modules[3].ode_solver.name == "midpoint" and cfg.modules[3].ode_solver.params == {"steps": 4}
    assert cfg.modules[1].scale_module.params == {"depth": 2} and cfg.modules[2].cfg_scale == 1.5
    assert cfg.module_part("ode_solver", 2).params == {"steps": 4}
    assert cfg.module_part("ode_solver", 0) == cfg.ode_solver and cfg.module_sample(1).cfg_scale == 1.5
    # another solver by name for module 3 drops midpoint's params and takes rk4's defaults (filled in
    # by validation, as for the shared parts)
    rk4 = load_config(path, ["modules.3.ode_solver.name=rk4"]).module_part("ode_solver", 2)
    assert rk4.name == "rk4" and rk4.params == {"steps": get_registry().get("ode_solver", "rk4").Params().steps}
    # the resolved config (string keys once dumped) reloads to the same modules
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml", ["modules.3.ode_solver.params.steps=6"])
    assert again.modules[1] == cfg.modules[1] and again.modules[3].ode_solver.params == {"steps": 6}


def test_describe_lists_each_modules_size_solver_and_steps(tiny_raw, tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    midpoint = {"ode_solver": {"name": "midpoint", "params": {"steps": 4}}}
    modules = {1: {"scale_module": {"params": {"depth": 3}}}, 3: midpoint}
    path.write_text(yaml.safe_dump(with_modules(tiny_raw, modules)))
    assert main(["describe", str(path), "--set", "modules.2.cfg_scale=1"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.strip().startswith("module ")]
    assert len(rows) == 3
    exp = build_experiment(validate_config(with_modules(tiny_raw, modules)))
    sizes = [f"{count(exp.generator.net(i)):,} parameters" for i in range(3)]
    assert sizes[0] != sizes[1] == sizes[2]
    assert rows[0].strip() == f"module 1: 4 tokens in 4 steps, {sizes[0]}; solver euler (steps 2), cfg 2"
    assert rows[1].strip() == f"module 2: 12 tokens in 3 steps, {sizes[1]}; solver euler (steps 2), cfg 1"
    assert rows[2].strip() == f"module 3: 48 tokens in 3 steps, {sizes[2]}; solver midpoint (steps 4), cfg 2"


def test_results_rows_carry_module_settings_as_columns(tiny_raw):
    from nestar_lab.run.results import flatten_config

    midpoint = {"ode_solver": {"name": "midpoint", "params": {"steps": 4}}, "cfg_scale": 1.0}
    modules = {1: {"scale_module": {"params": {"depth": 3}}}, 3: midpoint}
    flat = flatten_config(validate_config(with_modules(tiny_raw, modules)))
    assert flat["modules.1.scale_module.depth"] == 3 and "modules.1.scale_module" not in flat
    assert flat["modules.3.ode_solver"] == "midpoint" and flat["modules.3.ode_solver.steps"] == 4
    assert flat["modules.3.cfg_scale"] == 1.0
    assert not any(k.startswith("modules.2") for k in flat)


def test_a_joint_head_in_one_module_draws_one_time_per_patch_there_only(tiny_raw):
    """Training times follow each module's head: one per patch where it is joint, one per token
    where it is per-token, whichever modules the joint one is."""
    joint = {1: {"scale_module": {"params": {"head": "joint"}}}, 3: {"scale_module": {"params": {"head": "joint"}}}}
    exp = build_experiment(validate_config(with_modules(tiny_raw, joint)))
    gen = exp.generator
    groups = gen.time_groups(torch.device("cpu"))
    patches = gen.schedule.patch_of_token()
    for i, stage in enumerate(gen.schedule.stages):
        tokens = stage.tgt_idx
        if i in (0, 2):  # joint: the tokens of a patch share a group, and only they
            assert torch.equal(groups[tokens][:, None] == groups[tokens][None, :],
                               patches[tokens][:, None] == patches[tokens][None, :])  # fmt: skip
        else:  # per-token: every token its own group
            assert len(set(groups[tokens].tolist())) == len(tokens)
    stages = gen.schedule.stages
    assert len(stages) == 3  # n = 64, k = 4: modules 1 and 3 joint, module 2 per-token
    joint_patches = set(patches[torch.cat([stages[0].tgt_idx, stages[2].tgt_idx])].tolist())
    assert len(set(groups.tolist())) == len(joint_patches) + len(stages[1].tgt_idx)
    assert build_experiment(validate_config(tiny_raw)).generator.time_groups(torch.device("cpu")) is None
