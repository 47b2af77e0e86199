"""The layout of a generation schedule: stages (modules), their rows and sequential steps.

A *stage* is the work of one module. Its teacher-forced sequence has one row per generated
token: the row is fed by one already-known token (``src_idx``, or the learned start embedding
when -1) and yields the conditioning for one target token (``tgt_idx``). Rows are grouped into
consecutive *steps*: a step is one sequential generation step (one patch), and a row may attend
to rows of its own step and of earlier steps only (the block-causal mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor


@dataclass(frozen=True)
class Stage:
    """One module's rows, their steps, and the earlier stage it is coordinated with."""

    src_idx: Tensor  # (L,) long
    tgt_idx: Tensor  # (L,) long
    step_of_row: Tensor  # (L,) long, non-decreasing 0..S-1
    coordinate_with: int | None = None
    step_bounds: list[tuple[int, int]] = field(init=False, repr=False)

    def __post_init__(self):
        steps = self.step_of_row.tolist()
        if steps != sorted(steps) or (steps and (steps[0] != 0 or len(set(steps)) != steps[-1] + 1)):
            raise ValueError("rows must be grouped by step in order 0, 1, 2, ...")
        bounds, start = [], 0
        for s in range(len(set(steps))):
            end = start + steps.count(s)
            bounds.append((start, end))
            start = end
        object.__setattr__(self, "step_bounds", bounds)

    @property
    def num_rows(self) -> int:
        return int(self.tgt_idx.shape[0])

    @property
    def num_steps(self) -> int:
        return len(self.step_bounds)

    def step_rows(self, step: int) -> slice:
        """The rows of one sequential step (a patch)."""
        return slice(*self.step_bounds[step])

    def mask(self) -> Tensor:
        """``(L, L)`` bool: row r may attend to row c iff c's step <= r's step."""
        return self.step_of_row[None, :] <= self.step_of_row[:, None]


@dataclass(frozen=True)
class Schedule:
    """Everything a generator generates, in order: the stages and their steps."""

    num_tokens: int
    stages: list[Stage]

    @property
    def sequential_steps(self) -> int:
        return sum(s.num_steps for s in self.stages)

    def patch_of_token(self) -> Tensor:
        """``(n,)`` long: the global patch (stage, step) that generates each token."""
        ids, offset = torch.zeros(self.num_tokens, dtype=torch.long), 0
        for stage in self.stages:
            ids[stage.tgt_idx] = stage.step_of_row + offset
            offset += stage.num_steps
        return ids

    def validate(self) -> None:
        """Every token generated exactly once; every row fed by a token generated before it."""
        generated = torch.zeros(self.num_tokens, dtype=torch.long)
        for i, stage in enumerate(self.stages):
            if stage.coordinate_with is not None and not 0 <= stage.coordinate_with < i:
                raise ValueError(f"stage {i} coordinates with stage {stage.coordinate_with}, not an earlier one")
            for s in range(stage.num_steps):
                rows = stage.step_rows(s)
                src = stage.src_idx[rows]
                known = src[src >= 0]
                if (generated[known] == 0).any():
                    raise ValueError(f"stage {i} step {s} is fed by a token not generated before it")
                generated[stage.tgt_idx[rows]] += 1
        if not (generated == 1).all():
            bad = torch.nonzero(generated != 1).flatten().tolist()[:8]
            raise ValueError(f"tokens {bad} are generated {generated[bad].tolist()} times (expected once)")


def coordination_rows(stage: Stage, partner: Stage) -> tuple[Tensor, Tensor, Tensor, int]:
    """Rows for a pass of ``stage``'s module that also covers ``partner``'s rows.

    Returns ``(src_idx, tgt_idx, mask, num_main_rows)``: the partner's rows follow the stage's
    own rows as a second segment, and neither segment sees the other, so one forward pass
    yields the module's own conditioning and its conditioning on the partner's tokens.
    """
    a, b = stage.num_rows, partner.num_rows
    mask = torch.zeros(a + b, a + b, dtype=torch.bool)
    mask[:a, :a] = stage.mask()
    mask[a:, a:] = partner.mask()
    src = torch.cat([stage.src_idx, partner.src_idx])
    tgt = torch.cat([stage.tgt_idx, partner.tgt_idx])
    return src, tgt, mask, a


def is_power(n: int, k: int) -> int | None:
    """``M`` with ``k ** M == n``, or ``None``."""
    if k < 2 or n < 1:
        return None
    m = round(math.log(n, k))
    return m if k**m == n else None


def nested_schedule(num_tokens: int, k: int) -> Schedule:
    """NestAR: module 1 makes tokens 0..k-1 one at a time; module m >= 2 takes the k^(m-1)
    tokens made so far as its first patch and makes k-1 more patches of k^(m-1) tokens, each
    fed by the patch before it. Raises if ``num_tokens`` is not a power of ``k``."""
    num_modules = is_power(num_tokens, k)
    if num_modules is None or num_modules < 1:
        raise ValueError(f"NestAR needs n = k^M tokens; got n={num_tokens}, k={k}")
    arange = torch.arange
    stages = [Stage(src_idx=arange(-1, k - 1), tgt_idx=arange(k), step_of_row=arange(k))]
    for m in range(1, num_modules):
        patch = k**m
        tgt = arange(patch, k * patch)
        stages.append(
            Stage(src_idx=tgt - patch, tgt_idx=tgt, step_of_row=(tgt // patch) - 1, coordinate_with=m - 1)
        )
    return Schedule(num_tokens, stages)


def autoregressive_schedule(num_tokens: int) -> Schedule:
    """Token-by-token AR: one module, n steps, token i fed by token i-1 (n sequential steps)."""
    arange = torch.arange
    return Schedule(num_tokens, [Stage(src_idx=arange(-1, num_tokens - 1), tgt_idx=arange(num_tokens),
                                       step_of_row=arange(num_tokens))])  # fmt: skip


def single_step_schedule(num_tokens: int) -> Schedule:
    """Every token in one step (diffusion-style): rows fed by the start embedding only, so the
    whole image is produced by the velocity head; pair it with a joint head."""
    n = num_tokens
    return Schedule(n, [Stage(src_idx=torch.full((n,), -1), tgt_idx=torch.arange(n), step_of_row=torch.zeros(n, dtype=torch.long))])


T = TypeVar("T")


def gather_inputs(tokens_BND: Tensor, src_idx: Tensor) -> Tensor:
    """The token feeding each row, zeros for rows fed by the start embedding (``src = -1``).
    ``src_idx`` is ``(L,)``, or ``(B, L)`` when rows are fed differently per image."""
    idx = src_idx.clamp(min=0)
    if idx.dim() == 1:
        x = tokens_BND[:, idx]
    else:
        x = tokens_BND.gather(1, idx[..., None].expand(-1, -1, tokens_BND.shape[-1]))
    return x * (src_idx >= 0).unsqueeze(-1).to(x.dtype)
