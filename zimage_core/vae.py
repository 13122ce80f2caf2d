"""VAE decode and encode between model-space latents and float32 ``[B, H, W, C]`` images in 0..1.

Model space is what the transformer sees: ``(z - shift_factor) * scaling_factor`` of the VAE's latent
``z`` (ComfyUI's LATENT holds ``z`` itself, "raw VAE space"). Decoding is plain or exact-tiled
(``vae_tiling``); a plain decode that would not fit in free GPU memory switches to tiling and says so.
"""

from __future__ import annotations

import logging
from functools import partial

import torch

from .dtypes import component_dtype, dtype_name
from .errors import ZImageError
from .inputs import check_tile_args, check_tiled
from .options import MAX_TILE_SIZE
from .vae_tiling import decode_tiled, estimate_decode_bytes, free_memory, host_free_memory

log = logging.getLogger("zimage_core")


def vae_dtype(vae) -> torch.dtype:
    cdtype = component_dtype(vae)
    return cdtype.compute if cdtype else next(vae.parameters()).dtype


def vae_device(vae) -> torch.device:
    return next(vae.parameters()).device


def _factors(vae) -> tuple[float, float]:
    """(scaling, shift) of the VAE's latents; the shipped Flux VAE's when the model was loaded without its VAE."""
    if vae is None:
        from .formats import shipped_config

        cfg = shipped_config("vae")
        return cfg["scaling_factor"], cfg["shift_factor"]
    return vae.config.scaling_factor, vae.config.shift_factor


def to_vae_space(vae, latents: torch.Tensor) -> torch.Tensor:
    scaling, shift = _factors(vae)
    return latents / scaling + shift


def to_model_space(vae, z: torch.Tensor) -> torch.Tensor:
    scaling, shift = _factors(vae)
    return (z - shift) * scaling


def check_tiling(tile_size: int, overlap: int) -> None:
    """The tile rule of ``zimage_core.inputs`` (kept under this name for callers of the VAE module)."""
    check_tile_args(tile_size, overlap)


def _plain_decode(vae, z: torch.Tensor, on_progress=None) -> torch.Tensor:
    if on_progress is None:
        return vae.decode(z).sample
    # Cancel between the decoder's blocks: a pre-hook on each, removed afterwards.
    blocks = [vae.decoder.mid_block, *vae.decoder.up_blocks, vae.decoder.conv_norm_out]
    handles = [b.register_forward_pre_hook(lambda _m, _a: on_progress()) for b in blocks]
    try:
        return vae.decode(z).sample
    finally:
        for handle in handles:
            handle.remove()


def _chunk_size(vae, z_shape, dtype, device: torch.device, tiled: bool) -> int:
    """Images per decode call that fit the free memory (device on CUDA, host elsewhere), at least 1.

    A whole batch at once needs the batch times one image's activations (a 1024x1024 image about 2 GiB in
    bf16); 64 of them do not fit anywhere, so the batch is decoded in chunks. Tiled decodes keep one image's
    full-size activations in host memory, a third of the untiled estimate.
    """
    batch = z_shape[0]
    per_image = estimate_decode_bytes(vae, (1, *z_shape[1:]), dtype)
    if tiled:
        per_image //= 3
    free = host_free_memory() if tiled or device.type != "cuda" else free_memory(device)
    if free is None:
        return batch
    return max(1, min(batch, int(free * 0.8) // max(per_image, 1)))


@torch.no_grad()
def decode(vae, latents: torch.Tensor, *, tiled: bool | str = "auto", tile_size: int = 512, overlap: int = 64,
           guard=None, device: torch.device | None = None, on_progress=None) -> torch.Tensor:
    """Model-space latents ``[B, 16, h, w]`` to a float32 image ``[B, 8h, 8w, 3]`` in 0..1 on the CPU.

    ``tiled``: True, False, or "auto" (tile only when the plain decode would not fit in free memory).
    The batch is decoded in chunks that fit. ``on_progress()`` is called between tiles and between decoder
    blocks; it may raise (e.g. ``GenerationCancelled``) to cancel. Non-finite latents or a non-finite decode
    raise ``ZImageError`` naming the component, never an all-black image.
    """
    check_tiled(tiled)
    check_tile_args(tile_size, overlap)
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != vae.config.latent_channels:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ZImageError(
            f"latents of shape {shape} can't be decoded: the Flux VAE needs [B, "
            f"{vae.config.latent_channels}, H/8, W/8]."
        )
    if not bool(torch.isfinite(latents).all()):
        raise ZImageError(
            "the latents hold NaN or Inf values (the transformer's output): nothing to decode. Causes: a guidance "
            "too large, fp16 overflow without the precision guard (use 'auto' or bf16/fp32), NaN weights or a NaN "
            "init image."
        )
    device, dtype = torch.device(device) if device is not None else vae_device(vae), vae_dtype(vae)
    z_all = to_vae_space(vae, latents.float())
    use_tiles = tiled is True
    if tiled == "auto" and (free := free_memory(device)) is not None:
        need = estimate_decode_bytes(vae, (1, *z_all.shape[1:]), dtype)
        use_tiles = need > free
        if use_tiles:
            log.info("VAE decode of %dx%d needs about %.1f GiB but %.1f GiB are free: decoding in exact tiles.",
                     z_all.shape[3] * 8, z_all.shape[2] * 8, need / 2**30, free / 2**30)
    if use_tiles:
        run = partial(decode_tiled, vae, tile_size=tile_size, overlap=overlap, on_progress=on_progress)
    elif device.type == "cuda" and guard is None:
        # The exact tiled decoder with one tile is the same decode, faster on CUDA (its GroupNorm runs as
        # batch_norm on folded channels): 60 ms against 93 ms at 1024x1024 on an H100. The precision guard
        # watches diffusers' decoder blocks, so guarded decodes take the plain path. Above MAX_TILE_SIZE it
        # takes a few exact tiles.
        side = min(max(z_all.shape[2], z_all.shape[3]) * 8, MAX_TILE_SIZE)
        run = partial(decode_tiled, vae, tile_size=side, overlap=0, on_progress=on_progress)
    else:
        run = partial(_plain_decode, vae, on_progress=on_progress)
    chunk = _chunk_size(vae, tuple(z_all.shape), dtype, device, use_tiles)
    images = []
    for first in range(0, z_all.shape[0], chunk):
        if on_progress is not None:
            on_progress()
        z = z_all[first:first + chunk].to(device=device, dtype=dtype)
        image = guard.guarded_call("vae", run, z) if guard is not None else run(z)
        del z
        if not bool(torch.isfinite(image).all()):
            raise ZImageError(
                f"the VAE decode gave NaN or Inf values ({dtype_name(dtype)} compute) from finite latents: fp16 "
                "overflow in the VAE, or NaN VAE weights. Decode the VAE in bf16 or fp32, or turn the precision "
                "guard on ('auto')."
            )
        image = (image.float() / 2 + 0.5).clamp(0, 1)
        images.append(image.permute(0, 2, 3, 1).contiguous().cpu())  # the layout change on the device
    return images[0] if len(images) == 1 else torch.cat(images)


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
    if not bool(torch.isfinite(z).all()):
        raise ZImageError(
            "the VAE encode of the init image gave NaN or Inf values: the image holds NaN, or the VAE overflowed "
            f"in {dtype_name(dtype)} (encode in bf16 or fp32) or has NaN weights."
        )
    return to_model_space(vae, z.float()).cpu()
