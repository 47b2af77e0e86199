"""The one override mechanism (``config.apply_overrides``) shared by ``--set``, studies and benchmarks."""

from __future__ import annotations

import copy

import pytest
import yaml

from nestar_lab.config.errors import ConfigError
from nestar_lab.config.overrides import apply_overrides, read_yaml
from nestar_lab.config.registry import get_registry
from nestar_lab.config.validation import dump_config, load_config, validate_config
from nestar_lab.sweep.study import apply_dotted

QUICKSTART = "studies/configs/quickstart.yaml"


def base() -> dict:
    return {
        "name": "x",
        "ode_solver": {"name": "dopri5", "params": {"rtol": 1e-3, "atol": 1e-4}},
        "coordination": {"name": "velocity_matching", "params": {"weight": 0.1}},
        "metrics": [{"name": "speed", "params": {"repeats": 3}}, {"name": "fidelity", "params": {"extractor": "x"}}],
        "modules": {3: {"ode_solver": {"name": "rk4", "params": {"steps": 4}}}},
    }


def test_a_new_name_drops_the_previous_plugins_params():
    raw = apply_overrides(base(), ["ode_solver.name=euler", "coordination.name=none", "metrics.1.name=speed"])
    assert raw["ode_solver"] == {"name": "euler"} and raw["coordination"] == {"name": "none"}
    assert raw["metrics"][1] == {"name": "speed"} and raw["metrics"][0]["params"] == {"repeats": 3}


@pytest.mark.parametrize("order", [1, -1])
def test_params_given_in_the_same_call_are_kept_in_any_order(order):
    overrides = ["ode_solver.name=rk4", "ode_solver.params.steps=4"][::order]
    assert apply_overrides(base(), overrides)["ode_solver"] == {"name": "rk4", "params": {"steps": 4}}
    overrides = {"ode_solver.params": {"steps": 2}, "ode_solver.name": "euler"}
    assert apply_overrides(base(), overrides)["ode_solver"] == {"name": "euler", "params": {"steps": 2}}


def test_same_name_keeps_params_and_a_later_call_is_a_new_call():
    raw = apply_overrides(base(), ["ode_solver.name=dopri5"])
    assert raw["ode_solver"]["params"] == {"rtol": 1e-3, "atol": 1e-4}
    apply_overrides(raw, ["ode_solver.params.steps=8"])
    apply_overrides(raw, ["ode_solver.name=rk4"])  # params of an earlier call belong to dopri5
    assert raw["ode_solver"] == {"name": "rk4"}


def test_the_default_plugin_counts_as_the_previous_name():
    raw = {"ode_solver": {"params": {"steps": 8}}}  # the default solver is euler
    assert apply_overrides(copy.deepcopy(raw), ["ode_solver.name=euler"])["ode_solver"]["params"] == {"steps": 8}
    assert "params" not in apply_overrides(copy.deepcopy(raw), ["ode_solver.name=rk4"])["ode_solver"]


def test_module_parts_follow_the_same_rule():
    raw = apply_overrides(base(), ["modules.3.ode_solver.name=midpoint"])
    assert raw["modules"] == {3: {"ode_solver": {"name": "midpoint"}}}  # the YAML key 3, not "3"
    raw = apply_overrides(base(), ["modules.3.ode_solver.params.steps=2", "modules.1.scale_module.params.depth=8"])
    assert raw["modules"][3]["ode_solver"] == {"name": "rk4", "params": {"steps": 2}}
    assert raw["modules"][1] == {"scale_module": {"params": {"depth": 8}}}
    raw = {"ode_solver": {"name": "rk4"}, "modules": {2: {"ode_solver": {"params": {"steps": 3}}}}}
    assert apply_overrides(raw, ["modules.2.ode_solver.name=rk4"])["modules"][2]["ode_solver"]["params"] == {"steps": 3}


def test_a_mapping_replaces_never_merges():
    raw = apply_overrides(base(), ["ode_solver.params={rtol: 1e-2}"])
    assert raw["ode_solver"] == {"name": "dopri5", "params": {"rtol": 1e-2}}
    raw = apply_overrides(base(), ["ode_solver={name: rk4, params: {steps: 4}}", "metrics.0={name: class_accuracy}"])
    assert raw["ode_solver"] == {"name": "rk4", "params": {"steps": 4}}
    assert raw["metrics"][0] == {"name": "class_accuracy"}


