"""Optuna studies: trials are runs, invalid configs refused or failed, failures recorded, workers share.
Recovery from killed workers on every storage: test_study_recovery.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from nestar_lab.cli import main
from nestar_lab.config.errors import ConfigError
from nestar_lab.sweep import workers
from nestar_lab.sweep.storage import StudyFailed, open_study, tally
from nestar_lab.sweep.study import load_study
from nestar_lab.sweep.study_report import trials_table
from nestar_lab.sweep.tuning import Objective, run_study

optuna.logging.set_verbosity(optuna.logging.WARNING)


pytestmark = pytest.mark.usefixtures("one_thread")


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
    from nestar_lab.run import results

    assert len(results.load(spec.study_dir)) == 3
    assert main(["study", "report", str(spec.source)]) == 0
    assert (spec.study_dir / "report" / "trials.csv").is_file()
    assert (spec.study_dir / "report" / "disagreement.png").is_file()  # disagree_m logged per trial
    # running again continues the same study instead of starting over
    assert len(run_study(spec, trials=4).trials) == 4


def test_a_dry_run_prints_what_is_left_and_creates_nothing(tmp_path, tiny_raw, capsys):
    spec = write_study(tmp_path, tiny_raw)
    assert main(["study", "run", str(spec.source), "--trials", "3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    steps = tiny_raw["train"]["steps"]
    assert f"study tiny_study: 3 trials to run x {steps} training steps = {3 * steps} steps; about" in out
    assert "s/step timed here" in out and not spec.study_dir.exists()  # no database, no trial
    run_study(spec, trials=1)
    assert main(["study", "run", str(spec.source), "--trials", "3", "--dry-run"]) == 0
    assert "2 trials to run" in capsys.readouterr().out and len(results_of(spec)) == 1
    journal = tmp_path / "j.log"  # another storage without the study yet: 3 left, no file made
    assert main(["study", "run", str(spec.source), "--trials", "3", "--dry-run", "--storage", f"journal:{journal}"]) == 0
    assert "3 trials to run" in capsys.readouterr().out and not journal.exists()
    # with workers the trials share out, each worker timed with its own share of the threads
    assert main(["study", "run", str(spec.source), "--trials", "3", "--dry-run", "--workers", "2"]) == 0
    assert "s/step in each of 2 workers timed here" in capsys.readouterr().out


def test_a_worker_prints_no_estimate_or_summary_of_its_own(tmp_path, tiny_raw, capsys, monkeypatch):
    """The parent of ``--workers`` prints the study's estimate and its summary: a worker times no
    step and prints neither (they were printed once per process)."""
    spec = write_study(tmp_path, tiny_raw)
    run_study(spec, trials=1)
    monkeypatch.setenv("NESTAR_STUDY_WORKER", "1")
    capsys.readouterr()
    assert main(["study", "run", str(spec.source), "--trials", "1"]) == 0  # nothing left: ends at once
    out, err = capsys.readouterr()
    assert "trials to run" not in err and "report: nestar study report" not in out
    monkeypatch.delenv("NESTAR_STUDY_WORKER")
    assert main(["study", "run", str(spec.source), "--trials", "1"]) == 0
    out, err = capsys.readouterr()
    assert "0 trials to run" in err and "report: nestar study report" in out


def test_a_cost_estimate_shares_the_trials_out_over_the_workers(tmp_path, tiny_raw):
    from nestar_lab.sweep.cost import describe_cost

    spec = write_study(tmp_path, tiny_raw)
    steps = tiny_raw["train"]["steps"]
    alone = describe_cost(spec, 4, 100.0)
    shared = describe_cost(spec, 4, 100.0, workers=2, worker_step_s=150.0)
    assert f"about {4 * steps * 100 / 60:.0f} min of training at 100.00 s/step timed here" in alone
    assert f"about {4 * steps * 150 / 2 / 60:.0f} min of training at 150.00 s/step in each of 2 workers" in shared
    assert "1 workers" not in describe_cost(spec, 1, 100.0, workers=2, worker_step_s=150.0)  # one trial: one worker


def results_of(spec):
    from nestar_lab.run import results

    return results.load(spec.study_dir)


def test_every_value_and_arm_is_checked_before_any_trial(tmp_path, tiny_raw):
    space = {
        "generator.params.k": {"choices": [2, 3, 8]},  # 3: 64 tokens are no power of 3
        "train.lr": {"float": [-1.0, 1e-3]},  # the lower bound is no learning rate
        "tokenizer.params.patch_size": {"int": [1, 2]},
    }
    arms = [{"generator.params.k": 2, "train.lr": 1e-3, "tokenizer.params.patch_size": 1},
            {"generator.params.k": 8, "train.lr": 1e-3, "tokenizer.params.patch_size": 2}]  # 16 tokens, k=8
    with pytest.raises(ConfigError) as err:
        write_study(tmp_path, tiny_raw, space=space, arms=arms)
    lines = err.value.lines
    assert len(lines) == 3, lines
    assert "space.generator.params.k=3: generator.params: NestAR needs n = k^M tokens; got n=64, k=3" in lines[0]
    assert "space.train.lr=-1.0: train.lr: got -1.0; input should be greater than 0" in lines[1]
    assert ": arms {" in lines[2] and "'generator.params.k': 8" in lines[2] and "got n=16, k=8" in lines[2]
    assert not (tmp_path / "studies").exists()  # nothing made


def test_an_invalid_combination_fails_counts_and_exits_2(tmp_path, tiny_raw, capsys):
    space = {"generator.params.k": {"choices": [4, 8]}, "tokenizer.params.patch_size": {"choices": [1, 2]}}
    spec = write_study(tmp_path, tiny_raw, space=space)  # each value is valid alone; k=8 with 16 tokens is not
    open_study(spec).enqueue_trial({"generator.params.k": 8, "tokenizer.params.patch_size": 2})
    assert main(["study", "run", str(spec.source), "--trials", "1"]) == 2
    (trial,) = open_study(spec).trials
    assert trial.state == optuna.trial.TrialState.FAIL  # not PRUNED: it is the study file's mistake
    assert "n=16, k=8" in trial.user_attrs["invalid"]
    assert tally(open_study(spec))["finished"] == 1  # it counts toward --trials: a retry fails the same way
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("study tiny_study: 1 trials to run x 6 training steps = 6 steps; about "), err
    assert "s/step timed here" in err[0]  # the cost, before the first trial
    assert err[-1].startswith("error: 1 trial(s) proposed an invalid config, first trial 0:"), err


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path, tiny_raw, monkeypatch):
    import nestar_lab.run.evaluate as evaluate_module

    real = evaluate_module.evaluate
    calls = {"n": 0}

    def flaky(exp, run_dir, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("disk full")
        return real(exp, run_dir, **kw)

    monkeypatch.setattr(evaluate_module, "evaluate", flaky)
    study = run_study(write_study(tmp_path, tiny_raw), trials=3)
    # a failed trial is an attempt; --trials counts finished (COMPLETE or PRUNED) trials
    assert states(study).count(optuna.trial.TrialState.FAIL) == 1
    assert states(study).count(optuna.trial.TrialState.COMPLETE) == 3
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
    import nestar_lab.run.train as train_module

    monkeypatch.setattr(train_module, "validation_loss", lambda exp: 100.0)
    bad = study.ask()
    with pytest.raises(optuna.TrialPruned, match="pruned at step 2"):
        Objective(spec)._reporter(bad)(2, None)


def _worker(spec, trials, env=None):
    cmd = [sys.executable, "-m", "nestar_lab.cli", "study", "run", str(spec.source), "--trials", str(trials)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_two_workers_share_one_storage(tmp_path, tiny_raw):
    spec = write_study(tmp_path, tiny_raw)
    open_study(spec)  # create it first, as `--workers` does
    procs = [_worker(spec, 4) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    study = open_study(spec)
    # a trial both workers start in the same instant as the one completing the target is closed
    # at once as surplus (by design, see tuning): it runs nothing and is not counted
    kept = [t for t in study.trials if "surplus" not in t.user_attrs]
    surplus = [t for t in study.trials if "surplus" in t.user_attrs]
    assert all(t.state != optuna.trial.TrialState.COMPLETE for t in surplus) and len(surplus) <= 1
    numbers = [t.number for t in kept]
    assert len(numbers) == len(set(numbers)) == 4
    failures = [(t.number, t.state.name, t.user_attrs) for t in kept if t.state != optuna.trial.TrialState.COMPLETE]
    assert not failures
    from nestar_lab.run import results

    assert len(results.load(spec.study_dir)) == 4  # concurrent appends lose no row


def test_errors_in_a_row_give_up_with_one_line(tmp_path, tiny_raw, monkeypatch):
    import nestar_lab.run.evaluate as evaluate_module

    def broken(exp, run_dir, **kw):
        raise RuntimeError("metric code is broken")

    monkeypatch.setattr(evaluate_module, "evaluate", broken)
    tiny_raw["train"]["steps"] = 2
    spec = write_study(tmp_path, tiny_raw, max_errors_in_a_row=2)
    with pytest.raises(StudyFailed) as info:
        run_study(spec, trials=3)
    message = str(info.value)
    assert "2 trials in a row failed" in message and "RuntimeError: metric code is broken" in message
    assert "\n" not in message and info.value.exit_code == 1
    assert states(open_study(spec)) == [optuna.trial.TrialState.FAIL] * 2


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_rerun_waits_out_a_dead_trial_and_retries_it(tmp_path, tiny_raw, kind):
    """A worker that died right after creating its trial (no heartbeat ever sent): a re-run
    inside the grace period waits, fails the trial, re-runs its parameters, stops at the target."""
    tiny_raw["train"]["steps"] = 2
    spec = write_study(tmp_path, tiny_raw, heartbeat_seconds=1)
    url = f"journal:{tmp_path / 'j.log'}" if kind == "journal" else None
    dead = open_study(spec, url).ask()
    dead.suggest_categorical("generator.params.k", [2, 4, 8])
    started = time.time()
    study = run_study(spec, trials=1, storage=url, timeout=120)
    assert time.time() - started >= 2  # the grace period (2 x heartbeat_seconds) was waited out
    first, retry = study.trials
    assert first.state == optuna.trial.TrialState.FAIL and "error" not in first.user_attrs
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.user_attrs["retry_of"] == 0
    assert retry.params == first.params
    assert tally(study) == {"finished": 1, "running": 0, "waiting": 0, "errors": 0, "lost": 1, "invalid": 0}


def test_a_trial_started_past_the_target_is_surplus(tmp_path, tiny_raw):
    spec = write_study(tmp_path, tiny_raw)
    study = open_study(spec)
    first, second = study.ask(), study.ask()  # two processes starting at once, one trial wanted
    objective = Objective(spec, target=1)
    assert not objective._surplus(first) and objective._surplus(second)


class FakeWorker:
    made: list = []

    def __init__(self, cmd, env):
        self.cmd, self.env, self.pid = cmd, env, 1000 + len(FakeWorker.made)
        FakeWorker.made.append(self)

    def wait(self):
        return {1: -signal.SIGKILL, 3: 1}.get(self.pid - 1000, 0)

    def poll(self):
        return self.wait()


def test_workers_get_a_gpu_each_and_a_dead_worker_fails_the_run(tmp_path, tiny_raw, monkeypatch):
    import torch

    spec = write_study(tmp_path, tiny_raw)
    study = open_study(spec)
    monkeypatch.setattr(workers.subprocess, "Popen", FakeWorker)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 8)
    FakeWorker.made = []
    with pytest.raises(StudyFailed) as info:
        workers.run_workers(spec, 2, None, "sqlite:///x.db", 4, study)
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in FakeWorker.made] == ["0", "1", "2", "0"]
    assert [w.env["NESTAR_STUDY_WORKER"] for w in FakeWorker.made] == ["1", "2", "3", "4"]
    assert [w.env["OMP_NUM_THREADS"] for w in FakeWorker.made] == ["2"] * 4  # 8 cores shared by 4
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 1
    assert "worker 2/4 (pid 1001) was killed by SIGKILL; worker 4/4 (pid 1003) exited with code 1" in message
    assert "0/2 finished trials; re-run the same command" in message

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")  # ids as the parent sees them
    monkeypatch.setattr(FakeWorker, "wait", lambda self: 0)
    FakeWorker.made = []
    workers.run_workers(spec, 2, None, "sqlite:///x.db", 2, study)
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in FakeWorker.made] == ["4", "6"]

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU: shared, env untouched
    FakeWorker.made = []
    workers.run_workers(spec, 2, None, "sqlite:///x.db", 2, study)
    assert [w.env["CUDA_VISIBLE_DEVICES"] for w in FakeWorker.made] == ["4,6,7", "4,6,7"]


def test_report_separates_objectives_from_pruned_intermediate_values(tmp_path, tiny_raw):
    spec = write_study(tmp_path, tiny_raw)
    study = open_study(spec)
    done = study.ask()
    done.report(0.5, 2)
    study.tell(done, 1.25)
    pruned = study.ask()
    pruned.report(9.0, 2)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)  # optuna stores 9.0 as its "value"
    table = trials_table(study, spec).set_index("number")
    column = "objective:nn_train_dist_generated"
    assert table.loc[0, column] == 1.25 and table.loc[1, column] != table.loc[1, column]  # NaN
    assert list(table["last_val_loss"]) == [0.5, 9.0] and list(table["last_val_loss_step"]) == [2, 2]
    assert "value" not in table.columns


def test_sampling_only_keys_include_each_modules_solver_and_guidance(tmp_path, tiny_raw):
    from nestar_lab.sweep.study import is_sampling_key

    assert is_sampling_key("modules.3.ode_solver.params.steps") and is_sampling_key("modules.1.cfg_scale")
    assert is_sampling_key("modules.2.ode_solver.name") and is_sampling_key("sample.cfg_scale")
    assert not is_sampling_key("modules.1.scale_module.params.depth") and not is_sampling_key("train.lr")
    assert not is_sampling_key("modules.1.ode_solvers") and not is_sampling_key("generator.params.k")
    trained = write_study(tmp_path, tiny_raw, space={"modules.1.scale_module.params.depth": {"choices": [1, 2]}})
    assert not trained.sampling_only


def test_a_sampling_only_study_over_module_settings_trains_once(tmp_path, tiny_raw):
    """Trials that differ only in a module's solver steps and guidance share one training; a
    module's network size, trained, keys its own."""
    tiny_raw = {**tiny_raw, "generator": {"name": "nestar", "params": {"k": 4, "share_weights": False}},
                "modules": {1: {"scale_module": {"params": {"depth": 2}}}}}  # fmt: skip
    spec = write_study(tmp_path, tiny_raw, sampler={"name": "grid", "params": {"seed": 0}},
                       space={"modules.3.ode_solver.params.steps": {"choices": [1, 3]},
                              "modules.2.cfg_scale": {"choices": [1.0]}})  # fmt: skip
    assert spec.sampling_only
    study = run_study(spec, trials=2)
    assert states(study) == [optuna.trial.TrialState.COMPLETE] * 2
    shared = [p for p in (spec.study_dir / "shared").iterdir() if p.is_dir()]
    assert len(shared) == 1 and (shared[0] / "train_summary.json").is_file()
    nfe = set()
    for t in study.trials:
        run = spec.study_dir / "trials" / t.user_attrs["run_id"]
        assert (run / "trained_in.txt").read_text().strip() == str(shared[0])
        nfe.add(yaml.safe_load((run / "config.yaml").read_text())["modules"]["3"]["ode_solver"]["params"]["steps"])
    assert nfe == {1, 3}


