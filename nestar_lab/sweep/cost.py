"""What a study run will cost, printed before its first trial (``nestar study run``): trials x
steps, and an estimate from training steps timed here on the base config."""

from __future__ import annotations

import copy
from typing import Sequence

from nestar_lab.config.overrides import read_yaml
from nestar_lab.config.validation import validate_config
from nestar_lab.sweep.bracket import Bracket
from nestar_lab.sweep.study import StudySpec, apply_dotted


def timed_step_seconds(spec: StudySpec, device: str | None = None, threads: int | None = None) -> float:
    """Seconds of one training step of the study's base config and fixed overrides here, with
    ``threads`` CPU threads (default: this process's), as a ``--workers`` worker would run it."""
    import torch

    from nestar_lab.run.train import time_step

    raw = apply_dotted(copy.deepcopy(read_yaml(spec.base_path())), dict(spec.overrides))
    if device:
        raw["device"] = device
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return time_step(validate_config(raw))
    finally:
        torch.set_num_threads(previous)


def describe_cost(spec: StudySpec, to_run: int, step_s: float | None, searches: Sequence[Bracket] = (),
                  workers: int = 1, worker_step_s: float | None = None, search_arms: int = 1) -> str:  # fmt: skip
    """One line: the trials left, their training steps, the bracketing searches still to run (one
    ``bracket:`` entry per search not yet run: at least its grid; extensions past an edge add
    trials), and the hours at ``step_s`` (training only: evaluation comes on top). With ``workers``
    > 1 the trials share out over the workers, each at ``worker_step_s`` (a step timed with a
    worker's threads), and the searches, which run first, share out over ``min(workers,
    search_arms)`` processes (the arms with searches left: an arm's searches run one after the other)."""
    steps = int(validate_config(apply_dotted(copy.deepcopy(read_yaml(spec.base_path())), dict(spec.overrides))).train.steps)
    shared = " (sampling-only study: one shared training)" if spec.sampling_only else ""
    line = f"study {spec.name}: {to_run} trials to run x {steps} training steps = {to_run * steps} steps{shared}"
    search_steps = 0
    parts = []
    for b in spec.bracket:  # in the order the searches of an arm run
        n = sum(s is b for s in searches)
        if not n:
            continue
        search_steps += n * len(b.grid) * b.steps
        parts.append(f"{b.key} bracketed per arm: {n} searches x {len(b.grid)}+ trials x {b.steps} steps "
                     f"= {n * len(b.grid) * b.steps}+ steps")  # fmt: skip
    if parts:
        line += "; first " + "; then ".join(parts)
    if step_s is None or not (to_run or searches):
        return line
    trial_steps = steps if spec.sampling_only else to_run * steps
    parallel = min(workers, max(to_run, 1)) if not spec.sampling_only else 1
    per_step = worker_step_s if parallel > 1 and worker_step_s else step_s
    side_by_side = min(workers, search_arms) if search_steps else 1
    search_step = worker_step_s if side_by_side > 1 and worker_step_s else step_s
    total = search_step * search_steps / side_by_side + per_step * trial_steps / parallel
    when = f"{total / 3600:.1f} h" if total > 5400 else f"{total / 60:.0f} min"
    how = f"{per_step:.2f} s/step in each of {parallel} workers" if parallel > 1 else f"{step_s:.2f} s/step"
    if side_by_side > 1:
        how += f" (the searches {side_by_side} arms at a time)"
    return f"{line}; about {when} of training at {how} timed here (evaluations on top)"
