"""THE training loop: AdamW, warm-up + schedule, clipping, EMA, bf16 autocast, checkpoints, resume.

Every random draw of step ``s`` comes from a generator seeded by ``(seed, s)`` and the data
order of an epoch from ``(seed, epoch)``, so a run interrupted and resumed from its checkpoint
ends with the same weights as one that never stopped (exactly, on the CPU).
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from nestar_lab.config.errors import exit_code_for_signal
from nestar_lab.config.schema import ExperimentConfig, TrainConfig
from nestar_lab.interfaces import PassOptions
from nestar_lab.run import distributed
from nestar_lab.run.data import train_batches
from nestar_lab.run.experiment import Experiment, build_experiment
from nestar_lab.run.loggers import RunLoggers, check_loggers
from nestar_lab.run.optim import EMA, lr_factor, make_optimizer, skip_step_if
from nestar_lab.run.runbook import RunBook, TrainingFailed, config_diff, cut_log, record_resume, writing
from nestar_lab.run.rundir import (
    SUMMARY,
    RunDirError,
    check_checkpoint_fits,
    check_writable,
    load_checkpoint,
    load_run_config,
    new_run_dir,
    refuse_held,
    training_lock,
    write_json,
)


class TrainingInterrupted(RuntimeError):
    """Training stopped early (signal or request); the checkpoint holds the last step.
    ``signum``: the signal that stopped it (None for a request); ``exit_code``: 128 + it."""

    def __init__(self, run_dir: Path, step: int, signum: int | None = None):
        self.run_dir, self.step, self.signum = run_dir, step, signum
        self.exit_code = exit_code_for_signal(signum)
        super().__init__(f"interrupted at step {step}; resume with: nestar train --resume {run_dir}")


@dataclass
class TrainResult:
    """Where the run lives and what training cost (``seconds``: this segment; ``total_seconds``:
    every segment of the run). ``already_finished``: a resume found nothing left to train."""

    run_dir: Path
    steps: int
    seconds: float
    step_ms_median: float
    final_loss: dict[str, float] = field(default_factory=dict)
    nonfinite_skipped: int = 0
    total_seconds: float = 0.0
    already_finished: bool = False


def step_generator(seed: int, step: int, device: torch.device, rank: int = 0) -> torch.Generator:
    """The random stream of one training step on one rank."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step + rank * 7_777_777_777)


class _StopFlag:
    def __init__(self):
        self.requested = False
        self.signum: int | None = None

    @contextmanager
    def on_signals(self):
        def handler(signum, frame):
            self.requested, self.signum = True, signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def train(
    cfg: ExperimentConfig,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    overrides: list[str] | None = None,
    stop_at_step: int | None = None,
    progress: bool = True,
    callbacks: list[Callable[[int, Experiment], None]] = (),
    log_group: str | None = None,
) -> TrainResult:
    """Train ``cfg`` in ``run_dir`` (a new one when None); ``resume`` continues its checkpoint.

    A ``run_dir`` that already holds a run is refused unless ``resume`` or ``overwrite`` (which
    clears the old run first); it must be writable (:class:`~nestar_lab.run.rundir.RunDirError`).
    Resuming cuts ``train_log.jsonl`` back to the checkpoint's step, records config changes
    (``config.yaml`` rewritten, an entry in ``resumes.jsonl``; ``overrides``: the ``--set``
    items that made them), and a run already at ``train.steps`` is returned untouched
    (``already_finished``). A step whose loss or gradient is not finite is skipped (no
    optimiser or EMA update) and counted; ``train.max_nonfinite_steps`` in a row raise
    :class:`TrainingFailed`, with no checkpoint written since the streak began.

    ``stop_at_step`` interrupts after that many steps exactly as SIGINT would (for tests).
    ``callbacks(step, exp)`` run after every step (e.g. a study's pruning check); what they
    raise ends training. ``log_group``: the group the config's ``loggers`` file a new run under
    (a study's name). Under torchrun (or after :func:`distributed.init`) every rank runs
    this function: DDP averages gradients, rank 0 alone writes the run directory.
    """
    info = distributed.init(cfg.distributed.backend) if distributed.launched_by_torchrun() else distributed.current()
    tc = cfg.train
    state = None
    if resume:
        state = load_checkpoint(run_dir)  # on the CPU, as a fresh optimiser keeps its step counts
        if int(state["step"]) >= tc.steps:
            return _already_finished(Path(run_dir), state, tc, info)
    check_loggers(cfg)  # a logger's package missing: before any work
    made = _check_place(run_dir, resume, overwrite, info)  # cheap refusals first
    try:
        exp = build_experiment(cfg)  # device, data, tokenizer weights, reference files: before any run file
    except BaseException:
        for empty in made:  # leave no empty directory behind
            empty.rmdir()
        raise
    held = training_lock(run_dir) if run_dir is not None and info.is_main else contextlib.nullcontext()
    with held:  # a second process training this directory is refused before it changes a file
        run_dir = _shared_run_dir(cfg, run_dir, resume, overwrite, info)
        gen, device = exp.generator, exp.device
        model = _wrap_ddp(exp, info)
        opt, ema = make_optimizer(exp)
        step, changes = 0, {}
        if state is not None:
            check_checkpoint_fits(state, gen.state_dict(), run_dir, config_changes(load_run_config(run_dir), cfg))
            gen.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            ema.shadow = {k: v.to(device) for k, v in state["ema"].items()}
            step = int(state["step"])
            if info.is_main:
                changes = record_resume(cfg, run_dir, step, overrides)
                cut_log(run_dir, step)
        batches = train_batches(exp, step, info.rank, info.world)
        if info.is_main and info.enabled:
            print(f"distributed: {info.world} ranks x batch {tc.batch_size} = effective batch "
                  f"{info.world * tc.batch_size}", flush=True)  # fmt: skip
        bar = _progress(tc.steps, step, progress and info.is_main)
        with RunLoggers(cfg, run_dir, info.is_main, log_group) as loggers:
            return _loop(exp, model, opt, ema, batches, step, stop_at_step, callbacks, info,
                         RunBook(run_dir, tc, info, device, step, state, changes, bar, loggers))  # fmt: skip


