"""ZTurboNativeVAEDecodeTiled: our exact tiled decode on ComfyUI's own VAE (the Flux VAE of VAELoader)."""

from __future__ import annotations

import torch

from zimage_core import MAX_TILE_SIZE, MIN_TILE_SIZE, ExactTiledDecoder, ZImageError

from .adapters import CATEGORY, cancel_check
from .api import io


class ZTurboNativeVAEDecodeTiled(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZTurboNativeVAEDecodeTiled",
            display_name="Z-Image Turbo VAE Decode (Tiled, native VAE)",
            category=CATEGORY,
            description="Decodes with ComfyUI's own VAE (VAELoader, ae.safetensors) in exact tiles: memory bounded by "
                        "the tile, and GroupNorm statistics of the whole image, so no seams and the same image as "
                        "the untiled VAEDecode. The VAE is converted once (kept while the VAE is).",
            inputs=[
                io.Latent.Input("samples", tooltip="A 16-channel Flux-VAE LATENT (any sampler)."),
                io.Vae.Input("vae", tooltip="ComfyUI's Flux VAE (VAELoader with ae.safetensors)."),
                io.Int.Input("tile_size", default=512, min=MIN_TILE_SIZE, max=MAX_TILE_SIZE, step=32,
                             tooltip="Tile side in output pixels; sets the decoder's working memory per tile."),
                io.Int.Input("overlap", default=64, min=0, max=MAX_TILE_SIZE, step=32,
                             tooltip="Extra context read around each tile, in output pixels (below tile_size). The "
                                     "tiles are exact at any value; 0 is the fastest."),
            ],
            outputs=[io.Image.Output(tooltip="float32 [batch, height, width, 3] in 0..1.")],
        )

    @classmethod
    def execute(cls, samples, vae, tile_size=512, overlap=64) -> io.NodeOutput:
        return io.NodeOutput(decode_native(vae, samples, tile_size, overlap))


def decode_native(vae, samples: dict, tile_size: int = 512, overlap: int = 64) -> torch.Tensor:
    """IMAGE [B, H, W, 3] in 0..1 from a LATENT with ComfyUI's VAE, by our exact tiled decode."""
    import comfy.model_management

    z = samples["samples"] if isinstance(samples, dict) else samples
    if z.ndim != 4 or z.shape[1] != 16:
        raise ZImageError(f"samples has shape {list(z.shape)}: the Flux VAE decodes 16-channel image latents "
                          "[batch, 16, height/8, width/8]. Connect the LATENT of a Z-Image/Flux sampler.")
    model = getattr(vae, "first_stage_model", None)
    if model is None:
        raise ZImageError("vae is not a ComfyUI VAE: connect VAELoader's output.")
    device = getattr(vae, "device", torch.device("cpu"))
    dtype = getattr(vae, "vae_dtype", torch.float32)
    if device.type != "cpu":  # room for the converted weights and the tiles' activations
        comfy.model_management.free_memory(sum(p.numel() for p in model.parameters()) * 2 + (1 << 30), device)
    ours = ExactTiledDecoder.of(vae, model.state_dict, dtype, device)
    image = ExactTiledDecoder.decode(ours, z, tile_size, overlap, on_progress=cancel_check(),
                                     offload_device=comfy.model_management.vae_offload_device())
    return ((image.float() + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1).cpu()
