"""A study's ``bracket:``: every arm trains at its own bracketed values (one key, or several in
turn), searched first, kept in the study's storage, stated in the report; a study that cannot
bracket is refused before work."""

from __future__ import annotations

import optuna
import pytest
import yaml

from nestar_lab.cli import main
from nestar_lab.config.errors import ConfigError
from nestar_lab.sweep.bracket import PREFIX, arm_key, load_entries, pending
from nestar_lab.sweep.storage import existing_study, open_study
from nestar_lab.sweep.study import load_study
from nestar_lab.sweep.tuning import run_study

optuna.logging.set_verbosity(optuna.logging.WARNING)

BRACKET = {"key": "train.lr", "grid": [1.0e-3, 4.0e-3], "factor": 4, "cap": 1, "steps": 3, "samples_per_class": 2,
           "seed": 100}  # fmt: skip


WEIGHT = {**BRACKET, "key": "coordination.params.weight", "grid": [0.05, 0.2]}

pytestmark = pytest.mark.usefixtures("one_thread")


def write_study(tmp_path, tiny_raw, **fields):
    tiny_raw = {**tiny_raw, "metrics": [{"name": "class_accuracy", "params": {"epochs": 1}},
                                        {"name": "nearest_train_distance"}]}  # fmt: skip
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_raw))
    spec = {
        "name": "bracketed",
        "base": "base.yaml",
        "output_dir": str(tmp_path / "studies"),
        "space": {"generator.params.k": {"choices": [4, 8]}},
        "arms": [{"generator.params.k": 4}, {"generator.params.k": 8}],
        "objectives": [{"metric": "nn_train_dist_generated", "direction": "minimize"}],
        "sampler": {"name": "random", "params": {"seed": 0}},
        "pruner": {"name": "none"},
        "seeds": [0, 1],
        "bracket": BRACKET,
        **fields,
    }
    path = tmp_path / "bracketed.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_study(path)


