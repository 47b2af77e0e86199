"""The shared base of the VAE tokenizers: a frozen, float32 diffusers ``AutoencoderKL``."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from nestar_lab.interfaces import Params, Tokenizer


class AutoencoderKLParams(Params):
    """Fields every AutoencoderKL tokenizer has."""

    sample_posterior: bool = Field(False, description="latent cache draws from the posterior (MAR) instead of its mean")
    chunk_size: int = Field(32, ge=1, description="images per VAE forward pass (bounds memory)")


class AutoencoderKLTokenizer(Tokenizer):
    """Images in [-1, 1] <-> ``(mean - shift) * scaling_factor`` of a frozen AutoencoderKL posterior.

    Subclasses say which architecture (:meth:`vae_config`, a diffusers config dict, read
    without building the network) and how it is built and loaded (:meth:`build_vae`). The VAE
    is never trained: no gradients, always in eval mode, always float32 (autocast is disabled
    inside, and casting the tokenizer to another dtype leaves the VAE as it is).
    """

    def __init__(self, params=None, *, image_shape):
        super().__init__(params, image_shape=image_shape)
        config = self.vae_config(self.params)
        self.latent_shape = self._latent_shape(config, self.image_shape)
        scaling = getattr(self.params, "scaling_factor", None)
        self.scaling_factor = float(scaling if scaling is not None else config.get("scaling_factor", 1.0))
        self.shift_factor = float(config.get("shift_factor") or 0.0)  # SD3/Flux VAEs; 0 for LDM/MAR
        self.vae = self.build_vae(config).float().eval().requires_grad_(False)

    @classmethod
    @abstractmethod
    def vae_config(cls, params) -> dict[str, Any]:
        """The AutoencoderKL config (diffusers keys) for ``params``, known before building the
        network (it may read a config file, never the weights)."""

    @classmethod
    def latent_shape_for(cls, params, image_shape):
        return cls._latent_shape(cls.vae_config(params), image_shape)

    @classmethod
    def _latent_shape(cls, config: dict[str, Any], image_shape) -> tuple[int, int, int]:
        c, h, w = image_shape
        factor = 2 ** (len(config["block_out_channels"]) - 1)
        if c != config.get("in_channels", 3):
            raise ValueError(f"{cls.__name__} takes {config.get('in_channels', 3)}-channel images, not {c}")
        if h % factor or w % factor:
            raise ValueError(f"image size {h}x{w} is not divisible by the VAE's downsampling factor {factor}")
        return (int(config["latent_channels"]), h // factor, w // factor)

    @abstractmethod
    def build_vae(self, config: dict[str, Any]) -> torch.nn.Module:
        """The AutoencoderKL with its weights loaded."""

    # ------------------------------------------------------------------ frozen float32
    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()
        return self

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if "vae" in self._modules:
            self.vae.float()
        return self

    def _chunked(self, fn, x: Tensor) -> Tensor:
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            return torch.cat([fn(part.float()) for part in x.split(self.params.chunk_size)])

    # ------------------------------------------------------------------ interface
    def moments(self, images: Tensor) -> Tensor:
        """Posterior parameters ``(B, 2c, h, w)``: mean and log-variance on the channel dim, unscaled."""
        return self._chunked(lambda x: self.vae.encode(x).latent_dist.parameters, images)

    def encode(self, images: Tensor) -> Tensor:
        mean = self._chunked(lambda x: self.vae.encode(x).latent_dist.mean, images)
        return (mean - self.shift_factor) * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        z = latents / self.scaling_factor + self.shift_factor
        return self._chunked(lambda x: self.vae.decode(x).sample, z).clamp(-1, 1)

    def encode_for_cache(self, images: Tensor) -> Tensor:
        """Posterior moments when sampling the posterior, else the latents of :meth:`encode`."""
        return self.moments(images) if self.params.sample_posterior else self.encode(images)

    def latents_from_cache(self, cached: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A posterior draw ``mean + std * eps`` (``eps`` from ``generator``), scaled; or ``cached``."""
        if not self.params.sample_posterior:
            return cached
        mean, logvar = cached.float().chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # as diffusers' DiagonalGaussianDistribution
        device = generator.device if generator is not None else mean.device
        eps = torch.randn(mean.shape, generator=generator, device=device).to(mean.device)
        z = mean + std * eps
        return (z - self.shift_factor) * self.scaling_factor
