"""Token-by-token autoregression in the same sandbox: same tokenizers, orders, scale modules, solvers."""

from __future__ import annotations

from nestar_lab.interfaces import Params
from nestar_lab.method.generator import Generator
from nestar_lab.method.schedule import Schedule, autoregressive_schedule


class AR(Generator):
    """Token-by-token autoregression over the configured token order (use ``raster`` for the
    classic baseline): one causal module with a KV cache, n sequential steps, one flow-matching
    solve per token. NestAR with k = n is the same schedule."""

    class Params(Params):
        pass

    @classmethod
    def build_schedule(cls, params, num_tokens: int) -> Schedule:
        return autoregressive_schedule(num_tokens)
