"""AutoencoderKL weights: reading a file, LDM/MAR <-> diffusers key layout, strict loading.

The LDM / MAR (taming-style) layout names modules ``encoder.down.{i}.block.{j}``,
``encoder.down.{i}.attn.{j}``, ``{side}.mid.block_1/attn_1/block_2``, ``decoder.up.{i}...``
(indexed from the *highest* resolution, i.e. in reverse of diffusers' ``up_blocks``), with
attention projections stored as 1x1 convolutions. Every rule below maps both ways, so
:func:`diffusers_to_ldm` is the exact inverse of :func:`ldm_to_diffusers`. Unlike diffusers'
own converter, the encoder's down-block attention (``encoder.down.{i}.attn.{j}``, present in
MAR's KL-16) and decoder up-block attention are mapped too.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from torch import Tensor

# Training-loss modules (LPIPS network, discriminator) saved beside the autoencoder in LDM/MAR
# checkpoints: not part of the model, dropped on conversion.
DROPPED_PREFIXES = ("loss.",)

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_LINEAR = {"to_q", "to_k", "to_v", "to_out.0"}  # 1x1 conv in LDM, nn.Linear in diffusers

# (LDM module, diffusers module, leaf renames or None). {i}: block, {j}: layer in the block,
# {r}: decoder block, numbered in opposite directions by the two layouts.
_RULES = [
    ("encoder.down.{i}.block.{j}", "encoder.down_blocks.{i}.resnets.{j}", _RESNET),
    ("encoder.down.{i}.attn.{j}", "encoder.down_blocks.{i}.attentions.{j}", _ATTN),
    ("encoder.down.{i}.downsample.conv", "encoder.down_blocks.{i}.downsamplers.0.conv", None),
    ("decoder.up.{r}.block.{j}", "decoder.up_blocks.{r}.resnets.{j}", _RESNET),
    ("decoder.up.{r}.attn.{j}", "decoder.up_blocks.{r}.attentions.{j}", _ATTN),
    ("decoder.up.{r}.upsample.conv", "decoder.up_blocks.{r}.upsamplers.0.conv", None),
    ("{side}.mid.block_1", "{side}.mid_block.resnets.0", _RESNET),
    ("{side}.mid.attn_1", "{side}.mid_block.attentions.0", _ATTN),
    ("{side}.mid.block_2", "{side}.mid_block.resnets.1", _RESNET),
    ("{side}.norm_out", "{side}.conv_norm_out", None),
    ("{side}.conv_in", "{side}.conv_in", None),
    ("{side}.conv_out", "{side}.conv_out", None),
    ("quant_conv", "quant_conv", None),
    ("post_quant_conv", "post_quant_conv", None),
]
_GROUP = {"i": r"\d+", "j": r"\d+", "r": r"\d+", "side": "encoder|decoder"}


def _compile(module: str, leaves: dict[str, str] | None) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", module)  # literal, name, literal, name, ...
    body = "".join(re.escape(p) if n % 2 == 0 else f"(?P<{p}>{_GROUP[p]})" for n, p in enumerate(parts))
    leaf = rf"\.(?P<leaf>{'|'.join(map(re.escape, leaves))})" if leaves else ""
    return re.compile(rf"{body}{leaf}\.(?P<param>weight|bias)")


def _inverted(leaves: dict[str, str] | None) -> dict[str, str] | None:
    return leaves and {new: old for old, new in leaves.items()}


_LDM_TO_DIFF = [(_compile(ldm, lv), diff, lv) for ldm, diff, lv in _RULES]
_DIFF_TO_LDM = [(_compile(diff, _inverted(lv)), ldm, _inverted(lv)) for ldm, diff, lv in _RULES]


def _rename(key: str, rules, num_levels: int) -> tuple[str, bool] | None:
    """``(new key, is an attention projection weight)`` under the first matching rule, or ``None``."""
    for pattern, target, leaves in rules:
        m = pattern.fullmatch(key)
        if m is None:
            continue
        fields = m.groupdict()
        if fields.get("r") is not None:
            fields["r"] = str(num_levels - 1 - int(fields["r"]))
        leaf = leaves[fields["leaf"]] if leaves else ""
        module = target.format(**{k: v for k, v in fields.items() if k in _GROUP})
        projection = fields["param"] == "weight" and _ATTN_LINEAR & {leaf, fields.get("leaf")}
        return ".".join(filter(None, (module, leaf, fields["param"]))), bool(projection)
    return None


def ldm_key_to_diffusers(key: str, num_levels: int) -> str | None:
    """The diffusers name of an LDM key (``num_levels`` = len(block_out_channels)), or ``None``."""
    hit = _rename(key, _LDM_TO_DIFF, num_levels)
    return hit and hit[0]


def diffusers_key_to_ldm(key: str, num_levels: int) -> str | None:
    """The LDM name of a diffusers key, or ``None``."""
    hit = _rename(key, _DIFF_TO_LDM, num_levels)
    return hit and hit[0]


def ldm_to_diffusers(state: dict[str, Tensor], num_levels: int) -> dict[str, Tensor]:
    """Rename an LDM/MAR state dict to diffusers' layout; ``loss.*`` keys are dropped and
    unknown keys kept under their own names (so strict loading reports them)."""
    out = {}
    for key, value in state.items():
        if key.startswith(DROPPED_PREFIXES):
            continue
        hit = _rename(key, _LDM_TO_DIFF, num_levels)
        if hit is None:
            out[key] = value
            continue
        new_key, projection = hit
        if projection and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 conv -> linear
        out[new_key] = value
    return out


def diffusers_to_ldm(state: dict[str, Tensor], num_levels: int) -> dict[str, Tensor]:
    """Exact inverse of :func:`ldm_to_diffusers` (unknown keys raise ``KeyError``)."""
    out = {}
    for key, value in state.items():
        hit = _rename(key, _DIFF_TO_LDM, num_levels)
        if hit is None:
            raise KeyError(f"no LDM name for diffusers key {key!r}")
        new_key, projection = hit
        if projection and value.ndim == 2:
            value = value[:, :, None, None]  # linear -> 1x1 conv
        out[new_key] = value
    return out


def is_ldm_layout(state: dict[str, Tensor]) -> bool:
    """True for LDM/MAR key names (``encoder.down.``, ``decoder.up.``, ``*.mid.``)."""
    return any(re.match(r"(encoder|decoder)\.(down|up|mid)\.", k) for k in state)


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file or a torch checkpoint (state dict under ``model``,
    ``state_dict``, or the dict itself). Only tensors are unpickled (``weights_only``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path} holds Python objects besides tensors and is not unpickled for safety; "
            f"re-save its state dict alone (torch.save(ckpt['model'], ...)) or as .safetensors ({exc})"
        ) from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _listing(keys: list[str], limit: int = 5) -> str:
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)}: " + ", ".join(keys[:limit]) + more


def load_state_strict(model: torch.nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` (either layout) into a diffusers ``AutoencoderKL``; any missing,
    unexpected or mis-shaped key is a ``ValueError`` naming them in the file's own layout."""
    levels = len(model.config.block_out_channels)
    ldm = is_ldm_layout(state)
    original = {}
    if ldm:
        original = {ldm_key_to_diffusers(k, levels) or k: k for k in state}
        state = ldm_to_diffusers(state, levels)
    own = lambda k: (diffusers_key_to_ldm(k, levels) or k) if ldm else k  # noqa: E731
    expected = model.state_dict()
    missing = sorted(own(k) for k in expected.keys() - state.keys())
    unexpected = sorted(original.get(k, k) for k in state.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"weights {source} ({'LDM' if ldm else 'diffusers'} layout) do not fit the AutoencoderKL "
            f"(block_out_channels={tuple(model.config.block_out_channels)}): "
            f"missing keys {_listing(missing)}; unexpected keys {_listing(unexpected)}"
        )
    shapes = [f"{own(k)} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if state[k].shape != v.shape]  # fmt: skip
    if shapes:
        raise ValueError(f"weights {source} have mis-shaped tensors {_listing(shapes)}")
    model.load_state_dict(state, strict=True)
