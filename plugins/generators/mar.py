"""MAR-style masked autoregression: random order, a cosine schedule of reveals, re-encoding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from nestar_lab.flow import guided_velocity, path_sample, sample_times
from nestar_lab.generator import Generator, gather_inputs
from nestar_lab.interfaces import Params, Rows
from nestar_lab.losses import LossOutput
from nestar_lab.sample import autocast_head, cfg_scale_at, with_null_labels
from nestar_lab.schedule import Schedule, Stage


def reveal_counts(num_tokens: int, steps: int) -> list[int]:
    """Tokens known after each of ``steps`` iterations: MAR's cosine schedule, at least one new
    token per step, all known at the end."""
    counts, known = [], 0
    for s in range(steps):
        target = num_tokens - math.floor(num_tokens * math.cos(math.pi / 2 * (s + 1) / steps))
        known = min(max(target, known + 1), num_tokens - (steps - s - 1))
        counts.append(known)
    counts[-1] = num_tokens
    return counts


class MAR(Generator):
    """Masked autoregression in the manner of MAR (Li et al. 2024): every step re-encodes the
    known tokens with bidirectional attention and reveals the next tokens of a random order, as
    many as a cosine schedule says; a flow head samples them. Trained by masking a random
    order's first ``ratio * n`` tokens (``ratio`` uniform in [mask_ratio_min, 1]).

    Simplified from MAR: one bidirectional transformer over all positions (known tokens fed by
    their value, unknown ones by the learned start embedding) instead of MAR's encoder-decoder
    with buffer tokens; one random order per batch rather than per image; no KV cache (none
    applies: representations of known tokens change as tokens are revealed). Use
    ``sample.cfg_schedule: linear`` for MAR's guidance schedule.
    """

    class Params(Params):
        steps: int = Field(64, ge=1, description="sampling iterations S")
        mask_ratio_min: float = Field(0.7, gt=0, le=1)

    @classmethod
    def build_schedule(cls, params, num_tokens: int) -> Schedule:
        if params.steps > num_tokens:
            raise ValueError(f"MAR needs steps <= n; got steps={params.steps}, n={num_tokens}")
        counts = [0, *reveal_counts(num_tokens, params.steps)]
        step = torch.cat([torch.full((b - a,), s) for s, (a, b) in enumerate(zip(counts, counts[1:]))])
        n = torch.arange(num_tokens)
        return Schedule(num_tokens, [Stage(src_idx=torch.full((num_tokens,), -1), tgt_idx=n, step_of_row=step)])

    def _all_rows(self, known_n: Tensor) -> Rows:
        n = known_n.shape[0]
        arange = torch.arange(n, device=known_n.device)
        full = torch.ones(n, n, dtype=torch.bool, device=known_n.device)
        return Rows(torch.where(known_n, arange, -1), arange, full)

    def training_losses(self, tokens_BND, labels_B, flow, coordination, rng, **options) -> LossOutput:
        B, n, d = tokens_BND.shape
        device, mul = tokens_BND.device, flow.batch_mul
        order = torch.randperm(n, generator=rng, device=device)
        lo = self.params.mask_ratio_min
        ratio = lo + (1 - lo) * float(torch.rand((), generator=rng, device=device))
        masked = order[: max(1, math.ceil(ratio * n))]
        known = torch.ones(n, dtype=torch.bool, device=device)
        known[masked] = False
        rows = self._all_rows(known)
        net = self.net(0)
        cond = net(gather_inputs(tokens_BND, rows.src_idx), rows, labels_B, stage=0)[:, masked]
        x1 = tokens_BND[:, masked].expand(mul, -1, -1, -1)
        x0 = torch.randn(x1.shape, generator=rng, device=device)
        ps = path_sample(x1, x0, sample_times(x1.shape[:-1], flow, rng, device))
        loss = F.mse_loss(net.velocity(ps.y_t, ps.t, cond).float(), ps.target)
        return LossOutput(total=loss, parts={"flow_1": loss})

    @torch.no_grad()
    def sample_tokens(self, labels_B, solver, cfg, rng, token_dim, autocast):
        device = labels_B.device
        B, n = labels_B.shape[0], self.schedule.num_tokens
        net = self.net(0)
        guided = cfg.cfg_scale != 1.0
        labels_in = with_null_labels(labels_B, net.spec.num_classes) if guided else labels_B
        head = autocast_head(net.velocity, autocast)
        order = torch.randperm(n, generator=rng, device=device)
        tokens = torch.zeros(B, n, token_dim, device=device)
        known = torch.zeros(n, dtype=torch.bool, device=device)
        nfe, done = 0, 0
        for count in reveal_counts(n, self.params.steps):
            new = order[done:count]
            rows = self._all_rows(known)
            x_in = gather_inputs(tokens, rows.src_idx)
            with autocast():
                cond = net(torch.cat([x_in, x_in]) if guided else x_in, rows, labels_in, stage=0)[:, new]
            w = cfg_scale_at(cfg, count, n)
            if guided and w == 1.0:
                cond = cond[:B]

            x0 = cfg.temperature * torch.randn(B, len(new), token_dim, generator=rng, device=device)
            result = solver.integrate(guided_velocity(head, cond, w), x0)
            tokens[:, new] = result.y1.to(tokens.dtype)
            known[new] = True
            nfe, done = nfe + result.nfe, count
        return tokens, nfe