def test_a_continued_study_and_each_worker_draw_their_own_proposals(tmp_path, tiny_raw, monkeypatch):
    """A seeded sampler is offset per process by the trials already in the study and by the
    worker number: continuing a study, or two workers starting together, never replays the
    proposals of the first process, while a new study's first process keeps the seed as given."""
    from nestar_lab.sweep.study import trial_overrides

    (tmp_path / "b").mkdir()
    spec = write_study(tmp_path, tiny_raw, space={"train.lr": {"float": [1e-4, 1e-2], "log": True}})

    def propose(study) -> float:
        trial = study.ask()
        value = trial_overrides(spec, trial)["train.lr"]
        study.tell(trial, 0.0)
        return value

    first = [propose(open_study(spec)) for _ in range(1)]
    monkeypatch.setenv("NESTAR_STUDY_WORKER", "1")
    one = propose(open_study(spec))
    monkeypatch.setenv("NESTAR_STUDY_WORKER", "2")
    two = propose(open_study(spec))
    monkeypatch.delenv("NESTAR_STUDY_WORKER")
    again = propose(open_study(spec))
    assert len({first[0], one, two, again}) == 4
    # a new study's first process: the seed as given, so the first proposal is reproducible
    other = write_study(tmp_path / "b", tiny_raw, space={"train.lr": {"float": [1e-4, 1e-2], "log": True}})
    assert trial_overrides(other, open_study(other).ask())["train.lr"] == first[0]


