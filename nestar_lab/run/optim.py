"""The optimiser side of training: AdamW with decay groups, the learning-rate schedule, and the
EMA of weights used for sampling (``train.py`` runs them)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from nestar_lab.config.schema import TrainConfig
from nestar_lab.run.experiment import Experiment


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class EMA:
    """Exponential moving average of parameters, with the usual (1+s)/(10+s) warm-up of decay."""

    def __init__(self, params: dict[str, Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, Tensor], step: int, skip: Tensor | None = None) -> None:
        """Move the average toward ``params``; ``skip`` (a 0-dim bool on the device) holds it
        still instead, decided on the device (no host sync; a skipped training step)."""
        d = min(self.decay, (1 + step) / (10 + step))
        names = list(self.shadow)
        shadow, current = [self.shadow[k] for k in names], [params[k].detach().float() for k in names]
        if skip is None:
            torch._foreach_lerp_(shadow, current, 1 - d)
            return
        # shadow += w (p - shadow) with w a device tensor: _foreach_mul_'s Tensor overload reads no
        # value on the host (a 0-dim tensor passed to _foreach_lerp_ becomes a Python scalar: a sync)
        steps = torch._foreach_sub(current, shadow)
        torch._foreach_mul_(steps, (1 - d) * (~skip).float())
        torch._foreach_add_(shadow, steps)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on the weights of linear and convolution layers only;
    none on biases, norm scales, embeddings and learned tokens or positions (decaying those pulls
    rare classes' and positions' vectors to zero rather than regularising a mapping)."""
    decayed = {
        id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    }
    params = list(model.parameters())
    if weight_decay == 0:  # one group, as checkpoints written before the split hold
        return [{"params": params, "weight_decay": 0.0}]
    groups = [
        {"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(exp: Experiment):
    """AdamW over the generator (:func:`decay_groups`) and an EMA of its parameters.

    Fused AdamW (one kernel per step on CUDA, and on the CPU): it takes ``found_inf``, a device
    flag that turns a step into a no-op (parameters, moments and step count untouched), so a
    non-finite step is skipped without the host reading anything (:func:`skip_step_if`)."""
    tc = exp.cfg.train
    opt = torch.optim.AdamW(decay_groups(exp.generator, tc.weight_decay), lr=tc.lr, betas=tc.betas, fused=True)
    return opt, EMA(dict(exp.generator.named_parameters()), tc.ema_decay)


def skip_step_if(opt: torch.optim.Optimizer, skip: Tensor) -> None:
    """Make the next ``opt.step()`` a no-op where the 0-dim device flag ``skip`` is true: fused
    AdamW's ``found_inf`` (what ``GradScaler`` hands it), decided on the device."""
    opt.found_inf = skip.float()
