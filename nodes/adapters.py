"""Everything between ComfyUI and ``zimage_core``, in one module: model files, the ``ZTURBO_MODEL`` handle,
CONDITIONING, LATENT, IMAGE, progress/cancel and the guard report text.

The node files import only this module, ``.api`` and names that ``zimage_core/__init__.py`` exports; each node's
``execute`` converts its inputs here, calls one core function and converts the result back here.

Layouts (ComfyUI 0.3.75 and 0.33.0 alike):
- CONDITIONING of ComfyUI's own Z-Image text encoder (CLIPTextEncode with a lumina2 CLIP) is
  ``[[cond, {"pooled_output": None, "attention_mask": mask}]]``, ``cond`` float32 ``[1, L, 2560]`` (the second-to-last
  layer of the templated prompt, unpadded), ``mask`` int64 ``[1, L]`` of ones. Ours is the same.
- LATENT holds the Flux VAE's own latent ``z`` ("raw VAE space"): EmptySD3LatentImage gives zeros, VAEEncode gives
  ``z``, and ComfyUI's samplers apply ``(z - 0.1159) * 0.3611`` themselves. The core works in model space.
- IMAGE is float32 ``[B, H, W, C]`` in 0..1.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, replace

import torch

from zimage_core import (DOWNLOADS, LATENT_CHANNELS, MAX_SIZE, MIN_SIZE, SIZE_MULTIPLE, CastWeights, SpeedOptions,
                         ZImage, ZImageError, to_model_space, to_vae_space)

from .api import io

CATEGORY = "Z-Image Turbo"
ZTurboModel = io.Custom("ZTURBO_MODEL")
ZTurboLoadOptions = io.Custom("ZTURBO_LOAD_OPTIONS")
MODEL_TOOLTIP = "The Z-Image Turbo model from a Z-Image Turbo Loader (or the Precision Guard node)."
GUARD_FROM_MODEL = "from model"  # the sampler's precision_guard value meaning "whatever the model input carries"
LEGACY_GUARD_FROM_MODEL = "model"  # its name in workflows saved before 0.2


# ------------------------------------------------------------------------------------------ model files
NONE = "none"
FROM_FOLDER = "(from diffusers_model)"
COMPONENTS = {  # input name -> (ComfyUI model folder, official file name)
    "transformer": ("diffusion_models", "z_image_turbo_bf16.safetensors"),
    "text_encoder": ("text_encoders", "qwen_3_4b.safetensors"),
    "vae": ("vae", "ae.safetensors"),
}
DIFFUSERS_URL = "https://huggingface.co/Tongyi-MAI/Z-Image-Turbo"


def diffusers_models() -> list[str]:
    """Z-Image folders (holding a ZImagePipeline model_index.json) under ComfyUI's ``models/diffusers``."""
    import folder_paths

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


def diffusers_path(name: str) -> str | None:
    import folder_paths

    for base in folder_paths.get_folder_paths("diffusers"):
        path = os.path.join(base, name)
        if os.path.isfile(os.path.join(path, "model_index.json")):
            return path
    return None


# The text encoder and VAE choice that loads nothing: ComfyUI's own CLIPTextEncode and VAE nodes do that work, so a
# graph mixing them with our sampler does not hold Qwen3-4B and the VAE twice (about 8 GB).
NOT_LOADED = "none (ComfyUI's own node)"


def file_input(component: str, tooltip: str, from_folder: bool = False) -> io.Combo.Input:
    """A combo of the files in the component's model folder, defaulting to the official file name; the text encoder
    and the VAE may also be left out (``NOT_LOADED``)."""
    import folder_paths

    folder, official = COMPONENTS[component]
    files = folder_paths.get_filename_list(folder)
    default = official if official in files or not files else files[0]
    options = [*files, FROM_FOLDER] if from_folder else (files or [official])
    if component != "transformer" and not from_folder:
        options = [*options, NOT_LOADED]
        tooltip += (f" '{NOT_LOADED}': not loaded, for graphs where ComfyUI's "
                    + ("CLIPLoader + CLIPTextEncode encode the prompt." if component == "text_encoder"
                       else "VAELoader + VAEDecode/VAEEncode do the VAE's work."))
    return io.Combo.Input(component, options=options, default=default, tooltip=tooltip)


