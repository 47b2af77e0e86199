"""The generator base: a schedule (what is generated when) plus one scale module per stage.

A generator plugin only says *what* its schedule is (:meth:`Generator.build_schedule`); the
core trains every schedule with the same teacher-forced pass (``losses.py``) and samples it
with the same loop (``sample.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import Tensor, nn

from nestar_lab.interfaces import PassOptions, Plugin, Rows, ScaleModule, TokenSample
from nestar_lab.method import losses, sample
from nestar_lab.method.schedule import Schedule, coordination_rows

_SCHEDULES: dict[tuple, Schedule] = {}  # Generator.schedule_for's memo, oldest first


class Generator(Plugin, nn.Module, ABC):
    """A schedule of stages and the scale modules that run them.

    Constructor: ``(params, num_tokens=n, make_module=callable)``; ``make_module(stage)``
    returns a fresh scale module for stage ``stage`` (module ``stage + 1``, sized by its
    ``modules:`` entry; ``stage`` defaults to 0). When ``params.share_weights`` is true, one
    module runs every stage.
    """

    plugin_kind = "generator"

    def __init__(self, params=None, *, num_tokens: int, make_module: Callable[..., ScaleModule]):
        nn.Module.__init__(self)
        Plugin.__init__(self, params)
        self.schedule = self.schedule_for(self.params, num_tokens)
        self.schedule.validate()
        count = 1 if self.shares_weights(self.params) else len(self.schedule.stages)
        self.nets = nn.ModuleList(self.build_nets(make_module, count))
        self._rows: dict[tuple, object] = {}  # rows, masks and patch ids, built once per device

    @classmethod
    def schedule_for(cls, params, num_tokens: int) -> Schedule:
        """:meth:`build_schedule`, built once per generator class, params and token count (the
        config check, :func:`~nestar_lab.run.experiment.build_experiment` and the constructor share
        it; a schedule is never changed once built)."""
        key = (cls, params.model_dump_json(), num_tokens)
        if key not in _SCHEDULES:
            if len(_SCHEDULES) >= 32:
                _SCHEDULES.pop(next(iter(_SCHEDULES)))
            _SCHEDULES[key] = cls.build_schedule(params, num_tokens)
        return _SCHEDULES[key]

    @classmethod
    def shares_weights(cls, params) -> bool:
        """True when one network runs every stage (``params.share_weights``, a field or a class
        constant); then module sizes cannot differ per module."""
        return bool(getattr(params, "share_weights", False))

    def build_nets(self, make_module: Callable[..., ScaleModule], count: int) -> list[nn.Module]:
        """The networks, one per stage (``make_module(i)`` for stage i) or one shared; default:
        ``count`` scale modules. A generator whose network is not a scale module (``dit``)
        builds it here from one."""
        return [make_module(i) for i in range(count)]

    @classmethod
    @abstractmethod
    def build_schedule(cls, params, num_tokens: int) -> Schedule:
        """The schedule for ``num_tokens`` tokens; raise ``ValueError`` when impossible."""

    def training_losses(self, tokens_BND: Tensor, labels_B: Tensor, flow, coordination, rng,
                        options: PassOptions = PassOptions()):  # fmt: skip
        """The batch's losses. Default: the schedule's teacher-forced pass (``losses.py``);
        generators whose steps are not fixed rows (e.g. MAR's random masking) override this."""
        return losses.training_losses(self, tokens_BND, labels_B, flow, coordination, rng, options)

    def forward(self, tokens_BND: Tensor, labels_B: Tensor, flow, coordination, rng, options: PassOptions = PassOptions()):
        """Training losses (:meth:`training_losses`): the call DDP wraps."""
        return self.training_losses(tokens_BND, labels_B, flow, coordination, rng, options)

    def sample_tokens(self, labels_B: Tensor, plan: sample.SamplingPlan, rng, token_dim: int) -> TokenSample:
        """Tokens for ``labels`` with their NFE (in all and per stage) and context passes, each
        stage sampled as ``plan[stage]`` says (its solver, guidance and capture). Default: the
        schedule sampler (``sample.py``: KV cache, stages x steps). A generator brings its own loop
        only when its steps are not a schedule of fixed rows (``mar``: per-image random orders and
        re-encoding; ``dit``: no context network; ``var``: inputs upsampled from the previous scale);
        every sampler solves its patches with ``flow.solve_patch``."""
        return sample.sample_tokens(self, labels_B, plan, rng, token_dim)

    def time_groups(self, device: torch.device) -> Tensor | None:
        """Training draws one flow time per patch (the schedule's patch of each token) for the
        tokens of modules whose head is joint, and one per token for the others (per-module
        heads may differ, ``modules:``); ``None`` when no head is joint (``flow.draw_path``)."""
        joint = [getattr(self.net(i), "joint_head", False) for i in range(len(self.schedule.stages))]
        if not any(joint):
            return None
        key = ("patches", str(device))
        if key not in self._rows:
            groups = self.schedule.patch_of_token()
            own = int(groups.max()) + 1  # ids past every patch's: a group of one token
            for stage, is_joint in zip(self.schedule.stages, joint):
                if not is_joint:
                    groups[stage.tgt_idx] = own + stage.tgt_idx
            self._rows[key] = groups.to(device)
        return self._rows[key]

    def step_rows(self, stage: int, device: torch.device) -> list[Rows]:
        """The rows of each sequential step of ``stage``, on ``device``, built once (sampling reads
        them every call: no host-to-device copy, and the same memory for a captured step)."""
        key = ("steps", stage, str(device))
        if key not in self._rows:
            st = self.schedule.stages[stage]
            src, tgt = st.src_idx.to(device), st.tgt_idx.to(device)
            self._rows[key] = [Rows(src[st.step_rows(s)], tgt[st.step_rows(s)]) for s in range(st.num_steps)]
        return self._rows[key]

    def net(self, stage: int) -> ScaleModule:
        """The scale module that runs ``stage``."""
        return self.nets[stage if len(self.nets) > 1 else 0]

    def training_rows(self, stage: int, with_partner: bool, device: torch.device) -> tuple[Rows, int]:
        """Rows of ``stage``'s teacher-forced pass (plus its coordination partner's rows).

        Returns the rows and how many of them are the stage's own. Built once per device.
        """
        key = (stage, with_partner, str(device))
        st = self.schedule.stages[stage]
        partner = st.coordinate_with if with_partner else None
        if key not in self._rows:
            if partner is None:
                src, tgt, mask, n_main = st.src_idx, st.tgt_idx, st.mask(), st.num_rows
                groups = st.step_of_row
            else:
                other = self.schedule.stages[partner]
                src, tgt, mask, n_main = coordination_rows(st, other)
                groups = torch.cat([st.step_of_row, other.step_of_row + st.num_steps])
            rows = Rows(src.to(device), tgt.to(device), mask.to(device), groups.to(device))
            self._rows[key] = (rows, n_main)
        return self._rows[key]
