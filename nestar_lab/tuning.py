"""Optuna studies over experiment configs: objective, storage, pruning, workers, report.

Every trial is an ordinary run (run directory under the study's ``trials/``, a row in the
study's ``results.csv``) and records its run id. Invalid configs are pruned with the reason
recorded; a trial that raises is marked failed and the study goes on.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna

from nestar_lab.config import ConfigError, read_yaml, validate_config
from nestar_lab.study import StudySpec, apply_dotted, trial_overrides

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
_RETRY = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", optuna.storages.RetryFailedTrialCallback)
HEARTBEAT_S = int(os.environ.get("NESTAR_HEARTBEAT_S", "60"))  # RDB storage: stale-trial detection


def default_storage(spec: StudySpec) -> str:
    """An SQLite file inside the study's directory: embedded, nothing to set up."""
    spec.study_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(spec.study_dir / 'study.db').resolve()}"


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """``journal:PATH`` -> a journal file (shared filesystems); otherwise an SQLAlchemy URL
    (SQLite, PostgreSQL) with heartbeats, so a killed worker's trial is failed and retried."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:") :]))
    return optuna.storages.RDBStorage(
        url,
        heartbeat_interval=HEARTBEAT_S,
        grace_period=2 * HEARTBEAT_S,
        heartbeat_stale_trial_callback=_RETRY(max_retry=1),
    )


def open_study(spec: StudySpec, storage: str | None = None) -> optuna.Study:
    """Create the study, or continue it when it exists in ``storage``."""
    return optuna.create_study(
        study_name=spec.name,
        storage=make_storage(storage or default_storage(spec)),
        directions=spec.directions,
        sampler=spec.make_sampler(),
        pruner=spec.make_pruner(),
        load_if_exists=True,
    )


class Objective:
    """Builds a trial's config, trains it with pruning reports, evaluates it, returns metrics."""

    def __init__(self, spec: StudySpec, progress: bool = False):
        self.spec = spec
        self.base = read_yaml(spec.base_path())
        self.progress = progress

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        from nestar_lab.evaluate import evaluate
        from nestar_lab.train import load_trained, train

        overrides = trial_overrides(self.spec, trial)
        raw = apply_dotted(copy.deepcopy(self.base), overrides)
        raw["name"] = f"{self.spec.name}-trial{trial.number:04d}"
        raw["output_dir"] = str(self.spec.study_dir)
        try:
            cfg = validate_config(raw)
        except ConfigError as exc:
            trial.set_user_attr("invalid", "; ".join(exc.lines))
            raise optuna.TrialPruned(f"invalid config: {'; '.join(exc.lines)}") from None
        run_dir = self.spec.study_dir / "trials" / f"trial-{trial.number:04d}"
        trial.set_user_attr("run_id", run_dir.name)
        trial.set_user_attr("run_dir", str(run_dir))
        try:
            if self.spec.sampling_only:
                self._reuse_training(cfg, run_dir)
            else:
                train(cfg, run_dir, progress=self.progress, callbacks=[self._reporter(trial)])
            row = evaluate(load_trained(run_dir), run_dir)
        except optuna.TrialPruned:
            raise
        except Exception as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}".splitlines()[0])
            raise
        values = []
        for objective in self.spec.objectives:
            value = row.get(objective.metric)
            if value is None:
                errors = {k: v for k, v in row.items() if k.startswith("error_")}
                raise KeyError(f"metric {objective.metric!r} missing from the run's row (errors: {errors or 'none'})")
            values.append(float(value))
        return values if len(values) > 1 else values[0]

    def _reuse_training(self, cfg, run_dir: Path) -> None:
        """Sampling-only studies train once (per training config) and copy the checkpoint into
        each trial's run directory, which is then an ordinary, self-contained run."""
        from nestar_lab.results import config_hash
        from nestar_lab.rundir import CHECKPOINT, new_run_dir
        from nestar_lab.train import train

        training_cfg = cfg.model_copy(update={"name": f"{self.spec.name}-shared", "metrics": []})
        shared = self.spec.study_dir / "shared" / config_hash(
            training_cfg.model_copy(update={"ode_solver": None, "sample": None, "eval": None})
        )
        lock = shared.with_suffix(".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        while not (shared / "train_summary.json").is_file():
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL)  # one process trains, the others wait
            except FileExistsError:
                time.sleep(2)
                continue
            try:
                if (shared / CHECKPOINT).is_file():
                    train(training_cfg, shared, resume=True, progress=self.progress)
                else:
                    train(training_cfg, shared, progress=self.progress)
            finally:
                os.close(fd)
                lock.unlink()
        new_run_dir(cfg, run_dir)
        shutil.copy2(shared / CHECKPOINT, run_dir / CHECKPOINT)
        (run_dir / "trained_in.txt").write_text(f"{shared}\n")

    def _reporter(self, trial: optuna.Trial):
        every = self.spec.report_every
        single = len(self.spec.objectives) == 1  # optuna prunes single-objective studies only

        def report(step: int, exp) -> None:
            if not every or step % every or not single:
                return
            from nestar_lab.train import validation_loss

            trial.report(validation_loss(exp), step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}")

        return report


