"""Exact tiled VAE decode: equals the untiled decode at any size and tile size, on a small random Flux-layout VAE."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import AutoencoderKL

from zimage_core import vae_tiling
from zimage_core.errors import ZImageError
from zimage_core.vae_tiling import decode_tiled, estimate_decode_bytes

EXACT = 1e-4  # fp32: the tiled and untiled decodes differ only by float rounding (~1e-5)
TARGET = 2 / 255  # the product requirement, on the 0..1 image


def tiny_flux_vae(seed: int = 0) -> AutoencoderKL:
    """The Flux VAE layout (4 up blocks, no quant convs, mid attention, a shortcut conv where channels change)
    at toy width, with random GroupNorm affines and larger convs so every layer does something."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32), use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=True,
    ).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in vae.decoder.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, torch.nn.Conv2d):
                module.weight.mul_(1.5)
    return vae


def smooth_latents(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Low-frequency sinusoids plus a little noise: structured like real latents, not white noise."""
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    c = torch.arange(16.0)[:, None, None]
    z = torch.sin(2 * math.pi * (x * (1 + c % 3) + 0.7 * y * (1 + c % 4)) + c) + 0.5 * torch.cos(3 * y + c)
    return z + 0.2 * torch.randn(batch, 16, height, width, generator=generator)


def image(sample: torch.Tensor) -> torch.Tensor:
    return ((sample.float() + 1) / 2).clamp(0, 1)


def image_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (image(a) - image(b)).abs().max().item()


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return tiny_flux_vae()


def untiled(vae, z):
    with torch.no_grad():
        return vae.decode(z).sample


@pytest.mark.parametrize(
    "shape, tile_size, overlap",
    [
        ((1, 16, 24), 64, 0),     # 128x192: tiles divide the image
        ((1, 12, 10), 96, 8),     # 96x80: tiles that don't divide it
        ((1, 10, 17), 72, 40),    # 80x136: odd latent width, non-square
        ((2, 12, 16), 64, 16),    # batch 2
        ((1, 8, 6), 512, 64),     # one tile larger than the image
    ],
)
def test_tiled_decode_equals_untiled(vae, shape, tile_size, overlap):
    z = smooth_latents(*shape)
    reference = untiled(vae, z)
    assert image(reference).std() > 0.1, "the test VAE should produce a non-trivial image"
    out = decode_tiled(vae, z, tile_size=tile_size, overlap=overlap)
    assert out.shape == (shape[0], 3, 8 * shape[1], 8 * shape[2]) and out.dtype == z.dtype
    error = image_error(out, reference)
    # EXACT (float rounding) is far below the product's 2/255: the tiles are exact, not merely close enough.
    assert error <= EXACT, f"tiled decode differs from untiled by {error:.2e} (rounding is ~1e-5)"


def test_tiny_tiles_at_every_level_are_exact(vae):
    """Tiles of a few pixels at every resolution (mid-block output included), odd sides and halos."""
    z = smooth_latents(2, 9, 13, seed=3)
    for side, halo in ((lambda c, h: max(3, h // 3), lambda h: 0), (lambda c, h: 5 if h < 20 else 17, lambda h: 2)):
        out = vae_tiling._TiledDecoder(vae, side, halo, budget_bytes=1 << 40).decode(z)
        assert image_error(out, untiled(vae, z)) <= EXACT


def test_per_tile_groupnorm_is_not_exact(vae):
    """diffusers' enable_tiling normalises each tile on its own: it visibly differs on the same input."""
    z = smooth_latents(1, 16, 24)
    reference = untiled(vae, z)
    saved = vae.tile_sample_min_size, vae.tile_latent_min_size
    vae.tile_sample_min_size, vae.tile_latent_min_size = 64, 8
    vae.enable_tiling()
    try:
        naive = untiled(vae, z)
    finally:
        vae.disable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = saved
    assert image_error(naive, reference) > 10 * TARGET
    assert image_error(decode_tiled(vae, z, tile_size=64, overlap=16), reference) <= EXACT


def test_host_store_matches_device_store(vae, monkeypatch):
    """With no device budget every barrier activation goes to the host store; the result is the same."""
    z = smooth_latents(2, 10, 12, seed=5)
    on_device = decode_tiled(vae, z, tile_size=64, overlap=0, memory_budget_bytes=1 << 40)
    made = []

    class Counting(vae_tiling._HostActivation):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(vae_tiling, "_HostActivation", Counting)
    on_host = decode_tiled(vae, z, tile_size=64, overlap=0, memory_budget_bytes=0)
    assert len(made) > 10, "the tiny budget should have sent the activations to the host store"
    assert torch.equal(on_host, on_device)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"tile_size": 100}, ("tile_size", "multiple of 8", "at least 64", "100")),
        ({"tile_size": 56}, ("tile_size", "at least 64", "56")),
        ({"tile_size": 512.0}, ("tile_size", "512.0")),
        ({"tile_size": 512, "overlap": -8}, ("overlap", "0 to", "511", "-8")),
        ({"tile_size": 128, "overlap": 128}, ("overlap", "127", "128")),
        ({"memory_budget_bytes": -1}, ("memory_budget_bytes", ">= 0")),
    ],
)
def test_bad_arguments_raise_clear_errors(vae, kwargs, words):
    with pytest.raises(ZImageError) as caught:
        decode_tiled(vae, smooth_latents(1, 4, 4), **kwargs)
    for word in words:
        assert word in str(caught.value)


def test_bad_latents_raise(vae):
    with pytest.raises(ZImageError, match=r"\[batch, 16, height, width\]"):
        decode_tiled(vae, torch.zeros(1, 4, 8, 8))


def test_estimate_decode_bytes_scales_with_the_image(vae):
    small = estimate_decode_bytes(vae, (1, 16, 32, 32), torch.float32)
    assert estimate_decode_bytes(vae, (2, 16, 32, 32), torch.float32) >= 2 * small - 1
    assert estimate_decode_bytes(vae, (1, 16, 32, 32), torch.bfloat16) < small
    # at least the widest full-resolution activation, fp32
    assert small >= 32 * 256 * 256 * 4
