"""FlexAttention for the teacher-forced (block-causal) pass: a sparse block mask instead of a
dense additive bias, compiled on CUDA. The KV-cached sampling path needs no mask and keeps SDPA."""

from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache

import torch
from torch import Tensor


def flex_available() -> bool:
    """True when this torch ships FlexAttention."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def use_flex(choice: str, device: torch.device) -> bool:
    """``flex``: always (off CUDA eager, forward only: torch has no CPU backward for it);
    ``sdpa``: never; ``auto``: on CUDA."""
    if choice == "flex":
        if not flex_available():
            raise RuntimeError("scale_module.params.attention: 'flex' needs torch >= 2.5 (FlexAttention)")
        return True
    return choice == "auto" and device.type == "cuda" and flex_available()


class BlockMasks:
    """Block masks built once per row layout. Keys are the ``Rows`` objects themselves (held, so
    their ids stay unique), as generators reuse one ``Rows`` per stage; at most ``size`` kept."""

    def __init__(self, size: int = 16):
        self.size, self._masks = size, OrderedDict()

    def get(self, rows, dense_mask: Tensor):
        key = id(rows)
        if key in self._masks:
            self._masks.move_to_end(key)
            return self._masks[key][1]
        block = block_mask(dense_mask)
        self._masks[key] = (rows, block)
        if len(self._masks) > self.size:
            self._masks.popitem(last=False)
        return block


def block_mask(dense_mask: Tensor):
    """A FlexAttention ``BlockMask`` equal to a dense ``(L, L)`` boolean mask (True = attend)."""
    from torch.nn.attention.flex_attention import create_block_mask

    L = dense_mask.shape[0]

    def allowed(b, h, q, kv):
        return dense_mask[q, kv]

    return create_block_mask(allowed, None, None, L, L, device=dense_mask.device)


def flex_attend(q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
    """Attention under a ``BlockMask``; compiled on CUDA (FlexAttention's fast path)."""
    return _kernel(q.device.type == "cuda")(q, k, v, block_mask=mask)


@lru_cache(maxsize=2)
def _kernel(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
