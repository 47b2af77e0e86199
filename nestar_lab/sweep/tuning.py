"""Optuna studies over experiment configs: objective, storage, pruning, workers, report.

Every trial is an ordinary run (run directory under the study's ``trials/``, a row in the
study's ``results.csv``) and records its run id. Every point of the space is validated when the
study loads (``checks.space_problems``); a combination that still fails validation FAILs with its
reason in ``invalid``; a trial that raises is marked failed (its ``error`` recorded) and the study goes on.

What ``--trials N`` means. The study is done when it holds N *finished* trials: COMPLETE or
PRUNED, or FAILed by an invalid config (a combination of searched values that no check before the
study could see: user attribute ``invalid``; it counts, since a retry would fail the same way, and
``nestar study run`` then exits 2). Other trials are attempts that do not count:

* failed by an error (user attribute ``error``): a new trial is sampled in its place; one
  process gives up (:class:`StudyFailed`, exit 1) after ``max_errors_in_a_row`` of them in a row;
* lost: its worker died (SIGKILL, power loss, a lost machine). Every running trial sends a
  heartbeat every ``heartbeat_seconds``; a trial whose heartbeat is older than twice that is
  failed by whichever process looks next and re-queued (same parameters, user attribute
  ``retry_of``; a retry of a trial that had a checkpoint resumes it) up to ``MAX_RETRIES``
  times; an interrupted trial (SIGINT/SIGTERM) is re-queued at once;
* surplus: started in the same instant as another trial that completes the target (closed at
  once, user attribute ``surplus``).

A process starts a trial only while finished + running < N, and waits (rather than exits) while
running trials could still fail or go stale, so every process of a study stops with exactly N
finished trials and none RUNNING, whatever was killed when: a re-run waits out the grace period
of a dead worker's trial, fails it and retries it instead of starting trials past the target.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import signal
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from nestar_lab.config.errors import ConfigError
from nestar_lab.config.overrides import read_yaml
from nestar_lab.config.validation import validate_config
from nestar_lab.sweep.bracket import arm_key, pending
from nestar_lab.sweep.cost import describe_cost, timed_step_seconds
from nestar_lab.sweep.storage import (
    FINISHED,
    StudyFailed,
    _retry_now,
    check_storage,
    default_storage,
    existing_study,
    fail_stale,
    invalid,
    open_study,
    tally,
)
from nestar_lab.sweep.study import StudySpec, apply_dotted, trial_overrides
from nestar_lab.sweep.workers import run_workers, worker_threads

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class InvalidTrial(Exception):
    """A trial's config failed validation (a combination of searched values): the trial FAILs
    with user attribute ``invalid``; it counts toward ``--trials`` and ``study run`` exits 2."""


class _Surplus(Exception):
    pass


class Objective:
    """Builds a trial's config, trains it with pruning reports, evaluates it, returns metrics.

    ``target``: the number of finished trials asked for; a trial started when lower-numbered
    trials already reach it is closed at once as surplus (two processes starting together)."""

    def __init__(self, spec: StudySpec, progress: bool = False, target: int | None = None):
        self.spec = spec
        self.base = read_yaml(spec.base_path())
        self.progress = progress
        self.target = target
        self.interrupted: BaseException | None = None

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        from nestar_lab.run.train import TrainingInterrupted

        if self.target is not None and self._surplus(trial):
            trial.set_user_attr("surplus", f"the study already holds or runs {self.target} trials")
            raise _Surplus(f"trial {trial.number} not needed: {self.target} trials are finished or running")
        try:
            return self._run(trial)
        except optuna.TrialPruned:
            raise
        except InvalidTrial:  # FAIL, counted toward --trials (it will not become valid), exit 2 at the end
            raise
        except TrainingInterrupted as exc:
            self._interrupted(trial, exc)
            raise
        except Exception as exc:
            try:
                trial.set_user_attr("error", f"{type(exc).__name__}: {exc}".splitlines()[0])
            except UpdateFinishedTrialError:  # another process failed this trial as stale
                pass
            raise
        except BaseException as exc:  # KeyboardInterrupt, SystemExit
            self._interrupted(trial, exc)
            raise

    def _interrupted(self, trial: optuna.Trial, exc: BaseException) -> None:
        self.interrupted = exc
        try:
            trial.set_user_attr("interrupted", f"{type(exc).__name__}: {exc}".splitlines()[0])
            _retry_now(trial)
        except Exception:  # e.g. the storage is gone: the heartbeat will have it retried
            pass

    def _surplus(self, trial: optuna.Trial) -> bool:
        ahead = 0
        for t in trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)):
            ahead += t.state in FINISHED or t.number < trial.number
        ahead += sum(invalid(t) for t in trial.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
        return ahead >= self.target

    def _run(self, trial: optuna.Trial) -> float | list[float]:
        from nestar_lab.run.evaluate import evaluate
        from nestar_lab.run.rundir import CHECKPOINT
        from nestar_lab.run.train import load_trained, train

        frozen = trial.study._storage.get_trial(trial._trial_id)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # which process runs it
        origin = frozen.system_attrs.get("failed_trial")
        if origin is not None:
            trial.set_user_attr("retry_of", origin)
            for inherited in ("interrupted", "error"):  # the origin's reason, copied by optuna's retry: it
                if inherited in frozen.user_attrs:  # stays on the origin's row; this trial's own is set if it ends so
                    trial.set_user_attr(inherited, None)
        overrides = trial_overrides(self.spec, trial)
        for b in self.spec.bracket:  # the arm's bracketed values, as this trial trained them
            if b.key in overrides:  # (an entry applies to some arms only: ``if:``)
                trial.set_user_attr(f"bracketed:{b.key}", overrides[b.key])
        raw = apply_dotted(copy.deepcopy(self.base), overrides)
        raw["name"] = f"{self.spec.name}-trial{trial.number:04d}"
        raw["output_dir"] = str(self.spec.study_dir)
        run_dir = self.spec.study_dir / "trials" / f"trial-{trial.number:04d}"
        resume = False
        inherited = frozen.user_attrs.get("run_dir")  # a retry: its origin's run, if it got a checkpoint
        if origin is not None and inherited and not self.spec.sampling_only and (Path(inherited) / CHECKPOINT).is_file():
            run_dir, resume = Path(inherited), True
            raw["name"] = frozen.user_attrs.get("run_name", raw["name"])
        try:
            cfg = validate_config(raw)
        except ConfigError as exc:  # a combination the pre-check (``space_problems``) cannot see
            trial.set_user_attr("invalid", "; ".join(exc.lines))
            raise InvalidTrial(f"invalid config: {'; '.join(exc.lines)}") from None
        trial.set_user_attr("run_id", run_dir.name)
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("run_name", cfg.name)
        if self.spec.sampling_only:
            self._reuse_training(cfg, run_dir)
        else:
            train(cfg, run_dir, resume=resume, progress=self.progress, callbacks=[self._reporter(trial)],
                  log_group=self.spec.name)  # the config's loggers: the study's group / experiment
        row = evaluate(load_trained(run_dir), run_dir)
        values = []
        for objective in self.spec.objectives:
            value = row.get(objective.metric)
            if value is None:
                errors = {k: v for k, v in row.items() if k.startswith("error_")}
                raise KeyError(f"metric {objective.metric!r} missing from the run's row (errors: {errors or 'none'})")
            if not math.isfinite(float(value)):
                raise ValueError(f"metric {objective.metric!r} is {value} for run {run_dir}")
            values.append(float(value))
        return values if len(values) > 1 else values[0]

    def _reuse_training(self, cfg, run_dir: Path) -> None:
        """Sampling-only studies train once (per training config) and copy the checkpoint into
        each trial's run directory, which is then an ordinary, self-contained run. One process
        trains under an exclusive lock (released by the system if that process dies); the others
        wait for it, and the next to get the lock resumes a training whose trainer died."""
        import fcntl
        import shutil

        from nestar_lab.run.results import config_hash
        from nestar_lab.run.rundir import CHECKPOINT, new_run_dir
        from nestar_lab.run.train import train

        training_cfg = cfg.model_copy(update={"name": f"{self.spec.name}-shared", "metrics": []})
        modules = {n: e.model_copy(update={"ode_solver": None, "cfg_scale": None}) for n, e in cfg.modules.items()}
        sampling_free = {"ode_solver": None, "sample": None, "eval": None,
                         "modules": {n: e for n, e in modules.items() if e.scale_module is not None}}  # fmt: skip
        shared = self.spec.study_dir / "shared" / config_hash(training_cfg.model_copy(update=sampling_free))
        lock = shared.with_suffix(".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                if not (shared / "train_summary.json").is_file():
                    if (shared / CHECKPOINT).is_file():
                        train(training_cfg, shared, resume=True, progress=self.progress, log_group=self.spec.name)
                    else:  # nothing, or what a trainer that died before its first checkpoint left
                        fresh = {"overwrite": True} if "overwrite" in inspect.signature(train).parameters else {}
                        train(training_cfg, shared, progress=self.progress, log_group=self.spec.name, **fresh)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        new_run_dir(cfg, run_dir)
        shutil.copy2(shared / CHECKPOINT, run_dir / CHECKPOINT)
        (run_dir / "trained_in.txt").write_text(f"{shared}\n")

    def _reporter(self, trial: optuna.Trial):
        every = self.spec.report_every
        single = len(self.spec.objectives) == 1  # optuna prunes single-objective studies only

        def report_step(step: int, exp) -> None:
            if not every or step % every or not single:
                return
            from nestar_lab.run.train import validation_loss

            if step not in trial.study._storage.get_trial(trial._trial_id).intermediate_values:
                trial.report(validation_loss(exp), step)  # a resumed retry has its origin's reports
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}")

        return report_step


def run_study(
    spec: StudySpec,
    trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    workers: int = 1,
    progress: bool = False,
    estimate: bool = False,
    dry_run: bool = False,
    prepare: Callable[[StudySpec, optuna.Study, str, int], object] | None = None,
) -> optuna.Study | None:
    """Run until the study holds ``trials`` finished (COMPLETE or PRUNED) trials, counted across
    every cooperating process, or ``timeout`` seconds pass. ``workers > 1`` starts that many
    processes on this machine (one GPU each, round-robin, when several are visible).

    Raises :class:`StudyFailed` when a worker died, after ``spec.max_errors_in_a_row`` failed
    trials in a row, or when interrupted (its trial is re-queued for the next run). ``estimate``:
    first print what is left to run and its cost (from a training step timed here) to stderr.
    ``dry_run``: print that (to stdout) and return None, training and creating nothing.
    ``prepare``: called with the spec, the study, its storage URL and ``workers`` after the estimate
    and before any trial; a study with ``bracket:`` needs ``bracket_search.search_brackets`` there
    (``nestar study run`` passes it)."""
    trials = trials or spec.trials
    if storage:
        check_storage(storage)  # before the study directory or any trial exists
    if dry_run:
        existing = existing_study(spec, storage)
        left = max(0, trials - (tally(existing)["finished"] if existing is not None else 0))
        print(_cost(spec, left, pending(spec, existing), workers), flush=True)
        return None
    storage = storage or default_storage(spec)
    study = open_study(spec, storage)
    if estimate and not os.environ.get("NESTAR_STUDY_WORKER"):  # a worker: the parent printed it for all
        left = max(0, trials - tally(study)["finished"])
        print(_cost(spec, left, pending(spec, study), workers), file=sys.stderr, flush=True)
    if prepare is not None:
        prepare(spec, study, storage, workers)
    unsearched = pending(spec, study)
    if unsearched:
        (arm, b), n = unsearched[0], len(unsearched)
        raise ConfigError([f"study {spec.name}: {n} bracketing search(es) not run yet (bracket:; first {b.key} "
                           f"for arm {arm}); run it with `nestar study run`, or pass "
                           f"prepare=nestar_lab.sweep.bracket_search.search_brackets"])  # fmt: skip
    if spec.arms and not study.trials and not os.environ.get("NESTAR_STUDY_WORKER"):
        for arm in spec.arms:
            study.enqueue_trial(arm, skip_if_exists=True)
    if workers > 1:
        return run_workers(spec, trials, timeout, storage, workers, study)
    _optimize(study, spec, trials, timeout, progress)
    return study


def _cost(spec: StudySpec, left: int, searches: list, workers: int) -> str:
    """The estimate line (``searches``: ``bracket.pending``'s pairs): a step timed here, and with
    several workers one timed with a worker's threads."""
    entries, arms = [b for _, b in searches], len({arm_key(a) for a, _ in searches})
    if not (left or searches):
        return describe_cost(spec, left, None, entries)
    step_s = timed_step_seconds(spec)
    shared = workers > 1 and (left > 1 or arms > 1)
    worker_s = timed_step_seconds(spec, threads=worker_threads(workers)) if shared else None
    return describe_cost(spec, left, step_s, entries, workers, worker_s, search_arms=arms)


def invalid_trials(trials: list) -> str | None:
    """The trials that proposed a config no rule allows, as one line (None when there are none)."""
    bad = [t for t in trials if invalid(t)]
    if not bad:
        return None
    return (f"{len(bad)} trial(s) proposed an invalid config, first trial {bad[0].number}: "
            f"{bad[0].user_attrs['invalid']}; narrow the space or add a condition (if:)")


def _optimize(study: optuna.Study, spec: StudySpec, trials: int, timeout: float | None, progress: bool) -> None:
    objective = Objective(spec, progress, target=trials)
    start = time.monotonic()
    poll = min(spec.heartbeat_seconds, 5)
    in_a_row = 0
    reached: float | None = None
    while True:
        fail_stale(study)
        count = tally(study)
        if count["finished"] >= trials:
            # a trial still RUNNING now is surplus (about to close) or a dead worker's (failed
            # once its heartbeat expires): wait for either, but no longer than the grace period
            # (a process sharing the study with a larger --trials may be running legitimately)
            reached = reached or time.monotonic()
            if not count["running"] or time.monotonic() - reached > 2 * spec.heartbeat_seconds + poll:
                return
            time.sleep(poll)
            continue
        if timeout is not None and time.monotonic() - start >= timeout:
            return
        if count["finished"] + count["running"] >= trials:
            # running trials may complete the target; if one fails, or its worker died and its
            # heartbeat expires, a trial is needed again (a retry of a lost one)
            time.sleep(poll)
            continue
        ran: list[optuna.trial.FrozenTrial] = []
        try:
            study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[lambda s, t: ran.append(t)])
        except UpdateFinishedTrialError:  # this process was taken for dead (no heartbeat in time)
            print("study: a trial of this process was failed as stale by another; going on", file=sys.stderr)
            continue
        if objective.interrupted is not None:
            exc = objective.interrupted
            code = getattr(exc, "exit_code", None) or 128 + signal.SIGINT
            number = ran[0].number if ran else "?"
            raise StudyFailed(f"study {spec.name} interrupted during trial {number}, which is queued again: "
                              f"re-run the same command to go on", exit_code=code)  # fmt: skip
        if not ran:
            continue
        trial = ran[0]
        expected = ("invalid", "surplus", "interrupted")  # counted, closed on purpose, or queued again
        if trial.state == TrialState.FAIL and not any(k in trial.user_attrs for k in expected):
            in_a_row += 1  # an error of ours, or one Optuna met after the objective returned
            if in_a_row >= spec.max_errors_in_a_row:
                why = trial.user_attrs.get("error", "a failure Optuna reported when storing it (its warning above)")
                raise StudyFailed(f"study {spec.name}: {in_a_row} trials in a row failed, the last (trial "
                                  f"{trial.number}) with {why}; fix the cause and re-run "
                                  f"(max_errors_in_a_row: {spec.max_errors_in_a_row} in the study file)")  # fmt: skip
        elif trial.state in FINISHED:
            in_a_row = 0