def _missing_file(component: str, name: str) -> str:
    import folder_paths

    folder = COMPONENTS[component][0]
    searched = ", ".join(folder_paths.get_folder_paths(folder)) or f"models/{folder}"
    return (f"{component.replace('_', ' ')} file '{name}' was not found in ComfyUI/models/{folder}/ (searched: "
            f"{searched}); the official file is {DOWNLOADS[component]}")


def model_files(diffusers_model: str, parts: dict[str, str]) -> tuple[str | None, dict[str, str | None]]:
    """The diffusers folder and the full path of each split file, or one error naming EVERY missing file."""
    import folder_paths

    problems = []
    model_dir = None
    if diffusers_model != NONE:
        model_dir = diffusers_path(diffusers_model)
        if model_dir is None:
            problems.append(f"diffusers model '{diffusers_model}' was not found: put the Tongyi-MAI/Z-Image-Turbo folder "
                            f"({DIFFUSERS_URL}, the folder with model_index.json) into ComfyUI/models/diffusers/")
    files = {}
    for component, name in parts.items():
        if name == NOT_LOADED:
            continue
        if name == FROM_FOLDER:
            files[component] = None
            if diffusers_model == NONE:
                problems.append(f"{component} is set to '{FROM_FOLDER}' but diffusers_model is 'none': pick the "
                                f"{component.replace('_', ' ')} file ({DOWNLOADS[component]}) or a diffusers folder")
            continue
        files[component] = folder_paths.get_full_path(COMPONENTS[component][0], name)
        if files[component] is None:
            problems.append(_missing_file(component, name))
    if len(problems) == 1:
        raise ZImageError(f"{problems[0]}. Put it there and refresh the page (R).")
    if problems:
        listed = "\n".join(f"- {p}" for p in problems)
        raise ZImageError(f"{len(problems)} model files are missing:\n\n{listed}\n\nPut them there and refresh the "
                          "page (R).")
    return model_dir, files


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.isfile(path) else 0


def bytes_to_load(model_dir: str | None, files: dict[str, str | None]) -> int:
    """Bytes of weights a load reads: the split files plus the parts taken from the diffusers folder."""
    total = sum(_size(p) for p in files.values() if p)
    if model_dir is not None:
        for component, path in files.items():
            if path is None:
                for root, _, names in os.walk(os.path.join(model_dir, component)):
                    total += sum(_size(os.path.join(root, n)) for n in names if n.endswith(".safetensors"))
    return total


@dataclass(frozen=True)
class LoadOptions:
    """The loader's less common settings (the Z-Image Turbo Load Options node); defaults are the core's."""

    transformer_storage: str = "auto"
    text_encoder_storage: str = "auto"
    vae_dtype: str = "auto"
    attention: str = "auto"
    compile: bool = False
    offload: str = "none"

    def load_kwargs(self) -> dict:
        """Keyword arguments of ``ZImage.load`` for these options."""
        return dict(
            overrides={"transformer": (self.transformer_storage, None), "text_encoder": (self.text_encoder_storage, None),
                       "vae": (self.vae_dtype, self.vae_dtype)},
            speed=SpeedOptions(attention=self.attention, compile=bool(self.compile)), offload=self.offload,
        )


def make_room(nbytes: int, device: torch.device) -> None:
    """Ask ComfyUI to unload its own models until ``nbytes`` are free on ``device`` (ours are not tracked by it)."""
    if torch.device(device).type == "cpu":
        return
    import comfy.model_management as mm

    mm.free_memory(nbytes, torch.device(device))


def lora_file(name: str) -> str:
    """The path of a LoRA file in ComfyUI's ``models/loras``, or an error saying where it was looked for."""
    import folder_paths

    path = folder_paths.get_full_path("loras", name)
    if path is None:
        searched = ", ".join(folder_paths.get_folder_paths("loras")) or "models/loras"
        raise ZImageError(f"LoRA file '{name}' was not found in ComfyUI/models/loras/ (searched: {searched}). Put it "
                          "there and refresh the page (R).")
    return path


