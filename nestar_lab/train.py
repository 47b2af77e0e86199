"""THE training loop: AdamW, warm-up + schedule, clipping, EMA, bf16 autocast, checkpoints, resume.

Every random draw of step ``s`` comes from a generator seeded by ``(seed, s)`` and the data
order of an epoch from ``(seed, epoch)``, so a run interrupted and resumed from its checkpoint
ends with the same weights as one that never stopped (exactly, on the CPU).
"""

from __future__ import annotations

import math
import signal
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from nestar_lab import distributed
from nestar_lab.config import ExperimentConfig, TrainConfig
from nestar_lab.data import batch_indices, train_batches  # noqa: F401  (batch_indices: public here too)
from nestar_lab.experiment import Experiment, build_experiment
from nestar_lab.rundir import load_checkpoint, new_run_dir, save_checkpoint, write_json


class TrainingInterrupted(RuntimeError):
    """Training stopped early (signal or request); the checkpoint holds the last step."""

    def __init__(self, run_dir: Path, step: int):
        self.run_dir, self.step = run_dir, step
        super().__init__(f"interrupted at step {step}; resume with: nestar train --resume {run_dir}")


@dataclass
class TrainResult:
    """Where the run lives and what training cost."""

    run_dir: Path
    steps: int
    seconds: float
    step_ms_median: float
    final_loss: dict[str, float] = field(default_factory=dict)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def step_generator(seed: int, step: int, device: torch.device, rank: int = 0) -> torch.Generator:
    """The random stream of one training step on one rank."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step + rank * 7_777_777_777)


class EMA:
    """Exponential moving average of parameters, with the usual (1+s)/(10+s) warm-up of decay."""

    def __init__(self, params: dict[str, Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, Tensor], step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in names], [params[k].detach().float() for k in names], 1 - d)


class _StopFlag:
    def __init__(self):
        self.requested = False

    @contextmanager
    def on_signals(self):
        def handler(signum, frame):
            self.requested = True

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
    stop_at_step: int | None = None,
    progress: bool = True,
    callbacks: list[Callable[[int, Experiment], None]] = (),
) -> TrainResult:
    """Train ``cfg`` in ``run_dir`` (a new one when None); ``resume`` continues its checkpoint.

    ``stop_at_step`` interrupts after that many steps exactly as SIGINT would (for tests).
    ``callbacks(step, exp)`` run after every step (e.g. a study's pruning check); what they
    raise ends training. Under torchrun (or after :func:`distributed.init`) every rank runs
    this function: DDP averages gradients, rank 0 alone writes the run directory.
    """
    info = distributed.init(cfg.distributed.backend) if distributed.launched_by_torchrun() else distributed.current()
    run_dir = _shared_run_dir(cfg, run_dir, resume, info)
    exp = build_experiment(cfg)
    gen, tc, device = exp.generator, cfg.train, exp.device
    model = _wrap_ddp(exp, info)
    opt, ema = make_optimizer(exp)
    step = 0
    if resume:
        state = load_checkpoint(run_dir, map_location=device)
        gen.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        ema.shadow = {k: v.to(device) for k, v in state["ema"].items()}
        step = int(state["step"])

    def checkpoint():
        if info.is_main:
            state = {"step": step, "model": gen.state_dict(), "optimizer": opt.state_dict(), "ema": ema.shadow}
            save_checkpoint(run_dir, state)

    batches = train_batches(exp, step, info.rank, info.world)
    if info.is_main and info.enabled:
        print(f"distributed: {info.world} ranks x batch {tc.batch_size} = effective batch "
              f"{info.world * tc.batch_size}", flush=True)  # fmt: skip
    bar = _progress(tc.steps, step, progress and info.is_main)
    times: list[float] = []
    last: dict[str, float] = {}
    start = time.perf_counter()
    gen.train()
    with _StopFlag().on_signals() as stop:
        while step < tc.steps:
            t0 = time.perf_counter()
            tokens, labels = next(batches)
            out = train_step(exp, opt, ema, tokens, labels, step, model=model, rank=info.rank)
            step += 1
            times.append(time.perf_counter() - t0)
            if step % tc.log_every == 0 or step == tc.steps:
                last = {k: float(v.detach()) for k, v in out.parts.items()} | {"total": float(out.total.detach())}
                bar.set_postfix(loss=f"{last['total']:.4f}", refresh=False)
                if info.is_main:
                    _append_log(run_dir, step, last, tc.lr * lr_factor(step - 1, tc))
            bar.update(1)
            for callback in callbacks:
                callback(step, exp)
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                checkpoint()
            stopping = stop_at_step is not None and step >= stop_at_step and step < tc.steps
            if distributed.any_flag(stop.requested or stopping, info, device):
                checkpoint()
                bar.close()
                distributed.barrier(info)
                raise TrainingInterrupted(run_dir, step)
    bar.close()
    seconds = time.perf_counter() - start
    warm = times[min(10, len(times) // 2) :] or times
    result = TrainResult(run_dir, step, seconds, 1000 * statistics.median(warm) if warm else 0.0, last)
    if info.is_main:
        summary = {"steps": step, "seconds": seconds, "step_ms_median": result.step_ms_median, "final_loss": last,
                   "world_size": info.world, "effective_batch_size": info.world * tc.batch_size}  # fmt: skip
        write_json(run_dir / "train_summary.json", summary)
    distributed.barrier(info)
    return result


def _shared_run_dir(cfg: ExperimentConfig, run_dir, resume: bool, info: distributed.DistInfo) -> Path:
    """The run directory: made by rank 0 (a new one unless resuming), then told to every rank."""
    if resume:
        return Path(run_dir)
    path = [str(new_run_dir(cfg, run_dir))] if info.is_main else [None]
    if info.enabled:
        import torch.distributed as dist

        dist.broadcast_object_list(path, src=0)
    return Path(path[0])


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


def train_step(exp: Experiment, opt, ema: EMA, tokens: Tensor, labels: Tensor, step: int, model=None, rank: int = 0):
    """One optimiser step at ``step`` on a batch of tokens: label dropout, losses (one forward
    pass per module, through ``model``: the generator or its DDP wrapper), clip, AdamW, EMA.

    On logging steps the velocity disagreement of adjacent modules is measured too.
    """
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
            stages=stages, measure_disagreement=(step + 1) % tc.log_every == 0,
        )  # fmt: skip
    opt.zero_grad(set_to_none=True)
    out.total.backward()
    if tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(exp.generator.parameters(), tc.grad_clip)
    opt.step()
    ema.update(dict(exp.generator.named_parameters()), step)
    return out


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


def make_optimizer(exp: Experiment):
    """AdamW over the generator and an EMA of its parameters."""
    tc = exp.cfg.train
    opt = torch.optim.AdamW(exp.generator.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    return opt, EMA(dict(exp.generator.named_parameters()), tc.ema_decay)


def _append_log(run_dir: Path, step: int, losses: dict[str, float], lr: float) -> None:
    import json

    with open(run_dir / "train_log.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "lr": lr, **losses}) + "\n")


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def load_trained(run_dir: str | Path, use_ema: bool = True, cfg: ExperimentConfig | None = None) -> Experiment:
    """The experiment of a run with its trained (EMA by default) weights, in eval mode.

    ``cfg`` replaces the saved config (e.g. another solver or guidance scale for sampling).
    """
    from nestar_lab.rundir import load_run_config

    exp = build_experiment(cfg or load_run_config(run_dir))
    state = load_checkpoint(run_dir, map_location=exp.device)
    exp.generator.load_state_dict(state["model"])
    if use_ema:
        params = dict(exp.generator.named_parameters())
        with torch.no_grad():
            for name, value in state["ema"].items():
                params[name].copy_(value)
    exp.generator.eval()
    return exp
