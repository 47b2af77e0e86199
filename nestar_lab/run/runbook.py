"""Run bookkeeping for the training loop: the step log, resume records, guarded writes and the
failures they raise. Everything here reads or writes a run directory's files; the loop itself
(``train.py``) decides when."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from nestar_lab.config.errors import RunFailed
from nestar_lab.config.schema import ExperimentConfig, TrainConfig
from nestar_lab.run.rundir import (
    CHECKPOINT,
    CONFIG,
    LOG,
    RESUMES,
    SUMMARY,
    json_safe,
    os_reason,
    write_run_config,
    write_text,
)


class TrainingFailed(RunFailed, RuntimeError):
    """A run that cannot go on (non-finite losses or gradients for ``train.max_nonfinite_steps``
    steps in a row, weights that became non-finite, a run file that could not be written).
    The message is one line naming the step or file and the last good checkpoint, which is
    left intact. Exit code 1 on the command line."""

    def __init__(self, message: str, run_dir: Path | None = None, step: int | None = None):
        self.run_dir, self.step = run_dir, step
        super().__init__(message)


def book_from_summary(run_dir: Path) -> dict:
    """Run bookkeeping for a checkpoint written before checkpoints carried it."""
    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
        return {"seconds": float(summary.get("seconds") or 0.0), "segments": list(summary.get("segment_history") or [])}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def record_resume(cfg: ExperimentConfig, run_dir: Path, step: int, overrides: list[str] | None) -> dict:
    """What a resume changed in the run's config (``{key: {"from": old, "to": new}}``): the new
    ``config.yaml`` is written and the resume is appended to ``resumes.jsonl``."""
    import yaml

    try:
        saved = yaml.safe_load((run_dir / CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        saved = None
    new = cfg.model_dump(mode="json")
    changes = config_diff(saved, new) if isinstance(saved, dict) else {}
    with writing(run_dir / CONFIG, run_dir, step, "config not written"):
        if changes or not isinstance(saved, dict):
            write_run_config(run_dir, cfg)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "step": step, "overrides": list(overrides or []),
             "changes": changes}  # fmt: skip
    with writing(run_dir / RESUMES, run_dir, step, "resume not recorded"):
        with open(run_dir / RESUMES, "a") as f:
            f.write(json.dumps(json_safe(entry), allow_nan=False) + "\n")
    return changes


def config_diff(old, new, prefix: str = "") -> dict:
    if isinstance(old, dict) and isinstance(new, dict):
        out = {}
        for key in [*old, *(k for k in new if k not in old)]:
            out |= config_diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return {} if old == new else {prefix.rstrip("."): {"from": old, "to": new}}


def cut_log(run_dir: Path, step: int) -> None:
    """Cut ``train_log.jsonl`` back to the checkpoint's ``step`` (atomically), one line per step:
    the steps a killed segment logged after its last checkpoint are trained, and logged, again."""
    path = run_dir / LOG
    if not path.is_file():
        return
    text = path.read_text()
    rows: dict[int, str] = {}
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # half a line from a kill
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            rows[row["step"]] = line  # a step logged twice (by an older version): the later line
    new = "".join(rows[s] + "\n" for s in sorted(rows))
    if new != text:
        with writing(path, run_dir, step, "log not cut back"):
            write_text(path, new)


@contextmanager
def writing(path: Path, run_dir: Path, last_good: int | None, what: str):
    """Turn an ``OSError`` while writing ``path`` (a full disk, a permission change) into a
    one-line :class:`TrainingFailed` naming the path, the OS's reason and the checkpoint kept."""
    try:
        yield
    except OSError as exc:
        kept = (f"the previous checkpoint {run_dir / CHECKPOINT} (step {last_good}) is intact"
                if last_good is not None else "no checkpoint was written before")  # fmt: skip
        raise TrainingFailed(
            f"{path}: {what}: {os_reason(exc)}; {kept}; free space or fix the directory, then "
            f"resume with `nestar train --resume {run_dir}`",
            run_dir,
        ) from exc


def streak_message(run_dir: Path, step: int, streak: int, tc: TrainConfig, last_good: int | None) -> str:
    head = (f"training failed at step {step}: loss or gradient not finite for {streak} steps in a row "
            f"(steps {step - streak + 1}-{step}, train.max_nonfinite_steps={tc.max_nonfinite_steps}); ")  # fmt: skip
    if last_good is None:
        return head + (f"no checkpoint was written before; start again with a lower train.lr "
                       f"(`nestar train CONFIG --run-dir {run_dir} --overwrite --set train.lr=...`)")  # fmt: skip
    return head + (f"the last good checkpoint {run_dir / CHECKPOINT} (step {last_good}) is intact; resume it with "
                   f"a lower train.lr (`nestar train --resume {run_dir} --set train.lr=...`)")  # fmt: skip


def check_weights_finite(gen, ema, run_dir: Path, step: int, last_good: int | None) -> None:
    """Before a checkpoint: weights that became non-finite (a finite gradient times a huge
    learning rate) never reach the file; training cannot recover from them."""
    tensors = [p.detach() for p in gen.parameters()] + list(ema.shadow.values())
    if bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        return
    where = (f"the last good checkpoint {run_dir / CHECKPOINT} (step {last_good}) is intact; resume it"
             if last_good is not None else "no checkpoint was written before; start again")  # fmt: skip
    raise TrainingFailed(
        f"training failed at step {step}: the weights became non-finite (the learning rate is too large for "
        f"them); {where} with a lower train.lr",
        run_dir,
        step,
    )


def append_log(run_dir: Path, step: int, losses: dict[str, float], lr: float, extra: dict | None = None) -> None:
    """One JSON line per logged step; non-finite values are written as null (valid JSON)."""
    row = json_safe({"step": step, "lr": lr, **losses, **(extra or {})})
    with open(run_dir / LOG, "a") as f:
        f.write(json.dumps(row, allow_nan=False) + "\n")