def test_a_seeded_study_crosses_arms_with_seeds_and_reports_paired_differences(tmp_path, tiny_raw, capsys):
    """``seeds``: every arm once per seed (with its own eval seed), then a paired table against the
    reference arm: a difference per seed, its interval, and what resolving it would take."""
    spec = write_study(tmp_path, tiny_raw, arms=[{"generator.params.k": 4}, {"generator.params.k": 8}],
                       seeds=[0, 1, 2], reference={"generator.params.k": 4})  # fmt: skip
    assert spec.trials == 6
    # queued seed by seed: a study stopped part-way holds complete pairs, and drift hits every arm
    assert [(a["generator.params.k"], a["seed"]) for a in spec.arms] == [(4, 0), (8, 0), (4, 1), (8, 1), (4, 2), (8, 2)]
    study = run_study(spec)
    assert states(study) == [optuna.trial.TrialState.COMPLETE] * 6
    assert [(t.params["generator.params.k"], t.params["seed"]) for t in study.trials][:2] == [(4, 0), (8, 0)]
    from nestar_lab.run import results

    store = results.load(spec.study_dir)
    assert sorted(zip(store["generator.k"], store["seed"], store["eval.seed"])) == [
        (4, 0, 1234), (4, 1, 1235), (4, 2, 1236), (8, 0, 1234), (8, 1, 1235), (8, 2, 1236)]  # fmt: skip
    assert main(["study", "report", str(spec.source)]) == 0
    out = capsys.readouterr().out
    assert "Paired differences from generator.params.k=4" in out
    mean_row, row = [line for line in out.splitlines() if line.startswith("| generator.params.k=8 | 3 |")]
    assert "resolved" in row and "[" in row and "resolved" not in mean_row
    means = [line for line in out.splitlines() if line.startswith("| generator.params.k=4 (reference) | 3 |")]
    assert len(means) == 1 and means[0].count("[") == 1  # the reference arm's own mean and interval
    assert (spec.study_dir / "report" / "paired.md").is_file()


