"""Studies recover from killed workers on every storage: SQLite, a journal file, a real PostgreSQL.

A worker SIGKILLed mid-trial: its trial is failed once its heartbeat expires and retried (by the
surviving worker, or by a re-run, which waits out the grace period instead of starting trials
past the target); ``--workers`` exits non-zero naming the dead worker; in the end the study holds
exactly the requested number of finished trials and none RUNNING.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml

from nestar_lab.sweep.storage import FINISHED, make_storage, open_study, tally
from nestar_lab.sweep.study import load_study
from nestar_lab.sweep.tuning import run_study

optuna.logging.set_verbosity(optuna.logging.WARNING)
HEARTBEAT = 2  # seconds; a trial silent for 2x this is stale


@pytest.fixture(scope="module")
def postgres_url():
    from pgserver import PostgresServer, run_as, server_bin

    bin_dir = server_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl, postgres) on this machine")
    who = run_as()
    if who is None:
        pytest.skip("running as root without a 'postgres' or 'nobody' account and runuser: PostgreSQL refuses root")
    server = PostgresServer(bin_dir, *who)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "journal", "postgresql"])
def storage_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'study.db'}"
    if request.param == "journal":
        return f"journal:{tmp_path / 'study.journal'}"
    pytest.importorskip("psycopg", reason="psycopg (a dependency in pyproject.toml) is not installed: pip install -e .")
    return request.getfixturevalue("postgres_url")


def write_study(tmp_path, tiny_raw, name, **fields):
    raw = {**tiny_raw, "metrics": [{"name": "nearest_train_distance"}]}
    raw["train"] = {**raw["train"], "steps": 24, "checkpoint_every": 4}  # long enough to be killed mid-trial
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(raw))
    spec = {
        "name": name,
        "base": "base.yaml",
        "output_dir": str(tmp_path / "studies"),
        "space": {"generator.params.k": {"choices": [2, 4, 8]}},
        "objectives": [{"metric": "nn_train_dist_generated", "direction": "minimize"}],
        "sampler": {"name": "random", "params": {"seed": 0}},
        "pruner": {"name": "none"},
        "heartbeat_seconds": HEARTBEAT,
        **fields,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_study(path)


_READERS: dict = {}


def reader(spec, url):
    """The study as another process sees it (one storage, one connection pool, per test)."""
    key = (spec.name, url)
    if key not in _READERS:
        _READERS[key] = optuna.load_study(study_name=spec.name, storage=make_storage(url, HEARTBEAT))
    return _READERS[key]


def study_run(spec, url, trials, *extra):
    """``nestar study run`` in a subprocess; its stderr (and its workers') goes to ``.stderr_path``."""
    cmd = [sys.executable, "-m", "nestar_lab.cli", "study", "run", str(spec.source), "--trials", str(trials),
           "--storage", url, *extra]  # fmt: skip
    path = spec.source.parent / f"stderr-{time.monotonic_ns()}.txt"
    with open(path, "w") as err:  # own session: teardown can stop it with its workers
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # several processes on few cores: no oversubscription
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, env=env)
    proc.stderr_path = path
    SPAWNED.append(proc)
    return proc


SPAWNED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _stop_spawned():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this process trains too, beside the workers
    yield
    torch.set_num_threads(threads)
    for study in _READERS.values():  # close the connection pools
        engine = getattr(getattr(study._storage, "_backend", study._storage), "engine", None)
        if engine is not None:
            engine.dispose()
    _READERS.clear()
    while SPAWNED:
        proc = SPAWNED.pop()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group of a process this test started
        except ProcessLookupError:
            pass
        proc.wait()


def kill_a_running_trial(spec, url, procs, deadline_s=180):
    """SIGKILL the worker of a RUNNING trial (after its first checkpoint when it gets there in
    time); return that trial's number and whether it had a checkpoint."""
    from pathlib import Path

    deadline = time.time() + deadline_s
    while time.time() < deadline:
        assert all(p.poll() is None for p in procs), [p.stderr_path.read_text()[-3000:] for p in procs]
        running = [t for t in reader(spec, url).get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                   if "worker" in t.user_attrs and "run_dir" in t.user_attrs]  # fmt: skip
        if running:
            trial = running[0]
            checkpoint = Path(trial.user_attrs["run_dir"]) / "checkpoint.pt"
            until = time.time() + 60
            while not checkpoint.is_file() and time.time() < until:
                time.sleep(0.05)
            pid = int(trial.user_attrs["worker"].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            return trial.number, checkpoint.is_file()
        time.sleep(0.1)
    raise AssertionError("no trial was seen RUNNING")


def check_recovered(study, trials, killed):
    count = tally(study)
    assert count["finished"] == trials, count
    assert count["running"] == 0, count
    assert count["errors"] == 0, [t.user_attrs for t in study.trials]
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    for number in killed:
        dead = by_number[number]
        assert dead.state == optuna.trial.TrialState.FAIL and "error" not in dead.user_attrs
        retries = [t for t in by_number.values() if t.user_attrs.get("retry_of") == number]
        assert [t.state for t in retries] == [optuna.trial.TrialState.COMPLETE], (number, retries)
        assert retries[0].params == dead.params
    return by_number


def test_a_killed_workers_trial_is_retried_by_the_survivor(tmp_path, tiny_raw, storage_url):
    """Two workers; one is SIGKILLed mid-trial. The survivor waits out the dead trial's heartbeat,
    fails it and retries it (resuming its checkpoint); the parent exits non-zero naming the dead
    worker; the study holds exactly the requested number of finished trials, none RUNNING."""
    spec = write_study(tmp_path, tiny_raw, "recovery")
    open_study(spec, storage_url)  # created here, so that this test can watch it from the start
    parent = study_run(spec, storage_url, 2, "--workers", "2")
    killed, had_checkpoint = kill_a_running_trial(spec, storage_url, [parent])
    assert parent.wait(timeout=300) != 0
    err = parent.stderr_path.read_text()
    line = next((ln for ln in err.splitlines() if "was killed by SIGKILL" in ln), err[-3000:])
    assert "worker" in line and "2/2 finished trials" in line and "complete" in line, line
    study = reader(spec, storage_url)
    by_number = check_recovered(study, 2, [killed])
    assert len(study.trials) == 2 + 1  # two finished, one lost; nothing past the target
    retry = next(t for t in by_number.values() if t.user_attrs.get("retry_of") == killed)
    assert had_checkpoint  # killed after its first checkpoint, which the retry resumed:
    assert retry.user_attrs["run_id"] == by_number[killed].user_attrs["run_id"]
    assert retry.user_attrs["worker"] != by_number[killed].user_attrs["worker"]


def test_a_rerun_inside_the_grace_period_waits_and_retries(tmp_path, tiny_raw, storage_url):
    """A lone worker SIGKILLed mid-trial, then an immediate re-run: it waits for the dead trial
    to go stale, retries it and starts nothing past the target."""
    spec = write_study(tmp_path, tiny_raw, "rerun")
    open_study(spec, storage_url)
    lone = study_run(spec, storage_url, 1)
    killed, _ = kill_a_running_trial(spec, storage_url, [lone])
    lone.wait(timeout=60)
    study = run_study(spec, trials=1, storage=storage_url, timeout=240)
    check_recovered(study, 1, [killed])
    assert len(study.trials) == 2  # the dead trial and its retry: no trial was started beside it
    assert not [t for t in study.trials if t.state not in (*FINISHED, optuna.trial.TrialState.FAIL)]
