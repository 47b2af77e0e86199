"""A study's report is a typed result, its plots drawn by ``plots.py`` (issue 11)."""

from __future__ import annotations

import dataclasses

import optuna

from nestar_lab.sweep.plots import plot_study
from nestar_lab.sweep.study_report import StudyReport


def test_plot_study_draws_history_importances_and_pareto(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), 1 - t.suggest_float("y", 0, 1)), n_trials=4)
    paths = plot_study(study, ["a", "b"], True, tmp_path)
    assert {p.name for p in paths} == {"history.png", "importances.png", "pareto.png"}  # no run logs: no curves
    assert all(p.is_file() for p in paths)


def test_report_fields_are_typed():
    fields = {f.name: f.type for f in dataclasses.fields(StudyReport)}
    assert list(fields) == ["study", "best", "table", "table_path", "plots", "out_dir", "paired"]
    assert StudyReport.__dataclass_params__.frozen


def test_arms_plot_shows_each_arm_with_intervals_on_both_objectives(tmp_path):
    from nestar_lab.sweep.plots import plot_arms

    cols = ["objective:fid", "objective:sec_per_image"]
    arms = {
        "k=4": {s: {cols[0]: 20.0 + s, cols[1]: 0.010 + 0.001 * s} for s in range(3)},
        "k=2": {s: {cols[0]: 18.0 + s, cols[1]: 0.020 + 0.002 * s} for s in range(3)},
        "k=8": {0: {cols[0]: 25.0, cols[1]: 0.005}},  # one seed: no interval, left out
    }
    path = plot_arms(arms, cols, "k=4", tmp_path / "arms.png")
    assert path == tmp_path / "arms.png" and path.stat().st_size > 0
    assert plot_arms({"k=8": arms["k=8"]}, cols, "k=8", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_grid_edges_say_whether_a_weight_is_bracketed():
    import pandas as pd

    from nestar_lab.sweep.study import StudySpec
    from nestar_lab.sweep.study_report import grid_edges

    spec = StudySpec.model_validate({
        "name": "c", "base": "b.yaml", "objectives": [{"metric": "fid"}], "seeds": [0, 1],
        "space": {"coordination.name": {"choices": ["none", "vm", "dm"]},
                  "coordination.params.weight": {"choices": [0.01, 0.1, 1.0], "if": {"coordination.name": ["vm", "dm"]}}},
    })  # fmt: skip
    rows = [{"state": "COMPLETE", "param:coordination.name": name, "param:coordination.params.weight": w,
             "param:seed": s, "objective:fid": fid + s}
            for name, w, fid in [("vm", 0.01, 30), ("vm", 0.1, 20), ("vm", 1.0, 25),
                                 ("dm", 0.01, 30), ("dm", 0.1, 28), ("dm", 1.0, 22)] for s in (0, 1)]  # fmt: skip
    rows += [{"state": "COMPLETE", "param:coordination.name": "none", "param:seed": s, "objective:fid": 26} for s in (0, 1)]
    text = grid_edges(pd.DataFrame(rows), spec)
    assert "coordination.params.weight (coordination.name=vm): best fid at 0.1 of [0.01, 0.1, 1.0], inside" in text
    assert "coordination.params.weight (coordination.name=dm): best fid at 1 of [0.01, 0.1, 1.0], at the grid's edge" in text
    assert "none" not in text  # an arm without the key is not a point of its grid
    counts = spec.model_copy(update={"space": {"generator.params.k": {"choices": [2, 4, 8]}}})
    rows = [{"state": "COMPLETE", "param:generator.params.k": k, "param:seed": s, "objective:fid": 10 - k} for k in (2, 4, 8)
            for s in (0, 1)]  # fmt: skip
    assert grid_edges(pd.DataFrame(rows), StudySpec.model_validate(counts.model_dump())) is None  # k=8 is no "edge"


def test_a_speed_timed_by_several_processes_says_how_to_time_it_in_one():
    import pandas as pd

    from nestar_lab.sweep.study import StudySpec
    from nestar_lab.sweep.study_report import paired_table, timing_note

    spec = StudySpec.model_validate({
        "name": "k", "base": "b.yaml", "seeds": [0, 1], "output_dir": "runs/studies",
        "objectives": [{"metric": "fid_digits_cnn"}, {"metric": "sec_per_image"}],
        "space": {"generator.params.k": {"choices": [2, 4]}},
        "arms": [{"generator.params.k": 4}, {"generator.params.k": 2}],
    })  # fmt: skip
    rows = [{"state": "COMPLETE", "param:generator.params.k": k, "param:seed": s, "worker": f"vm:{100 + s}",
             "objective:fid_digits_cnn": 3.0 + s, "objective:sec_per_image": 0.004 + 0.001 * k}
            for k in (4, 2) for s in (0, 1)]  # fmt: skip
    table = pd.DataFrame(rows)
    note = timing_note(table, spec)
    assert "sec_per_image were timed inside each trial, by 2 processes" in note
    assert note.endswith("`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_retime.py runs/studies/k"
                         " --by generator.k --reference 4`.")
    assert note in paired_table(table, spec)
    assert timing_note(table.assign(worker="vm:1"), spec) is None  # one process timed them all
    quality_only = spec.model_copy(update={"objectives": spec.objectives[:1]})
    assert timing_note(table, quality_only) is None  # no speed objective


def test_an_arm_reads_the_same_while_trials_wait():
    """A waiting trial's NaN turns the table's k column into floats (4.0): the reference arm k=4
    went missing ("no completed trials of the reference arm") while the study ran."""
    import pandas as pd

    from nestar_lab.sweep.study import StudySpec
    from nestar_lab.sweep.study_report import arm_label, arms_by_seed, paired_table

    spec = StudySpec.model_validate({
        "name": "k", "base": "b.yaml", "seeds": [0, 1], "objectives": [{"metric": "fid"}],
        "space": {"generator.params.k": {"choices": [2, 4]}},
        "arms": [{"generator.params.k": 4}, {"generator.params.k": 2}],
    })  # fmt: skip
    rows = [{"state": "COMPLETE", "param:generator.params.k": k, "param:seed": s, "objective:fid": 3.0 + s + k}
            for k in (4, 2) for s in (0, 1)]  # fmt: skip
    rows.append({"state": "WAITING"})
    table = pd.DataFrame(rows)
    assert table["param:generator.params.k"].dtype == float
    arms, reference = arms_by_seed(table, spec)
    assert reference == "generator.params.k=4" and set(arms) == {"generator.params.k=4", "generator.params.k=2"}
    assert "| generator.params.k=2 | 2 | -2.000 [" in paired_table(table, spec)
    assert arm_label({"w": 0.005, "x": 1.0, "on": True, "name": "none"}) == "w=0.005, x=1, on=True, name=none"