@pytest.mark.parametrize("fields, message", [
    ({"seeds": [0]}, "1 distinct seed(s) give no interval"),
    ({"name": "a b/c"}, "name: got 'a b/c'; expected letters, digits, '_', '.' or '-'"),
    ({"seeds": [1, 1]}, "1 distinct seed(s) give no interval"),
    ({"seeds": "0,1"}, "seeds: expected a list of integers"),
    ({"reference": {"generator.params.k": 4}}, "reference: a paired comparison needs seeds"),
    ({"seeds": [0, 1], "arms": [{"generator.params.k": 4}], "reference": {"generator.params.k": 2}},
     "reference: {'generator.params.k': 2} is none of the arms"),
])  # fmt: skip
def test_a_seeded_study_that_cannot_give_an_interval_is_refused_before_work(fields, message, tmp_path, tiny_raw):
    from nestar_lab.config.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        write_study(tmp_path, tiny_raw, **fields)
    assert len(info.value.lines) == 1 and message in info.value.lines[0], info.value.lines


@pytest.mark.parametrize("space, message", [
    ({"train.lr": {"float": [1e-2, 1e-4], "log": True}}, "float: [0.01, 0.0001] has low above high"),
    ({"generator.params.k": {"int": [8, 2]}}, "int: [8, 2] has low above high"),
    ({"train.lr": {"choices": []}}, "choices: empty"),
    ({"train.lr": {"float": [1e-4, 1e-2], "step": -1}}, "step: expected a value > 0"),
    ({"train.lr": {"float": [1e-4, 1e-2], "step": 1e-4, "log": True}}, "without steps; drop step or log"),
    ({"train.warmup_steps": {"int": [0, 8], "log": True}}, "a log range needs low >= 1"),
    ({"generator.params.k": {"choices": [4, 8]}, "train.lr": {"float": [1e-4, 1e-2], "if": {"generator.params.k": [2]}}},
     "condition generator.params.k in [2] never holds (generator.params.k searches choices [4, 8])"),
    ({"train.lr": {"float": [1e-4, 1e-2]}, "sampler": "grid"}, "grid walks lists of values; space.train.lr is a range"),
])  # fmt: skip
def test_a_range_optuna_would_refuse_at_its_first_trial_is_refused_when_the_study_loads(space, message, tmp_path,
                                                                                         tiny_raw):  # fmt: skip
    sampler = space.pop("sampler", None)
    fields = {"sampler": {"name": sampler, "params": {"seed": 0}}} if sampler else {}
    with pytest.raises(ConfigError) as info:
        write_study(tmp_path, tiny_raw, space=space, **fields)
    (line,) = info.value.lines
    assert message in line and (sampler or f"space.{list(space)[-1]}: " in line), line


