"""Run bookkeeping for the training loop: the step log, resume records, guarded writes and the
failures they raise, and :class:`RunBook`, which keeps one segment's books (streaks, held-back
checkpoints, segments, step times). Everything here reads or writes a run directory's files; the
loop itself (``train.py``) decides when."""

from __future__ import annotations

import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from nestar_lab.config.errors import RunFailed
from nestar_lab.config.schema import ExperimentConfig, TrainConfig
from nestar_lab.run import distributed
from nestar_lab.run.experiment import device_name, precision_name
from nestar_lab.run.rundir import (
    CHECKPOINT,
    CONFIG,
    LOG,
    RESUMES,
    SUMMARY,
    json_safe,
    os_reason,
    save_checkpoint,
    write_json,
    write_run_config,
    write_text,
)
from nestar_lab.run.step_records import NonfiniteGuard


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


def append_log(run_dir: Path, step: int, losses: dict[str, float], lr: float, extra: dict | None = None) -> dict:
    """One JSON line per logged step; non-finite values are written as null (valid JSON). Returns the row."""
    row = json_safe({"step": step, "lr": lr, **losses, **(extra or {})})
    with open(run_dir / LOG, "a") as f:
        f.write(json.dumps(row, allow_nan=False) + "\n")
    return row


class RunBook:
    """The bookkeeping of one training segment, so that ``train()`` reads as the loop: the run so
    far (seconds and segments of earlier segments, from the checkpoint), this segment, the
    non-finite count and streak (kept on the device between reads, :class:`NonfiniteGuard`), the
    checkpoint that falls due during a streak (written at the next good step), the last good
    checkpoint, the logged losses and the step times.

    Rank 0 alone writes; every rank keeps the same book (their weights and flags are equal)."""

    def __init__(self, run_dir: Path, tc: TrainConfig, info, device: torch.device, step: int,
                 state: dict | None, changes: dict, bar, loggers=None) -> None:  # fmt: skip
        book = {"seconds": 0.0, "segments": [], "nonfinite_skipped": 0, "nonfinite_streak": 0}
        if state is not None:
            book.update(state.get("run") or book_from_summary(run_dir))
        self.run_dir, self.tc, self.info, self.device, self.bar = run_dir, tc, info, device, bar
        self.loggers = loggers  # RunLoggers: the same records as the log, after it is written
        self.earlier_seconds, self.earlier_segments = float(book["seconds"]), list(book["segments"])
        self.segment = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "start_step": step, "end_step": step,
                        "seconds": 0.0, "hardware": device_name(device),
                        "precision": precision_name(device, tc.precision)} | ({"changes": changes} if changes else {})
        self.skipped, self.streak = int(book["nonfinite_skipped"]), int(book["nonfinite_streak"])
        self.last_good = step if state is not None else None  # the step of the checkpoint on disk
        self.guard = NonfiniteGuard(device, self.streak, tc.max_nonfinite_steps)
        self.pending = False  # a checkpoint fell due while non-finite steps were being skipped
        self.last: dict[str, float] = {}
        self.times: list[float] = []  # seconds per step, spread evenly over the steps between two reads
        self.start = self.read_at = time.perf_counter()

    def note(self, step: int, out, nonfinite: Tensor, lr: float) -> None:
        """Keep step ``step``'s losses and flag on the device (no read)."""
        self.guard.note(step, out.parts, out.total, nonfinite, lr)

    def catch_up(self) -> None:
        """Read the steps the device kept (one sync): count skips and the streak, write their log
        lines, and fail at the step where a streak reached its limit (the device froze there)."""
        records = self.guard.read()
        if not records:
            return
        now = time.perf_counter()
        step_s = (now - self.read_at) / len(records)  # spread evenly: the device ran them unread
        self.times.extend([step_s] * len(records))
        self.read_at = now
        speed = {"step_seconds": step_s, "images_per_second": self.info.world * self.tc.batch_size / max(step_s, 1e-9)}
        tc, run_dir = self.tc, self.run_dir
        for rec in records:
            self.streak = self.streak + 1 if rec.nonfinite else 0
            self.skipped += rec.nonfinite
            if rec.step % tc.log_every == 0 or rec.step == tc.steps or rec.nonfinite:
                self.last = rec.losses
                self.bar.set_postfix(loss=f"{self.last['total']:.4f}", refresh=False)
                if self.info.is_main:
                    extra = {"nonfinite_skipped": self.skipped} | ({"skipped": True} if rec.nonfinite else {}) | speed
                    with writing(run_dir / LOG, run_dir, self.last_good, "log not written"):
                        row = append_log(run_dir, rec.step, self.last, rec.lr, extra)
                    if self.loggers is not None:
                        self.loggers.scalars(rec.step, row)
            if self.streak >= tc.max_nonfinite_steps:
                self.bar.close()
                raise TrainingFailed(streak_message(run_dir, rec.step, self.streak, tc, self.last_good), run_dir,
                                     rec.step)  # fmt: skip

    def due(self, step: int) -> bool:
        """A checkpoint falls due after ``step``: ``checkpoint_every``, the last step, or one held back."""
        return step % self.tc.checkpoint_every == 0 or step == self.tc.steps or self.pending

    def checkpoint_due(self, step: int) -> bool:
        """Whether to write a checkpoint after ``step``: one is :meth:`due` and no streak of skipped
        steps is running (it waits for the next good step)."""
        if not self.due(step):
            return False
        self.catch_up()
        self.pending = self.streak > 0 and step < self.tc.steps
        return not self.pending

    def checkpoint(self, step: int, gen, opt, ema) -> None:
        """Write the checkpoint of ``step`` atomically, with the run's book; refuse non-finite weights."""
        self.catch_up()  # the book a checkpoint carries is read first
        run_dir = self.run_dir
        self.segment.update(end_step=step, seconds=time.perf_counter() - self.start)
        check_weights_finite(gen, ema, run_dir, step, self.last_good)  # every rank: their weights are equal
        error = None
        if self.info.is_main:
            run = {"seconds": self.earlier_seconds + self.segment["seconds"],
                   "segments": [*self.earlier_segments, dict(self.segment)],
                   "nonfinite_skipped": self.skipped, "nonfinite_streak": self.streak}  # fmt: skip
            state = {"step": step, "model": gen.state_dict(), "optimizer": opt.state_dict(), "ema": ema.shadow,
                     "run": run}  # fmt: skip
            try:
                with writing(run_dir / CHECKPOINT, run_dir, self.last_good, "checkpoint not written"):
                    save_checkpoint(run_dir, state)
            except TrainingFailed as exc:
                error = exc
        if distributed.any_flag(error is not None, self.info, self.device):
            raise error or TrainingFailed(f"rank 0 could not write {run_dir / CHECKPOINT} (see its message)",
                                          run_dir, step)  # fmt: skip
        self.last_good = step

    def finish(self, step: int) -> dict:
        """The segment's end: ``train_summary.json`` (rank 0) and what it says."""
        seconds = time.perf_counter() - self.start
        warm = self.times[min(10, len(self.times) // 2) :] or self.times
        summary = {"steps": step, "seconds": self.earlier_seconds + seconds,
                   "step_ms_median": 1000 * statistics.median(warm) if warm else 0.0, "final_loss": self.last,
                   "world_size": self.info.world, "effective_batch_size": self.info.world * self.tc.batch_size,
                   "nonfinite_skipped": self.skipped}  # fmt: skip
        if self.info.is_main:
            self.segment.update(end_step=step, seconds=seconds)
            history = [*self.earlier_segments, self.segment]
            with writing(self.run_dir / SUMMARY, self.run_dir, self.last_good, "summary not written"):
                write_json(self.run_dir / SUMMARY, summary | {"segments": len(history), "segment_history": history})
        return summary | {"segment_seconds": seconds}
