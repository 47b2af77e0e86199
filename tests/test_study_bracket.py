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


def test_with_workers_the_arms_search_side_by_side_and_choose_what_one_process_chooses(tmp_path, tiny_raw, capsys):
    """Two processes (``python -m nestar_lab.sweep.bracket_search``), one arm each, store the very
    choices a search in this process makes: an arm's search depends on nothing another arm does."""
    from nestar_lab.sweep.bracket_search import search_brackets
    from nestar_lab.sweep.storage import default_storage

    (tmp_path / "serial").mkdir()
    serial_spec = write_study(tmp_path / "serial", tiny_raw)
    serial = search_brackets(serial_spec, open_study(serial_spec), default_storage(serial_spec))
    spec = write_study(tmp_path, tiny_raw)
    storage = default_storage(spec)
    side_by_side = search_brackets(spec, open_study(spec, storage), storage, workers=2)
    assert "2 arms' searches in 2 processes side by side" in capsys.readouterr().err
    assert len(side_by_side) == 2 and not pending(spec, existing_study(spec, None))
    for key, entry in serial.items():
        assert side_by_side[key]["value"] == entry["value"]
        assert dict(map(tuple, side_by_side[key]["scores"])) == pytest.approx(dict(map(tuple, entry["scores"])))


class Ended:
    """A finished search process with a fixed pid."""

    def __init__(self, pid):
        self.pid = pid


def test_search_processes_share_the_arms_and_a_failed_one_is_one_line(tmp_path, tiny_raw, monkeypatch):
    import signal

    from nestar_lab.sweep import bracket_search, workers
    from nestar_lab.sweep.storage import StudyFailed, default_storage

    three = [{"generator.params.k": k} for k in (2, 4, 8)]
    spec = write_study(tmp_path, tiny_raw, space={"generator.params.k": {"choices": [2, 4, 8]}}, arms=three)
    study = open_study(spec)
    started = []

    def processes(codes, stopped=()):
        def run(commands):
            started.append(commands)
            return [Ended(500 + i) for i in range(len(commands))], list(codes), list(stopped)
        return run

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(bracket_search, "run_processes", processes([0, 0]))
    bracket_search.search_brackets(spec, study, "sqlite:///x.db", workers=2)  # nothing stored: fakes
    (commands,) = started
    assert [cmd[-4:] for cmd, _ in commands] == [["nestar_lab.sweep.bracket_search", str(spec.source), "sqlite:///x.db",
                                                  "0,2"], ["nestar_lab.sweep.bracket_search", str(spec.source),
                                                           "sqlite:///x.db", "1"]]  # fmt: skip
    assert [env["OMP_NUM_THREADS"] for _, env in commands] == ["2", "2"]  # 4 cores shared by 2

    monkeypatch.setattr(bracket_search, "run_processes", processes([0, 3]))
    with pytest.raises(StudyFailed) as info:
        bracket_search.search_brackets(spec, study, "sqlite:///x.db", workers=4)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 3
    assert "the search of arm(s) 1 (pid 501) exited with code 3" in message and "re-run the same command" in message
    assert [len(c) for c in started[1:]] == [3]  # one process per arm: no more processes than arms

    monkeypatch.setattr(bracket_search, "run_processes", processes([-15, -15], [signal.SIGTERM]))
    with pytest.raises(StudyFailed) as info:
        bracket_search.search_brackets(spec, study, "sqlite:///x.db", workers=2)
    assert info.value.exit_code == 128 + signal.SIGTERM and "interrupted (SIGTERM)" in str(info.value)

    # one arm to search: this process searches it, no other is started
    monkeypatch.setattr(bracket_search, "run_processes", processes([1]))
    (tmp_path / "one").mkdir()
    one = write_study(tmp_path / "one", tiny_raw, arms=three[1:2])
    started.clear()
    assert len(bracket_search.search_brackets(one, open_study(one), default_storage(one), workers=2)) == 1
    assert not started


def test_the_search_entry_point_reports_bad_input_as_one_line(tmp_path, capsys):
    from nestar_lab.sweep.bracket_search import main as search_main

    assert search_main([str(tmp_path / "missing.yaml"), "sqlite:///x.db", "0"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "missing.yaml" in line


def test_the_cost_line_counts_the_searches_side_by_side(tmp_path, tiny_raw):
    from nestar_lab.sweep.bracket import Bracket
    from nestar_lab.sweep.cost import describe_cost

    spec = write_study(tmp_path, tiny_raw)
    (b,) = spec.bracket
    assert isinstance(b, Bracket)
    steps = tiny_raw["train"]["steps"]
    search = 2 * len(b.grid) * b.steps  # two arms' searches
    alone = describe_cost(spec, 4, 10.0, [b, b], workers=1, search_arms=2)
    assert f"about {(search + 4 * steps) * 10 / 60:.0f} min of training at 10.00 s/step timed here" in alone
    shared = describe_cost(spec, 4, 10.0, [b, b], workers=2, worker_step_s=15.0, search_arms=2)
    minutes = (search + 4 * steps) * 15 / 2 / 60
    assert f"about {minutes:.0f} min of training at 15.00 s/step in each of 2 workers" in shared
    assert "(the searches 2 arms at a time)" in shared
    one_arm = describe_cost(spec, 4, 10.0, [b], workers=2, worker_step_s=15.0, search_arms=1)
    assert "arms at a time" not in one_arm  # one arm: its searches run alone, at this process's step time