@pytest.mark.parametrize("arm, message", [
    ({"generator.params.k": 2}, "arms.0.generator.params.k: 2 is outside the space's choices [4, 8]"),
    ({"generator.params.k": 4, "train.lr": 0.5}, "arms.0.train.lr: 0.5 is outside the space's float: [0.0001, 0.01]"),
])  # fmt: skip
def test_an_arm_outside_its_space_is_refused_when_the_study_loads(arm, message, tmp_path, tiny_raw):
    space = {"generator.params.k": {"choices": [4, 8]}, "train.lr": {"float": [1e-4, 1e-2]}}
    with pytest.raises(ConfigError) as info:
        write_study(tmp_path, tiny_raw, space=space, arms=[arm])
    assert any(message in line for line in info.value.lines), info.value.lines


@pytest.mark.parametrize("fields, where", [
    ({"space": {"train.no_such_knob": {"choices": [1, 2]}}}, "space.train.no_such_knob"),
    ({"space": {"no_such_section.x": {"float": [0.1, 1.0]}}}, "space.no_such_section.x"),
    ({"overrides": {"scale_module.params.nope": 3}}, "overrides.scale_module.params.nope"),
])  # fmt: skip
def test_a_key_that_is_no_config_field_is_refused_before_any_trial(fields, where, tmp_path, tiny_raw):
    from nestar_lab.config.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        write_study(tmp_path, tiny_raw, **fields)
    (line,) = info.value.lines
    assert f"{where}: not a field of the base config" in line


