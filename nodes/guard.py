"""ZTurboPrecisionGuard: the fp16 overflow policy for the text encoder, the sampler and the decoder."""

from __future__ import annotations

from zimage_core import GUARD_POLICIES

from .adapters import CATEGORY, MODEL_TOOLTIP, ZTurboModel
from .api import io


class ZTurboPrecisionGuard(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZTurboPrecisionGuard",
            display_name="Z-Image Turbo Precision Guard",
            category=CATEGORY,
            description="Sets how fp16 overflow (NaN, black images) is handled by every node that uses this model: "
                        "the text encoder, the sampler and the decoders. The sampler's guard_report output says "
                        "what happened.",
            inputs=[
                ZTurboModel.Input("model", tooltip=MODEL_TOOLTIP),
                io.Combo.Input("policy", options=list(GUARD_POLICIES), default="auto",
                               tooltip="off: plain fp16. detect: stop with an error naming the block that overflowed. "
                                       "auto: run just the overflowing blocks in bf16/fp32 (remembered, so paid once). "
                                       "clamp: ComfyUI's clipping to ±65504 (lossy)."),
            ],
            outputs=[ZTurboModel.Output(display_name="model", tooltip="The same model with this policy.")],
        )

    @classmethod
    def execute(cls, model, policy) -> io.NodeOutput:
        return io.NodeOutput(model.with_guard(policy))