def load_model(model_dir: str | None, files: dict[str, str | None], dtype: str, options: LoadOptions) -> "ModelHandle":
    """``ZImage.load`` on ComfyUI's device, after making room for the weights (when they stay on the GPU)."""
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    if options.offload == "none":
        make_room(bytes_to_load(model_dir, files), device)
    # reuse: a changed dtype or offload mode reloads only what changed
    skip = tuple(c for c in ("text_encoder", "vae") if c not in files)
    zimage = ZImage.load(model_dir, **files, device=device, dtype=dtype, reuse=True, skip=skip, **options.load_kwargs())
    return ModelHandle(zimage)


# ---------------------------------------------------------------------------- ComfyUI's weights, for Accelerate
FP8_LAYOUTS = ("TensorCoreFP8E4M3Layout", "TensorCoreFP8Layout")  # comfy_quant float8_e4m3fn (and legacy scaled fp8)
INT8_LAYOUT = "TensorWiseINT8Layout"  # comfy_quant int8_tensorwise, int8_convrot (Hadamard-rotated groups)
GPU_NATIVE_LAYOUTS = {"TensorCoreNVFP4Layout": ("nvfp4", (10, 0)), "TensorCoreMXFP8Layout": ("mxfp8", (10, 0))}


def comfy_weights(fp8_matmul: bool) -> CastWeights:
    """The Accelerate node's weight provider: every weight of a block through ComfyUI's ``cast_bias_weight`` just
    before its use and ``uncast_bias_weight`` right after, with the arguments ComfyUI's own ops pass (its float,
    fp8 and quantized linear layers), so low VRAM, dynamic VRAM (comfy-aimdo), per-op LoRA and async offload move
    the weights as they do without our node; and ComfyUI's attention dispatch when another node chose an attention.

    Quantized weights (``QuantizedTensor``): e4m3 (comfy_quant float8_e4m3fn, converted legacy scaled fp8) runs our
    fp8 matmul on its raw data and scale, int8 (int8_tensorwise, int8_convrot) our int8 matmul with the rotation;
    nvfp4 and mxfp8 run ComfyUI's own forward on GPUs whose tensor cores take
    them (compute capability 10.0+), else our maths on the weight dequantized per op, as are the other formats."""
    import comfy.ldm.modules.attention as comfy_attention
    import comfy.model_management as mm
    import comfy.ops

    cast_bias_weight, uncast_bias_weight = comfy.ops.cast_bias_weight, comfy.ops.uncast_bias_weight
    current = "want_requant" in inspect.signature(cast_bias_weight).parameters  # 0.33: LoRA re-quantizes per op

    def cast(module, x, mode):
        if mode == "float":  # as ComfyUI's cast ops: the weight in x's dtype, per-op patches applied
            return cast_bias_weight(module, x, offloadable=True)
        if mode == "fp8":  # as ComfyUI's fp8 linear: the weight kept in fp8, the bias in x's dtype
            extra = dict(compute_dtype=mm.lora_compute_dtype(x.device), want_requant=True) if current else {}
            return cast_bias_weight(module, x, dtype=stored_dtype(module), bias_dtype=x.dtype, offloadable=True,
                                    **extra)
        # quantized, as ComfyUI's mixed-precision linear: the QuantizedTensor kept as it is
        return cast_bias_weight(module, x, offloadable=True, compute_dtype=x.dtype, want_requant=True)

    def rotation(params):  # int8_convrot: the Hadamard group the codes were rotated by
        return params.convrot_groupsize if getattr(params, "convrot", False) else None

    def quantized(weight):
        layout = getattr(weight, "_layout_cls", None)
        if layout in FP8_LAYOUTS:
            return "raw", (torch.float8_e4m3fn, None)
        if layout == INT8_LAYOUT and not getattr(weight._params, "transposed", False):
            return "raw", (torch.int8, rotation(weight._params))
        if layout in GPU_NATIVE_LAYOUTS:
            name, capability = GPU_NATIVE_LAYOUTS[layout]
            device = weight.device
            if device.type == "cuda" and torch.cuda.get_device_capability(device) >= capability:
                return "native", f"{name} weights: this GPU multiplies them natively (ComfyUI's own kernels)"
        return "dequantize", None

    def raw(weight):
        layout = getattr(weight, "_layout_cls", None)
        if layout not in FP8_LAYOUTS and layout != INT8_LAYOUT:
            return None
        params = weight._params
        scale = params.scale.float()
        scale = scale.view(-1, 1) if scale.numel() > 1 else scale
        if layout == INT8_LAYOUT:
            return weight._qdata, scale, rotation(params)
        return weight._qdata, scale

    def attention(transformer_options, heads):
        def run(q, k, v, mask):  # ComfyUI's dispatch (it applies the override) on [B, heads, S, head_dim]
            out = comfy_attention.optimized_attention_masked(q, k, v, heads, mask, skip_reshape=True,
                                                             transformer_options=transformer_options)
            return out.view(out.shape[0], out.shape[1], heads, -1).transpose(1, 2)
        return run

    return CastWeights(cast, uncast_bias_weight, quantized=quantized, raw=raw, attention=attention,
                       fp8_matmul=fp8_matmul, stored_dtype=stored_dtype)


