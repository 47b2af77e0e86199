"""torch.distributed: process groups, ranks, and what only rank 0 does.

A run is distributed when launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) or
with ``nestar train --distributed``. Each rank trains a per-rank batch of ``train.batch_size``
(effective batch = ``world * batch_size``) on its own slice of every global batch; gradients
are averaged by DDP; rank 0 alone writes checkpoints, logs and progress bars.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_command(argv: list[str], processes: int) -> list[str]:
    """``nestar ARGV --distributed N`` as the command that runs ARGV (without ``--distributed``)
    under torchrun with N processes on this machine."""
    plain, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--distributed":
            skip = True
        elif not a.startswith("--distributed="):
            plain.append(a)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "nestar_lab.cli", *plain]  # fmt: skip


def launched_by_torchrun() -> bool:
    """True when the environment describes a job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(backend: str = "auto") -> DistInfo:
    """Join the process group described by the environment (torchrun's variables); a single
    process without them gets ``DistInfo()``. ``auto``: NCCL when CUDA is present, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world=world, local_rank=local_rank)


def current() -> DistInfo:
    """The job this process belongs to (single process when no group is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """Each rank's own GPU (``cuda:LOCAL_RANK``) when running on CUDA."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def any_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """True on every rank if it is true on any (e.g. a stop signal seen by one rank)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gather_cat(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` (same shape but dim 0) in rank order, on every rank."""
    if not info.enabled:
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(info.world)]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(info.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