def run_study(
    spec: StudySpec,
    trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    workers: int = 1,
    progress: bool = False,
) -> optuna.Study:
    """Run until the study holds ``trials`` finished trials in all (across every cooperating
    process), or ``timeout`` seconds pass. ``workers > 1`` starts that many processes."""
    trials = trials or spec.trials
    storage = storage or default_storage(spec)
    study = open_study(spec, storage)
    if spec.arms and not study.trials and not os.environ.get("NESTAR_STUDY_WORKER"):
        for arm in spec.arms:
            study.enqueue_trial(arm, skip_if_exists=True)
    if workers > 1:
        return _run_workers(spec, trials, timeout, storage, workers, study)
    remaining = trials - _finished(study)
    if remaining > 0:
        # counting running trials too lets cooperating processes stop at the total together
        counted = (*FINISHED, optuna.trial.TrialState.RUNNING)
        study.optimize(
            Objective(spec, progress),
            n_trials=remaining,
            timeout=timeout,
            catch=(Exception,),
            callbacks=[optuna.study.MaxTrialsCallback(trials, states=counted)],
        )
    return study


FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


def _finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def _run_workers(spec, trials, timeout, storage, workers, study) -> optuna.Study:
    cmd = [sys.executable, "-m", "nestar_lab.cli", "study", "run", str(spec.source), "--trials", str(trials),
           "--storage", storage]  # fmt: skip
    if timeout:
        cmd += ["--timeout", str(timeout)]
    env = {**os.environ, "NESTAR_STUDY_WORKER": "1"}
    procs = [subprocess.Popen(cmd, env=env) for _ in range(workers)]
    codes = [p.wait() for p in procs]
    if any(codes):
        print(f"workers exited with {codes}", file=sys.stderr)
    return study


def trials_table(study: optuna.Study, spec: StudySpec):
    """Trials (number, state, params, values, run id, reasons) joined to their runs' metrics."""
    import pandas as pd

    from nestar_lab import results

    df = study.trials_dataframe(attrs=("number", "state", "params", "values", "user_attrs", "duration"))
    df.columns = [c.replace("user_attrs_", "").replace("params_", "param:") for c in df.columns]
    runs = results.load(spec.study_dir)
    if "run_id" in df.columns and not runs.empty:
        metric_cols = [o.metric for o in spec.objectives if o.metric in runs.columns]
        extra = [c for c in ("class_accuracy", "sec_per_image", "nfe_per_image") if c in runs.columns]
        keep = ["run_id", *dict.fromkeys(metric_cols + extra)]
        df = df.merge(runs[keep].drop_duplicates("run_id", keep="last"), on="run_id", how="left")
    return df if isinstance(df, pd.DataFrame) else pd.DataFrame(df)


def report(spec: StudySpec, storage: str | None = None, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Best trial(s), the joined table, and PNG plots (history, importances, Pareto front)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ov

    study = open_study(spec, storage)
    out_dir = Path(out_dir or spec.study_dir / "report")
    out_dir.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    best = study.best_trials if complete else []
    plots = []
    names = [o.metric for o in spec.objectives]
    makers = {"history": lambda: ov.plot_optimization_history(study, target=lambda t: t.values[0], target_name=names[0])}
    if len(complete) >= 2 and spec.space:
        makers["importances"] = lambda: ov.plot_param_importances(
            study, target=lambda t: t.values[0], target_name=names[0]
        )
    if len(spec.objectives) > 1 and complete:
        makers["pareto"] = lambda: ov.plot_pareto_front(study, target_names=names)
    for name, make in makers.items():
        try:
            make()
            path = out_dir / f"{name}.png"
            plt.gcf().set_size_inches(7, 4.5)
            plt.tight_layout()
            plt.savefig(path, dpi=110)
            plots.append(path)
        except (ValueError, RuntimeError) as exc:  # e.g. too few trials for importances
            print(f"plot {name} skipped: {exc}", file=sys.stderr)
        finally:
            plt.close("all")
    curve = _plot_disagreement(study, out_dir / "disagreement.png")
    if curve:
        plots.append(curve)
    table = trials_table(study, spec)
    table.to_csv(out_dir / "trials.csv", index=False)
    return {"study": study, "best": best, "table": table, "plots": plots, "out_dir": out_dir}


def _plot_disagreement(study: optuna.Study, path: Path) -> Path | None:
    """Velocity disagreement of adjacent modules over training, one line per trial and pair."""
    import json

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    drawn = False
    for t in study.get_trials(deepcopy=False):
        log = Path(t.user_attrs.get("run_dir", "")) / "train_log.jsonl"
        if not log.is_file():
            continue
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        keys = sorted({k for r in rows for k in r if k.startswith("disagree_")})
        label = ", ".join(f"{k.split('.')[0]}={v}" for k, v in t.params.items()) or f"trial {t.number}"
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*pts), label=f"{label} [{key}]")
            drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel("mean ||v_m - v_(m-1)||^2 on module m-1's tokens")
        ax.set_yscale("log")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(path)
    plt.close(fig)
    return path if drawn else None
