"""The loaders: Z-Image-Turbo from ComfyUI's split files or from a diffusers folder, nothing from the network.

The common case shows four widgets (three files and the compute dtype), like ComfyUI's own three loaders; the
rest (storage dtypes, attention, compile, offload) sits on the optional Z-Image Turbo Load Options node. The
one-node loader of 0.1 (``ZTurboLoader``, eleven widgets) stays registered, hidden from search, so workflows saved
with it load and run unchanged.
"""

from __future__ import annotations

from zimage_core import ATTENTION_BACKENDS, COMPUTE_DTYPES, OFFLOAD_MODES, STORAGE_DTYPES, ZImageError

from .adapters import (CATEGORY, FROM_FOLDER, NONE, LoadOptions, ZTurboLoadOptions, ZTurboModel, diffusers_models,
                       file_input, load_model, model_files)
from .api import io

DTYPE_TOOLTIP = ("Compute dtype of all three models. auto: bf16 where the GPU has it, fp16 on older CUDA cards (with "
                 "the precision guard on), fp32 on the CPU.")
OPTIONS_TOOLTIP = "Optional: storage dtypes, attention, compile and offload from a Z-Image Turbo Load Options node."
MODEL_OUTPUT = dict(display_name="model", tooltip="The loaded Z-Image Turbo model.")
FILE_TOOLTIPS = {
    "transformer": "The diffusion model, from models/diffusion_models (z_image_turbo_bf16.safetensors).",
    "text_encoder": "The Qwen3-4B text encoder, from models/text_encoders (qwen_3_4b.safetensors).",
    "vae": "The Flux VAE, from models/vae (ae.safetensors).",
}


def _dtype_input() -> io.Combo.Input:
    return io.Combo.Input("dtype", options=list(COMPUTE_DTYPES), default="auto", tooltip=DTYPE_TOOLTIP)


def _option_inputs() -> list:
    return [
        io.Combo.Input("transformer_storage", options=list(STORAGE_DTYPES), default="auto",
                       tooltip="How the transformer's weights are stored in memory. auto: as the compute dtype. "
                               "fp8_e4m3fn halves the memory of the bf16 weights."),
        io.Combo.Input("text_encoder_storage", options=list(STORAGE_DTYPES), default="auto",
                       tooltip="How the text encoder's weights are stored. auto: as the compute dtype."),
        io.Combo.Input("vae_dtype", options=list(COMPUTE_DTYPES), default="auto",
                       tooltip="Compute (and storage) dtype of the VAE. auto: as the loader's dtype."),
        io.Combo.Input("attention", options=list(ATTENTION_BACKENDS), default="auto",
                       tooltip="Attention kernel. auto: cuDNN where PyTorch ranks it first (H100, H200, B200), "
                               "else PyTorch's pick (flash); a new image size's first calls skip cuDNN until its "
                               "one-off plan (~0.06 s on an H100) would have paid off, so their bits differ from "
                               "later ones by rounding. sdpa: the same choice from the first call (bit-identical "
                               "reruns)."),
        io.Boolean.Input("compile", default=False,
                         tooltip="torch.compile the transformer block. Off by default: on an H200 the default fused "
                                 "kernels are as fast (8 steps at 1024²: 0.760 s; compiled 0.763 s). Compiling happens "
                                 "at load, in the background: about 15 s the first time, 4-5 s in later processes "
                                 "(cached); new prompts and seeds don't recompile."),
        io.Combo.Input("offload", options=list(OFFLOAD_MODES), default="none",
                       tooltip="none: all on the GPU (22 GiB at 1024x1024 in bf16). model: each model on the GPU only "
                               "while it runs (12.5 GiB bf16, 7.7 GiB with fp8 storage). sequential: transformer "
                               "blocks streamed (3.4 GiB). Switching reloads nothing from disk."),
    ]


class ZTurboFileLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZTurboFileLoader",
            display_name="Z-Image Turbo Loader",
            category=CATEGORY,
            description="Loads Z-Image-Turbo from ComfyUI's split files (transformer, Qwen3-4B text encoder, Flux VAE) "
                        "on ComfyUI's device. Nothing is downloaded. More settings: Z-Image Turbo Load Options.",
            inputs=[
                *(file_input(c, FILE_TOOLTIPS[c]) for c in ("transformer", "text_encoder", "vae")),
                _dtype_input(),
                ZTurboLoadOptions.Input("options", optional=True, tooltip=OPTIONS_TOOLTIP),
            ],
            outputs=[ZTurboModel.Output(**MODEL_OUTPUT)],
        )

    @classmethod
    def validate_inputs(cls, transformer, text_encoder, vae) -> bool:
        # Any file name passes here: execute() names every missing file, its folder and its download in one
        # message, where ComfyUI's own check would only say "value not in list", once per input.
        return True

    @classmethod
    def execute(cls, transformer, text_encoder, vae, dtype="auto", options=None) -> io.NodeOutput:
        model_dir, files = model_files(NONE, {"transformer": transformer, "text_encoder": text_encoder, "vae": vae})
        return io.NodeOutput(load_model(model_dir, files, dtype, options or LoadOptions()))


class ZTurboDiffusersLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        folders = diffusers_models()
        return io.Schema(
            node_id="ZTurboDiffusersLoader",
            display_name="Z-Image Turbo Loader (diffusers folder)",
            category=CATEGORY,
            description="Loads Z-Image-Turbo from a Tongyi-MAI/Z-Image-Turbo folder (the one with model_index.json) "
                        "under models/diffusers. Nothing is downloaded.",
            inputs=[
                io.Combo.Input("diffusers_model", options=folders or [NONE], default=(folders or [NONE])[0],
                               tooltip="A Tongyi-MAI/Z-Image-Turbo folder under models/diffusers."),
                _dtype_input(),
                ZTurboLoadOptions.Input("options", optional=True, tooltip=OPTIONS_TOOLTIP),
            ],
            outputs=[ZTurboModel.Output(**MODEL_OUTPUT)],
        )

    @classmethod
    def validate_inputs(cls, diffusers_model) -> bool:
        return True  # execute() says where the folder belongs and where to get it

    @classmethod
    def execute(cls, diffusers_model, dtype="auto", options=None) -> io.NodeOutput:
        if diffusers_model == NONE:
            raise ZImageError("no Z-Image-Turbo folder was found in ComfyUI/models/diffusers/: put the "
                              "Tongyi-MAI/Z-Image-Turbo folder (https://huggingface.co/Tongyi-MAI/Z-Image-Turbo, the "
                              "folder with model_index.json) there and refresh the page (R), or use the Z-Image Turbo "
                              "Loader with the split files.")
        parts = dict.fromkeys(("transformer", "text_encoder", "vae"), FROM_FOLDER)
        model_dir, files = model_files(diffusers_model, parts)
        return io.NodeOutput(load_model(model_dir, files, dtype, options or LoadOptions()))


class ZTurboLoadOptionsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZTurboLoadOptions",
            display_name="Z-Image Turbo Load Options",
            category=CATEGORY,
            description="The loader's less common settings: weight storage (fp8), VAE dtype, attention kernel, "
                        "torch.compile and offload. Connect it to a Z-Image Turbo Loader's options input.",
            inputs=_option_inputs(),
            outputs=[ZTurboLoadOptions.Output(display_name="options", tooltip="For a Z-Image Turbo Loader.")],
        )

    @classmethod
    def execute(cls, transformer_storage="auto", text_encoder_storage="auto", vae_dtype="auto", attention="auto",
                compile=False, offload="none") -> io.NodeOutput:
        return io.NodeOutput(LoadOptions(transformer_storage, text_encoder_storage, vae_dtype, attention,
                                         bool(compile), offload))


class ZTurboLoader(io.ComfyNode):
    """Deprecated: the one-node loader of 0.1, kept with its inputs in their order so saved workflows still load."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZTurboLoader",
            display_name="Z-Image Turbo Loader (all options, deprecated)",
            category=CATEGORY,
            is_deprecated=True,
            description="Deprecated: use Z-Image Turbo Loader (+ Load Options) or Loader (diffusers folder). Loads "
                        "from split files or a diffusers folder; a file chosen here replaces that part of the folder.",
            inputs=[
                io.Combo.Input("diffusers_model", options=[NONE, *diffusers_models()], default=NONE,
                               tooltip="A Tongyi-MAI/Z-Image-Turbo folder under models/diffusers. Parts set to "
                                       f"'{FROM_FOLDER}' below load from it; a file chosen below replaces that part."),
                *(file_input(c, FILE_TOOLTIPS[c], from_folder=True) for c in ("transformer", "text_encoder", "vae")),
                _dtype_input(),
                *_option_inputs(),
            ],
            outputs=[ZTurboModel.Output(**MODEL_OUTPUT)],
        )

    @classmethod
    def validate_inputs(cls, diffusers_model, transformer, text_encoder, vae) -> bool:
        return True

    @classmethod
    def execute(cls, diffusers_model, transformer, text_encoder, vae, dtype="auto", transformer_storage="auto",
                text_encoder_storage="auto", vae_dtype="auto", attention="auto", compile=False,
                offload="none") -> io.NodeOutput:
        model_dir, files = model_files(diffusers_model,
                                       {"transformer": transformer, "text_encoder": text_encoder, "vae": vae})
        options = LoadOptions(transformer_storage, text_encoder_storage, vae_dtype, attention, bool(compile), offload)
        return io.NodeOutput(load_model(model_dir, files, dtype, options))
