"""The training objective of any schedule: per-stage flow matching plus coordination.

One forward pass per stage (module) per batch: the stage's teacher-forced rows, and, when the
coordination objective needs it, its partner's rows as a second masked segment of the same pass.

``gen`` is a ``nestar_lab.method.generator.Generator``, named in annotations only: the generator's
default methods call this module, so it does not import the generator back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from nestar_lab.interfaces import CoordinationObjective, CoordinationPair, PassOptions
from nestar_lab.method.flow import FlowConfig, draw_path
from nestar_lab.method.schedule import gather_inputs


@dataclass
class LossOutput:
    """The loss to minimise and each of its parts (``flow_1..flow_M``, ``coor``)."""

    total: Tensor
    parts: dict[str, Tensor]


def training_losses(
    gen: Generator,
    tokens_BND: Tensor,
    labels_B: Tensor,
    flow: FlowConfig,
    coordination: CoordinationObjective | None,
    rng: torch.Generator,
    options: PassOptions = PassOptions(),
) -> LossOutput:
    """Flow-matching losses of the stages (all, or ``options.stages``) and the coordination loss
    (none when ``coordination`` is None).

    Each token gets ``flow.batch_mul`` (noise, time) draws shared by every module that
    predicts it, so the coordination pair sees both modules at the same ``(y_t, t)``; with a
    joint head the time is one per patch (:meth:`Generator.time_groups`), as in sampling.
    ``options.measure_disagreement`` adds ``disagree_m``: mean ||v_m - v_(m-1)||^2 on module m-1's
    tokens, logged whether or not the objective uses it (it is never part of the loss).
    """
    stages, measure_disagreement = options.stages, options.measure_disagreement
    device = tokens_BND.device
    path = draw_path(tokens_BND, flow, rng, gen.time_groups(device))  # (mul, B, n, ...) over all tokens
    parts: dict[str, Tensor] = {}
    pairs: list[CoordinationPair] = []
    own_velocity: dict[int, Tensor] = {}
    active = set(range(len(gen.schedule.stages))) if stages is None else stages
    coordinate = coordination is not None and coordination.needs_pairs
    for i, stage in enumerate(gen.schedule.stages):
        if i not in active:
            continue
        j = stage.coordinate_with
        with_partner = j in own_velocity and (coordinate or measure_disagreement)
        rows, n_main = gen.training_rows(i, with_partner, device)
        net = gen.net(i)
        cond_BLD = net(gather_inputs(tokens_BND, rows.src_idx), rows, labels_B, stage=i)
        tgt = rows.tgt_idx
        ps = path.rows(tgt)
        v = net.velocity(ps.y_t, ps.t, cond_BLD, rows.groups).float()  # cond broadcasts over draws
        parts[f"flow_{i + 1}"] = F.mse_loss(v[:, :, :n_main], ps.target[:, :, :n_main])
        own_velocity[i] = v[:, :, :n_main]
        if with_partner:
            pair = CoordinationPair(
                fine_stage=i,
                v_fine=v[:, :, n_main:].flatten(0, 1),
                v_coarse=own_velocity[j].detach().flatten(0, 1),
                y_t=ps.y_t[:, :, n_main:].flatten(0, 1),
                t=ps.t[:, :, n_main:].flatten(0, 1),
                x1=ps.x1[:, :, n_main:].flatten(0, 1),
                labels=labels_B.repeat(ps.x1.shape[0]),  # rows flattened draw-major: (draw, image)
                step=options.step,
            )
            pairs.append(pair)
    total = torch.stack(list(parts.values())).sum()
    if measure_disagreement:
        for p in pairs:
            parts[f"disagree_{p.fine_stage + 1}"] = (p.v_fine.detach() - p.v_coarse).pow(2).mean()
    if pairs and coordinate:
        parts["coor"] = coordination(pairs)
        total = total + parts["coor"]
    return LossOutput(total=total, parts=parts)
