"""ZTurboSampler: the flow-matching Euler sampler of Z-Image-Turbo (8 steps by default), LATENT in and out.

Sigmas, noise and ``denoise`` mean what they mean in ComfyUI's KSampler with ModelSamplingAuraFlow(shift 3) and
the ``simple`` scheduler: the same seed gives the same noise, and denoise < 1 runs the last ``steps`` of a
``steps / denoise`` schedule from the input latent. ``guidance`` is diffusers' (ComfyUI cfg - 1); 0 is off.
The size comes from ``latent_image`` when one is connected, else from width/height/batch_size (the pack's web
extension, ``web/zturbo.js``, hides those three while a latent is connected).
"""

from __future__ import annotations

from zimage_core import (GUARD_POLICIES, MAX_BATCH, MAX_SIZE, MAX_STEPS, MIN_SIZE, SAMPLERS, SIZE_MULTIPLE, ZImageError,
                         check_guidance, check_seed, check_size)

from .adapters import (CATEGORY, GUARD_FROM_MODEL, LEGACY_GUARD_FROM_MODEL, MODEL_TOOLTIP, ZTurboModel,
                       activation_bytes, caption_features, check_finite, guard_report, init_latent, latent_out,
                       latent_samples, make_room, negative_features, step_callback)
from .api import io

GUARD_CHOICES = [GUARD_FROM_MODEL, *GUARD_POLICIES]
SIZE_NOTE = " Ignored while latent_image is connected: the latent's size is used (these widgets are then hidden)."


class ZTurboSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZTurboSampler",
            display_name="Z-Image Turbo Sampler",
            category=CATEGORY,
            description="Samples Z-Image-Turbo with the reference recipe (flow-matching Euler, shift 3, 8 steps by "
                        "default). Takes the conditioning of Z-Image Turbo Text Encode or of CLIPTextEncode with a "
                        "lumina2 CLIP, returns a Flux-VAE LATENT for any VAE decode node. The image size comes from "
                        "latent_image when connected, else from width/height/batch_size.",
            inputs=[
                ZTurboModel.Input("model", tooltip=MODEL_TOOLTIP),
                io.Conditioning.Input("positive", tooltip="The prompt: one conditioning entry; a batched one gives "
                                                          "its rows to the images in turn."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Used only when guidance > 0; an empty prompt when not connected."),
                io.Latent.Input("latent_image", optional=True,
                                tooltip="Optional 16-channel latent (EmptySD3LatentImage, a VAE encode). When connected "
                                        "its size and batch are used and width/height/batch_size are ignored; its "
                                        "content matters only with denoise < 1 (img2img)."),
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
                             tooltip="Image width in pixels (multiple of 16)." + SIZE_NOTE),
                io.Int.Input("height", default=1024, min=MIN_SIZE, max=MAX_SIZE, step=SIZE_MULTIPLE,
                             tooltip="Image height in pixels (multiple of 16)." + SIZE_NOTE),
                io.Int.Input("batch_size", default=1, min=1, max=MAX_BATCH,
                             tooltip="Images per run." + SIZE_NOTE),
                io.Combo.Input("precision_guard", options=GUARD_CHOICES, default=GUARD_FROM_MODEL, optional=True,
                               tooltip=f"fp16 overflow policy for this sampler. '{GUARD_FROM_MODEL}': the policy the "
                                       "model input carries (set by a Precision Guard node; without one: auto with "
                                       "fp16 compute, off otherwise). The others override it for this sampler."),
                io.Combo.Input("sampler", options=list(SAMPLERS), default="euler", optional=True,
                               tooltip="euler: flow-matching Euler, the diffusers reference. res_multistep: the "
                                       "second-order method ComfyUI's Z-Image template uses (same sigmas; equal to "
                                       "KSampler's res_multistep). Both cost one transformer call per step."),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="Flux-VAE latent in raw VAE space, for any VAE decode."),
                io.String.Output(display_name="guard_report", tooltip="What the precision guard did in this run."),
            ],
        )

    @classmethod
    def validate_inputs(cls, precision_guard=GUARD_FROM_MODEL):
        if precision_guard in GUARD_CHOICES or precision_guard == LEGACY_GUARD_FROM_MODEL:  # 0.1's name for it
            return True
        return f"precision_guard '{precision_guard}' is not one of {', '.join(GUARD_CHOICES)}"

    @classmethod
    def execute(cls, model, positive, seed, steps, guidance, denoise, width, height, batch_size, negative=None,
                latent_image=None, precision_guard=GUARD_FROM_MODEL, sampler="euler") -> io.NodeOutput:
        check_guidance(guidance)  # NaN passes ComfyUI's min/max check and would be taken as "off"
        check_seed(seed)
        zimage = model.ready(precision_guard)
        init = None
        if latent_image is not None:
            if denoise <= 0.0:
                return io.NodeOutput({"samples": latent_samples(latent_image, "latent_image").clone()},
                                     "denoise 0: the input latent is returned unchanged")
            init = init_latent(zimage, latent_image)
            batch_size, height, width = init.shape[0], init.shape[2] * 8, init.shape[3] * 8
        elif denoise < 1.0:
            raise ZImageError(f"denoise {denoise} needs a latent_image to start from (img2img): connect one (e.g. Z-Image "
                              "Turbo VAE Encode of an image), or set denoise to 1.")
        check_size(width, height)
        cap_feats = caption_features(positive, batch_size, zimage.transformer.config.cap_feat_dim, "positive")
        negative_feats = negative_features(zimage, negative, batch_size) if guidance > 0 else None
        make_room(activation_bytes(batch_size, width, height), zimage.device)
        if zimage.guard is not None:
            zimage.guard.begin_run()
        latents = zimage.sample(cap_feats, seed=seed, width=width, height=height, steps=steps, guidance=guidance,
                                negative_feats=negative_feats, denoise=denoise, init_latents=init,
                                callback=step_callback(steps, zimage.device), sampler=sampler)
        check_finite(latents, "sampling produced NaN/inf latents (the fp16 overflow of Z-Image): add a Z-Image Turbo "
                              "Precision Guard (auto) after the loader, set precision_guard to auto, or load with "
                              "dtype bf16/fp32.")
        return io.NodeOutput(latent_out(zimage, latents), guard_report(zimage))
