"""ZTurboSampler: the 8-step flow-matching Euler sampler of Z-Image-Turbo, LATENT in and out.

Sigmas, noise and ``denoise`` mean what they mean in ComfyUI's KSampler with ModelSamplingAuraFlow(shift 3) and
the ``simple`` scheduler: the same seed gives the same noise, and denoise < 1 runs the last ``steps`` of a
``steps / denoise`` schedule from the input latent. ``guidance`` is diffusers' (ComfyUI cfg - 1); 0 is off.
"""

from __future__ import annotations

import torch

from zimage_core import ZImageError
from zimage_core.sampler import MAX_SIZE, MAX_STEPS, MIN_SIZE, SIZE_MULTIPLE, check_size
from zimage_core.vae import to_model_space

from .api import io
from .conditioning import caption_features
from .guard import report_text
from .model import CATEGORY, MODEL_TOOLTIP, ZTurboModel, make_room
from .vae import latent_samples, to_latent

GUARD_CHOICES = ["model", "off", "detect", "auto", "clamp"]


def _progress(steps: int):
    """Per-step callback: ComfyUI's progress bar, and a prompt stop when the user cancels."""
    import comfy.model_management
    import comfy.utils

    bar = comfy.utils.ProgressBar(steps)

    def on_step(info):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(info.step + 1, info.total)

    return on_step


def _activation_bytes(batch: int, width: int, height: int) -> int:
    return int(2**30 * batch * width * height / 1024**2)  # about 1 GiB per 1024² image in bf16 (measured 0.7)


class ZTurboSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZTurboSampler",
            display_name="Z-Image Turbo Sampler (8-step)",
            category=CATEGORY,
            description="Samples Z-Image-Turbo with the reference recipe (flow-matching Euler, shift 3, 8 steps). "
                        "Takes the conditioning of Z-Image Turbo Text Encode or of CLIPTextEncode with a lumina2 "
                        "CLIP, returns a Flux-VAE LATENT for any VAE decode node.",
            inputs=[
                ZTurboModel.Input("model", tooltip=MODEL_TOOLTIP),
                io.Conditioning.Input("positive", tooltip="The prompt: one conditioning entry; a batched one gives "
                                                          "its rows to the images in turn."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Used only when guidance > 0; an empty prompt when not connected."),
                io.Latent.Input("latent_image", optional=True,
                                tooltip="Optional 16-channel latent (EmptySD3LatentImage, a VAE encode). Its size "
                                        "and batch replace width/height/batch_size; its content matters only with "
                                        "denoise < 1 (img2img)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed; the same seed gives the same noise as ComfyUI's KSampler."),
                io.Int.Input("steps", default=8, min=1, max=MAX_STEPS,
                             tooltip="Number of transformer calls. Z-Image-Turbo is made for 8."),
                io.Float.Input("guidance", default=0.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance, diffusers' scale (= ComfyUI cfg - 1). 0 is off, "
                                       "as Turbo wants; > 0 doubles the cost."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1 starts from pure noise. Below 1 (img2img, needs latent_image) only the last "
                                       "part of the schedule runs, so the image stays closer to the input (KSampler's "
                                       "rule); 0 returns the input unchanged."),
                io.Int.Input("width", default=1024, min=MIN_SIZE, max=MAX_SIZE, step=SIZE_MULTIPLE,
                             tooltip="Image width in pixels (multiple of 16), when no latent_image is connected."),
                io.Int.Input("height", default=1024, min=MIN_SIZE, max=MAX_SIZE, step=SIZE_MULTIPLE,
                             tooltip="Image height in pixels (multiple of 16), when no latent_image is connected."),
                io.Int.Input("batch_size", default=1, min=1, max=64,
                             tooltip="Images per run, when no latent_image is connected."),
                io.Combo.Input("precision_guard", options=GUARD_CHOICES, default="model", optional=True,
                               tooltip="fp16 overflow policy for this sampler. model: the one set by the Precision "
                                       "Guard node, else auto with fp16 compute and off otherwise."),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="Flux-VAE latent in raw VAE space, for any VAE decode."),
                io.String.Output(display_name="guard_report", tooltip="What the precision guard did in this run."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, seed, steps, guidance, denoise, width, height, batch_size, negative=None,
                latent_image=None, precision_guard="model") -> io.NodeOutput:
        zimage = model.ready(None if precision_guard == "model" else precision_guard)
        init = None
        if latent_image is not None:
            if latent_image.get("noise_mask") is not None:
                raise ZImageError("the latent_image has a noise mask (inpainting), which the Z-Image Turbo Sampler does "
                                  "not support: use ComfyUI's KSampler for inpainting.")
            z = latent_samples(latent_image, "latent_image")
            if denoise <= 0.0:
                return io.NodeOutput({"samples": z.clone()}, "denoise 0: the input latent is returned unchanged")
            batch_size, height, width = z.shape[0], z.shape[2] * 8, z.shape[3] * 8
            try:
                check_size(width, height)
            except ZImageError as err:
                raise ZImageError(f"the latent_image is {width}x{height} pixels: {err}") from None
            init = to_model_space(zimage.vae, z)
        elif denoise < 1.0:
            raise ZImageError(f"denoise {denoise} needs a latent_image to start from (img2img): connect one (e.g. Z-Image "
                              "Turbo VAE Encode of an image), or set denoise to 1.")
        check_size(width, height)
        cap_dim = zimage.transformer.config.cap_feat_dim
        cap_feats = caption_features(positive, batch_size, cap_dim, "positive")
        negative_feats = None
        if guidance > 0:
            negative_feats = (caption_features(negative, batch_size, cap_dim, "negative") if negative is not None
                              else zimage.encode_prompt([""] * batch_size))
        make_room(_activation_bytes(batch_size, width, height), zimage.device)
        if zimage.guard is not None:
            zimage.guard.begin_run()
        latents = zimage.sample(cap_feats, seed=seed, width=width, height=height, steps=steps, guidance=guidance,
                                negative_feats=negative_feats, denoise=denoise, init_latents=init,
                                callback=_progress(steps))
        if not torch.isfinite(latents).all():
            raise ZImageError(
                "sampling produced NaN/inf latents (the fp16 overflow of Z-Image): add a Z-Image Turbo Precision Guard "
                "(auto) after the loader, set precision_guard to auto, or load with dtype bf16/fp32."
            )
        return io.NodeOutput(to_latent(zimage, latents), report_text(zimage))
