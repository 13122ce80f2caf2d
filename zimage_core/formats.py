"""Checkpoint layouts: recognise what a file holds and derive the model config from its tensor shapes.

Split files (ComfyUI's ``diffusion_models/``, ``text_encoders/``, ``vae/``) carry no config. The real
Z-Image-Turbo configs ship in ``configs/``; the sizes that vary between checkpoints (width, depth, heads)
are read off the tensor shapes, so a real file gives exactly the shipped config and a small test model
gives its own.
"""

from __future__ import annotations

import json
import re
from importlib import resources

from .errors import ZImageError

TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
VAE_PREFIXES = ("first_stage_model.", "vae.")
DOWNLOADS = {
    "transformer": "models/diffusion_models/z_image_turbo_bf16.safetensors "
    "(https://huggingface.co/Comfy-Org/z_image_turbo/tree/main/split_files/diffusion_models)",
    "text_encoder": "models/text_encoders/qwen_3_4b.safetensors "
    "(https://huggingface.co/Comfy-Org/z_image_turbo/tree/main/split_files/text_encoders)",
    "vae": "models/vae/ae.safetensors (https://huggingface.co/Comfy-Org/z_image_turbo/tree/main/split_files/vae)",
}


def shipped_config(component: str) -> dict:
    """The real Z-Image-Turbo config of one component, as shipped in ``zimage_core/configs``."""
    text = resources.files("zimage_core.configs").joinpath(f"{component}.json").read_text()
    return json.loads(text)


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    return max(found) + 1 if found else 0


def _strip(keys, prefixes) -> str:
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in keys):
            return prefix
    return ""


def identify(keys) -> tuple[str, str]:
    """(component, description) of a state dict's key set; component is '' when it is none of ours."""
    keys = list(keys)
    ks = set(keys)

    def has(fragment):
        return any(fragment in k for k in keys)

    if any(re.search(r"\.(lora_[AB]|lora_(up|down)|lora\.(up|down)|hada_w[12]_[ab]|lokr_w[12](_[ab])?)(\.|$)|_lora\.(up|down)\.", k)
           for k in keys):
        return "", ("a LoRA (this is a LoRA: use the Z-Image Turbo LoRA node, or --lora FILE[:STRENGTH] on the "
                    "command line, on a loaded model)")
    quant = _quant_note(keys)
    if has("cap_embedder.") and has("x_pad_token"):
        return "transformer", f"a Z-Image transformer (original layout{quant})"
    if has("all_x_embedder.") and has("cap_embedder."):
        return "transformer", f"a Z-Image transformer (diffusers layout{quant})"
    if has("cap_embedder.") or has("x_embedder."):
        if has("noise_refiner.") or has("context_refiner."):
            return "transformer", "a Lumina-family (NextDiT) transformer"
    if has("embed_tokens.weight") and has("self_attn.q_proj"):
        return "text_encoder", f"a Qwen/Llama-style text encoder{quant.replace(', ', ' (', 1) + ')' if quant else ''}"
    if has("decoder.conv_in.weight") and (has("decoder.up.") or has("decoder.up_blocks.")):
        return "vae", "a VAE"
    if has("double_blocks.") or has("single_blocks."):
        return "", "a Flux transformer, not Z-Image"
    if has("input_blocks.") or has("down_blocks.0.attentions"):
        return "", "a Stable Diffusion UNet, not Z-Image"
    if has("text_model.encoder") or has("transformer.resblocks"):
        return "", "a CLIP text encoder, not Qwen3-4B"
    if has("encoder.block.0.") or "shared.weight" in ks:
        return "", "a T5 text encoder, not Qwen3-4B"
    return "", "not a Z-Image component (unrecognised tensor names)"


def _quant_note(keys) -> str:
    """', <quantized layout>' for a file whose key names show one (quantized.py reads it)."""
    from .quantized import quant_layout

    layout = quant_layout(keys)
    return {"scaled_fp8": ", legacy scaled fp8", "comfy_quant": ", comfy_quant mixed precision"}.get(layout, "")


def expect(component: str, keys, source: str) -> None:
    """Raise a clear error when ``source`` holds something other than ``component``."""
    found, description = identify(keys)
    if found == component:
        return
    names = {"transformer": "a transformer", "text_encoder": "a text encoder", "vae": "a VAE"}
    where = DOWNLOADS[component].split(" ")[0]
    raise ZImageError(
        f"{source} is {description}, not {names[component]}. Pick the Z-Image {names[component][2:]} "
        f"file here (it belongs in {where})."
    )


# --------------------------------------------------------------------------------------- transformer
def transformer_prefix(keys) -> str:
    return _strip(keys, TRANSFORMER_PREFIXES)


