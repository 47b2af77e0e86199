"""Baseline schedules in the same sandbox: same tokenizers, orders, scale modules, solvers."""

from __future__ import annotations

from nestar_lab.generator import Generator
from nestar_lab.interfaces import Params
from nestar_lab.schedule import Schedule, autoregressive_schedule, single_step_schedule


class AR(Generator):
    """Token-by-token autoregression over the configured token order (use ``raster`` for the
    classic baseline): one causal module with a KV cache, n sequential steps, one flow-matching
    solve per token. NestAR with k = n is the same schedule."""

    class Params(Params):
        pass

    @classmethod
    def build_schedule(cls, params, num_tokens: int) -> Schedule:
        return autoregressive_schedule(num_tokens)


class DiT(Generator):
    """Diffusion-style baseline: all n tokens in one step, the image made by integrating one
    velocity field over every token at once (sample with ``ode_solver.params.steps: 50``).

    The transformer only turns the label and positions into per-token conditioning; the
    denoiser is the scale module's velocity head, which must be joint
    (``scale_module.params.head: joint``) for tokens to see each other: a per-token head would
    draw every token independently. Simplified from DiT: flow matching instead of DDPM, and
    the conditioning tokens stand in for DiT's patch-embedding + label AdaLN.
    """

    class Params(Params):
        pass

    @classmethod
    def build_schedule(cls, params, num_tokens: int) -> Schedule:
        return single_step_schedule(num_tokens)