def _loop(exp: Experiment, model, opt, ema, batches, step: int, stop_at_step, callbacks, info, book) -> TrainResult:
    """Train from ``step`` to ``train.steps``: the loop itself (``book`` keeps its records)."""
    gen, device, tc, run_dir, bar = exp.generator, exp.device, exp.cfg.train, book.run_dir, book.bar
    gen.train()
    with _StopFlag().on_signals() as stop:
        while step < tc.steps:
            tokens, labels = next(batches)
            out, nonfinite = train_step(exp, opt, ema, tokens, labels, step, model=model, rank=info.rank, info=info,
                                        hold=book.guard.hold)  # fmt: skip
            book.note(step + 1, out, nonfinite, tc.lr * lr_factor(step, tc))
            step += 1
            bar.update(1)
            stopping = stop_at_step is not None and step >= stop_at_step and step < tc.steps
            if step % tc.log_every == 0 or book.due(step) or stopping or stop.requested:
                book.catch_up()  # the one read of the device's flags and losses since the last
            for callback in callbacks:
                callback(step, exp)
            if book.checkpoint_due(step):
                book.checkpoint(step, gen, opt, ema)
            if distributed.any_flag(stop.requested or stopping, info, device):
                book.checkpoint(step, gen, opt, ema)
                bar.close()
                distributed.barrier(info)
                raise TrainingInterrupted(run_dir, step, stop.signum)
    bar.close()
    done = book.finish(step)
    distributed.barrier(info)
    return TrainResult(run_dir, step, done["segment_seconds"], done["step_ms_median"], done["final_loss"],
                       done["nonfinite_skipped"], done["seconds"])  # fmt: skip


def _already_finished(run_dir: Path, state: dict, tc: TrainConfig, info: distributed.DistInfo) -> TrainResult:
    """A resume with nothing left to train: no file is rewritten (a missing summary, from a run
    killed between its last checkpoint and the summary, is written)."""
    step = int(state["step"])
    run = state.get("run") or {}
    path = run_dir / SUMMARY
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        summary = None
    if not isinstance(summary, dict):
        segments = run.get("segments", [])
        summary = {"steps": step, "seconds": run.get("seconds", 0.0), "step_ms_median": 0.0, "final_loss": {},
                   "world_size": info.world, "effective_batch_size": info.world * tc.batch_size,
                   "nonfinite_skipped": run.get("nonfinite_skipped", 0), "segments": len(segments),
                   "segment_history": segments}  # fmt: skip
        if info.is_main:
            with writing(path, run_dir, step, "summary not written"):
                write_json(path, summary)
    return TrainResult(run_dir, step, 0.0, float(summary.get("step_ms_median") or 0.0),
                       summary.get("final_loss") or {}, int(summary.get("nonfinite_skipped") or 0),
                       float(summary.get("seconds") or 0.0), already_finished=True)  # fmt: skip