@pytest.mark.parametrize("fields, message", [
    ({"sampler": {"name": "tpe", "params": {"bogus": 1}}},
     "sampler.params: optuna's 'tpe' sampler refuses {'bogus': 1}: "),
    ({"pruner": {"name": "median", "params": {"n_startup_trials": -1}}},
     "pruner.params: optuna's 'median' pruner refuses {'n_startup_trials': -1}: Number of startup trials"),
])  # fmt: skip
def test_sampler_and_pruner_params_optuna_refuses_are_config_errors_before_the_study_exists(fields, message, tmp_path,
                                                                                          tiny_raw):  # fmt: skip
    with pytest.raises(ConfigError) as info:
        write_study(tmp_path, tiny_raw, **fields)
    (line,) = info.value.lines
    assert message in line, line
    assert not (tmp_path / "studies").exists()


FIDELITY = {"metrics": [{"name": "fidelity", "params": {"extractor": "dataset_cnn"}}]}


@pytest.mark.parametrize("fields, message, fixed", [
    ({"objectives": [{"metric": "nn_train_dist_generatd", "direction": "minimize"}]},
     "objectives.0.metric: no evaluation of this study's config gives 'nn_train_dist_generatd'; did you mean "
     "nn_train_dist_generated", {"objectives": [{"metric": "nn_train_dist_generated", "direction": "minimize"}]}),
    ({"objectives": [{"metric": "nfe_module_2", "direction": "minimize"},  # every row has these
                     {"metric": "fid_digits_cnn", "direction": "minimize"}]},  # the base runs no fidelity
     "objectives.1.metric: no evaluation of this study's config gives 'fid_digits_cnn'; its metrics give copy_rate",
     {"overrides": FIDELITY}),
])  # fmt: skip
def test_an_objective_no_evaluation_gives_is_refused_before_any_trial(fields, message, fixed, tmp_path, tiny_raw):
    """Found after training, it would fail every trial of the study, each after its training."""
    with pytest.raises(ConfigError) as info:
        write_study(tmp_path, tiny_raw, **fields)
    (line,) = info.value.lines
    assert message in line, line
    write_study(tmp_path, tiny_raw, **{**fields, **fixed})  # spelt right, or the study's own metrics give it


