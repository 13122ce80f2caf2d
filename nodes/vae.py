"""VAE decode (plain and exact-tiled) and encode, between ComfyUI's LATENT/IMAGE and the core."""

from __future__ import annotations

from zimage_core import MAX_TILE_SIZE, MIN_TILE_SIZE

from .adapters import CATEGORY, MODEL_TOOLTIP, ZTurboModel, cancel_check, image_in, image_out, latent_in, latent_out
from .api import io

SAMPLES_TOOLTIP = "A 16-channel Flux-VAE latent (raw VAE space, as ComfyUI keeps it)."
IMAGE_TOOLTIP = "float32 [batch, height, width, 3] in 0..1."


class ZTurboVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZTurboVAEDecode",
            display_name="Z-Image Turbo VAE Decode",
            category=CATEGORY,
            description="Decodes a Flux-VAE LATENT (from our sampler or any native sampler) to an IMAGE. Switches to "
                        "exact tiles by itself when the whole image would not fit in free GPU memory. Cancel stops it "
                        "between tiles and decoder blocks.",
            inputs=[
                io.Latent.Input("samples", tooltip=SAMPLES_TOOLTIP),
                ZTurboModel.Input("model", tooltip=MODEL_TOOLTIP),
            ],
            outputs=[io.Image.Output(tooltip=IMAGE_TOOLTIP)],
        )

    @classmethod
    def execute(cls, samples, model) -> io.NodeOutput:
        zimage = model.ready()
        image = zimage.decode(latent_in(zimage, samples, "samples"), tiled="auto", on_progress=cancel_check())
        return io.NodeOutput(image_out(image))


class ZTurboVAEDecodeTiled(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZTurboVAEDecodeTiled",
            display_name="Z-Image Turbo VAE Decode (Tiled)",
            category=CATEGORY,
            description="Decodes in tiles with bounded memory, for 2048² and beyond. Unlike VAEDecodeTiled the tiles "
                        "are exact: GroupNorm statistics are those of the whole image, so there are no seams and "
                        "the result equals the untiled decode. Cancel stops it between tiles.",
            inputs=[
                io.Latent.Input("samples", tooltip=SAMPLES_TOOLTIP),
                ZTurboModel.Input("model", tooltip=MODEL_TOOLTIP),
                io.Int.Input("tile_size", default=512, min=MIN_TILE_SIZE, max=MAX_TILE_SIZE, step=32,
                             tooltip="Tile side in output pixels; sets the decoder's working memory per tile."),
                io.Int.Input("overlap", default=64, min=0, max=MAX_TILE_SIZE, step=32,
                             tooltip="Extra context read around each tile, in output pixels (below tile_size). The "
                                     "tiles are exact at any value; 0 is the fastest."),
            ],
            outputs=[io.Image.Output(tooltip=IMAGE_TOOLTIP)],
        )

    @classmethod
    def execute(cls, samples, model, tile_size=512, overlap=64) -> io.NodeOutput:
        zimage = model.ready()
        image = zimage.decode(latent_in(zimage, samples, "samples"), tiled=True, tile_size=tile_size, overlap=overlap,
                              on_progress=cancel_check())
        return io.NodeOutput(image_out(image))


class ZTurboVAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZTurboVAEEncode",
            display_name="Z-Image Turbo VAE Encode",
            category=CATEGORY,
            description="Encodes an IMAGE to a Flux-VAE LATENT (the distribution's mean), for img2img with denoise < 1.",
            inputs=[
                io.Image.Input("pixels", tooltip="The image; width and height must be multiples of 16 (ImageScale)."),
                ZTurboModel.Input("model", tooltip=MODEL_TOOLTIP),
            ],
            outputs=[io.Latent.Output(tooltip="Raw VAE-space latent [batch, 16, height/8, width/8].")],
        )

    @classmethod
    def execute(cls, pixels, model) -> io.NodeOutput:
        zimage = model.ready()
        return io.NodeOutput(latent_out(zimage, zimage.encode_image(image_in(pixels))))
