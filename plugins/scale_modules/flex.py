"""FlexAttention for the teacher-forced (block-causal) pass: a sparse block mask instead of a
dense additive bias, compiled on CUDA. The KV-cached sampling path needs no mask and keeps SDPA."""

from __future__ import annotations

import hashlib
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
    """FlexAttention block masks cached by the dense mask's content, so a layout is built once
    however many ``Rows`` objects carry it. The fast path keys on the ``Rows`` object itself (held,
    so its id stays unique; generators reuse one ``Rows`` per stage): a hit costs no device work.
    Only a ``Rows`` seen for the first time hashes its mask (one device-to-host copy) to find an
    equal layout built before. At most ``size`` of each kept."""

    def __init__(self, size: int = 16):
        self.size = size
        self._by_rows: OrderedDict[int, tuple[object, tuple]] = OrderedDict()
        self._by_content: OrderedDict[tuple, object] = OrderedDict()
        self.built = 0  # block masks constructed (for tests and curiosity)

    def get(self, rows, dense_mask: Tensor):
        hit = self._by_rows.get(id(rows))
        if hit is not None and hit[0] is rows:
            self._by_rows.move_to_end(id(rows))
            content = hit[1]
        else:
            content = mask_key(dense_mask)
            self._by_rows[id(rows)] = (rows, content)
            _trim(self._by_rows, self.size)
        block = self._by_content.get(content)
        if block is None:
            block = block_mask(dense_mask)
            self.built += 1
            self._by_content[content] = block
            _trim(self._by_content, self.size)
        else:
            self._by_content.move_to_end(content)
        return block


def mask_key(dense_mask: Tensor) -> tuple:
    """A content key of a boolean mask: shape, device and a digest of its bits."""
    bits = dense_mask.detach().to("cpu", torch.bool).contiguous().numpy()
    return tuple(dense_mask.shape), str(dense_mask.device), hashlib.blake2b(bits.tobytes(), digest_size=16).hexdigest()


def _trim(cache: OrderedDict, size: int) -> None:
    while len(cache) > size:
        cache.popitem(last=False)


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