def stored_dtype(module) -> torch.dtype:
    """The dtype ComfyUI keeps a layer's weight in: a QuantizedTensor's data (not the dtype it stands for); under
    dynamic VRAM the model's dtype, not the tensor's: the module holds the file's tensor (bf16 for a bf16 file
    loaded as ``fp8_e4m3fn_fast``) and fp8 is made as it streams. ComfyUI marks that dtype on the module when it
    builds it (``weight_comfy_model_dtype``) and on the Parameter only when sampling loads it (``_model_dtype``):
    the node decides before that, so reading the Parameter alone said bf16 and turned our fp8 matmul off (measured
    on an H100: fp8_e4m3fn_fast ran on weights cast to bf16 per op, 0.907 s where comfy_quant fp8 ran 0.721 s)."""
    weight = module.weight
    data = getattr(weight, "_qdata", None)
    if data is not None:
        return data.dtype
    return getattr(weight, "_model_dtype", None) or getattr(module, "weight_comfy_model_dtype", None) or weight.dtype


def fp8_auto(patcher, diffusion_model) -> bool:
    """Whether ComfyUI itself multiplies this model in low precision: UNETLoader's ``fp8_e4m3fn_fast`` (the model
    config's fp8 optimization), or comfy_quant e4m3 / int8 weights (its quantized linear)."""
    config = getattr(patcher.model, "model_config", None)
    if getattr(config, "optimizations", {}).get("fp8", False):
        return True
    return getattr(diffusion_model.layers[0].attention.qkv.weight, "_layout_cls", None) in (*FP8_LAYOUTS, INT8_LAYOUT)


def loaded_summary(patcher) -> str:
    """How ComfyUI holds a model's weights now, e.g. '11.5 of 11.5 GiB on cuda:0, dynamic VRAM'."""
    gib = 1024 ** 3
    try:
        loaded, total = patcher.loaded_size() / gib, patcher.model_size() / gib
    except Exception:  # noqa: BLE001 - a patcher of another pack may lack these
        return "loaded size unknown"
    dynamic = patcher.is_dynamic() if hasattr(patcher, "is_dynamic") else False
    how = "dynamic VRAM" if dynamic else ("fully loaded" if loaded >= total - 1e-3 else "partly loaded")
    return f"{loaded:.2f} of {total:.2f} GiB on {patcher.load_device}, {how}"


