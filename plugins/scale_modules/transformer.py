"""The transformer scale module: label prefix + block-causal rows -> AdaLN MLP flow head."""

from __future__ import annotations

from typing import Literal

import torch
from nestar_plugins.scale_modules.flex import BlockMasks, use_flex
from nestar_plugins.scale_modules.layers import Block, FlowHead, JointHead, LayerCache, sincos_2d
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from nestar_lab.interfaces import Params, Rows, ScaleModule


class Transformer(ScaleModule):
    """A pre-norm transformer over ``prefix_tokens`` label tokens followed by the rows.

    Each row's input is the feeding token (projected) plus position features of the feeding
    token and of the target token (both from their 2-D grid coordinates), or the learned start
    embedding. The output at a row conditions the velocity head for the target token: a
    per-token MLP (``head: mlp``, MAR's design) or a joint transformer over the patch's tokens
    (``head: joint``), which models the tokens of a patch together.
    """

    class Params(Params):
        width: int = Field(128, ge=8)
        depth: int = Field(4, ge=1)
        heads: int = Field(4, ge=1)
        mlp_ratio: float = Field(4.0, gt=0)
        prefix_tokens: int = Field(4, ge=1, description="label tokens every row can attend to")
        head: Literal["mlp", "joint"] = Field("mlp", description="per-token MLP, or joint over a patch")
        head_width: int = Field(128, ge=8)
        head_depth: int = Field(3, ge=1)
        head_heads: int = Field(4, ge=1, description="attention heads of the joint head")
        attention: Literal["auto", "sdpa", "flex"] = Field(
            "auto", description="training-pass attention: auto = FlexAttention block masks on CUDA, else SDPA"
        )
        grad_checkpointing: bool = Field(False, description="recompute blocks in backward: less memory, ~30% more time")

        @model_validator(mode="after")
        def _heads_divide_width(self):
            if self.width % self.heads:
                raise ValueError(f"heads ({self.heads}) must divide width ({self.width})")
            if self.head == "joint" and self.head_width % self.head_heads:
                raise ValueError(f"head_heads ({self.head_heads}) must divide head_width ({self.head_width})")
            return self

    def __init__(self, params=None, *, spec):
        super().__init__(params, spec=spec)
        p, D = self.params, self.params.width
        self.register_buffer("pos_table", sincos_2d(spec.coords, D), persistent=False)
        self.token_in = nn.Linear(spec.token_dim, D)
        self.src_pos = nn.Linear(D, D, bias=False)
        self.tgt_pos = nn.Linear(D, D, bias=False)
        self.start = nn.Parameter(torch.randn(D) * 0.02)
        self.label_emb = nn.Embedding(spec.num_classes + 1, D)  # last row: the null label
        self.prefix_pos = nn.Parameter(torch.randn(p.prefix_tokens, D) * 0.02)
        self.stage_emb = nn.Embedding(spec.num_stages, D)
        self.blocks = nn.ModuleList(Block(D, p.heads, p.mlp_ratio) for _ in range(p.depth))
        self.norm = nn.LayerNorm(D)
        if p.head == "joint":
            self.head = JointHead(spec.token_dim, D, p.head_width, p.head_depth, p.head_heads)
        else:
            self.head = FlowHead(spec.token_dim, D, p.head_width, p.head_depth)
        for emb in (self.label_emb, self.stage_emb):
            nn.init.normal_(emb.weight, std=0.02)
        self._block_masks = BlockMasks()

    @property
    def joint_head(self) -> bool:
        return self.params.head == "joint"

    def _prefix(self, labels_B: Tensor, stage: int) -> Tensor:
        stage_vec = self.stage_emb.weight[stage]
        return self.label_emb(labels_B)[:, None, :] + self.prefix_pos[None] + stage_vec

    def _positions(self, rows: Rows) -> tuple[Tensor, Tensor]:
        """Position features of each row's feeding token and target: the grid cells of
        ``src_idx``/``tgt_idx``, or ``rows.coords`` (one position for both) when given."""
        if rows.coords is None:
            return self.pos_table[rows.src_idx.clamp(min=0)], self.pos_table[rows.tgt_idx]
        pos = sincos_2d(rows.coords, self.params.width).to(self.pos_table.dtype)
        return pos, pos

    def _embed_rows(self, x_in_BLd: Tensor, rows: Rows) -> Tensor:
        is_start = (rows.src_idx < 0).unsqueeze(-1)  # src_idx is (L,) or (B, L)
        src_pos, tgt_pos = self._positions(rows)
        fed = self.token_in(x_in_BLd) + self.src_pos(src_pos)
        x = torch.where(is_start, self.start.to(fed.dtype), fed) + self.tgt_pos(tgt_pos)
        return x if rows.stages is None else x + self.stage_emb(rows.stages)

    def forward(self, x_in_BLd: Tensor, rows: Rows, labels_B: Tensor, stage: int) -> Tensor:
        P, L = self.params.prefix_tokens, len(rows)
        x = torch.cat([self._prefix(labels_B, stage), self._embed_rows(x_in_BLd, rows).to(self.start.dtype)], 1)
        mask = None  # rows.mask None: bidirectional over prefix and rows, plain SDPA on any device
        if rows.mask is not None:
            mask = torch.zeros(P + L, P + L, dtype=torch.bool, device=x.device)
            mask[:, :P] = True
            mask[P:, P:] = rows.mask
            if use_flex(self.params.attention, x.device):
                mask = self._block_masks.get(rows, mask)
        recompute = self.params.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, mask, use_reentrant=False) if recompute else block(x, mask)
        return self.norm(x[:, P:])

    def compile_parts(self, backend: str = "inductor") -> None:
        """Compile the blocks and the velocity head: the training pass, the KV-cached extension
        and every ODE step of sampling all run through them."""
        for block in self.blocks:
            block.compile(backend=backend)
        self.head.compile(backend=backend)

    def start_cache(self, labels_B: Tensor, stage: int, capacity: int | None = None) -> list[LayerCache]:
        total = None if capacity is None else self.params.prefix_tokens + capacity
        cache = [LayerCache(total) for _ in self.blocks]
        x = self._prefix(labels_B, stage)
        for block, layer_cache in zip(self.blocks, cache):
            x = block(x, cache=layer_cache)
        return cache

    def extend(self, x_in_BLd: Tensor, rows: Rows, cache: list[LayerCache]) -> Tensor:
        x = self._embed_rows(x_in_BLd, rows)
        for block, layer_cache in zip(self.blocks, cache):
            x = block(x, cache=layer_cache)
        return self.norm(x)

    def velocity(self, y_BLd: Tensor, t_BL: Tensor, cond_BLD: Tensor, groups_L: Tensor | None = None) -> Tensor:
        return self.head(y_BLd, t_BL, cond_BLD, groups_L)
