"""A diffusers ``AutoencoderKL`` from the weights of another program's Flux VAE, for our exact tiled decode.

ComfyUI's ``VAELoader`` keeps the Flux VAE in the original BFL layout (``first_stage_model``: ``decoder.up.N``,
``mid.attn_1`` …). ``autoencoder_from_bfl_state`` converts such a state dict with diffusers' own converter
(``convert_ldm_vae_checkpoint``, as ``loading.load_vae`` does for ``ae.safetensors``) into an ``AutoencoderKL``
that ``vae_tiling.decode_tiled`` runs. ``ExactTiledDecoder`` keeps one converted model per source object (weakly:
it dies with the source) and decodes with it. No ComfyUI import here: the caller hands over the state dict, the
device and the dtype.
"""

from __future__ import annotations

import weakref

import torch

from . import formats
from .errors import ZImageError
from .vae_tiling import decode_tiled

_CACHE: "weakref.WeakKeyDictionary[object, tuple]" = weakref.WeakKeyDictionary()


def autoencoder_from_bfl_state(state: dict[str, torch.Tensor], dtype: torch.dtype, device="cpu"):
    """An ``AutoencoderKL`` (eval, no grad) holding a copy of a BFL-layout Flux VAE ``state`` in ``dtype``."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    shapes = {k: tuple(v.shape) for k, v in state.items()}
    if not formats.vae_is_original_layout(shapes):
        raise ZImageError("the VAE's weights are not in the Flux VAE's original (BFL) layout: the exact tiled "
                          "decode takes the Flux VAE of VAELoader (ae.safetensors). Use VAEDecodeTiled for others.")
    config = {k: v for k, v in formats.vae_config(shapes, "the VAE").items() if not k.startswith("_")}
    prefix = formats.vae_prefix(shapes)
    plain = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    converted = convert_ldm_vae_checkpoint(plain, config)
    with torch.device("meta"):
        model = AutoencoderKL(**config)
    converted = {k: v.detach().to(device=device, dtype=dtype, copy=True) for k, v in converted.items()}
    missing, unexpected = model.load_state_dict(converted, strict=False, assign=True)
    missing = [k for k in missing if k.startswith(("decoder.", "post_quant_conv."))]
    if missing:
        raise ZImageError(f"the VAE's weights lack {len(missing)} decoder tensors (first: {missing[0]}): it is not a "
                          "complete Flux VAE. Load ae.safetensors with VAELoader.")
    model.encoder = None  # the decode never uses it (its weights stay unassigned meta tensors otherwise)
    return model.eval().requires_grad_(False)


class ExactTiledDecoder:
    """Our exact tiled decode of another program's Flux VAE (one converted copy per source, made once)."""

    @staticmethod
    def of(source: object, state_fn, dtype: torch.dtype, device) -> "object":
        """The converted model for ``source`` (made from ``state_fn()`` on first use, or when dtype changed)."""
        cached = _CACHE.get(source)
        if cached is None or cached[0] != dtype:
            cached = _CACHE[source] = (dtype, autoencoder_from_bfl_state(state_fn(), dtype, "cpu"))
        model = cached[1]
        return model.to(device)

    @staticmethod
    def decode(model, latents: torch.Tensor, tile_size: int = 512, overlap: int = 64, on_progress=None,
               offload_device="cpu") -> torch.Tensor:
        """Decode raw VAE-space ``latents`` [B, 16, h, w] to images [B, 3, 8h, 8w] in [-1, 1] with bounded memory;
        the model's weights go back to ``offload_device`` afterwards."""
        param = next(model.decoder.parameters())
        try:
            with torch.no_grad():
                return decode_tiled(model, latents.to(device=param.device, dtype=param.dtype), tile_size, overlap,
                                    on_progress=on_progress)
        finally:
            if torch.device(offload_device) != param.device:
                model.to(offload_device)