# -------------------------------------------------------------------------------------- ZTURBO_MODEL
@dataclass(frozen=True)
class ModelHandle:
    """One loaded ``ZImage`` plus the precision-guard policy chosen for it in the graph.

    The Precision Guard node returns a new handle rather than changing the loader's cached output; each node
    applies its handle's policy to the shared model before it runs (``ready``).
    """

    zimage: ZImage
    guard: str | None = None  # None: the core default (auto with fp16 compute, else off)
    loras: tuple = ()  # ((file path, strength), ...) in the order the LoRA nodes are chained

    def with_guard(self, policy: str) -> "ModelHandle":
        return replace(self, guard=policy)

    def with_lora(self, path: str, strength: float) -> "ModelHandle":
        """This handle with one more LoRA; the file is parsed and checked against the model now, so a damaged or
        foreign LoRA is reported on the LoRA node, before anything merges (the merge happens when a node runs)."""
        self.zimage.parse_lora(path)
        return replace(self, loras=self.loras + ((path, float(strength)),))

    def ready(self, guard_override: str | None = None) -> ZImage:
        """The model with this handle's LoRAs merged (only what changed since the last run is merged again: the
        weights' owner knows what is merged, also when another loader node of the same files merged something else)
        and its precision-guard policy (or ``guard_override``) attached."""
        zimage = self.zimage
        zimage.set_loras(self.loras)
        if guard_override in (GUARD_FROM_MODEL, LEGACY_GUARD_FROM_MODEL):
            guard_override = None
        policy = guard_override or self.guard or zimage.default_guard_policy()
        current = zimage.guard.policy if zimage.guard is not None else "off"
        if policy != current:
            zimage.set_precision_guard(policy)  # also forgets embeddings made under the old policy
        return zimage

    def __repr__(self) -> str:  # shown by ComfyUI in error reports
        loras = "".join(f", LoRA {os.path.basename(p)} x{s:g}" for p, s in self.loras)
        return (f"ZTurboModel({self.zimage.policy.describe()} on {self.zimage.device}, guard={self.guard or 'default'}"
                f"{loras})")


def guard_report(zimage) -> str:
    """The guard's report (``PrecisionGuard.report()``) as Markdown that *Preview as Text* shows as written:
    a summary line, a blank line, the list, a blank line, the counts."""
    guard = zimage.guard
    if guard is None:
        return f"precision guard: off ({zimage.policy.describe()})"
    report = guard.report()
    lines = [f"precision guard: {report['summary']}"]
    if report["events"]:
        lines.append("")
        for event in report["events"]:
            step = f" at step {event['step'] + 1}" if event["step"] is not None else ""
            lines.append(f"- {event['component']} {event['block']}{step}: {event['action']} ({event['dtype']})")
    lines += ["", f"checks: {report['checks']}, re-runs with block checks: {report['probe_runs']}"]
    return "\n".join(lines)


def check_finite(tensor: torch.Tensor, message: str) -> torch.Tensor:
    if not torch.isfinite(tensor).all():
        raise ZImageError(message)
    return tensor


# -------------------------------------------------------------------------------------- CONDITIONING
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


def negative_features(zimage, negative, batch: int) -> list[torch.Tensor]:
    """The negative captions; an empty prompt (encoded by the core) when nothing is connected."""
    if negative is None:
        return zimage.encode_prompt([""] * batch)
    return caption_features(negative, batch, zimage.transformer.config.cap_feat_dim, "negative")


# -------------------------------------------------------------------------------------------- sizes
def _nearest(value: int) -> list[int]:
    if value < MIN_SIZE or value > MAX_SIZE:
        return [min(max(value, MIN_SIZE), MAX_SIZE)]
    lower = value // SIZE_MULTIPLE * SIZE_MULTIPLE
    return [value] if lower == value else [max(lower, MIN_SIZE), lower + SIZE_MULTIPLE]


def nearest_sizes(width: int, height: int) -> list[str]:
    """The allowed sizes next to ``width`` x ``height``: each side rounded down and up to a multiple of 16."""
    return [f"{w}x{h}" for w in _nearest(width) for h in _nearest(height)]


def size_problem(width: int, height: int) -> str | None:
    """Why ``width`` x ``height`` can't be sampled (with the nearest sizes that can), or None."""
    if all(v % SIZE_MULTIPLE == 0 and MIN_SIZE <= v <= MAX_SIZE for v in (width, height)):
        return None
    return (f"{width}x{height} pixels, not a multiple of {SIZE_MULTIPLE} (each side {MIN_SIZE}..{MAX_SIZE}; Z-Image "
            f"works on 16-pixel patches). The nearest allowed sizes are {', '.join(nearest_sizes(width, height))}")


