"""``nestar study run --workers W``: W processes on this machine sharing one study's storage,
each with its share of the CPU cores and, where several GPUs are visible, one GPU (round-robin).
A worker is an ordinary ``nestar study run`` of the same study; a dead one fails the run (its
trials are retried by the next run) and SIGTERM or Ctrl-C here stops them all. The bracketing
searches before the trials share out the same way (``bracket_search.search_in_processes``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import optuna

from nestar_lab.sweep.storage import StudyFailed, tally


def worker_threads(workers: int) -> int:
    """CPU threads of each ``--workers`` process: ``OMP_NUM_THREADS`` when set, else the cores shared out."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(given) if given.isdigit() and int(given) > 0 else max(1, (os.cpu_count() or 1) // workers)


def visible_gpus() -> list[str]:
    """The GPU ids a worker can be pinned to with ``CUDA_VISIBLE_DEVICES`` (empty for fewer than
    two GPUs): the entries of an existing ``CUDA_VISIBLE_DEVICES``, else 0..count-1."""
    import torch

    count = torch.cuda.device_count()
    if count < 2:
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if len(listed) >= count else [str(i) for i in range(count)]


def how_it_ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def worker_env(i: int, workers: int, gpus: list[str]) -> dict[str, str]:
    """Worker ``i``'s environment (0-based): its share of the cores and, with several GPUs, one of them."""
    env = {**os.environ, "OMP_NUM_THREADS": str(worker_threads(workers))}  # the cores shared out, not each taking all
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
    return env


def run_processes(commands: list[tuple[list[str], dict[str, str]]]) -> tuple[list, list[int], list[int]]:
    """Start every (command, environment) and wait for them all; SIGTERM or Ctrl-C here is passed on
    to them as SIGTERM (each stops at a checkpoint). Returns the processes, their exit codes and the
    signals this process received while waiting (empty when none)."""
    procs: list[subprocess.Popen] = []
    stopped: list[int] = []

    def stop(signum, frame=None):
        stopped.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, stop) if main_thread else None
    try:
        for cmd, env in commands:
            procs.append(subprocess.Popen(cmd, env=env))
        codes = []
        for p in procs:
            while True:
                try:
                    codes.append(p.wait())
                    break
                except KeyboardInterrupt:
                    stop(signal.SIGINT)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return procs, codes, stopped


def run_workers(spec, trials, timeout, storage, workers, study) -> optuna.Study:
    cmd = [sys.executable, "-m", "nestar_lab.cli", "study", "run", str(spec.source), "--trials", str(trials),
           "--storage", storage]  # fmt: skip
    if timeout:
        cmd += ["--timeout", str(timeout)]
    gpus = visible_gpus()
    envs = [{**worker_env(i, workers, gpus), "NESTAR_STUDY_WORKER": str(i + 1)} for i in range(workers)]
    procs, codes, stopped = run_processes([(cmd, env) for env in envs])
    if stopped:
        raise StudyFailed(f"study {spec.name} interrupted ({signal.Signals(stopped[0]).name}); the workers' trials "
                          "are queued again: re-run the same command to go on", exit_code=128 + stopped[0])  # fmt: skip
    died = [f"worker {i + 1}/{workers} (pid {p.pid}) {how_it_ended(c)}"
            for i, (p, c) in enumerate(zip(procs, codes)) if c]  # fmt: skip
    if died:
        count = tally(study)
        state = (f"the study holds {count['finished']}/{trials} finished trials"
                 + (" and is complete" if count["finished"] >= trials and not count["running"]
                    else "; re-run the same command to finish it"))  # fmt: skip
        raise StudyFailed("; ".join(died) + f"; {state}")
    return study