def _check_place(run_dir, resume: bool, overwrite: bool, info: distributed.DistInfo) -> list[Path]:
    """A new run's directory, when given, checked before the experiment is built (rank 0): it
    holds no run (unless ``overwrite``) and is writable. Returns the directories this made
    (empty, innermost first)."""
    if resume or run_dir is None or not info.is_main:
        return []
    if not overwrite:
        refuse_held(run_dir)
    path = Path(run_dir).absolute()
    made = [p for p in (path, *path.parents) if not p.exists()]
    check_writable(run_dir)
    return made


def _shared_run_dir(cfg: ExperimentConfig, run_dir, resume: bool, overwrite: bool, info: distributed.DistInfo) -> Path:
    """The run directory, checked (a new one refuses an existing run unless ``overwrite``; any
    must be writable) and made by rank 0, then told to every rank (with rank 0's error, if any)."""
    path, error = None, None
    if info.is_main:
        try:
            path = str(check_writable(run_dir) if resume else new_run_dir(cfg, run_dir, overwrite=overwrite))
        except Exception as exc:  # noqa: BLE001  (told to the other ranks, then raised)
            error = exc
    if info.enabled:
        import torch.distributed as dist

        told = None if error is None else (isinstance(error, ValueError), str(error).splitlines()[0])
        shared = [path, told]
        dist.broadcast_object_list(shared, src=0)
        path, told = shared
        if told is not None and error is None:  # another rank: the same failure, as one line
            error = RunDirError(told[1]) if told[0] else TrainingFailed(f"rank 0 failed: {told[1]}")
    if error is not None:
        raise error
    return Path(path)


def _wrap_ddp(exp: Experiment, info: distributed.DistInfo):
    """The module training calls: the generator, wrapped in DDP when distributed."""
    if not info.enabled:
        return exp.generator
    from torch.nn.parallel import DistributedDataParallel as DDP

    unused = exp.cfg.distributed.find_unused_parameters
    if unused is None:
        unused = exp.cfg.train.module_schedule == "progressive"
    ids = [exp.device.index if exp.device.index is not None else info.local_rank] if exp.device.type == "cuda" else None
    return DDP(exp.generator, device_ids=ids, find_unused_parameters=unused)


def active_stages(step: int, num_stages: int, cfg: TrainConfig) -> set[int] | None:
    """Stages trained at ``step``: all (``joint``), or under ``progressive`` one module at a
    time in order during the first ``progressive_fraction`` of the steps, then all."""
    pretrain = int(cfg.progressive_fraction * cfg.steps)
    if cfg.module_schedule == "joint" or step >= pretrain:
        return None
    return {step * num_stages // pretrain}


def train_step(exp: Experiment, opt, ema: EMA, tokens: Tensor, labels: Tensor, step: int, model=None,
               rank: int = 0, info: distributed.DistInfo | None = None, hold: Tensor | None = None):  # fmt: skip
    """THE training step at ``step`` on a batch of tokens: label dropout, every module's losses
    (one forward pass per module, through ``model``: the generator or its DDP wrapper; on logging
    steps the modules' disagreement too), backward, clipping, the non-finite guard, AdamW, EMA.

    Returns ``(losses, nonfinite)``: ``nonfinite`` is a 0-dim bool on the device, true when the
    total loss or the gradient norm is not finite (on any rank). Such a step, or any step while
    ``hold`` is true (a streak at its limit), changes nothing: the fused optimiser is told on the
    device (``found_inf``) and the EMA holds still. Nothing here reads a device value on the host,
    so on a GPU the CPU runs ahead (``NonfiniteGuard`` reads later)."""
    cfg, tc, device = exp.cfg, exp.cfg.train, exp.device
    model = model if model is not None else exp.generator
    rng = step_generator(cfg.seed, step, device, rank)
    y = labels
    drop = torch.rand(y.shape, generator=rng, device=device) < tc.label_dropout
    y = torch.where(drop, torch.full_like(y, exp.dataset.num_classes), y)
    for group in opt.param_groups:
        group["lr"] = tc.lr * lr_factor(step, tc)
    stages = active_stages(step, len(exp.generator.schedule.stages), tc)
    with exp.autocast()():
        out = model(
            tokens, y, cfg.flow, exp.coordination, rng,
            PassOptions(stages=stages, measure_disagreement=(step + 1) % tc.log_every == 0, step=step),
        )  # fmt: skip
    opt.zero_grad(set_to_none=True)
    out.total.backward()
    if tc.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(exp.generator.parameters(), tc.grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in exp.generator.parameters() if p.grad is not None])
    nonfinite = ~(torch.isfinite(out.total.detach()) & torch.isfinite(norm.to(out.total.device)))
    if info is not None and info.enabled:  # a rank's own loss may be the only non-finite value
        import torch.distributed as dist

        flag = nonfinite.float().reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        nonfinite = flag.reshape(()) > 0
    skip = nonfinite if hold is None else nonfinite | hold
    skip_step_if(opt, skip)
    opt.step()
    ema.update(dict(exp.generator.named_parameters()), step, skip=skip)
    return out, nonfinite