# -------------------------------------------------------------------------------------------- LATENT
def latent_samples(latent, what: str = "latent") -> torch.Tensor:
    """The ``samples`` of a LATENT, checked to be a 16-channel Flux-VAE latent ``[B, 16, h, w]``."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not torch.is_tensor(samples):
        raise ZImageError(f"the {what} has no 'samples' tensor: connect a LATENT output.")
    if samples.ndim != 4:
        raise ZImageError(
            f"the {what} has shape {list(samples.shape)}; Z-Image needs an image latent [batch, 16, height/8, width/8] "
            "(video and audio latents don't fit)."
        )
    if samples.shape[1] != LATENT_CHANNELS:
        raise ZImageError(
            f"the {what} has {samples.shape[1]} channels; Z-Image needs a 16-channel Flux-VAE latent. Make it with "
            "EmptySD3LatentImage, or encode the image with Z-Image Turbo VAE Encode (or VAEEncode with ae.safetensors) "
            "instead of an SD1/SDXL latent node."
        )
    return samples.float()


def latent_in(zimage, latent, what: str) -> torch.Tensor:
    """A LATENT as the core's model-space latents."""
    return to_model_space(zimage.vae, latent_samples(latent, what))


def init_latent(zimage, latent_image) -> torch.Tensor:
    """The sampler's latent_image as model-space latents, with its size checked (it sets the image size)."""
    if latent_image.get("noise_mask") is not None:
        raise ZImageError("the latent_image has a noise mask (inpainting), which the Z-Image Turbo Sampler does "
                          "not support: use ComfyUI's KSampler for inpainting.")
    z = latent_samples(latent_image, "latent_image")
    why = size_problem(z.shape[3] * 8, z.shape[2] * 8)
    if why:
        raise ZImageError(f"the latent_image is {why}. Make the latent (EmptySD3LatentImage) or the encoded image "
                          "(ImageScale before the VAE Encode) one of those sizes.")
    return to_model_space(zimage.vae, z)


def latent_out(zimage, latents: torch.Tensor) -> dict:
    """Core model-space latents as a ComfyUI LATENT (raw VAE space, float32 on the intermediate device)."""
    import comfy.model_management

    z = to_vae_space(zimage.vae, latents.float())
    return {"samples": z.to(comfy.model_management.intermediate_device())}


# --------------------------------------------------------------------------------------------- IMAGE
def image_in(pixels: torch.Tensor) -> torch.Tensor:
    """An IMAGE for the VAE encoder, with its size checked (the encoded latent sets the sampler's size)."""
    if torch.is_tensor(pixels) and pixels.ndim == 4:
        why = size_problem(int(pixels.shape[2]), int(pixels.shape[1]))
        if why:
            raise ZImageError(f"the image is {why}. Scale or crop it to one of those first (e.g. ImageScale with "
                              "crop 'center' between Load Image and this node).")
    return pixels


def image_out(image: torch.Tensor) -> torch.Tensor:
    return check_finite(image, "the VAE produced NaN/inf (fp16 overflow, or a broken latent): add a Z-Image Turbo "
                               "Precision Guard (auto) after the loader, or load with vae_dtype bf16/fp32 (Z-Image "
                               "Turbo Load Options).")


# ----------------------------------------------------------------------------------- progress, cancel
def step_callback(steps: int, device):
    """Per-step callback of the sampler: cancel, ComfyUI's progress bar and latent previews (``preview.py``)."""
    from .preview import make_step_callback

    return make_step_callback(steps, device)


def cancel_check():
    """Called by the core between VAE tiles and decoder blocks: raises when the user pressed Cancel."""
    import comfy.model_management

    return comfy.model_management.throw_exception_if_processing_interrupted


def activation_bytes(batch: int, width: int, height: int) -> int:
    return int(2**30 * batch * width * height / 1024**2)  # about 1 GiB per 1024² image in bf16 (measured 0.7)
