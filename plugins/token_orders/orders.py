"""Generation orders of a latent grid ("rasterization", which the paper leaves open)."""

from __future__ import annotations

from nestar_lab.interfaces import TokenOrder


class Raster(TokenOrder):
    """Row by row, left to right."""

    def order(self, h: int, w: int) -> list[int]:
        return list(range(h * w))


def _interleave(r: int, c: int) -> int:
    code = 0
    for bit in range(16):
        code |= ((r >> bit) & 1) << (2 * bit + 1) | ((c >> bit) & 1) << (2 * bit)
    return code


class ZOrder(TokenOrder):
    """Morton (Z) order: quadrants recursively, so every prefix of 4^m tokens is a square block.

    With k = 4 each NestAR module then completes the next larger square.
    """

    def order(self, h: int, w: int) -> list[int]:
        return sorted(range(h * w), key=lambda i: _interleave(i // w, i % w))


class CoarseToFine(TokenOrder):
    """Dyadic lattices from coarse to fine: first the stride-S lattice, then the cells new at
    stride S/2, ... Within a level the cells go by phase (right, below, diagonal) then raster.

    On a 2^L x 2^L grid with k = 4, module m outputs exactly the stride 2^(L-m) lattice and
    each of its patches is one phase of it: every module is a coarser image of the next.
    """

    def order(self, h: int, w: int) -> list[int]:
        top = 1
        while top * 2 < max(h, w):
            top *= 2

        def key(i: int) -> tuple[int, int, int, int]:
            r, c = divmod(i, w)
            stride = top
            while r % stride or c % stride:
                stride //= 2
            phase = (r // stride) % 2 * 2 + (c // stride) % 2 if stride < top else 0
            return (-stride, phase, r, c)

        return sorted(range(h * w), key=key)
