"""VAE decode (plain and exact-tiled) and encode, between ComfyUI's LATENT/IMAGE and the core.

ComfyUI's LATENT holds the Flux VAE's own latent ``z`` ("raw VAE space"): EmptySD3LatentImage gives zeros,
VAEEncode gives ``z``, and its samplers apply ``(z - 0.1159) * 0.3611`` themselves. The core works in model
space, so these nodes convert with ``zimage_core.vae.to_model_space`` / ``to_vae_space``.
"""

from __future__ import annotations

import torch

from zimage_core import ZImageError
from zimage_core.vae import to_model_space, to_vae_space

from .api import io
from .model import CATEGORY, MODEL_TOOLTIP, ZTurboModel

LATENT_CHANNELS = 16


def latent_samples(latent, what: str = "latent") -> torch.Tensor:
    """The ``samples`` of a LATENT, checked to be a 16-channel Flux-VAE latent ``[B, 16, h, w]``."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not torch.is_tensor(samples):
        raise ZImageError(f"the {what} has no 'samples' tensor: connect a LATENT output.")
    if samples.ndim != 4:
        raise ZImageError(
            f"the {what} has shape {list(samples.shape)}; Z-Image needs an image latent [batch, 16, height/8, width/8] "
            "(video and audio latents don't fit)."
        )
    if samples.shape[1] != LATENT_CHANNELS:
        raise ZImageError(
            f"the {what} has {samples.shape[1]} channels; Z-Image needs a 16-channel Flux-VAE latent. Make it with "
            "EmptySD3LatentImage, or encode the image with Z-Image Turbo VAE Encode (or VAEEncode with ae.safetensors) "
            "instead of an SD1/SDXL latent node."
        )
    return samples.float()


def to_latent(zimage, latents: torch.Tensor) -> dict:
    """Core model-space latents as a ComfyUI LATENT (raw VAE space, float32 on the intermediate device)."""
    import comfy.model_management

    z = to_vae_space(zimage.vae, latents.float())
    return {"samples": z.to(comfy.model_management.intermediate_device())}


def _decode(zimage, latent, **tiling) -> torch.Tensor:
    z = latent_samples(latent, "samples")
    image = zimage.decode(to_model_space(zimage.vae, z), **tiling)
    if not torch.isfinite(image).all():
        raise ZImageError(
            "the VAE produced NaN/inf (fp16 overflow, or a broken latent): add a Z-Image Turbo Precision Guard (auto) "
            "after the loader, or load with vae_dtype bf16/fp32."
        )
    return image


class ZTurboVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZTurboVAEDecode",
            display_name="Z-Image Turbo VAE Decode",
            category=CATEGORY,
            description="Decodes a Flux-VAE LATENT (from our sampler or any native sampler) to an IMAGE. Switches to "
                        "exact tiles by itself when the whole image would not fit in free GPU memory.",
            inputs=[
                io.Latent.Input("samples", tooltip="A 16-channel Flux-VAE latent (raw VAE space, as ComfyUI keeps it)."),
                ZTurboModel.Input("model", tooltip=MODEL_TOOLTIP),
            ],
            outputs=[io.Image.Output(tooltip="float32 [batch, height, width, 3] in 0..1.")],
        )

    @classmethod
    def execute(cls, samples, model) -> io.NodeOutput:
        return io.NodeOutput(_decode(model.ready(), samples, tiled="auto"))


class ZTurboVAEDecodeTiled(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZTurboVAEDecodeTiled",
            display_name="Z-Image Turbo VAE Decode (Tiled)",
            category=CATEGORY,
            description="Decodes in tiles with bounded memory, for 2048² and beyond. Unlike VAEDecodeTiled the tiles "
                        "are exact: GroupNorm statistics are those of the whole image, so there are no seams and "
                        "the result equals the untiled decode.",
            inputs=[
                io.Latent.Input("samples", tooltip="A 16-channel Flux-VAE latent (raw VAE space, as ComfyUI keeps it)."),
                ZTurboModel.Input("model", tooltip=MODEL_TOOLTIP),
                io.Int.Input("tile_size", default=512, min=64, max=4096, step=32,
                             tooltip="Tile side in output pixels; sets the decoder's working memory per tile."),
                io.Int.Input("overlap", default=64, min=0, max=4096, step=32,
                             tooltip="Extra context read around each tile, in output pixels (below tile_size). The "
                                     "tiles are exact at any value; 0 is the fastest."),
            ],
            outputs=[io.Image.Output(tooltip="float32 [batch, height, width, 3] in 0..1.")],
        )

    @classmethod
    def execute(cls, samples, model, tile_size=512, overlap=64) -> io.NodeOutput:
        return io.NodeOutput(_decode(model.ready(), samples, tiled=True, tile_size=tile_size, overlap=overlap))


class ZTurboVAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZTurboVAEEncode",
            display_name="Z-Image Turbo VAE Encode",
            category=CATEGORY,
            description="Encodes an IMAGE to a Flux-VAE LATENT (the distribution's mean), for img2img with denoise < 1.",
            inputs=[
                io.Image.Input("pixels", tooltip="The image; width and height must be multiples of 16."),
                ZTurboModel.Input("model", tooltip=MODEL_TOOLTIP),
            ],
            outputs=[io.Latent.Output(tooltip="Raw VAE-space latent [batch, 16, height/8, width/8].")],
        )

    @classmethod
    def execute(cls, pixels, model) -> io.NodeOutput:
        zimage = model.ready()
        return io.NodeOutput(to_latent(zimage, zimage.encode_image(pixels)))