def test_an_empty_space_is_refused(tmp_path, tiny_raw):
    from nestar_lab.config.errors import ConfigError

    with pytest.raises(ConfigError, match="space: empty"):
        write_study(tmp_path, tiny_raw, space={})


@pytest.mark.parametrize("flag, value", [("--trials", "0"), ("--trials", "-3"), ("--workers", "0"), ("--timeout", "-5"),
                                         ("--timeout", "nan")])  # fmt: skip
def test_study_run_refuses_counts_that_run_nothing(flag, value, tmp_path, tiny_raw, capsys):
    spec = write_study(tmp_path, tiny_raw)
    with pytest.raises(SystemExit) as info:
        main(["study", "run", str(spec.source), flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and ("at least 1" in err or "positive number of seconds" in err)
    assert not spec.study_dir.exists() or not any(spec.study_dir.iterdir()), "the study was created"


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).parents[1] / "studies").glob("*.yaml")))
def test_every_shipped_study_loads_and_names_only_config_fields(path):
    spec = load_study(path)
    assert spec.trials >= 1 and spec.space


def test_reporting_a_study_never_run_says_so_and_creates_nothing(tmp_path, tiny_raw, capsys):
    spec = write_study(tmp_path, tiny_raw)
    assert main(["study", "report", str(spec.source)]) == 1
    err = capsys.readouterr().err
    assert "nothing to report yet" in err and f"nestar study run {spec.source}" in err
    assert not spec.study_dir.exists()


