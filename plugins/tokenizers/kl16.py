"""MAR's KL-16 VAE (the tokenizer of the NestAR paper): 256 px -> 16 x 16 latents of 16 channels."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nestar_plugins.tokenizers.autoencoder_kl import AutoencoderKLParams, AutoencoderKLTokenizer
from nestar_plugins.tokenizers.ldm_convert import load_state_strict, read_state_dict
from pydantic import Field

if TYPE_CHECKING:  # diffusers is imported on first build: registry discovery stays fast
    from diffusers import AutoencoderKL

WHERE_TO_GET = (
    "KL-16 weights are MAR's released kl16.ckpt (github.com/LTH14/mar: util/download.py saves it as "
    "pretrained_models/vae/kl16.ckpt); "
    "set tokenizer.params.weights to its local path, or to null for random weights"
)


class KL16(AutoencoderKLTokenizer):
    """The KL-16 VAE of MAR/LDM as a diffusers ``AutoencoderKL``, frozen.

    Architecture: ``block_out_channels`` (128, 128, 256, 256, 512), two resnets per block,
    attention in the encoder's last down block and in both mid blocks, none in the decoder's
    up blocks, 16 latent channels (downsampling 16). ``weights`` is a local path to a diffusers
    directory, a ``.safetensors`` file, or an LDM/MAR checkpoint (``.ckpt``/``.pt``/``.pth``,
    state dict under ``model``, ``state_dict`` or top level), in either key layout; ``null``
    builds random weights (tests, speed benchmarks) with a warning.
    """

    class Params(AutoencoderKLParams):
        weights: str | None = Field(..., description="local weights path; null = random weights (meaningless samples)")
        scaling_factor: float = Field(0.2325, gt=0, description="latent multiplier (MAR: 0.2325)")
        sample_posterior: bool = Field(True, description="latent cache draws from the posterior, as MAR trains")
        block_out_channels: tuple[int, ...] = Field((128, 128, 256, 256, 512), min_length=1)
        layers_per_block: int = Field(2, ge=1)

    @classmethod
    def vae_config(cls, params) -> dict[str, Any]:
        levels = len(params.block_out_channels)
        return dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * (levels - 1) + ("AttnDownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(params.block_out_channels),
            layers_per_block=params.layers_per_block,
            latent_channels=16,
            mid_block_add_attention=True,
            scaling_factor=params.scaling_factor,
        )

    def build_vae(self, config: dict[str, Any]) -> AutoencoderKL:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(**config)
        if self.params.weights is None:
            warnings.warn(
                "kl16 has no weights (tokenizer.params.weights is null): the VAE is randomly initialised "
                "and its latents and decoded samples are meaningless. " + WHERE_TO_GET,
                stacklevel=3,
            )
            return vae
        path = Path(self.params.weights).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"KL-16 weights not found at {path} (tokenizer.params.weights); {WHERE_TO_GET}")
        if path.is_dir():
            state = AutoencoderKL.from_pretrained(path, local_files_only=True).state_dict()
        else:
            state = read_state_dict(path)
        load_state_strict(vae, state, str(path))
        return vae
