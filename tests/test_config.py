"""Configs validate completely before any work, with one readable line per problem."""

from __future__ import annotations

import yaml
import pytest

from nestar_lab.cli import main
from nestar_lab.config import ConfigError, apply_overrides, load_config, validate_config


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
