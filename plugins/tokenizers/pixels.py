"""The identity-like tokenizer: p x p pixel patches become one token of C*p*p channels."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from nestar_lab.interfaces import Params, Tokenizer


class Pixels(Tokenizer):
    """Patchify raw pixels (already in [-1, 1]) and scale by ``scale``; exact round trip."""

    class Params(Params):
        patch_size: int = Field(1, ge=1)
        scale: float = Field(1.0, gt=0, description="multiplier applied to pixel values in latent space")

    def __init__(self, params=None, *, image_shape):
        super().__init__(params, image_shape=image_shape)
        self.latent_shape = self.latent_shape_for(self.params, self.image_shape)

    @classmethod
    def latent_shape_for(cls, params, image_shape):
        c, h, w = image_shape
        p = params.patch_size
        if h % p or w % p:
            raise ValueError(f"patch_size {p} does not divide the image size {h}x{w}")
        return (c * p * p, h // p, w // p)

    def encode(self, images: Tensor) -> Tensor:
        p = self.params.patch_size
        _, h, w = self.latent_shape
        return F.unfold(images, p, stride=p).view(images.shape[0], -1, h, w) * self.params.scale

    def decode(self, latents: Tensor) -> Tensor:
        p = self.params.patch_size
        _, H, W = self.image_shape
        cols = (latents / self.params.scale).flatten(2)
        return F.fold(cols, (H, W), p, stride=p)
