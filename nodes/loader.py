"""ZTurboLoader: Z-Image-Turbo from ComfyUI's split files or from a diffusers folder, nothing from the network."""

from __future__ import annotations

import json
import os

import folder_paths

from zimage_core import SpeedOptions, ZImage, ZImageError
from zimage_core.formats import DOWNLOADS
from zimage_core.offload import OFFLOAD_MODES

from .api import io
from .model import CATEGORY, ModelHandle, ZTurboModel, make_room

from zimage_core.fast_denoiser import ATTENTION_BACKENDS

NONE = "none"
FROM_FOLDER = "(from diffusers_model)"
COMPONENTS = {  # input name -> (ComfyUI model folder, official file name)
    "transformer": ("diffusion_models", "z_image_turbo_bf16.safetensors"),
    "text_encoder": ("text_encoders", "qwen_3_4b.safetensors"),
    "vae": ("vae", "ae.safetensors"),
}
COMPUTE = ["auto", "bf16", "fp16", "fp32"]
STORAGE = ["auto", "bf16", "fp16", "fp32", "fp8_e4m3fn"]
DIFFUSERS_URL = "https://huggingface.co/Tongyi-MAI/Z-Image-Turbo"


def diffusers_models() -> list[str]:
    """Z-Image folders (holding a ZImagePipeline model_index.json) under ComfyUI's ``models/diffusers``."""
    found = set()
    for base in folder_paths.get_folder_paths("diffusers"):
        if not os.path.isdir(base):
            continue
        for root, dirs, files in os.walk(base, followlinks=True):
            if "model_index.json" not in files:
                continue
            dirs.clear()
            try:
                with open(os.path.join(root, "model_index.json"), encoding="utf-8") as f:
                    name = json.load(f).get("_class_name", "")
            except (OSError, ValueError):
                continue
            if "ZImage" in name:
                found.add(os.path.relpath(root, base).replace(os.sep, "/"))
    return sorted(found)


def _diffusers_path(name: str) -> str | None:
    for base in folder_paths.get_folder_paths("diffusers"):
        path = os.path.join(base, name)
        if os.path.isfile(os.path.join(path, "model_index.json")):
            return path
    return None


def _file_input(component: str, tooltip: str) -> io.Combo.Input:
    folder, official = COMPONENTS[component]
    files = folder_paths.get_filename_list(folder)
    default = official if official in files else (files[0] if files else FROM_FOLDER)
    return io.Combo.Input(component, options=[*files, FROM_FOLDER], default=default, tooltip=tooltip)


def missing_file(component: str, name: str) -> str:
    folder = COMPONENTS[component][0]
    searched = ", ".join(folder_paths.get_folder_paths(folder)) or f"models/{folder}"
    return (f"{component.replace('_', ' ')} file '{name}' was not found in ComfyUI/models/{folder}/ (searched: "
            f"{searched}). Put it there and refresh the page (R). The official file is {DOWNLOADS[component]}.")


def problem(diffusers_model: str, parts: dict[str, str]) -> str | None:
    """Why the chosen files can't be loaded, or None."""
    if diffusers_model != NONE and _diffusers_path(diffusers_model) is None:
        return (f"diffusers model '{diffusers_model}' was not found: put the Tongyi-MAI/Z-Image-Turbo folder "
                f"({DIFFUSERS_URL}, the folder with model_index.json) into ComfyUI/models/diffusers/.")
    for component, name in parts.items():
        if name == FROM_FOLDER:
            if diffusers_model == NONE:
                return (f"{component} is set to '{FROM_FOLDER}' but diffusers_model is 'none': pick the "
                        f"{component.replace('_', ' ')} file ({DOWNLOADS[component]}) or a diffusers folder.")
        elif folder_paths.get_full_path(COMPONENTS[component][0], name) is None:
            return missing_file(component, name)
    return None


class ZTurboLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZTurboLoader",
            display_name="Z-Image Turbo Loader",
            category=CATEGORY,
            description="Loads Z-Image-Turbo (transformer, Qwen3-4B text encoder, Flux VAE) from ComfyUI's split "
                        "files or a diffusers folder, on ComfyUI's device. Nothing is downloaded.",
            inputs=[
                io.Combo.Input("diffusers_model", options=[NONE, *diffusers_models()], default=NONE,
                               tooltip="A Tongyi-MAI/Z-Image-Turbo folder under models/diffusers. Parts set to "
                                       f"'{FROM_FOLDER}' below load from it; a file chosen below replaces that part."),
                _file_input("transformer", "The diffusion model, from models/diffusion_models "
                                           "(z_image_turbo_bf16.safetensors)."),
                _file_input("text_encoder", "The Qwen3-4B text encoder, from models/text_encoders "
                                            "(qwen_3_4b.safetensors)."),
                _file_input("vae", "The Flux VAE, from models/vae (ae.safetensors)."),
                io.Combo.Input("dtype", options=COMPUTE, default="auto",
                               tooltip="Compute dtype of all three models. auto: bf16 where the GPU has it, fp16 on "
                                       "older CUDA cards (with the precision guard on), fp32 on the CPU."),
                io.Combo.Input("transformer_storage", options=STORAGE, default="auto",
                               tooltip="How the transformer's weights are stored in memory. auto: as the compute "
                                       "dtype. fp8_e4m3fn halves the memory of the bf16 weights."),
                io.Combo.Input("text_encoder_storage", options=STORAGE, default="auto",
                               tooltip="How the text encoder's weights are stored. auto: as the compute dtype."),
                io.Combo.Input("vae_dtype", options=COMPUTE, default="auto",
                               tooltip="Compute (and storage) dtype of the VAE. auto: as dtype."),
                io.Combo.Input("attention", options=list(ATTENTION_BACKENDS), default="auto",
                               tooltip="Attention kernel of the transformer. auto: PyTorch's choice (SDPA); cudnn "
                                       "is as fast on an H100."),
                io.Boolean.Input("compile", default=False,
                                 tooltip="torch.compile the transformer block (1.7x faster steps on an H100; the first "
                                         "run pays about 12 s of compiling; new prompts and seeds don't recompile)."),
                io.Combo.Input("offload", options=list(OFFLOAD_MODES), default="none",
                               tooltip="none: all on the GPU (22 GiB at 1024x1024 in bf16). model: each model on the "
                                       "GPU only while it runs (12.5 GiB bf16, 7.7 GiB with fp8 storage). sequential: "
                                       "transformer blocks streamed (3.4 GiB). Switching reloads nothing from disk."),
            ],
            outputs=[ZTurboModel.Output(display_name="model", tooltip="The loaded Z-Image Turbo model.")],
        )

    @classmethod
    def validate_inputs(cls, **_inputs) -> bool:
        # Accept any file name here: execute() checks the files and says which folder and download each one needs,
        # where ComfyUI's own check would only say "value not in list" (once per input).
        return True

    @classmethod
    def execute(cls, diffusers_model, transformer, text_encoder, vae, dtype="auto", transformer_storage="auto",
                text_encoder_storage="auto", vae_dtype="auto", attention="auto", compile=False,
                offload="none") -> io.NodeOutput:
        import comfy.model_management

        parts = {"transformer": transformer, "text_encoder": text_encoder, "vae": vae}
        why = problem(diffusers_model, parts)
        if why:
            raise ZImageError(why)
        model_dir = _diffusers_path(diffusers_model) if diffusers_model != NONE else None
        files = {c: None if name == FROM_FOLDER else folder_paths.get_full_path(COMPONENTS[c][0], name)
                 for c, name in parts.items()}
        device = comfy.model_management.get_torch_device()
        if offload == "none":
            make_room(sum(_size(p) for p in files.values() if p) + _folder_size(model_dir, files), device)
        zimage = ZImage.load(  # reuse: a changed dtype or offload mode reloads only what changed
            model_dir, **files, device=device, dtype=dtype,
            overrides={"transformer": (transformer_storage, None), "text_encoder": (text_encoder_storage, None),
                       "vae": (vae_dtype, vae_dtype)},
            speed=SpeedOptions(attention=attention, compile=bool(compile)), offload=offload, reuse=True,
        )
        return io.NodeOutput(ModelHandle(zimage))


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.isfile(path) else 0


def _folder_size(model_dir: str | None, files: dict) -> int:
    if model_dir is None:
        return 0
    total = 0
    for component, path in files.items():
        if path is None:
            for root, _, names in os.walk(os.path.join(model_dir, component)):
                total += sum(_size(os.path.join(root, n)) for n in names if n.endswith(".safetensors"))
    return total