def test_each_arm_trains_at_its_own_bracketed_value(tmp_path, tiny_raw, capsys):
    spec = write_study(tmp_path, tiny_raw)
    assert main(["study", "run", str(spec.source), "--dry-run"]) == 0
    assert "first train.lr bracketed per arm: 2 searches x 2+ trials x 3 steps" in capsys.readouterr().out
    assert existing_study(spec, None) is None  # a dry run creates and searches nothing

    assert main(["study", "run", str(spec.source)]) == 0
    study = existing_study(spec, None)
    entries = load_entries(study)
    assert len(entries) == 2 and not pending(spec, study)
    for k in (4, 8):
        entry = entries["train.lr " + arm_key({"generator.params.k": k})]
        tried = [v for v, _ in entry["scores"]]
        assert entry["value"] in tried and set(BRACKET["grid"]) <= set(tried)
        assert len(tried) <= len(BRACKET["grid"]) + 2 * BRACKET["cap"]
        best_score = min(s for _, s in entry["scores"] if s is not None)
        assert dict(entry["scores"])[entry["value"]] == best_score
    # the searches: studies in the same storage, their own seed and budget, only the metric needed
    searches = sorted((spec.study_dir / "brackets").glob("*/study.yaml"))
    assert len(searches) == 2
    names = {s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{spec.study_dir / 'study.db'}")}
    for path in searches:
        search = yaml.safe_load(path.read_text())
        assert search["name"] in names and search["name"].startswith("bracketed.bracket.train.lr-")
        assert search["overrides"]["seed"] == 100 and search["overrides"]["train.steps"] == 3
        assert [m["name"] for m in search["overrides"]["metrics"]] == ["nearest_train_distance"]
    # every seeded trial trained at its arm's chosen value
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4
    for t in done:
        chosen = entries["train.lr " + arm_key({"generator.params.k": t.params["generator.params.k"]})]["value"]
        trained = yaml.safe_load((spec.study_dir / "trials" / t.user_attrs["run_id"] / "config.yaml").read_text())
        assert trained["train"]["lr"] == chosen == t.user_attrs["bracketed:train.lr"]
    capsys.readouterr()
    assert main(["study", "report", str(spec.source)]) == 0
    out = capsys.readouterr().out
    assert "Each arm's train.lr, bracketed by its own search" in out
    assert out.count("- generator.params.k=") >= 2
    # a second run finds the choices stored: no search again
    assert main(["study", "run", str(spec.source)]) == 0
    assert load_entries(existing_study(spec, None)) == entries
    assert "[bracket]" not in capsys.readouterr().err


def test_a_changed_budget_is_searched_again_and_running_without_the_search_is_refused(tmp_path, tiny_raw):
    spec = write_study(tmp_path, tiny_raw)
    entry = {"arm": {"generator.params.k": 4}, "key": "train.lr", "value": 4e-3, "budget": {"old": True}}
    study = open_study(spec)
    study.set_user_attr(PREFIX + "train.lr " + arm_key({"generator.params.k": 4}), entry)
    assert [arm for arm, _ in pending(spec, study)] == [{"generator.params.k": 4}, {"generator.params.k": 8}]
    with pytest.raises(ConfigError) as info:
        run_study(spec)  # the Python API without the searches: one line saying what to run
    assert "prepare=nestar_lab.sweep.bracket_search.search_brackets" in info.value.lines[0]


def test_a_search_whose_training_fails_stops_with_one_line_and_stores_nothing(tmp_path, tiny_raw, capsys, monkeypatch):
    import nestar_lab.run.train as train_module

    spec = write_study(tmp_path, tiny_raw)

    def broken(*args, **kwargs):
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr(train_module, "train", broken)
    assert main(["study", "run", str(spec.source)]) == 1
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "failed" in line and "the disk is on fire" in line
    study = existing_study(spec, None)
    assert not load_entries(study) and pending(spec, study) and not study.trials  # no seeded trial ran


@pytest.mark.parametrize("fields, message", [
    ({"arms": [], "space": {"generator.params.k": {"choices": [4, 8]}}, "seeds": [0, 1]},
     "bracket: needs arms"),
    ({"space": {"generator.params.k": {"choices": [4, 8]}, "train.lr": {"float": [1e-4, 1e-2]}}},
     "bracket.key: train.lr is also set in space"),
    ({"bracket": {**BRACKET, "seed": 1}}, "bracket.seed: 1 is one of the study's seeds"),
    ({"bracket": {**BRACKET, "grid": [4e-3, 1e-3]}}, "bracket.grid: "),
    ({"bracket": {**BRACKET, "grid": [1e-3]}}, "bracket.grid: "),
    ({"bracket": {**BRACKET, "factor": 1}}, "bracket.factor: "),
    ({"bracket": {**BRACKET, "key": "train.no_such_knob"}}, "bracket.train.no_such_knob: not a field of the base config"),
    ({"bracket": {**BRACKET, "key": "train.warmup_steps", "grid": [0.5, 2.0]}}, "bracket.key train.warmup_steps=0.125"),
    ({"bracket": [BRACKET, {**BRACKET, "grid": [2e-3, 8e-3]}]}, "bracket.1.key: train.lr is bracketed twice"),
    ({"bracket": [WEIGHT | {"if": {"coordination.name": ["velocity_matching"]}}, BRACKET]},
     "bracket.0.if: ['coordination.name'] are not in the search space"),
    ({"bracket": [WEIGHT | {"if": {"generator.params.k": [2]}}, BRACKET]},
     "bracket.0.if: {'generator.params.k': [2]} holds for none of the arms"),
])  # fmt: skip
def test_a_study_that_cannot_bracket_is_refused_before_work(fields, message, tmp_path, tiny_raw):
    with pytest.raises(ConfigError) as info:
        write_study(tmp_path, tiny_raw, **fields)
    assert any(message in line for line in info.value.lines), info.value.lines
    assert not (tmp_path / "studies").exists()


def test_several_keys_are_bracketed_in_turn_each_where_it_applies(tmp_path, tiny_raw, capsys):
    """A coordination weight only where an objective is on, then each arm's learning rate at it."""
    on = {"coordination.name": "velocity_matching"}
    off = {"coordination.name": "none"}
    spec = write_study(tmp_path, tiny_raw, space={"coordination.name": {"choices": ["none", "velocity_matching"]}},
                       arms=[off, on], bracket=[WEIGHT | {"if": {"coordination.name": ["velocity_matching"]}}, BRACKET])
    assert main(["study", "run", str(spec.source), "--dry-run"]) == 0
    assert ("first coordination.params.weight bracketed per arm: 1 searches x 2+ trials x 3 steps = 6+ steps; "
            "then train.lr bracketed per arm: 2 searches x 2+ trials x 3 steps" in capsys.readouterr().out)

    assert main(["study", "run", str(spec.source)]) == 0
    study = existing_study(spec, None)
    entries = load_entries(study)
    assert sorted(entries) == sorted(["coordination.params.weight " + arm_key(on), "train.lr " + arm_key(on),
                                      "train.lr " + arm_key(off)])  # no weight searched for `none`
    weight = entries["coordination.params.weight " + arm_key(on)]["value"]
    assert entries["train.lr " + arm_key(on)]["budget"]["before"] == {"coordination.params.weight": weight}
    assert "before" not in entries["train.lr " + arm_key(off)]["budget"]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4
    for t in done:
        arm = {"coordination.name": t.params["coordination.name"]}
        trained = yaml.safe_load((spec.study_dir / "trials" / t.user_attrs["run_id"] / "config.yaml").read_text())
        lr = entries["train.lr " + arm_key(arm)]["value"]
        assert trained["train"]["lr"] == lr == t.user_attrs["bracketed:train.lr"]
        if arm == on:
            trained_weight = trained["coordination"]["params"]["weight"]
            assert trained_weight == weight == t.user_attrs["bracketed:coordination.params.weight"]
        else:
            assert "bracketed:coordination.params.weight" not in t.user_attrs
    capsys.readouterr()
    assert main(["study", "report", str(spec.source)]) == 0
    out = capsys.readouterr().out
    assert "Each arm's coordination.params.weight, bracketed by its own search" in out
    assert "Each arm's train.lr, bracketed by its own search" in out
    assert "with the coordination.params.weight chosen above" in out

    # an earlier choice that changes makes the later one stale: that arm's lr is searched again
    changed = {**entries["coordination.params.weight " + arm_key(on)], "value": weight * 4}
    study.set_user_attr(PREFIX + "coordination.params.weight " + arm_key(on), changed)
    assert [(arm, b.key) for arm, b in pending(spec, study)] == [(on, "train.lr")]
