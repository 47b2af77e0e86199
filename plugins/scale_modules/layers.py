"""Building blocks of the transformer scale module: attention with a KV cache, the AdaLN flow head."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_2d(coords_n2: Tensor, dim: int) -> Tensor:
    """Fixed 2-D sine-cosine features of (row, col) coordinates: ``(n, dim)``."""
    quarter = dim // 4
    steps = torch.arange(quarter, dtype=torch.float32, device=coords_n2.device)
    freqs = torch.exp(-math.log(100.0) * steps / max(quarter, 1))
    parts = []
    for axis in range(2):
        angles = coords_n2[:, axis : axis + 1].float() * freqs[None] * math.pi
        parts += [torch.sin(angles), torch.cos(angles)]
    out = torch.cat(parts, dim=1)
    return F.pad(out, (0, dim - out.shape[1]))


def timestep_features(t: Tensor, dim: int = 64) -> Tensor:
    """Sinusoidal features of t in [0, 1] (scaled to [0, 1000] like diffusion timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = (t.float() * 1000.0).unsqueeze(-1) * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class LayerCache:
    """Keys and values of the rows a layer has seen so far: ``(B, heads, T, head_dim)``.

    With ``capacity`` (the prefix plus every row a sampling call will append) the buffers are
    allocated once, at the first append, at their final length and written in place: no
    ``torch.cat``, no new shapes or allocations per step, fixed addresses (what a CUDA graph of a
    step needs). Without it the cache grows by concatenation (for callers that do not know).
    """

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.length = 0
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new rows' keys and values; returns every row's so far (views)."""
        if self.capacity is None:
            self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
            self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
            self.length = self.k.shape[2]
            return self.k, self.v
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} rows; appending {k.shape[2]} to {self.length} overflows it")
        if self.k is None:
            B, H, _, hd = k.shape
            self.k = k.new_empty(B, H, self.capacity, hd)
            self.v = v.new_empty(B, H, self.capacity, hd)
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Multi-head self-attention; with a cache, new rows attend to cached rows and each other."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: LayerCache | None = None) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.append(k, v)
        if mask is not None and not isinstance(mask, Tensor):  # a FlexAttention BlockMask
            from nestar_plugins.scale_modules.flex import flex_attend

            out = flex_attend(q, k, v, mask)
        else:
            out = _sdpa(q, k, v, mask)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Scaled dot-product attention under a boolean ``mask`` (True: attend), or none.

    On the CPU two kernels are slow: the backward with a boolean mask (so the mask becomes an
    additive float one), and the bf16 flash kernel's backward (measured on a Xeon with AVX512-BF16,
    one thread, the ablation base: 71 ms per call at 64 rows against 15 in fp32, half of a bf16
    training step). Under bf16 autocast on the CPU attention therefore runs in fp32 (the rest of
    the step stays bf16): the step went from 0.57 s to 0.33 s, fp32 throughout takes 0.51 s."""
    dtype = q.dtype
    upcast = q.device.type == "cpu" and dtype == torch.bfloat16
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return out.to(dtype)


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: LayerCache | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), mask, cache)
        return x + self.mlp(self.norm2(x))


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class AdaLNResBlock(nn.Module):
    """Residual MLP block whose norm is shifted, scaled and gated by the conditioning."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.norm(x), shift, scale))


class _HeadBase(nn.Module):
    """What the velocity heads share: token, context and time embeddings in, AdaLN-zero out."""

    def __init__(self, token_dim: int, cond_dim: int, width: int):
        super().__init__()
        self.inp = nn.Linear(token_dim, width)
        self.cond = nn.Linear(cond_dim, width)
        self.time = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width))
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, token_dim)
        for layer in (self.ada[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed(self, y_BLd: Tensor, t_BL: Tensor, cond_BLD: Tensor) -> tuple[Tensor, Tensor]:
        """Token features and per-token conditioning (context + time)."""
        c = self.cond(cond_BLD) + self.time(timestep_features(t_BL).to(cond_BLD.dtype))
        return self.inp(y_BLd), c

    def output(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.out(_modulate(self.norm(x), shift, scale))


class FlowHead(_HeadBase):
    """Per-token MLP velocity head, AdaLN-conditioned on time and the transformer's output."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__(token_dim, cond_dim, width)
        self.blocks = nn.ModuleList(AdaLNResBlock(width) for _ in range(depth))

    def forward(self, y_BLd: Tensor, t_BL: Tensor, cond_BLD: Tensor, groups_L: Tensor | None = None) -> Tensor:
        x, c = self.embed(y_BLd, t_BL, cond_BLD)
        for block in self.blocks:
            x = block(x, c)
        return self.output(x, c)

class AdaLNAttnBlock(nn.Module):
    """DiT-style block: attention and MLP, each shifted, scaled and gated by the conditioning."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: Tensor, c: Tensor, mask: Tensor | None) -> Tensor:
        s1, g1, b1, s2, g2, b2 = self.ada(c).chunk(6, dim=-1)
        x = x + g1 * self.attn(_modulate(self.norm1(x), b1, s1), mask)
        return x + g2 * self.mlp(_modulate(self.norm2(x), b2, s2))


class JointHead(_HeadBase):
    """Velocity head over the tokens of a patch together: a small transformer whose tokens attend
    within their patch, AdaLN-conditioned per token on time and the context transformer's output."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, heads: int):
        super().__init__(token_dim, cond_dim, width)
        self.blocks = nn.ModuleList(AdaLNAttnBlock(width, heads) for _ in range(depth))

    def forward(self, y_BLd: Tensor, t_BL: Tensor, cond_BLD: Tensor, groups_L: Tensor | None = None) -> Tensor:
        x, c = self.embed(y_BLd, t_BL, cond_BLD)
        shape = torch.broadcast_shapes(x.shape, c.shape)
        L, W = shape[-2], shape[-1]
        x, c = x.expand(shape).reshape(-1, L, W), c.expand(shape).reshape(-1, L, W)
        mask = None if groups_L is None else groups_L[:, None] == groups_L[None, :]
        for block in self.blocks:
            x = block(x, c, mask)
        out = self.output(x, c)
        return out.reshape(*shape[:-1], out.shape[-1])
