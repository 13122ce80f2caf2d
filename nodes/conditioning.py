"""ZTurboTextEncode: the prompt as a CONDITIONING with the layout of ComfyUI's own Z-Image text encoder."""

from __future__ import annotations

from .adapters import CATEGORY, MODEL_TOOLTIP, ZTurboModel, check_finite, to_conditioning
from .api import io


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
        embedding = model.ready().encode_prompt([text])[0]
        check_finite(embedding, "the text encoder produced NaN/inf, the fp16 overflow of Qwen3: add a Z-Image Turbo "
                                "Precision Guard (auto) after the loader, or load with dtype bf16/fp32.")
        return io.NodeOutput(to_conditioning(embedding))
