"""Any local diffusers ``AutoencoderKL`` (e.g. the Stable Diffusion VAE) as a tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nestar_plugins.tokenizers.autoencoder_kl import AutoencoderKLParams, AutoencoderKLTokenizer
from nestar_plugins.tokenizers.ldm_convert import load_state_strict, read_state_dict
from pydantic import Field

if TYPE_CHECKING:  # diffusers is imported on first build: registry discovery stays fast
    from diffusers import AutoencoderKL


class DiffusersVAE(AutoencoderKLTokenizer):
    """A frozen local AutoencoderKL: a diffusers directory (``save_pretrained`` layout), or a
    ``.safetensors`` file (diffusers or LDM key layout) with its ``config.json``.

    ``scaling_factor: null`` takes the model config's (SD VAE: 0.18215). The latent shape comes
    from the config: ``latent_channels`` at 1 / 2^(len(block_out_channels) - 1) of the image size.
    """

    class Params(AutoencoderKLParams):
        path: str = Field(..., description="diffusers AutoencoderKL directory, or a .safetensors weights file")
        config: str | None = Field(None, description="config.json for a .safetensors file; default: the one beside it")
        scaling_factor: float | None = Field(None, gt=0, description="latent multiplier; null = the model config's")
        sample_posterior: bool = False

    @staticmethod
    def _paths(params) -> tuple[Path, Path]:
        path = Path(params.path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"AutoencoderKL not found at {path} (tokenizer.params.path); give a local diffusers directory "
                "(AutoencoderKL.save_pretrained, e.g. the 'vae' folder of a Stable Diffusion snapshot) "
                "or a .safetensors file"
            )
        if path.is_dir():
            config = path / "config.json"
        else:
            config = Path(params.config).expanduser() if params.config else path.with_name("config.json")
        if not config.is_file():
            raise FileNotFoundError(f"AutoencoderKL config not found at {config} (tokenizer.params.config)")
        return path, config

    @classmethod
    def vae_config(cls, params) -> dict[str, Any]:
        return json.loads(cls._paths(params)[1].read_text())

    def build_vae(self, config: dict[str, Any]) -> AutoencoderKL:
        from diffusers import AutoencoderKL

        path, _ = self._paths(self.params)
        if path.is_dir():
            return AutoencoderKL.from_pretrained(path, local_files_only=True)
        vae = AutoencoderKL.from_config(config)
        load_state_strict(vae, read_state_dict(path), str(path))
        return vae
