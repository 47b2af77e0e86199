"""NestAR: M = log_k(n) nested modules, k + (M-1)(k-1) sequential steps."""

from __future__ import annotations

from pydantic import Field

from nestar_lab.interfaces import Params
from nestar_lab.method.generator import Generator
from nestar_lab.method.schedule import Schedule, nested_schedule


class NestAR(Generator):
    """Module 1 generates k tokens one by one; module m >= 2 generates k-1 patches of k^(m-1)
    tokens, each conditioned on everything before it. Adjacent modules are coordinated."""

    class Params(Params):
        k: int = Field(4, ge=2, description="patch factor: n must equal k^M")
        share_weights: bool = Field(False, description="one scale module for every module")

    @classmethod
    def build_schedule(cls, params, num_tokens: int) -> Schedule:
        return nested_schedule(num_tokens, params.k)
