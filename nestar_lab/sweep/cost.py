"""What a study run will cost, printed before its first trial (``nestar study run``): trials x
steps, and an estimate from training steps timed here on the base config."""

from __future__ import annotations

import copy

from nestar_lab.config.overrides import read_yaml
from nestar_lab.config.validation import validate_config
from nestar_lab.sweep.study import StudySpec, apply_dotted


def timed_step_seconds(spec: StudySpec, device: str | None = None) -> float:
    """Seconds of one training step of the study's base config and fixed overrides here."""
    from nestar_lab.run.train import time_step

    raw = apply_dotted(copy.deepcopy(read_yaml(spec.base_path())), dict(spec.overrides))
    if device:
        raw["device"] = device
    return time_step(validate_config(raw))


def describe_cost(spec: StudySpec, to_run: int, step_s: float | None, searches: int = 0) -> str:
    """One line: the trials left, their training steps, the bracketing searches still to run (at
    least the grid per arm; ``searches``: the arms without their ``bracket:`` value yet;
    extensions past an edge add trials), and the hours at ``step_s``
    (training only: evaluation comes on top)."""
    steps = int(validate_config(apply_dotted(copy.deepcopy(read_yaml(spec.base_path())), dict(spec.overrides))).train.steps)
    shared = " (sampling-only study: one shared training)" if spec.sampling_only else ""
    line = f"study {spec.name}: {to_run} trials to run x {steps} training steps = {to_run * steps} steps{shared}"
    search_steps = 0
    if searches:
        b = spec.bracket
        search_steps = searches * len(b.grid) * b.steps
        line += (f"; first {b.key} bracketed per arm: {searches} searches x {len(b.grid)}+ trials x {b.steps} steps "
                 f"= {search_steps}+ steps")  # fmt: skip
    if step_s is None or not (to_run or searches):
        return line
    total = step_s * ((steps if spec.sampling_only else to_run * steps) + search_steps)
    when = f"{total / 3600:.1f} h" if total > 5400 else f"{total / 60:.0f} min"
    return f"{line}; about {when} of training at {step_s:.2f} s/step timed here (evaluations on top)"
