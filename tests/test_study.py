"""Optuna studies: trials are runs, invalid configs are pruned, failures recorded, workers share."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import optuna
import pytest
import yaml

from nestar_lab.cli import main
from nestar_lab.study import load_study
from nestar_lab.tuning import Objective, open_study, run_study

optuna.logging.set_verbosity(optuna.logging.WARNING)


def write_study(tmp_path, tiny_raw, **fields):
    tiny_raw = {**tiny_raw, "metrics": [{"name": "nearest_train_distance"}]}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_raw))
    spec = {
        "name": "tiny_study",
        "base": "base.yaml",
        "output_dir": str(tmp_path / "studies"),
        "space": {"generator.params.k": {"choices": [2, 4, 8]}},
        "objectives": [{"metric": "nn_train_dist_generated", "direction": "minimize"}],
        "sampler": {"name": "random", "params": {"seed": 0}},
        "pruner": {"name": "none"},
        **fields,
    }
    path = tmp_path / "tiny_study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_study(path)


def states(study):
    return [t.state for t in study.get_trials(deepcopy=False)]


def test_three_trials_complete_and_each_is_a_run(tmp_path, tiny_raw):
    spec = write_study(tmp_path, tiny_raw)
    study = run_study(spec, trials=3)
    assert states(study) == [optuna.trial.TrialState.COMPLETE] * 3
    for t in study.trials:
        run = spec.study_dir / "trials" / t.user_attrs["run_id"]
        assert (run / "metrics.json").is_file() and (run / "checkpoint.pt").is_file()
    from nestar_lab import results

    assert len(results.load(spec.study_dir)) == 3
    assert main(["study", "report", str(spec.source)]) == 0
    assert (spec.study_dir / "report" / "trials.csv").is_file()
    assert (spec.study_dir / "report" / "disagreement.png").is_file()  # disagree_m logged per trial
    # running again continues the same study instead of starting over
    assert len(run_study(spec, trials=4).trials) == 4


def test_invalid_combination_is_pruned_with_its_reason(tmp_path, tiny_raw):
    spec = write_study(tmp_path, tiny_raw, space={"generator.params.k": {"choices": [3]}})
    study = run_study(spec, trials=1)
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert "n=64, k=3" in trial.user_attrs["invalid"]


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path, tiny_raw, monkeypatch):
    import nestar_lab.evaluate as evaluate_module

    real = evaluate_module.evaluate
    calls = {"n": 0}

    def flaky(exp, run_dir, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("disk full")
        return real(exp, run_dir, **kw)

    monkeypatch.setattr(evaluate_module, "evaluate", flaky)
    study = run_study(write_study(tmp_path, tiny_raw), trials=3)
    assert states(study).count(optuna.trial.TrialState.FAIL) == 1
    assert states(study).count(optuna.trial.TrialState.COMPLETE) == 2
    failed = next(t for t in study.trials if t.state == optuna.trial.TrialState.FAIL)
    assert failed.user_attrs["error"] == "RuntimeError: disk full"


def test_pruner_stops_a_trial_with_a_bad_intermediate_value(tmp_path, tiny_raw, monkeypatch):
    spec = write_study(
        tmp_path, tiny_raw, report_every=2,
        pruner={"name": "median", "params": {"n_startup_trials": 1, "n_warmup_steps": 0}},
    )  # fmt: skip
    study = open_study(spec)
    good = study.ask()
    good.report(1.0, 2)
    study.tell(good, 1.0)
    import nestar_lab.train as train_module

    monkeypatch.setattr(train_module, "validation_loss", lambda exp: 100.0)
    bad = study.ask()
    with pytest.raises(optuna.TrialPruned, match="pruned at step 2"):
        Objective(spec)._reporter(bad)(2, None)


def _worker(spec, trials, env=None):
    cmd = [sys.executable, "-m", "nestar_lab.cli", "study", "run", str(spec.source), "--trials", str(trials)]
    return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_two_workers_share_one_storage(tmp_path, tiny_raw):
    spec = write_study(tmp_path, tiny_raw)
    open_study(spec)  # create it first, as `--workers` does
    procs = [_worker(spec, 4) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    study = open_study(spec)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) == 4
    failures = [(t.number, t.state.name, t.user_attrs) for t in study.trials if t.state != optuna.trial.TrialState.COMPLETE]
    assert not failures
    from nestar_lab import results

    assert len(results.load(spec.study_dir)) == 4  # concurrent appends lose no row


def test_a_killed_workers_study_resumes(tmp_path, tiny_raw):
    tiny_raw["train"]["steps"] = 400  # long enough to be killed mid-trial
    spec = write_study(tmp_path, tiny_raw)
    proc = _worker(spec, 2, env={"NESTAR_HEARTBEAT_S": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not list((spec.study_dir / "trials").glob("*/checkpoint.pt")):
        time.sleep(0.5)
    proc.kill()
    proc.wait()
    tiny_raw["train"]["steps"] = 6  # the remaining trials may be quick
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**tiny_raw, "metrics": [{"name": "nearest_train_distance"}]}))
    time.sleep(3)  # past the heartbeat grace period: the trial is stale
    os.environ["NESTAR_HEARTBEAT_S"] = "1"
    try:
        import importlib

        import nestar_lab.tuning as tuning

        importlib.reload(tuning)
        study = tuning.run_study(spec, trials=3)
    finally:
        del os.environ["NESTAR_HEARTBEAT_S"]
        importlib.reload(tuning)
    finished = [s for s in states(study) if s == optuna.trial.TrialState.COMPLETE]
    assert len(finished) >= 2
    assert optuna.trial.TrialState.RUNNING not in states(study)
