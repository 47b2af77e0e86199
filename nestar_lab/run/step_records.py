"""What the training loop learns about its steps, kept on the device until the host needs it.

A plain training step makes no tensor-to-Python conversion (``docs/runs.md``, "Non-finite
steps"): the non-finite check, the skip, and the run of consecutive bad steps are device
tensors. The loop reads them all at once (one host-device sync) on logging, checkpoint, stop and
final steps. Between reads a streak that reaches ``train.max_nonfinite_steps`` freezes training
on the device (every later step is skipped), so the weights the host finds when it reads are
the ones of the step where the streak ended, and the failure names that step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class StepRecord:
    """One step, read back: its losses, whether it was non-finite (skipped), its learning rate."""

    step: int
    losses: dict[str, float]
    nonfinite: bool
    lr: float


class NonfiniteGuard:
    """The device side of the non-finite rule, and the steps not yet read by the host.

    ``hold`` is what a step's update is skipped on besides its own non-finite values: true once
    ``limit`` non-finite steps came in a row. :meth:`note` keeps a step's detached losses and
    flag; :meth:`read` returns every step noted since the last read, in order, with one sync.
    """

    def __init__(self, device: torch.device, streak: int, limit: int):
        self.limit = limit
        self.streak = torch.tensor(streak, device=device)  # consecutive non-finite steps
        self.hold = self.streak >= limit
        self._pending: list[tuple[int, dict[str, Tensor], Tensor, float]] = []

    def note(self, step: int, parts: dict[str, Tensor], total: Tensor, nonfinite: Tensor, lr: float) -> None:
        """Record step ``step`` (1-based: the steps done after it) without reading anything."""
        self.streak = torch.where(nonfinite, self.streak + 1, torch.zeros_like(self.streak))
        self.hold = self.hold | (self.streak >= self.limit)
        losses = {k: v.detach() for k, v in parts.items()} | {"total": total.detach()}
        self._pending.append((step, losses, nonfinite, lr))

    def read(self) -> list[StepRecord]:
        """Every noted step since the last read (one tensor-to-Python conversion in all)."""
        if not self._pending:
            return []
        flat = [torch.stack([v.float().reshape(()) for v in losses.values()] + [bad.float().reshape(())])
                for _, losses, bad, _ in self._pending]  # fmt: skip
        values = torch.cat(flat).tolist()
        records, at = [], 0
        for step, losses, _, lr in self._pending:
            n = len(losses)
            row = values[at : at + n + 1]
            records.append(StepRecord(step, dict(zip(losses, row[:n])), bool(row[n]), lr))
            at += n + 1
        self._pending.clear()
        return records
