"""Configs validate completely before any work, with one readable line per problem."""

from __future__ import annotations

import math

import pytest
import yaml
from pydantic import ValidationError

from nestar_lab.cli import main
from nestar_lab.config.errors import ConfigError
from nestar_lab.config.overrides import apply_overrides, read_yaml
from nestar_lab.config.registry import get_registry
from nestar_lab.config.schema import TrainConfig
from nestar_lab.config.validation import load_config, validate_config


def errors_of(raw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    return info.value.lines


def test_quickstart_config_validates_and_fills_defaults():
    cfg = load_config("studies/configs/quickstart.yaml")
    assert cfg.generator.params == {"k": 4, "share_weights": False}
    assert "steps" in cfg.ode_solver.params


def test_unknown_top_level_key(tiny_raw):
    tiny_raw["trian"] = {}
    (line,) = errors_of(tiny_raw)
    assert line.startswith("trian:") and "extra" in line.lower()


def test_bad_plugin_param_names_path_value_and_expectation(tiny_raw):
    tiny_raw["generator"]["params"]["k"] = "four"
    tiny_raw["ode_solver"]["params"]["stepz"] = 3
    lines = errors_of(tiny_raw)
    assert any(l.startswith("generator.params.k: got 'four'") and "integer" in l for l in lines)
    assert any(l.startswith("ode_solver.params.stepz:") for l in lines)


def test_unknown_plugin_lists_names(tiny_raw):
    tiny_raw["ode_solver"] = {"name": "rk45"}
    (line,) = errors_of(tiny_raw)
    assert line.startswith("ode_solver.name:") and "dopri5" in line


def test_token_count_must_be_power_of_k(tiny_raw):
    tiny_raw["generator"]["params"]["k"] = 3
    (line,) = errors_of(tiny_raw)
    assert line.startswith("generator.params:") and "n=64" in line and "k=3" in line


def test_range_checked(tiny_raw):
    tiny_raw["train"]["lr"] = -1
    (line,) = errors_of(tiny_raw)
    assert line.startswith("train.lr: got -1") and "greater than 0" in line


def test_overrides_parse_yaml_values():
    raw = apply_overrides({"generator": {"params": {}}}, ["generator.params.k=8", "train.lr=3e-4", "name=x"])
    assert raw == {"generator": {"params": {"k": 8}}, "train": {"lr": 3e-4}, "name": "x"}


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["generator.params.k"])


def test_cli_bad_config_exits_2_without_traceback(tmp_path, tiny_raw, capsys):
    path = tmp_path / "bad.yaml"
    tiny_raw["generator"]["params"]["k"] = 5
    path.write_text(yaml.safe_dump(tiny_raw))
    assert main(["train", str(path), "--set", "train.steps=0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "config error: train.steps: got 0" in err
    assert not (tmp_path / "runs").exists(), "no work may start on a bad config"


def test_cli_missing_file(capsys):
    assert main(["train", "no/such.yaml"]) == 2
    assert "no/such.yaml: no such config file" in capsys.readouterr().err


def test_every_part_and_layer_reported_in_one_pass(tiny_raw):
    tiny_raw["train"]["lr"] = float("inf")
    tiny_raw["train"]["steps"] = True
    tiny_raw["generator"]["params"]["k"] = "four"
    tiny_raw["metrics"][0]["params"]["epochs"] = 1.5
    lines = errors_of(tiny_raw)
    assert [line.split(":")[0] for line in lines] == ["train.lr", "train.steps", "generator.params.k", "metrics.0.params.epochs"]
    assert lines[0] == "train.lr: got inf; must be a finite number"


def test_a_non_finite_plugin_param_is_one_line(tiny_raw):
    tiny_raw["scale_module"]["params"]["mlp_ratio"] = float("nan")
    assert errors_of(tiny_raw) == ["scale_module.params.mlp_ratio: got nan; must be a finite number"]


def test_strict_types(tiny_raw):
    tiny_raw["train"].update(lr=1, batch_size="32")  # an int fills a float; a string is no number
    tiny_raw["data"] = {"hflip": 1}
    lines = errors_of(tiny_raw)
    assert [line.split(":")[0] for line in lines] == ["train.batch_size", "data.hflip"]
    del tiny_raw["train"]["batch_size"], tiny_raw["data"]
    cfg = validate_config(tiny_raw)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


def test_lists_still_fill_tuples(tiny_raw):
    tiny_raw["train"]["betas"] = [0.8, 0.9]
    assert validate_config(tiny_raw).train.betas == (0.8, 0.9)


def test_core_models_refuse_inf_in_python_too():
    with pytest.raises(ValidationError):
        TrainConfig(lr=math.inf)


def test_yaml_floats_are_yaml_1_2(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {lr: 3e-4, weight_decay: 1.0e-2, steps: 10}\nname: 1e3x\n")
    raw = read_yaml(path)
    assert raw == {"train": {"lr": 3e-4, "weight_decay": 1e-2, "steps": 10}, "name": "1e3x"}


def test_overrides_index_lists():
    raw = {"metrics": [{"name": "a"}, {"name": "b", "params": {}}]}
    apply_overrides(raw, ["metrics.1.params.epochs=3"])
    assert raw["metrics"][1]["params"] == {"epochs": 3}
    with pytest.raises(ConfigError, match="metrics.2: the list has 2 items"):
        apply_overrides(raw, ["metrics.2.name=c"])


def test_default_params_of_every_plugin_pass_the_strict_check():
    from nestar_lab.config.validation import strict_validate

    checked = 0
    for info in get_registry().all():
        try:
            params = info.cls.Params()
        except ValidationError:
            continue  # has required fields (e.g. a weights path)
        errors = []
        again = strict_validate(info.cls.Params, params.model_dump(mode="json"), info.name, errors)
        assert errors == [] and again == params, (info.kind, info.name, errors)
        checked += 1
    assert checked > 20
