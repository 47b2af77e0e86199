"""The kl16 and diffusers_vae tokenizers and the LDM <-> diffusers key converter (CPU, no downloads)."""

from __future__ import annotations

import re

import pydantic
import pytest
import torch
from nestar_plugins.tokenizers.ldm_convert import diffusers_to_ldm, ldm_to_diffusers, load_state_strict
from safetensors.torch import save_file

from nestar_lab.config.registry import get_registry

reg = get_registry()
KL16 = reg.get("tokenizer", "kl16")
DiffusersVAE = reg.get("tokenizer", "diffusers_vae")
SMALL = dict(block_out_channels=(32, 32, 64), layers_per_block=1)  # 3 levels: downsampling 4
IMAGE = (3, 32, 32)
ENC_ATTN = [  # the encoder's down-block attention of KL-16, which diffusers' own converter misses
    f"encoder.down.4.attn.{j}.{leaf}.{p}"
    for j in (0, 1)
    for leaf in ("norm", "q", "k", "v", "proj_out")
    for p in ("weight", "bias")
]


def random_kl16(image_shape=IMAGE, **params):
    with pytest.warns(UserWarning, match="meaningless"):
        return KL16(KL16.Params(weights=None, **params), image_shape=image_shape)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(1)
    return random_kl16(**SMALL)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, *IMAGE, generator=torch.Generator().manual_seed(0)) * 2 - 1


# ----------------------------------------------------------------------------- (a) real architecture
def test_real_kl16_architecture_maps_every_key_both_ways():
    tok = random_kl16(image_shape=(3, 256, 256))
    assert tok.latent_shape == (16, 16, 16)
    assert 60e6 < sum(p.numel() for p in tok.parameters()) < 75e6  # MAR's KL-16: about 66M
    state = tok.vae.state_dict()
    ldm = diffusers_to_ldm(state, num_levels=5)
    assert len(ldm) == len(state) == 312
    assert not [k for k in ldm if re.search(r"_blocks|resnets|attentions|to_[qkvo]|group_norm|conv_shortcut", k)]
    assert set(ENC_ATTN) <= ldm.keys() and ldm["encoder.down.4.attn.0.q.weight"].shape == (512, 512, 1, 1)
    assert not [k for k in ldm if k.startswith("decoder.up.") and ".attn." in k]
    # LDM numbers decoder blocks from the highest resolution: up.0 is 128 wide and does not upsample
    assert ldm["decoder.up.0.block.0.conv1.weight"].shape == (128, 128, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in ldm and "decoder.up.4.upsample.conv.weight" in ldm
    back = ldm_to_diffusers(ldm, num_levels=5)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    load_state_strict(tok.vae, ldm, "exported")  # zero missing, zero unexpected

    # diffusers' own converter agrees on every key it maps, and misses the encoder's attention
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    theirs = single_file.convert_ldm_vae_checkpoint(dict(ldm), tok.vae.config)
    agreed = theirs.keys() & state.keys()
    assert all(torch.equal(theirs[k], back[k]) for k in agreed)
    assert {k for k in state.keys() - agreed} == {k for k in state if k.startswith("encoder.down_blocks.4.attentions.")}


def test_sizes_are_checked_before_building():
    with pytest.raises(ValueError, match="250x250.*16"):
        KL16(KL16.Params(weights=None), image_shape=(3, 250, 250))
    with pytest.raises(ValueError, match="3-channel"):
        KL16(KL16.Params(weights=None), image_shape=(1, 256, 256))
    with pytest.raises(pydantic.ValidationError):
        KL16.Params()  # weights must be given, null included
    with pytest.raises(pydantic.ValidationError):
        KL16.Params(weights=None, scale=1.0)


# ----------------------------------------------------------------------------- (b) every weight layout
def _write(layout, vae, tmp_path):
    state, levels = vae.state_dict(), len(vae.config.block_out_channels)
    if layout == "dir":
        vae.save_pretrained(tmp_path / "vae")
        return tmp_path / "vae"
    if layout.startswith("safetensors"):
        path = tmp_path / "vae.safetensors"
        tensors = diffusers_to_ldm(state, levels) if layout.endswith("ldm") else state
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        return path
    ldm = diffusers_to_ldm(state, levels)
    ldm |= {  # training-loss modules saved beside the VAE: must be dropped
        "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
        "loss.perceptual_loss.scaling_layer.shift": torch.randn(1, 3, 1, 1),
    }
    path = tmp_path / ("kl16.ckpt" if layout == "ckpt" else "kl16.pth")
    torch.save({"model": ldm, "epoch": 3} if layout == "ckpt" else {"state_dict": ldm}, path)
    return path


@pytest.mark.parametrize("layout", ["ckpt", "pth_state_dict", "dir", "safetensors", "safetensors_ldm"])
def test_weights_load_from_every_layout(layout, small, images, tmp_path):
    path = _write(layout, small.vae, tmp_path)
    torch.manual_seed(2)  # a different random init: equality below needs the weights loaded
    loaded = KL16(KL16.Params(weights=str(path), **SMALL), image_shape=IMAGE)
    assert all(torch.equal(a, b) for a, b in zip(loaded.vae.state_dict().values(), small.vae.state_dict().values()))
    latents = small.encode(images)
    assert latents.shape == (2, *loaded.latent_shape) == (2, 16, 8, 8)
    assert torch.equal(loaded.encode(images), latents)
    assert torch.equal(loaded.decode(latents), small.decode(latents))


def test_corrupted_checkpoint_lists_missing_and_unexpected_keys(small, tmp_path):
    ldm = diffusers_to_ldm(small.vae.state_dict(), 3)
    del ldm["encoder.down.2.attn.0.q.weight"]
    ldm["encoder.bogus.weight"] = torch.zeros(1)
    torch.save({"model": ldm}, tmp_path / "bad.ckpt")
    listing = r"missing keys 1: encoder\.down\.2\.attn\.0\.q\.weight.*unexpected keys 1: encoder\.bogus\.weight"
    with pytest.raises(ValueError, match=listing):
        KL16(KL16.Params(weights=str(tmp_path / "bad.ckpt"), **SMALL), image_shape=IMAGE)
    del ldm["encoder.bogus.weight"]
    ldm["encoder.down.2.attn.0.q.weight"] = torch.zeros(64, 32, 1, 1)
    torch.save({"model": ldm}, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"mis-shaped.*encoder\.down\.2\.attn\.0\.q\.weight"):
        KL16(KL16.Params(weights=str(tmp_path / "bad.ckpt"), **SMALL), image_shape=IMAGE)


def test_missing_weights_file_is_one_clear_line(tmp_path):
    path = tmp_path / "nowhere" / "kl16.ckpt"
    with pytest.raises(FileNotFoundError) as info:
        KL16(KL16.Params(weights=str(path)), image_shape=(3, 256, 256))
    message = str(info.value)
    assert str(path) in message and "tokenizer.params.weights" in message and "kl16.ckpt" in message
    assert "\n" not in message
    with pytest.raises(FileNotFoundError, match="tokenizer.params.path"):
        DiffusersVAE(DiffusersVAE.Params(path=str(path)), image_shape=IMAGE)


# ----------------------------------------------------------------------------- (e) scaling, posterior, frozen
def test_scaling_and_posterior_sampling(small, images):
    posterior = small.vae.encode(images).latent_dist
    assert torch.equal(small.encode(images), posterior.mean * 0.2325)
    moments = small.encode_for_cache(images)  # sample_posterior defaults to True for kl16
    assert torch.equal(moments, posterior.parameters) and moments.shape == (2, 32, 8, 8)

    def draw(seed, cached=moments):
        return small.latents_from_cache(cached, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))
    n = 4000
    many = draw(0, moments[:1].expand(n, -1, -1, -1)) / 0.2325
    mean, std = posterior.mean[0], posterior.std[0]
    assert ((many.mean(0) - mean).abs() / (std / n**0.5)).max() < 6  # within 6 standard errors
    torch.testing.assert_close(many.std(0), std, rtol=0.1, atol=0)


