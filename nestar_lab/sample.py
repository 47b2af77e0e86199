"""THE sampler: for each stage, for each step (patch), encode the new rows with the KV cache,
then integrate the patch's velocity field from noise with the ODE solver (batched CFG).

``gen`` is a ``nestar_lab.generator.Generator``, named in annotations only: the generator's
default methods call this module, so it does not import the generator back.
"""

from __future__ import annotations

import contextlib
import time
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from nestar_lab.capture import context_passes, describe, why_not_capturable
from nestar_lab.capture import resolve as capture_resolve
from nestar_lab.config import SampleConfig
from nestar_lab.flow import solve_patch, with_null_labels
from nestar_lab.schedule import gather_inputs, per_module
from nestar_lab.interfaces import ODESolver, Samples, SampleStats, Tokenizer, TokenOrder, TokenSample


@torch.no_grad()
def sample_tokens(
    gen: Generator,
    labels_B: Tensor,
    solver: ODESolver | Sequence[ODESolver],
    cfg: SampleConfig | Sequence[SampleConfig],
    rng: torch.Generator,
    token_dim: int,
    autocast=contextlib.nullcontext,
) -> TokenSample:
    """Generate tokens ``(B, n, d)`` for ``labels`` with the schedule's stages and steps; each
    stage (module) solves its patches with its solver and guidance (one, or one per stage)."""
    device = labels_B.device
    B, n = labels_B.shape[0], gen.schedule.num_tokens
    tokens = torch.zeros(B, n, token_dim, device=device)
    nfe, done, passes = [], 0, 0
    for i, stage in enumerate(gen.schedule.stages):
        net, solver_i, cfg_i = gen.net(i), per_module(solver, i), per_module(cfg, i)
        guided = cfg_i.cfg_scale != 1.0  # cond and uncond rows share one batch
        labels_in = with_null_labels(labels_B, net.spec.num_classes) if guided else labels_B
        nfe.append(0)
        static = capture_resolve(cfg_i.capture, solver_i, device)
        context = context_passes(net, i, labels_in, stage.num_rows, autocast, static)  # static on CUDA: graphs
        context.start(labels_in)  # the KV cache, allocated once at the stage's length and written in place
        for s, rows in enumerate(gen.step_rows(i, device)):
            x_in = gather_inputs(tokens, rows.src_idx)
            cond = context.extend(s, torch.cat([x_in, x_in]) if guided else x_in, rows)
            done, passes = done + len(rows), passes + 1
            result = solve_patch(solver_i, net.velocity, cond, (B, len(rows), token_dim), rng=rng, autocast=autocast,
                                 cfg_scale=cfg_i.scale_at(done, n), temperature=cfg_i.temperature,
                                 capture=static)  # fmt: skip
            tokens[:, rows.tgt_idx] = result.y1.to(tokens.dtype)
            nfe[i] += result.nfe  # a Python count: no sync
    return TokenSample(tokens, sum(nfe), passes, tuple(nfe))


class Sampler:
    """Images from labels: tokens -> latent grid -> pixels, with sampling stats. ``solver`` and
    ``cfg`` are one for every module or one per module (``Experiment.solvers`` and
    ``Experiment.sample_configs()``); batch size and temperature are module 1's (shared)."""

    def __init__(
        self,
        gen: Generator,
        tokenizer: Tokenizer,
        order: TokenOrder,
        solver: ODESolver | Sequence[ODESolver],
        cfg: SampleConfig | Sequence[SampleConfig],
        autocast=contextlib.nullcontext,
    ):
        self.gen, self.tokenizer, self.order, self.solver, self.cfg = gen, tokenizer, order, solver, cfg
        self.autocast = autocast
        device = next(gen.parameters()).device
        solvers = list(solver) if isinstance(solver, (list, tuple)) else [solver]
        mode = per_module(cfg, 0).capture
        self.captured = mode != "off" and all(why_not_capturable(s, device) is None for s in solvers)
        self.path = describe(mode, solvers, device)  # one line for the log: captured or eager, and why

    @torch.no_grad()
    def __call__(self, labels: Tensor, seed: int = 0, batch_size: int | None = None) -> Samples:
        """Images for ``labels`` in batches of ``batch_size`` (default: the config's)."""
        device = next(self.gen.parameters()).device
        rng = torch.Generator(device=device).manual_seed(seed)
        labels = labels.to(device)
        token_dim = self.tokenizer.latent_shape[0]
        start = time.perf_counter()
        images, nfe_sum, passes, per_stage = [], 0, 0, None
        chunks = labels.split(batch_size or per_module(self.cfg, 0).batch_size)
        for chunk in tqdm(chunks, desc="sample", unit="batch", disable=len(chunks) < 2, leave=False):
            batch = self.gen.sample_tokens(chunk, self.solver, self.cfg, rng, token_dim, self.autocast)
            nfe_sum += batch.nfe * len(chunk)  # adaptive solvers may differ per chunk
            stage_nfe = [m * len(chunk) for m in batch.nfe_per_module]
            per_stage = stage_nfe if per_stage is None else [a + b for a, b in zip(per_stage, stage_nfe)]
            passes = batch.context_passes
            images.append(self.tokenizer.decode(self.order.unflatten(batch.tokens)).float().clamp(-1, 1))
        out = torch.cat(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats = SampleStats(
            num_images=int(labels.shape[0]),
            sequential_steps=self.gen.schedule.sequential_steps,
            nfe_per_image=nfe_sum / max(len(labels), 1),
            seconds=time.perf_counter() - start,
            context_passes=passes,
            nfe_per_module=[m / max(len(labels), 1) for m in per_stage or []],
            captured=self.captured,
        )
        return Samples(images=out.cpu(), labels=labels.cpu(), stats=stats)
