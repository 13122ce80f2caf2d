"""ZTurboLoRA: a LoRA file from ComfyUI's ``models/loras`` merged into the Z-Image Turbo model, chainable."""

from __future__ import annotations

from .adapters import CATEGORY, MODEL_TOOLTIP, ZTurboModel, lora_file
from .api import io


class ZTurboLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths

        return io.Schema(
            node_id="ZTurboLoRA",
            display_name="Z-Image Turbo LoRA",
            category=CATEGORY,
            description="Merges a Z-Image LoRA into the model (transformer, and text encoder where the file has such "
                        "keys). Chain several to stack them. Every naming ComfyUI maps for Z-Image is read, Musubi-"
                        "tuner's too; LoRA, LoHa, LoKr, DoRA. Keys that match nothing are listed in the console with "
                        "their likely cause. Changing the strength or removing the node restores the weights exactly, "
                        "without reading the checkpoint again.",
            inputs=[
                ZTurboModel.Input("model", tooltip=MODEL_TOOLTIP),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A LoRA file from ComfyUI/models/loras."),
                io.Float.Input("strength", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="1: the LoRA as trained. 0: off (the original weights, bit for bit)."),
            ],
            outputs=[ZTurboModel.Output(display_name="model", tooltip="The model with this LoRA (merged when it runs).")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        return io.NodeOutput(model.with_lora(lora_file(lora_name), strength))
