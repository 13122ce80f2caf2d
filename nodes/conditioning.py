"""ZTurboTextEncode and the CONDITIONING layout shared with ComfyUI's own Z-Image text encoder.

ComfyUI 0.3.75's CLIPTextEncode with a lumina2 CLIP (Qwen3-4B) returns ``[[cond, {"pooled_output": None,
"attention_mask": mask}]]``: ``cond`` float32 ``[1, L, 2560]`` (the output of the second-to-last layer of the
templated prompt, unpadded) and ``mask`` int64 ``[1, L]`` of ones. ZTurboTextEncode returns the same, so
either encoder feeds our sampler or ComfyUI's KSampler.
"""

from __future__ import annotations

import torch

from zimage_core import ZImageError

from .api import io
from .model import CATEGORY, MODEL_TOOLTIP, ZTurboModel

# Keys that change what ComfyUI's samplers do with an entry (areas, masks, ControlNets, timestep ranges);
# our sampler can't honour them, so it refuses them rather than ignoring them.
UNSUPPORTED = {"area": "ConditioningSetArea", "mask": "ConditioningSetMask", "control": "ControlNet",
               "gligen": "GLIGEN"}


def to_conditioning(embedding: torch.Tensor) -> list:
    """One prompt's ``[L, C]`` embedding as ComfyUI's CONDITIONING."""
    import comfy.model_management

    device = comfy.model_management.intermediate_device()
    cond = embedding.to(device=device, dtype=torch.float32, copy=True)[None]
    mask = torch.ones((1, cond.shape[1]), dtype=torch.long, device=device)
    return [[cond, {"pooled_output": None, "attention_mask": mask}]]


def caption_features(conditioning, batch: int, width: int, what: str) -> list[torch.Tensor]:
    """One ``[L, C]`` caption per image of the batch, from a CONDITIONING with a single entry.

    Rows of a batched tensor are used in turn (image ``i`` gets row ``i % rows``, ComfyUI's rule); positions the
    attention mask marks as padding are dropped.
    """
    if not isinstance(conditioning, list) or not conditioning:
        raise ZImageError(f"the {what} conditioning is empty: connect a text encoder's output.")
    if len(conditioning) > 1:
        raise ZImageError(
            f"the {what} conditioning has {len(conditioning)} entries (from ConditioningCombine or similar); the "
            "Z-Image Turbo Sampler takes one. Write a single prompt, join prompts with ConditioningConcat, or use "
            "ComfyUI's KSampler for combined conditionings."
        )
    cond, extras = conditioning[0]
    for key, node in UNSUPPORTED.items():
        if extras.get(key) is not None:
            raise ZImageError(f"the {what} conditioning carries '{key}' (from {node}), which the Z-Image Turbo Sampler "
                              "does not support: remove that node or use ComfyUI's KSampler.")
    if extras.get("start_percent", 0.0) > 0.0 or extras.get("end_percent", 1.0) < 1.0:
        raise ZImageError(f"the {what} conditioning has a timestep range (ConditioningSetTimestepRange), which the "
                          "Z-Image Turbo Sampler does not support.")
    if not torch.is_tensor(cond) or cond.ndim != 3:
        raise ZImageError(f"the {what} conditioning is not a [batch, tokens, features] tensor.")
    if cond.shape[-1] != width:
        raise ZImageError(
            f"the {what} conditioning is {cond.shape[-1]} wide but Z-Image needs {width}-wide Qwen3-4B embeddings: use "
            "the Z-Image Turbo Text Encode node, or CLIPLoader with qwen_3_4b.safetensors and type 'lumina2'."
        )
    rows = list(cond.float().unbind(0))
    mask = extras.get("attention_mask")
    if torch.is_tensor(mask) and mask.numel() == cond.shape[0] * cond.shape[1]:
        keep = mask.reshape(cond.shape[0], cond.shape[1]).to(torch.bool).cpu()
        rows = [row[k.to(row.device)] for row, k in zip(rows, keep)]
    if any(len(r) == 0 for r in rows):
        raise ZImageError(f"the {what} conditioning has no tokens (its attention mask is all zero).")
    return [rows[i % len(rows)] for i in range(batch)]


class ZTurboTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZTurboTextEncode",
            display_name="Z-Image Turbo Text Encode",
            category=CATEGORY,
            description="Encodes a prompt with Qwen3-4B the way the reference does (chat template, second-to-last "
                        "layer, no padding). The CONDITIONING has the layout of ComfyUI's own Z-Image text encoder.",
            inputs=[
                ZTurboModel.Input("model", tooltip=MODEL_TOOLTIP),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="The prompt. Up to 512 tokens are used (the template included)."),
            ],
            outputs=[io.Conditioning.Output(tooltip="The prompt embedding, [1, tokens, 2560].")],
        )

    @classmethod
    def execute(cls, model, text) -> io.NodeOutput:
        zimage = model.ready()
        embedding = zimage.encode_prompt([text])[0]
        if not torch.isfinite(embedding).all():
            raise ZImageError(
                "the text encoder produced NaN/inf, the fp16 overflow of Qwen3: add a Z-Image Turbo Precision Guard "
                "(auto) after the loader, or load with dtype bf16/fp32."
            )
        return io.NodeOutput(to_conditioning(embedding))
