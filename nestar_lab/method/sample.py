"""THE sampler: for each stage, for each step (patch), encode the new rows with the KV cache,
then integrate the patch's velocity field from noise with the ODE solver (batched CFG).

``gen`` is a ``nestar_lab.method.generator.Generator``, named in annotations only: the generator's
default methods call this module, so it does not import the generator back.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from tqdm.auto import tqdm

from nestar_lab.interfaces import ODESolver, Samples, SampleStats, Tokenizer, TokenOrder, TokenSample
from nestar_lab.method.capture import context_passes, describe
from nestar_lab.method.capture import resolve as capture_resolve
from nestar_lab.method.flow import solve_patch, with_null_labels
from nestar_lab.method.schedule import gather_inputs


class SampleConfig(BaseModel):
    """Sampling: guidance, temperature, batch size, capture (the ``sample:`` section of a config)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    cfg_scale: float = Field(2.0, ge=0)
    cfg_schedule: Literal["constant", "linear"] = "constant"
    temperature: float = Field(1.0, gt=0)
    batch_size: int = Field(256, ge=1)
    capture: Literal["auto", "on", "off"] = Field(
        "auto", description="replay each patch solve as one CUDA graph: auto = on CUDA with fixed-step solvers"
    )

    def scale_at(self, tokens_done: int, num_tokens: int) -> float:
        """Guidance for a step after which ``tokens_done`` tokens exist (linear: 1 -> cfg_scale)."""
        if self.cfg_schedule == "constant":
            return self.cfg_scale
        return 1.0 + (self.cfg_scale - 1.0) * tokens_done / num_tokens



@dataclass(frozen=True)
class StagePlan:
    """How one stage (module) samples: its solver, its settings (guidance, temperature, batch size)
    and whether its patch solves and context passes replay as CUDA graphs (decided once)."""

    solver: ODESolver
    settings: SampleConfig
    captured: bool


@dataclass(frozen=True)
class SamplingPlan:
    """Every stage's :class:`StagePlan` and the precision: what ``Generator.sample_tokens`` reads.

    Built once per sampler (``Experiment.sampling_plan()``, or :meth:`build` / :meth:`shared`);
    past this point nothing is "one setting or one per stage". ``path`` is the log's line: which
    path sampling takes (captured or eager) and why."""

    stages: tuple[StagePlan, ...]
    autocast: Callable = contextlib.nullcontext
    path: str = ""

    @classmethod
    def build(cls, solvers: Sequence[ODESolver], settings: Sequence[SampleConfig], device: torch.device | str,
              autocast: Callable = contextlib.nullcontext, capture: bool | None = None) -> SamplingPlan:  # fmt: skip
        """One stage per solver and settings (``modules:`` resolved). ``capture`` overrides the
        settings' ``capture`` decision (``True`` on the CPU: the static path without graphs, for tests)."""
        if len(solvers) != len(settings):
            raise ValueError(f"a sampling plan needs one solver per stage's settings; got {len(solvers)} and {len(settings)}")
        stages = tuple(StagePlan(s, c, capture_resolve(c.capture if capture is None else capture, s, device))
                       for s, c in zip(solvers, settings))  # fmt: skip
        mode = "off" if capture is False else ("on" if capture else settings[0].capture)
        return cls(stages, autocast, describe(mode, list(solvers), device))

    @classmethod
    def shared(cls, solver: ODESolver, settings: SampleConfig, num_stages: int, device: torch.device | str,
               autocast: Callable = contextlib.nullcontext, capture: bool | None = None) -> SamplingPlan:  # fmt: skip
        """The same solver and settings for every one of ``num_stages`` stages."""
        return cls.build([solver] * num_stages, [settings] * num_stages, device, autocast, capture)

    def __getitem__(self, stage: int) -> StagePlan:
        return self.stages[stage]

    @property
    def captured(self) -> bool:
        return all(s.captured for s in self.stages)


@torch.no_grad()
def sample_tokens(gen: Generator, labels_B: Tensor, plan: SamplingPlan, rng: torch.Generator, token_dim: int) -> TokenSample:
    """Generate tokens ``(B, n, d)`` for ``labels`` with the schedule's stages and steps; each
    stage (module) solves its patches with its plan's solver and guidance."""
    device = labels_B.device
    B, n = labels_B.shape[0], gen.schedule.num_tokens
    tokens = torch.zeros(B, n, token_dim, device=device)
    nfe, done, passes = [], 0, 0
    for i, stage in enumerate(gen.schedule.stages):
        net, sp = gen.net(i), plan[i]
        guided = sp.settings.cfg_scale != 1.0  # cond and uncond rows share one batch
        labels_in = with_null_labels(labels_B, net.spec.num_classes) if guided else labels_B
        nfe.append(0)
        context = context_passes(net, i, labels_in, stage.num_rows, plan.autocast, sp.captured)  # on CUDA: graphs
        context.start(labels_in)  # the KV cache, allocated once at the stage's length and written in place
        for s, rows in enumerate(gen.step_rows(i, device)):
            x_in = gather_inputs(tokens, rows.src_idx)
            cond = context.extend(s, torch.cat([x_in, x_in]) if guided else x_in, rows)
            done, passes = done + len(rows), passes + 1
            result = solve_patch(sp.solver, net.velocity, cond, (B, len(rows), token_dim), rng=rng,
                                 autocast=plan.autocast, cfg_scale=sp.settings.scale_at(done, n),
                                 temperature=sp.settings.temperature, capture=sp.captured)  # fmt: skip
            tokens[:, rows.tgt_idx] = result.y1.to(tokens.dtype)
            nfe[i] += result.nfe  # a Python count: no sync
    return TokenSample(tokens, sum(nfe), passes, tuple(nfe))


class Sampler:
    """Images from labels: tokens -> latent grid -> pixels, with sampling stats, following a
    :class:`SamplingPlan` (one stage plan per module; batch size is module 1's, shared)."""

    def __init__(self, gen: Generator, tokenizer: Tokenizer, order: TokenOrder, plan: SamplingPlan):
        if len(plan.stages) != len(gen.schedule.stages):
            raise ValueError(f"the sampling plan has {len(plan.stages)} stage(s); the generator has "
                             f"{len(gen.schedule.stages)}")  # fmt: skip
        self.gen, self.tokenizer, self.order, self.plan = gen, tokenizer, order, plan
        self.captured = plan.captured
        self.path = plan.path  # one line for the log: captured or eager, and why

    @torch.no_grad()
    def __call__(self, labels: Tensor, seed: int = 0, batch_size: int | None = None) -> Samples:
        """Images for ``labels`` in batches of ``batch_size`` (default: the config's)."""
        device = next(self.gen.parameters()).device
        rng = torch.Generator(device=device).manual_seed(seed)
        labels = labels.to(device)
        token_dim = self.tokenizer.latent_shape[0]
        start = time.perf_counter()
        images, nfe_sum, passes, per_stage = [], 0, 0, None
        chunks = labels.split(batch_size or self.plan[0].settings.batch_size)
        for chunk in tqdm(chunks, desc="sample", unit="batch", disable=len(chunks) < 2, leave=False):
            batch = self.gen.sample_tokens(chunk, self.plan, rng, token_dim)
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
