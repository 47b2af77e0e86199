"""MAR-style masked autoregression: per-image random orders, a cosine reveal schedule, re-encoding."""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

from nestar_lab.interfaces import Params, PassOptions, Rows, TokenSample
from nestar_lab.method.flow import draw_path, solve_patch, with_null_labels
from nestar_lab.method.generator import Generator
from nestar_lab.method.losses import LossOutput
from nestar_lab.method.schedule import Schedule, Stage, gather_inputs


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


def mask_ratio(rng: torch.Generator, device, low: float, std: float, mean: float = 1.0) -> Tensor:
    """MAR's masking ratio: a normal(mean, std) truncated to [low, 1], drawn on the device by
    inverting its CDF (a 0-dim tensor: no host sync)."""
    a = torch.special.ndtr(torch.tensor((low - mean) / std, device=device))
    b = torch.special.ndtr(torch.tensor((1.0 - mean) / std, device=device))
    u = torch.rand((), generator=rng, device=device)
    return (mean + std * torch.special.ndtri(a + u * (b - a))).clamp(low, 1.0)


def random_orders(batch: int, n: int, rng: torch.Generator, device) -> Tensor:
    """``(B, n)``: an independent random generation order per image."""
    return torch.rand(batch, n, generator=rng, device=device).argsort(dim=1)


class MAR(Generator):
    """Masked autoregression in the manner of MAR (Li et al. 2024): every step re-encodes the
    known tokens with bidirectional attention and reveals the next tokens of each image's own
    random order, as many as a cosine schedule says; MAR's per-token MLP flow head samples them.
    Trained by masking the first ``ceil(ratio * n)`` tokens of a random order per image, with
    ``ratio`` MAR's truncated normal (mean 1, std ``mask_ratio_std``, on [mask_ratio_min, 1],
    one ratio per batch as in MAR); the loss covers the masked tokens.

    Simplified from MAR (``docs/baselines.md``): one bidirectional transformer over all
    positions (known tokens fed by their value, unknown ones by the learned start embedding,
    label as prefix tokens) instead of MAR's encoder-decoder with buffer tokens; flow matching
    instead of its DDPM head. No KV cache applies: the representations of known tokens change
    as tokens are revealed. Use ``sample.cfg_schedule: linear`` for MAR's guidance schedule.
    """

    class Params(Params):
        steps: int = Field(64, ge=1, description="sampling iterations S")
        mask_ratio_min: float = Field(0.7, gt=0, le=1)
        mask_ratio_std: float = Field(0.25, gt=0, description="std of MAR's truncated-normal mask ratio (mean 1)")

    @classmethod
    def build_schedule(cls, params, num_tokens: int) -> Schedule:
        if params.steps > num_tokens:
            raise ValueError(f"MAR needs steps <= n; got steps={params.steps}, n={num_tokens}")
        counts = [0, *reveal_counts(num_tokens, params.steps)]
        step = torch.cat([torch.full((b - a,), s) for s, (a, b) in enumerate(zip(counts, counts[1:]))])
        n = torch.arange(num_tokens)
        return Schedule(num_tokens, [Stage(src_idx=torch.full((num_tokens,), -1), tgt_idx=n, step_of_row=step)])

    def build_nets(self, make_module, count):
        nets = super().build_nets(make_module, count)
        if nets[0].joint_head:
            raise ValueError("mar samples each revealed token with MAR's per-token head; set scale_module.params.head: mlp")
        return nets

    def _encode(self, tokens_BND: Tensor, known_Bn: Tensor, labels_B: Tensor) -> Tensor:
        """Bidirectional pass over every position (no mask object): ``(B, n, D)``."""
        n = known_Bn.shape[1]
        arange = torch.arange(n, device=known_Bn.device)
        rows = Rows(torch.where(known_Bn, arange, -1), arange)
        return self.net(0)(gather_inputs(tokens_BND, rows.src_idx), rows, labels_B, stage=0)

    def training_losses(self, tokens_BND, labels_B, flow, coordination, rng, options=PassOptions()) -> LossOutput:
        """One stage: ``options.stages`` other than stage 0 is an error; no adjacent modules, so
        ``options.measure_disagreement`` logs nothing."""
        options.check_one_stage("MAR")
        B, n, _ = tokens_BND.shape
        device = tokens_BND.device
        rank_Bn = random_orders(B, n, rng, device).argsort(dim=1)  # each token's place in its image's order
        ratio = mask_ratio(rng, device, self.params.mask_ratio_min, self.params.mask_ratio_std)
        masked_Bn = rank_Bn < torch.ceil(ratio * n).clamp(min=1)
        cond = self._encode(tokens_BND, ~masked_Bn, labels_B)
        ps = draw_path(tokens_BND, flow, rng, None)  # MAR's head: per-token times, every position
        err = (self.net(0).velocity(ps.y_t, ps.t, cond).float() - ps.target).pow(2).mean(-1)
        weight = masked_Bn.to(err.dtype)
        loss = (err * weight).sum() / (weight.sum() * err.shape[0])  # the masked tokens only
        return LossOutput(total=loss, parts={"flow_1": loss})

    @torch.no_grad()
    def sample_tokens(self, labels_B, plan, rng, token_dim) -> TokenSample:
        sp, autocast = plan[0], plan.autocast  # one stage: modules.1
        device = labels_B.device
        B, n, net = labels_B.shape[0], self.schedule.num_tokens, self.net(0)
        guided = sp.settings.cfg_scale != 1.0
        labels_in = with_null_labels(labels_B, net.spec.num_classes) if guided else labels_B
        order_Bn = random_orders(B, n, rng, device)
        tokens = torch.zeros(B, n, token_dim, device=device)
        known = torch.zeros(B, n, dtype=torch.bool, device=device)
        nfe, done, counts = 0, 0, reveal_counts(n, self.params.steps)
        for count in counts:
            new_BK = order_Bn[:, done:count]
            pick = torch.cat([new_BK, new_BK]) if guided else new_BK
            with autocast():
                cond = self._encode(torch.cat([tokens, tokens]) if guided else tokens,
                                    torch.cat([known, known]) if guided else known, labels_in)  # fmt: skip
            cond = cond.gather(1, pick[..., None].expand(-1, -1, cond.shape[-1]))
            result = solve_patch(sp.solver, net.velocity, cond, (B, count - done, token_dim), rng=rng, autocast=autocast,
                                 cfg_scale=sp.settings.scale_at(count, n), temperature=sp.settings.temperature, capture=sp.captured)  # fmt: skip
            tokens.scatter_(1, new_BK[..., None].expand(-1, -1, token_dim), result.y1.to(tokens.dtype))
            known.scatter_(1, new_BK, True)
            nfe, done = nfe + result.nfe, count
        return TokenSample(tokens, nfe, len(counts), (nfe,))