@torch.no_grad()
def validation_loss(exp: Experiment, num_images: int = 256, seed: int = 0) -> float:
    """Flow loss (all modules, no coordination) of the current weights on a fixed test batch
    with fixed noise: a cheap, comparable signal during training."""
    split = exp.dataset.split("test")
    images, labels = split.images[:num_images].to(exp.device), split.labels[:num_images].to(exp.device)
    tokens = exp.order.flatten(exp.tokenizer.encode(images))
    rng = torch.Generator(device=exp.device).manual_seed(seed)
    was_training = exp.generator.training
    exp.generator.eval()
    with exp.autocast()():
        parts = exp.generator.training_losses(tokens, labels, exp.cfg.flow, None, rng).parts
    exp.generator.train(was_training)
    return float(sum(v for k, v in parts.items() if k.startswith("flow_")))


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (a log file, a test), where the one
    # line of an error message should stand alone
    return tqdm(total=total, initial=initial, disable=None if enabled else True, desc="train", unit="step",
                dynamic_ncols=True)  # fmt: skip


def time_step(cfg: ExperimentConfig) -> float:
    """Seconds of one training step of ``cfg`` on this machine: the third of three (the first
    ones are slow), for cost estimates (``nestar study run``, the quality benchmark)."""
    exp = build_experiment(cfg)
    batches, (opt, ema) = train_batches(exp, 0), make_optimizer(exp)
    took = 0.0
    for step in range(3):
        tokens, labels = next(batches)
        t0 = time.perf_counter()
        float(train_step(exp, opt, ema, tokens, labels, step)[0].total.detach())
        took = time.perf_counter() - t0
    return took


def config_changes(old: ExperimentConfig, new: ExperimentConfig) -> list[str]:
    """``key old -> new`` for each config key that differs (what a ``--set`` changed)."""
    diff = config_diff(old.model_dump(mode="json"), new.model_dump(mode="json"))
    return [f"{key} {change['from']!r} -> {change['to']!r}" for key, change in diff.items()]


def load_trained(run_dir: str | Path, use_ema: bool = True, cfg: ExperimentConfig | None = None) -> Experiment:
    """The experiment of a run with its trained (EMA by default) weights, in eval mode.

    ``cfg`` replaces the saved config (e.g. another solver or guidance scale for sampling).
    """
    saved = load_run_config(run_dir)
    exp = build_experiment(cfg or saved)
    state = load_checkpoint(run_dir, map_location=exp.device)
    changed = config_changes(saved, cfg) if cfg is not None else []
    advice = "sample and evaluate with the run's own model settings (drop the --set that changes them)"
    check_checkpoint_fits(state, exp.generator.state_dict(), run_dir, changed, advice)
    exp.generator.load_state_dict(state["model"])
    if use_ema:
        params = dict(exp.generator.named_parameters())
        with torch.no_grad():
            for name, value in state["ema"].items():
                params[name].copy_(value)
    exp.generator.eval()
    return exp
