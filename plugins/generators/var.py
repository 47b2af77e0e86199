"""VAR-style next-scale prediction: a pyramid of the latent grid, one sequential step per scale."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from nestar_lab.interfaces import Params, PassOptions, Rows, TokenSample
from nestar_lab.method.capture import context_passes
from nestar_lab.method.flow import draw_path, solve_patch, with_null_labels
from nestar_lab.method.generator import Generator
from nestar_lab.method.losses import LossOutput
from nestar_lab.method.schedule import Schedule, Stage


def pyramid_scales(scales: tuple[int, ...] | None, num_tokens: int) -> tuple[int, ...]:
    """The side lengths, coarse to fine, ending at the grid side; default 1, 2, 4, ..., side."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"VAR needs a square latent grid; got n={num_tokens} tokens")
    if scales is None:
        if side & (side - 1):
            raise ValueError(f"VAR's default scales 1, 2, 4, ... need a power-of-two side; got {side}: set scales")
        return tuple(2**i for i in range(side.bit_length()))
    if scales[-1] != side:
        raise ValueError(f"VAR's last scale must be the grid side {side}; got scales={list(scales)}")
    return tuple(scales)


class VAR(Generator):
    """Next-scale prediction in the manner of VAR (Tian et al. 2024), with continuous tokens.

    Scale k is the latent grid area-downsampled to ``s_k x s_k``; the last scale is the latent
    itself and is the output. Each scale is one sequential step: its rows are fed by the previous
    scale upsampled to ``s_k x s_k`` (the first by the start embedding) and see their own and
    coarser scales, so training is one teacher-forced pass over the pyramid and sampling extends
    a KV cache scale by scale. A flow head samples a scale's tokens (``groups`` = scale, so
    ``head: joint`` models a scale jointly); every pyramid token weighs the same in the loss.

    Our reading: targets are the downsampled grids, not VAR's residuals: continuous tokens leave
    no quantisation error for finer scales to correct, and the last scale is the image with no
    sum over scales. Rows sit at their cell's centre in grid coordinates (``Rows.coords``) and
    carry their scale (``Rows.stages``: one stage per scale, one shared module) in place of
    VAR's learned per-scale position and level embeddings.
    """

    class Params(Params):
        scales: tuple[int, ...] | None = Field(None, description="side lengths, coarse to fine; None: 1, 2, 4, ...")
        upsample: Literal["nearest", "bilinear", "bicubic"] = Field("bicubic", description="scale k -> k+1 input")
        share_weights: ClassVar[bool] = True  # one transformer runs every scale, as in VAR

        @field_validator("scales")
        @classmethod
        def _increasing(cls, v):
            if v is not None and (not v or v[0] < 1 or any(b <= a for a, b in zip(v, v[1:]))):
                raise ValueError(f"scales must be positive and strictly increasing; got {list(v)}")
            return v

    @classmethod
    def build_schedule(cls, params, num_tokens: int) -> Schedule:
        """Bookkeeping: stage k is one step accounting for the s_k^2 - s_(k-1)^2 cells it adds."""
        stages, done = [], 0
        for s in pyramid_scales(params.scales, num_tokens):
            new = torch.arange(done, s * s)
            stages.append(Stage(src_idx=torch.full_like(new, -1), tgt_idx=new, step_of_row=torch.zeros_like(new)))
            done = s * s
        return Schedule(num_tokens, stages)

    def __init__(self, params=None, *, num_tokens: int, make_module):
        super().__init__(params, num_tokens=num_tokens, make_module=make_module)
        spec = self.net(0).spec
        if spec.grid[0] != spec.grid[1]:
            raise ValueError(f"VAR needs a square latent grid; got {spec.grid[0]}x{spec.grid[1]}")
        self.scales, self.side = pyramid_scales(self.params.scales, num_tokens), spec.grid[1]
        cells = (spec.coords[:, 0] * self.side + spec.coords[:, 1]).long()  # grid cell of each token
        self.register_buffer("cell_of_token", cells, persistent=False)
        ends = torch.tensor([s * s for s in self.scales]).cumsum(0).tolist()
        self.bounds = list(zip([0, *ends[:-1]], ends))  # rows of each scale in the pyramid

    def _pyramid_rows(self, device: torch.device) -> Rows:
        """All scales' rows, coarse to fine; a row is fed by the previous scale's cell holding
        its centre (the first scale by the start embedding) and sits at its centre."""
        key = ("pyramid", str(device))
        if key not in self._rows:
            src, coords, level = [torch.full((self.scales[0] ** 2,), -1)], [], []
            for k, s in enumerate(self.scales):
                centre = (torch.arange(s) + 0.5) * self.side / s - 0.5
                coords.append(torch.cartesian_prod(centre, centre))
                level.append(torch.full((s * s,), k))
                if k:
                    p, start = self.scales[k - 1], self.bounds[k - 1][0]
                    parent = ((2 * torch.arange(s) + 1) * p) // (2 * s)
                    src.append((start + parent[:, None] * p + parent[None, :]).flatten())
            level = torch.cat(level).to(device)
            mask = level[None, :] <= level[:, None]  # a scale sees itself and coarser scales
            src, coords = torch.cat(src).to(device), torch.cat(coords).to(device)
            self._rows[key] = Rows(src, torch.arange(len(level), device=device), mask, level, coords, level)
        return self._rows[key]

    def _upsample(self, map_BdSS: Tensor, s: int) -> Tensor:
        corners = {} if self.params.upsample == "nearest" else {"align_corners": False}
        return F.interpolate(map_BdSS, size=(s, s), mode=self.params.upsample, **corners)

    def pyramid(self, tokens_BND: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing: ``(inputs, targets)``, each ``(B, P, d)`` over all scales' rows."""
        B, n, d = tokens_BND.shape
        cells = torch.zeros_like(tokens_BND).index_copy(1, self.cell_of_token, tokens_BND)
        grid = cells.transpose(1, 2).reshape(B, d, self.side, self.side)
        maps = [F.interpolate(grid, size=(s, s), mode="area") for s in self.scales]
        s0 = self.scales[0]
        inputs = [grid.new_zeros(B, s0 * s0, d)] + [flat(self._upsample(m, s)) for m, s in zip(maps, self.scales[1:])]
        return torch.cat(inputs, 1), torch.cat([flat(m) for m in maps], 1)

    def training_losses(self, tokens_BND, labels_B, flow, coordination, rng, options=PassOptions()) -> LossOutput:
        """``options.stages`` selects scales (progressive training); one network, no adjacent
        modules, so ``options.measure_disagreement`` logs nothing."""
        device = tokens_BND.device
        rows, net = self._pyramid_rows(device), self.net(0)
        x_in, x1 = self.pyramid(tokens_BND)
        cond = net(x_in, rows, labels_B, stage=0)
        ps = draw_path(x1, flow, rng, rows.groups if net.joint_head else None)  # joint: one time per scale
        err_P = (net.velocity(ps.y_t, ps.t, cond, rows.groups).float() - ps.target).pow(2).mean((0, 1, 3))
        parts = {f"mse_{s}x{s}": err_P[a:b].mean().detach() for (a, b), s in zip(self.bounds, self.scales)}
        if (active := options.stages) is not None:  # progressive training: these scales only
            err_P = err_P[torch.isin(rows.stages, torch.tensor(sorted(active), device=device))]
        parts = {"flow_1": err_P.mean(), **parts}  # every pyramid token weighs the same
        return LossOutput(total=parts["flow_1"], parts=parts)

    @torch.no_grad()
    def sample_tokens(self, labels_B, plan, rng, token_dim):
        device = labels_B.device
        B, n, net = labels_B.shape[0], self.schedule.num_tokens, self.net(0)
        # one KV cache runs every scale: it holds the unconditional rows when any scale guides
        guided = any(plan[k].settings.cfg_scale != 1.0 for k in range(len(self.scales)))
        labels_in = with_null_labels(labels_B, net.spec.num_classes) if guided else labels_B
        capacity = self.bounds[-1][1]  # every scale's rows
        context = context_passes(net, 0, labels_in, capacity, plan.autocast, plan[0].captured)  # one KV cache for every scale
        context.start(labels_in)
        prev, nfe, r = None, [], self._pyramid_rows(device)
        for k, s in enumerate(self.scales):  # scale k is stage k: modules.(k+1) sets its solver and guidance
            sp = plan[k]
            sl = slice(*self.bounds[k])
            rows = Rows(r.src_idx[sl], r.tgt_idx[sl], coords=r.coords[sl], stages=r.stages[sl])
            x_in = torch.zeros(B, s * s, token_dim, device=device) if prev is None else flat(self._upsample(prev, s))
            cond = context.extend(k, torch.cat([x_in, x_in]) if guided else x_in, rows)
            result = solve_patch(sp.solver, net.velocity, cond, (B, s * s, token_dim), rng=rng, autocast=plan.autocast,
                                 cfg_scale=sp.settings.scale_at(s * s, n), temperature=sp.settings.temperature,
                                 capture=sp.captured)  # one scale, one patch
            prev = result.y1.float().transpose(1, 2).reshape(B, token_dim, s, s)
            nfe.append(result.nfe)
        return TokenSample(flat(prev)[:, self.cell_of_token], sum(nfe), len(self.scales), tuple(nfe))


def flat(map_BdSS: Tensor) -> Tensor:
    """``(B, d, s, s)`` -> row-major tokens ``(B, s*s, d)``."""
    return map_BdSS.flatten(2).transpose(1, 2)
