"""Contract tests over every dataset, tokenizer and token order plugin."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from nestar_lab.config.registry import get_registry

reg = get_registry()


def make(kind, name, params=None, **kwargs):
    cls = reg.get(kind, name)
    return cls(cls.Params(**(params or {})), **kwargs)


def _image_folder(tmp_path) -> dict:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    return {"root": str(tmp_path), "resolution": 8}


def _small_vae_dir(tmp_path) -> dict:
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4).save_pretrained(tmp_path / "vae")  # fmt: skip
    return {"path": str(tmp_path / "vae")}


# Plugins that cannot be built from default params get example params here (a data folder, a
# small model); a third-party plugin without an entry is tested from its defaults when it can be.
EXAMPLES = {
    ("dataset", "image_folder"): _image_folder,
    ("tokenizer", "kl16"): lambda tmp: {"weights": None, "block_out_channels": [32, 32], "layers_per_block": 1},
    ("tokenizer", "diffusers_vae"): _small_vae_dir,
}


def example(kind, name, tmp_path, **kwargs):
    import warnings

    params = EXAMPLES[(kind, name)](tmp_path) if (kind, name) in EXAMPLES else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # kl16 without weights warns that its latents are meaningless
            return make(kind, name, params, **kwargs)
    except (ValidationError, FileNotFoundError) as e:
        pytest.skip(f"{kind} {name} needs params: add an entry to EXAMPLES ({str(e).splitlines()[0]})")


@pytest.mark.parametrize("name", reg.names("dataset"))
def test_dataset_splits(name, tmp_path):
    ds = example("dataset", name, tmp_path)
    train, test = ds.split("train"), ds.split("test")
    for split in (train, test):
        assert split.images.shape[1:] == ds.image_shape
        assert split.images.min() >= -1 and split.images.max() <= 1
        assert split.labels.min() >= 0 and split.labels.max() < ds.num_classes
    assert len(train) > len(test) > 0
    again = example("dataset", name, tmp_path / "again")
    assert torch.equal(again.split("test").labels, test.labels), "the split must be seeded"
    image, label = ds.items("train")[0]  # the lazy view training reads
    assert tuple(image.shape) == ds.image_shape and 0 <= int(label) < ds.num_classes
    with pytest.raises(ValueError, match="split"):
        ds.split("validation")


def test_digits_split_is_disjoint():
    ds = make("dataset", "digits")
    train, test = ds.split("train").images.flatten(1), ds.split("test").images.flatten(1)
    assert len(train) + len(test) == 1797
    # the digits set holds a few duplicate images; a shared index would share all of them
    assert (torch.cdist(test, train).min(1).values == 0).float().mean() < 0.05


@pytest.mark.parametrize("name", reg.names("tokenizer"))
def test_tokenizer_shapes_and_cache_views(name, tmp_path):
    tok = example("tokenizer", name, tmp_path, image_shape=(3, 16, 16))
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    latents = tok.encode(images)
    assert tuple(latents.shape) == (5, *tok.latent_shape)  # latent_shape is known before any forward
    decoded = tok.decode(latents)
    assert decoded.shape == images.shape and decoded.min() >= -1 - 1e-5 and decoded.max() <= 1 + 1e-5
    stored = tok.encode_for_cache(images)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    from_cache = tok.latents_from_cache(stored, generator=g())
    assert from_cache.shape == latents.shape and torch.equal(from_cache, tok.latents_from_cache(stored, generator=g()))


def test_pixels_round_trip_is_exact():
    tok = make("tokenizer", "pixels", image_shape=(1, 8, 8))
    images = torch.rand(5, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(tok.decode(tok.encode(images)), images, rtol=1e-5, atol=1e-5)


def test_pixels_patches():
    cls = reg.get("tokenizer", "pixels")
    tok = cls(cls.Params(patch_size=2), image_shape=(3, 8, 8))
    assert tok.latent_shape == (12, 4, 4)
    with pytest.raises(ValueError, match="does not divide"):
        cls(cls.Params(patch_size=3), image_shape=(1, 8, 8))


@pytest.mark.parametrize("name", reg.names("token_order"))
@pytest.mark.parametrize("grid", [(8, 8), (4, 4), (16, 16), (4, 8)])
def test_token_order_is_a_permutation_with_coordinates(name, grid):
    order = make("token_order", name, grid=grid)
    h, w = grid
    assert sorted(order.perm.tolist()) == list(range(h * w))
    latent = torch.randn(2, 3, h, w)
    tokens = order.flatten(latent)
    assert tokens.shape == (2, h * w, 3)
    assert torch.equal(order.unflatten(tokens), latent)
    r, c = order.coords[5].long().tolist()
    assert torch.equal(tokens[:, 5], latent[:, :, r, c])


def test_coarse_to_fine_modules_are_coarser_images():
    order = make("token_order", "coarse_to_fine", grid=(8, 8))
    first4 = {tuple(x) for x in order.coords[:4].long().tolist()}
    first16 = {tuple(x) for x in order.coords[:16].long().tolist()}
    assert first4 == {(r, c) for r in (0, 4) for c in (0, 4)}
    assert first16 == {(r, c) for r in range(0, 8, 2) for c in range(0, 8, 2)}


def test_zorder_prefixes_are_square_blocks():
    order = make("token_order", "zorder", grid=(8, 8))
    assert {tuple(x) for x in order.coords[:16].long().tolist()} == {(r, c) for r in range(4) for c in range(4)}


def test_image_patches_are_balanced_rgb_crops_with_a_spatial_split():
    cls = reg.get("dataset", "image_patches")
    ds = cls(cls.Params(crops_per_photo=20, photos=("astronaut", "camera", "coffee")))
    train, test = ds.split("train"), ds.split("test")
    assert ds.image_shape == (3, 16, 16) and ds.num_classes == 3
    assert torch.bincount(train.labels).tolist() == [16, 16, 16]
    assert torch.bincount(test.labels).tolist() == [4, 4, 4]
    assert torch.cdist(test.images.flatten(1), train.images.flatten(1)).min() > 0
    with pytest.raises(ValueError, match="not photographs of skimage.data"):
        cls.Params(photos=("astronaut", "no_such_photo"))