def test_a_study_file_whose_objectives_changed_is_refused_before_any_trial(tmp_path, tiny_raw, capsys):
    """Optuna loads an existing study as it was created: with other objectives every new trial
    would train, then fail when stored (a changed count) or be scored on another metric."""
    spec = write_study(tmp_path, tiny_raw, trials=1)
    assert main(["study", "run", str(spec.source)]) == 0
    raw = yaml.safe_load(spec.source.read_text())
    raw["objectives"] = [raw["objectives"][0], {"metric": "nn_train_dist_generated", "direction": "maximize"}]
    spec.source.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    for command in (["run", "--trials", "2"], ["run", "--dry-run"], ["report"]):
        assert main(["study", command[0], str(spec.source), *command[1:]]) == 2
        (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("config error:")]
        assert "objectives: study 'tiny_study'" in line and "give the study a new name" in line
    assert len(optuna.load_study(study_name="tiny_study", storage=f"sqlite:///{spec.study_dir / 'study.db'}").trials) == 1


def test_trials_optuna_fails_after_the_objective_returned_count_as_errors(tmp_path, tiny_raw, monkeypatch):
    spec = write_study(tmp_path, tiny_raw, trials=1, max_errors_in_a_row=2)
    monkeypatch.setattr(Objective, "_run", lambda self, trial: [1.0, 2.0])  # two values, one objective
    with pytest.raises(StudyFailed) as info:
        run_study(spec)
    assert "2 trials in a row failed" in str(info.value) and "a failure Optuna reported" in str(info.value)


def test_a_resumed_trial_keeps_its_origins_stop_reason_off_its_own_row(tmp_path, tiny_raw, monkeypatch):
    """An interrupted trial is queued again; optuna's retry copies the origin's user attributes,
    so the finished retry read "interrupted at step N" in the report as if it had not finished."""
    import signal as signals

    import nestar_lab.run.train as train_module
    from nestar_lab.run.train import TrainingInterrupted

    real_train = train_module.train

    def stopped(cfg, run_dir, **kw):
        raise TrainingInterrupted(Path(run_dir), 1, signals.SIGTERM)

    tiny_raw["train"]["steps"] = 2
    spec = write_study(tmp_path, tiny_raw)
    monkeypatch.setattr(train_module, "train", stopped)
    with pytest.raises(StudyFailed) as info:
        run_study(spec, trials=1)
    assert info.value.exit_code == 143
    monkeypatch.setattr(train_module, "train", real_train)
    study = run_study(spec, trials=1)
    origin, retry = study.trials[0], study.trials[-1]
    assert origin.state == optuna.trial.TrialState.FAIL and "interrupted at step 1" in origin.user_attrs["interrupted"]
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.user_attrs["retry_of"] == 0
    assert retry.user_attrs.get("interrupted") is None  # cleared when the retry started
    table = trials_table(study, spec).set_index("number")
    assert "interrupted at step 1" in table.loc[0, "interrupted"]
    assert table.loc[retry.number, "interrupted"] != table.loc[retry.number, "interrupted"]  # NaN: no reason shown


CLAIM = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
import optuna
from nestar_lab.sweep.storage import make_storage
optuna.logging.set_verbosity(optuna.logging.ERROR)
url, start, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
study = optuna.load_study(study_name="claims", storage=make_storage(url))
while time.time() < start:
    time.sleep(0.001)
json.dump([study.ask().number for _ in range(10)], open(out, "w"))
"""


def test_workers_starting_together_never_claim_the_same_queued_trial(tmp_path):
    """SQLite ignores optuna's SELECT ... FOR UPDATE, so two workers could both read a queued trial
    as WAITING and both run it (seen in the k ablation: the second failed it, its run directory
    locked by the first). Four processes claim 40 queued trials at the same instant: each once."""
    from nestar_lab.sweep.storage import make_storage

    url = f"sqlite:///{tmp_path / 'claims.db'}"
    study = optuna.create_study(study_name="claims", storage=make_storage(url))
    for i in range(40):
        study.enqueue_trial({"x": i})
    start = time.time() + 4  # after every process has imported and connected
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM, url, str(start), str(tmp_path / f"{w}.json")], env=env)
             for w in range(4)]  # fmt: skip
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    import json

    claimed = [n for w in range(4) for n in json.loads((tmp_path / f"{w}.json").read_text())]
    assert sorted(claimed) == list(range(40))  # every queued trial once, none twice, none sampled anew
