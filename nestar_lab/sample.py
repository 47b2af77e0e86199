"""THE sampler: for each stage, for each step (patch), encode the new rows with the KV cache,
then integrate the patch's velocity field from noise with the ODE solver (batched CFG)."""

from __future__ import annotations

import contextlib
import time

import torch
from torch import Tensor
from tqdm.auto import tqdm

from nestar_lab.config import SampleConfig
from nestar_lab.flow import guided_velocity
from nestar_lab.generator import Generator, gather_inputs
from nestar_lab.interfaces import ODESolver, Rows, Samples, SampleStats, Tokenizer, TokenOrder


def cfg_scale_at(cfg: SampleConfig, tokens_done: int, num_tokens: int) -> float:
    """Guidance for a step after which ``tokens_done`` tokens exist (linear: 1 -> cfg_scale)."""
    if cfg.cfg_schedule == "constant":
        return cfg.cfg_scale
    return 1.0 + (cfg.cfg_scale - 1.0) * tokens_done / num_tokens


@torch.no_grad()
def sample_tokens(
    gen: Generator,
    labels_B: Tensor,
    solver: ODESolver,
    cfg: SampleConfig,
    rng: torch.Generator,
    token_dim: int,
    autocast=contextlib.nullcontext,
) -> tuple[Tensor, int]:
    """Generate tokens ``(B, n, d)`` for ``labels``; returns them and the NFE per image."""
    device = labels_B.device
    B, n = labels_B.shape[0], gen.schedule.num_tokens
    guided = cfg.cfg_scale != 1.0  # cond and uncond rows share one batch
    labels_in = with_null_labels(labels_B, gen.net(0).spec.num_classes) if guided else labels_B
    tokens = torch.zeros(B, n, token_dim, device=device)
    nfe, done = 0, 0
    for i, stage in enumerate(gen.schedule.stages):
        net = gen.net(i)
        head = autocast_head(net.velocity, autocast)
        src_all, tgt_all = stage.src_idx.to(device), stage.tgt_idx.to(device)
        with autocast():
            cache = net.start_cache(labels_in, stage=i)
        for s in range(stage.num_steps):
            sl = stage.step_rows(s)
            rows = Rows(src_all[sl], tgt_all[sl])
            x_in = gather_inputs(tokens, rows.src_idx)
            with autocast():
                cond = net.extend(torch.cat([x_in, x_in]) if guided else x_in, rows, cache)
            done += len(rows)
            w = cfg_scale_at(cfg, done, n)
            if guided and w == 1.0:
                cond = cond[:B]
            x0 = cfg.temperature * torch.randn(B, len(rows), token_dim, generator=rng, device=device)
            result = solver.integrate(guided_velocity(head, cond, w), x0)
            tokens[:, rows.tgt_idx] = result.y1.to(tokens.dtype)
            nfe += result.nfe
    return tokens, nfe


def with_null_labels(labels_B: Tensor, null: int) -> Tensor:
    """``(2B,)`` labels: the conditional ones, then the null label for the unconditional half."""
    return torch.cat([labels_B, torch.full_like(labels_B, null)])


def autocast_head(head, autocast):
    """A velocity head run under the sampler's precision (the ODE state itself stays fp32)."""

    def run(y, t, cond):
        with autocast():
            return head(y, t, cond)

    return run


class Sampler:
    """Images from labels: tokens -> latent grid -> pixels, with sampling stats."""

    def __init__(
        self,
        gen: Generator,
        tokenizer: Tokenizer,
        order: TokenOrder,
        solver: ODESolver,
        cfg: SampleConfig,
        autocast=contextlib.nullcontext,
    ):
        self.gen, self.tokenizer, self.order, self.solver, self.cfg = gen, tokenizer, order, solver, cfg
        self.autocast = autocast

    @torch.no_grad()
    def __call__(self, labels: Tensor, seed: int = 0, batch_size: int | None = None) -> Samples:
        """Images for ``labels`` in batches of ``batch_size`` (default: the config's)."""
        device = next(self.gen.parameters()).device
        rng = torch.Generator(device=device).manual_seed(seed)
        labels = labels.to(device)
        token_dim = self.tokenizer.latent_shape[0]
        start = time.perf_counter()
        images, nfe_sum = [], 0
        chunks = labels.split(batch_size or self.cfg.batch_size)
        for chunk in tqdm(chunks, desc="sample", unit="batch", disable=len(chunks) < 2, leave=False):
            tokens, nfe = self.gen.sample_tokens(chunk, self.solver, self.cfg, rng, token_dim, self.autocast)
            nfe_sum += nfe * len(chunk)  # adaptive solvers may differ per chunk
            images.append(self.tokenizer.decode(self.order.unflatten(tokens)).float().clamp(-1, 1))
        out = torch.cat(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats = SampleStats(
            num_images=int(labels.shape[0]),
            sequential_steps=self.gen.schedule.sequential_steps,
            nfe_per_image=nfe_sum / max(len(labels), 1),
            seconds=time.perf_counter() - start,
        )
        return Samples(images=out.cpu(), labels=labels.cpu(), stats=stats)