def test_no_posterior_sampling_caches_latents(small, images):
    tok = random_kl16(sample_posterior=False, scaling_factor=0.5, **SMALL)
    tok.load_state_dict(small.state_dict())
    cached = tok.encode_for_cache(images)
    torch.testing.assert_close(cached, small.encode(images) / 0.2325 * 0.5)
    assert tok.latents_from_cache(cached, torch.Generator().manual_seed(0)) is cached


def test_vae_stays_frozen_float32_and_ignores_autocast(small, images):
    assert not any(p.requires_grad for p in small.parameters())
    small.train()
    assert not small.vae.training
    reference = small.encode(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latents = small.encode(images)
    assert latents.dtype == torch.float32 and torch.equal(latents, reference)
    assert small.encode(images.bfloat16()).dtype == torch.float32
    small.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in small.vae.parameters())
    small.eval()


# ----------------------------------------------------------------------------- (f) diffusers_vae
def test_diffusers_vae_reads_scaling_and_latent_shape_from_config(images, tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(3)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, scaling_factor=0.18215,
    )  # fmt: skip
    vae.save_pretrained(tmp_path / "sd_like")
    tok = DiffusersVAE(DiffusersVAE.Params(path=str(tmp_path / "sd_like")), image_shape=IMAGE)
    assert tok.scaling_factor == 0.18215 and tok.latent_shape == (4, 16, 16)
    with torch.no_grad():
        expected = vae.encode(images).latent_dist.mean * 0.18215
    torch.testing.assert_close(tok.encode(images), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(tok.encode_for_cache(images), tok.encode(images))  # sample_posterior off
    weights_file = tmp_path / "sd_like" / "diffusion_pytorch_model.safetensors"  # config.json beside it
    single = DiffusersVAE.Params(path=str(weights_file), scaling_factor=0.5)
    tok2 = DiffusersVAE(single, image_shape=IMAGE)
    assert tok2.scaling_factor == 0.5
    torch.testing.assert_close(tok2.encode(images), expected / 0.18215 * 0.5, rtol=1e-5, atol=1e-6)
