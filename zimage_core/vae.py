"""VAE decode and encode between model-space latents and float32 ``[B, H, W, C]`` images in 0..1.

Model space is what the transformer sees: ``(z - shift_factor) * scaling_factor`` of the VAE's latent
``z`` (ComfyUI's LATENT holds ``z`` itself, "raw VAE space"). Decoding is plain or exact-tiled
(``vae_tiling``); a plain decode that would not fit in free GPU memory switches to tiling and says so.
"""

from __future__ import annotations

import logging
from functools import partial

import torch

from .errors import ZImageError

log = logging.getLogger("zimage_core")


def vae_dtype(vae) -> torch.dtype:
    cdtype = getattr(vae, "zimage_dtype", None)
    return cdtype.compute if cdtype else next(vae.parameters()).dtype


def vae_device(vae) -> torch.device:
    return next(vae.parameters()).device


def to_vae_space(vae, latents: torch.Tensor) -> torch.Tensor:
    return latents / vae.config.scaling_factor + vae.config.shift_factor


def to_model_space(vae, z: torch.Tensor) -> torch.Tensor:
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def check_tiling(tile_size: int, overlap: int) -> None:
    if not isinstance(tile_size, int) or tile_size < 64 or tile_size > 4096 or tile_size % 8:
        raise ZImageError(f"tile size {tile_size!r} is out of range: use a multiple of 8 in 64..4096 pixels (512 is usual).")
    if not isinstance(overlap, int) or overlap < 0 or overlap >= tile_size:
        raise ZImageError(f"tile overlap {overlap!r} is out of range: use 0..{tile_size - 8} pixels, below the tile size.")


def _free_memory(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _plain_decode(vae, z: torch.Tensor) -> torch.Tensor:
    return vae.decode(z).sample


@torch.no_grad()
def decode(vae, latents: torch.Tensor, *, tiled: bool | str = "auto", tile_size: int = 512, overlap: int = 64,
           guard=None, device: torch.device | None = None) -> torch.Tensor:
    """Model-space latents ``[B, 16, h, w]`` to a float32 image ``[B, 8h, 8w, 3]`` in 0..1 on the CPU.

    ``tiled``: True, False, or "auto" (tile only when the plain decode would not fit in free memory).
    """
    if latents.ndim != 4 or latents.shape[1] != vae.config.latent_channels:
        raise ZImageError(
            f"latents of shape {tuple(latents.shape)} can't be decoded: the Flux VAE needs [B, "
            f"{vae.config.latent_channels}, H/8, W/8]."
        )
    device, dtype = device or vae_device(vae), vae_dtype(vae)
    z = to_vae_space(vae, latents.float()).to(device=device, dtype=dtype)
    use_tiles = tiled is True
    if tiled == "auto" and (free := _free_memory(device)) is not None:
        from .vae_tiling import estimate_decode_bytes

        need = estimate_decode_bytes(vae, tuple(z.shape), dtype)
        use_tiles = need > free
        if use_tiles:
            log.info("VAE decode of %dx%d needs about %.1f GiB but %.1f GiB are free: decoding in exact tiles.",
                     z.shape[3] * 8, z.shape[2] * 8, need / 2**30, free / 2**30)
    if use_tiles:
        from .vae_tiling import decode_tiled

        check_tiling(tile_size, overlap)
        run = partial(decode_tiled, vae, tile_size=tile_size, overlap=overlap)
    elif device.type == "cuda" and guard is None:
        # The exact tiled decoder with one tile is the same decode, faster on CUDA (its GroupNorm runs as
        # batch_norm on folded channels): 60 ms against 93 ms at 1024x1024 on an H100. The precision guard
        # watches diffusers' decoder blocks, so guarded decodes take the plain path.
        from .vae_tiling import decode_tiled

        run = partial(decode_tiled, vae, tile_size=max(z.shape[2], z.shape[3]) * 8, overlap=0)
    else:
        run = partial(_plain_decode, vae)
    image = guard.guarded_call("vae", run, z) if guard is not None else run(z)
    image = (image.float() / 2 + 0.5).clamp(0, 1)
    return image.permute(0, 2, 3, 1).contiguous().cpu()  # the layout change on the device, not the CPU


@torch.no_grad()
def encode(vae, image: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """A float ``[B, H, W, C]`` image in 0..1 to model-space latents (the distribution's mean), float32 on the CPU."""
    if image.ndim != 4 or image.shape[-1] not in (3, 4):
        raise ZImageError(f"image of shape {tuple(image.shape)} can't be encoded: expected [B, H, W, 3] in 0..1.")
    height, width = image.shape[1:3]
    if height % 16 or width % 16:
        raise ZImageError(
            f"image size {width}x{height} is not a multiple of 16: Z-Image works on 16-pixel patches. "
            "Resize or crop it first (e.g. with ImageScale) to a multiple of 16."
        )
    device, dtype = device or vae_device(vae), vae_dtype(vae)
    pixels = image[..., :3].permute(0, 3, 1, 2).to(device=device, dtype=dtype) * 2 - 1
    z = vae.encode(pixels).latent_dist.mode()
    return to_model_space(vae, z.float()).cpu()