def test_values_are_yaml_1_2_and_dict_values_are_used_as_given():
    raw = apply_overrides({}, ["train.lr=3e-4", "tokenizer.params.weights=null", "a.b=[1, 2]", "c='4'", "d=1.0e5"])
    assert raw == {"train": {"lr": 3e-4}, "tokenizer": {"params": {"weights": None}}, "a": {"b": [1, 2]}, "c": "4", "d": 1e5}
    assert apply_overrides({}, {"a.b": "3e-4"}) == {"a": {"b": "3e-4"}}  # a study's value is not re-parsed


@pytest.mark.parametrize(
    "override, message",
    [
        ("generator.params.k", "--set generator.params.k: expected KEY=VALUE"),
        ("generator..k=4", "--set generator..k=4: empty part in 'generator..k'"),
        ("metrics.2.name=c", "--set metrics.2.name=c: metrics.2: the list has 2 items (indices 0..1)"),
        ("metrics.x.name=c", "--set metrics.x.name=c: metrics.x: the list has 2 items (indices 0..1)"),
        ("metrics.-1.name=c", "--set metrics.-1.name=c: metrics.-1: the list has 2 items (indices 0..1)"),
        ("name.first=a", "--set name.first=a: name is 'x', not a mapping or a list"),
        ("coordination.params.weight.x=1", "--set coordination.params.weight.x=1: coordination.params.weight is 0.1"),
        ("ode_solver.params={rtol: 1", "--set ode_solver.params={rtol: 1: the value is not valid YAML"),
        ("a.b\nc", "--set 'a.b\\nc': expected KEY=VALUE"),
    ],
)
def test_a_bad_override_is_one_line_naming_it_and_changes_nothing(override, message):
    raw = base()
    with pytest.raises(ConfigError) as info:
        apply_overrides(raw, ["ode_solver.name=euler", override])
    (line,) = info.value.lines
    assert line.startswith(message) and "\n" not in line
    assert raw == base()


def test_studies_use_the_same_mechanism():
    """``study.apply_dotted`` (trial overrides) is ``apply_overrides`` on a mapping."""
    overrides = {"ode_solver.params.steps": 2, "ode_solver.name": "euler"}
    assert apply_dotted(base(), overrides) == apply_overrides(base(), overrides)
    with pytest.raises(ConfigError, match=r"^override metrics\.5\.name: metrics\.5: the list has 2 items"):
        apply_dotted(base(), {"metrics.5.name": "speed"})
    with pytest.raises(ConfigError, match="the list is empty"):
        apply_overrides({"metrics": []}, ["metrics.0.name=speed"])


def test_readme_swaps_validate():
    """README, "Swapping a part": the quickstart's velocity_matching weight and euler steps go with the old plugin."""
    assert load_config(QUICKSTART, ["coordination.name=none"]).coordination.params == {}
    cfg = load_config(QUICKSTART, ["ode_solver.name=dopri5"])
    assert cfg.ode_solver.name == "dopri5" and "steps" not in cfg.ode_solver.params
    cfg = load_config(QUICKSTART, ["ode_solver.name=dopri5", "ode_solver.params={rtol: 1e-3, atol: 1e-4}"])
    assert (cfg.ode_solver.params["rtol"], cfg.ode_solver.params["atol"]) == (1e-3, 1e-4)


def test_a_run_dirs_resolved_config_swaps_too(tmp_path):
    """``nestar eval RUN_DIR --set ode_solver.name=...`` starts from a config with every default filled."""
    dump_config(load_config(QUICKSTART, ["ode_solver.params.steps=7"]), tmp_path / "config.yaml")
    for overrides in (["ode_solver.name=dopri5"], ["coordination.name=data_matching"], ["metrics.4.name=class_accuracy"]):
        validate_config(apply_overrides(read_yaml(tmp_path / "config.yaml"), overrides))
    cfg = validate_config(apply_overrides(read_yaml(tmp_path / "config.yaml"), ["ode_solver.name=rk4"]))
    assert cfg.ode_solver.params == get_registry().get("ode_solver", "rk4").Params().model_dump(mode="json")  # not euler's 7 steps


def test_cli_set_with_a_bad_index_exits_2_with_one_line(capsys):
    from nestar_lab.cli import main

    assert main(["describe", QUICKSTART, "--set", "metrics.9.params.epochs=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["config error: --set metrics.9.params.epochs=1: metrics.9: the list has 5 items (indices 0..4)"]


def test_yaml_file_and_set_agree(tmp_path):
    path = tmp_path / "c.yaml"
    raw = read_yaml(QUICKSTART)
    raw["ode_solver"] = {"name": "rk4", "params": {"steps": 4}}
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path) == load_config(QUICKSTART, ["ode_solver.name=rk4", "ode_solver.params.steps=4"])
