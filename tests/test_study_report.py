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
