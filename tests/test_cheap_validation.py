"""Validating a config is cheap (issue 11): no tokenizer is built (its latent shape comes from
its class), and load_config + build_experiment build the tokenizer and the schedule once each."""

from __future__ import annotations

import copy

import pytest
import yaml
from conftest import TINY

from nestar_lab.config.registry import get_registry
from nestar_lab.config.validation import load_config
from nestar_lab.interfaces import Tokenizer
from nestar_lab.method import generator as generator_module
from nestar_lab.run.experiment import build_experiment


@pytest.fixture
def counts(monkeypatch):
    """Constructions of every tokenizer and calls of the tiny generator's ``build_schedule``."""
    seen = {"tokenizer": 0, "schedule": 0}
    init = Tokenizer.__init__

    def counted_init(self, *args, **kwargs):
        seen["tokenizer"] += 1
        init(self, *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "__init__", counted_init)
    gen_cls = get_registry().get("generator", TINY["generator"]["name"])
    build = gen_cls.build_schedule.__func__

    def counted_build(cls, params, num_tokens):
        seen["schedule"] += 1
        return build(cls, params, num_tokens)

    monkeypatch.setattr(gen_cls, "build_schedule", classmethod(counted_build))
    monkeypatch.setattr(generator_module, "_SCHEDULES", {})  # nothing left from other tests
    return seen


def _write(tmp_path, raw):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_load_config_builds_no_tokenizer_and_build_experiment_builds_each_part_once(tmp_path, counts):
    cfg = load_config(_write(tmp_path, copy.deepcopy(TINY)))
    assert counts == {"tokenizer": 0, "schedule": 1}
    exp = build_experiment(cfg)
    assert counts == {"tokenizer": 1, "schedule": 1}
    assert exp.generator.schedule is generator_module.Generator.schedule_for.__func__(
        type(exp.generator), exp.generator.params, exp.order.num_tokens)  # fmt: skip


def test_a_bad_patch_size_is_reported_without_building_the_tokenizer(tmp_path, counts):
    from nestar_lab.config.errors import ConfigError

    raw = copy.deepcopy(TINY)
    raw["tokenizer"]["params"]["patch_size"] = 3
    with pytest.raises(ConfigError, match="patch_size 3 does not divide"):
        load_config(_write(tmp_path, raw))
    assert counts["tokenizer"] == 0


def test_vae_latent_shape_comes_from_params_alone(tmp_path):
    """KL-16's latent shape needs neither its weights (here missing) nor its network."""
    kl16 = get_registry().get("tokenizer", "kl16")
    params = kl16.Params(weights=str(tmp_path / "missing.ckpt"))
    assert kl16.latent_shape_for(params, (3, 256, 256)) == (16, 16, 16)
    with pytest.raises(ValueError, match="downsampling factor 16"):
        kl16.latent_shape_for(params, (3, 200, 200))


def test_plugins_receive_the_params_objects_validation_made(tmp_path, monkeypatch):
    """``validate_config`` validates each part's params once; ``build_experiment`` hands those very
    objects to the plugins (shared parts and ``modules:`` parts alike) and validates nothing again."""
    from pydantic import BaseModel

    raw = copy.deepcopy(TINY)
    raw["modules"] = {1: {"ode_solver": {"params": {"steps": 3}}, "scale_module": {"params": {"depth": 2}}}}
    cfg = load_config(_write(tmp_path, raw))
    validations = []
    original = BaseModel.model_validate.__func__

    def counted(cls, *args, **kwargs):
        validations.append(cls.__qualname__)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(BaseModel, "model_validate", classmethod(counted))
    exp = build_experiment(cfg)
    plugin_params = [v for v in validations if v.endswith(".Params")]
    assert plugin_params == [], plugin_params
    registry = get_registry()
    assert exp.solver.params is cfg.ode_solver.params_for(registry.get("ode_solver", cfg.ode_solver.name))
    assert exp.coordination.params is cfg.coordination.params_for(type(exp.coordination))
    assert exp.generator.params is cfg.generator.params_for(type(exp.generator))
    first = cfg.module_part("ode_solver", 0)
    assert exp.solvers[0].params is first.params_for(type(exp.solvers[0])) and exp.solvers[0].params.steps == 3
    assert exp.solvers[-1].params is exp.solver.params
    nets = exp.generator.nets
    if len(nets) > 1:  # one network per module: module 1's is its own size
        assert nets[0].params is cfg.module_part("scale_module", 0).params_for(type(nets[0]))
        assert nets[0].params.depth == 2 and nets[1].params is cfg.scale_module.params_for(type(nets[1]))


def test_specs_compare_by_name_and_params_only():
    """The validated object is not part of a spec's identity: a validated spec equals the same spec
    read from a dumped config, and dumps only ``name`` and ``params``."""
    from nestar_lab.config.schema import ComponentSpec
    from nestar_lab.config.validation import validate_config

    cfg = validate_config(copy.deepcopy(TINY))
    again = ComponentSpec(name=cfg.ode_solver.name, params=dict(cfg.ode_solver.params))
    assert cfg.ode_solver == again and again == cfg.ode_solver
    assert cfg.ode_solver.model_dump() == {"name": cfg.ode_solver.name, "params": cfg.ode_solver.params}
    assert validate_config(cfg.model_dump(mode="json")) == cfg


def test_a_spec_copied_or_changed_after_validation_gets_its_own_params():
    """The object validation made is used only while ``params`` still says the same: a copy with
    other params (``model_copy(update=...)``) or a module entry changed afterwards is validated anew."""
    from nestar_lab.config.parts import make
    from nestar_lab.config.validation import validate_config

    raw = copy.deepcopy(TINY)
    raw["modules"] = {3: {"ode_solver": {"params": {"steps": 5}}}}
    cfg = validate_config(raw)
    assert make("ode_solver", cfg.ode_solver).params.steps == 2
    changed = cfg.ode_solver.model_copy(update={"params": {**cfg.ode_solver.params, "steps": 7}})
    assert make("ode_solver", changed).params.steps == 7
    assert make("ode_solver", cfg.module_part("ode_solver", 2)).params.steps == 5
    entry = cfg.modules[3].model_copy(deep=True)
    entry.ode_solver = entry.ode_solver.model_copy(update={"params": {"steps": 9}})
    assert make("ode_solver", entry.ode_solver.over(cfg.ode_solver)).params.steps == 9
    cfg.modules[3].ode_solver.params["steps"] = 11  # changed in place
    assert make("ode_solver", cfg.module_part("ode_solver", 2)).params.steps == 11