def transformer_config(shapes: dict[str, tuple], source: str) -> dict:
    """Config of an original-layout or diffusers-layout transformer state dict, from its shapes."""
    prefix = transformer_prefix(shapes)
    s = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    diffusers_layout = "all_x_embedder.2-1.weight" in s
    x_key = "all_x_embedder.2-1.weight" if diffusers_layout else "x_embedder.weight"
    norm_key = "layers.0.attention.norm_q.weight" if diffusers_layout else "layers.0.attention.q_norm.weight"
    try:
        dim, patch_in = s[x_key]
        head_dim = s[norm_key][0]
        cap_feat_dim = s["cap_embedder.0.weight"][0]
    except KeyError as err:
        raise ZImageError(f"{source}: transformer tensor {err} is missing; the file is incomplete or not Z-Image.") from None
    if dim == 2304:
        raise ZImageError(f"{source} is a Lumina 2 transformer (width 2304), not Z-Image (width 3840).")
    cfg = shipped_config("transformer")
    cfg.pop("_class_name", None)
    cfg.update(
        dim=dim,
        in_channels=patch_in // 4,
        n_layers=_count(s, r"layers\.(\d+)\."),
        n_refiner_layers=_count(s, r"noise_refiner\.(\d+)\."),
        n_heads=dim // head_dim,
        n_kv_heads=dim // head_dim,
        cap_feat_dim=cap_feat_dim,
    )
    if head_dim != 128:
        quarter = (head_dim // 4) // 2 * 2
        rest = (head_dim - quarter) // 2
        cfg["axes_dims"] = [head_dim - 2 * rest, rest, rest]
    return cfg


# -------------------------------------------------------------------------------------- text encoder
def text_encoder_prefix(keys) -> str:
    return "model." if any(k.startswith("model.embed_tokens") for k in keys) else ""


def text_encoder_config(shapes: dict[str, tuple], source: str) -> dict:
    """Qwen3 config of a ``model.*`` (ComfyUI) or bare (transformers ``Qwen3Model``) state dict."""
    prefix = text_encoder_prefix(shapes)
    s = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    try:
        vocab, hidden = s["embed_tokens.weight"]
        head_dim = s["layers.0.self_attn.q_norm.weight"][0]
        q_out = s["layers.0.self_attn.q_proj.weight"][0]
        kv_out = s["layers.0.self_attn.k_proj.weight"][0]
        inter = s["layers.0.mlp.gate_proj.weight"][0]
    except KeyError as err:
        if "layers.0.self_attn.q_proj.weight" in s and "layers.0.self_attn.q_norm.weight" not in s:
            raise ZImageError(
                f"{source} is a Qwen2.5/Llama-style encoder without q/k norms, not Qwen3-4B. Use qwen_3_4b.safetensors."
            ) from None
        raise ZImageError(f"{source}: text-encoder tensor {err} is missing; the file is incomplete.") from None
    cfg = shipped_config("text_encoder")
    cfg.update(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        head_dim=head_dim,
        num_attention_heads=q_out // head_dim,
        num_key_value_heads=kv_out // head_dim,
        num_hidden_layers=_count(s, r"layers\.(\d+)\."),
    )
    cfg["max_window_layers"] = cfg["num_hidden_layers"]
    return cfg


# ----------------------------------------------------------------------------------------------- VAE
def vae_prefix(keys) -> str:
    return _strip(keys, VAE_PREFIXES)


def vae_is_original_layout(keys) -> bool:
    return any(".down.0.block." in k or k.startswith("encoder.down.") for k in keys)


def vae_config(shapes: dict[str, tuple], source: str) -> dict:
    """Flux-VAE config from a BFL-layout or diffusers-layout state dict."""
    prefix = vae_prefix(shapes)
    s = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    original = vae_is_original_layout(s)
    try:
        latent = s["decoder.conv_in.weight"][1]
        if original:
            n_down = _count(s, r"encoder\.down\.(\d+)\.")
            channels = [s[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(n_down)]
            per_block = _count(s, r"encoder\.down\.0\.block\.(\d+)\.")
        else:
            n_down = _count(s, r"encoder\.down_blocks\.(\d+)\.")
            channels = [s[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n_down)]
            per_block = _count(s, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    except KeyError as err:
        raise ZImageError(f"{source}: VAE tensor {err} is missing; the file is incomplete or not a Flux VAE.") from None
    if latent != 16:
        raise ZImageError(
            f"{source} is a VAE with {latent} latent channels (Stable Diffusion/SDXL style); Z-Image uses the "
            f"16-channel Flux VAE: {DOWNLOADS['vae']}."
        )
    cfg = shipped_config("vae")
    cfg.pop("_class_name", None)
    cfg.update(
        block_out_channels=channels,
        layers_per_block=per_block,
        latent_channels=latent,
        down_block_types=["DownEncoderBlock2D"] * n_down,
        up_block_types=["UpDecoderBlock2D"] * n_down,
        use_quant_conv="quant_conv.weight" in s,
        use_post_quant_conv="post_quant_conv.weight" in s,
    )
    return cfg
