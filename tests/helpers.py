"""Test helpers: write a model in the layouts users have on disk (the inverse of the loaders' converters)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

RENAMES = {  # diffusers -> original Z-Image names (the inverse of diffusers' rename table)
    "all_final_layer.2-1.": "final_layer.",
    "all_x_embedder.2-1.": "x_embedder.",
    ".attention.to_out.0.": ".attention.out.",
    ".attention.norm_k.": ".attention.k_norm.",
    ".attention.norm_q.": ".attention.q_norm.",
}


def transformer_to_original(state: dict[str, torch.Tensor], prefix: str = "model.diffusion_model.") -> dict:
    out = {}
    for key, value in state.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            base = key.replace(".attention.to_q.weight", "")
            value = torch.cat([state[f"{base}.attention.to_{x}.weight"] for x in "qkv"], dim=0)
            key = f"{base}.attention.qkv.weight"
        for old, new in RENAMES.items():
            key = key.replace(old, new)
        out[prefix + key] = value.contiguous()
    return out


def text_encoder_to_comfy(state: dict[str, torch.Tensor]) -> dict:
    return {f"model.{k}": v.contiguous() for k, v in state.items()}


def vae_to_original(state: dict[str, torch.Tensor], config) -> dict:
    """diffusers AutoencoderKL keys -> BFL (ldm) keys of the Flux ``ae.safetensors``."""
    n_up = len(config.up_block_types)
    out = {}
    for key, value in state.items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = k.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        k = k.replace("mid_block.attentions.0.group_norm", "mid.attn_1.norm")
        k = k.replace("mid_block.attentions.0.to_q", "mid.attn_1.q").replace("mid_block.attentions.0.to_k", "mid.attn_1.k")
        k = k.replace("mid_block.attentions.0.to_v", "mid.attn_1.v")
        k = k.replace("mid_block.attentions.0.to_out.0", "mid.attn_1.proj_out")
        if ".down_blocks." in k:
            k = k.replace(".down_blocks.", ".down.").replace(".resnets.", ".block.").replace(".downsamplers.0.", ".downsample.")
        if ".up_blocks." in k:
            head, rest = k.split(".up_blocks.", 1)
            index, rest = rest.split(".", 1)
            rest = rest.replace("resnets.", "block.").replace("upsamplers.0.", "upsample.")
            k = f"{head}.up.{n_up - 1 - int(index)}.{rest}"
        if ".mid.attn_1." in k and k.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[k] = value.contiguous()
    return out


def save_split_files(models, folder: Path, prefix: str = "model.diffusion_model.") -> dict[str, Path]:
    """The ComfyUI split-file trio of a (transformer, full Qwen3Model, vae) triple."""
    transformer, text_encoder, vae = models
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "transformer": folder / "z_image_turbo_bf16.safetensors",
        "text_encoder": folder / "qwen_3_4b.safetensors",
        "vae": folder / "ae.safetensors",
    }
    save_file(transformer_to_original(transformer.state_dict(), prefix), str(paths["transformer"]))
    save_file(text_encoder_to_comfy(text_encoder.state_dict()), str(paths["text_encoder"]))
    save_file(vae_to_original(vae.state_dict(), vae.config), str(paths["vae"]))
    return paths


def load_pack(repo: Path = Path(__file__).resolve().parents[1]):
    """The node pack imported as ComfyUI imports it (a package from custom_nodes, ``zturbo_pack``), core loaded;
    returns its Accelerate node module. Call after ComfyUI is importable."""
    import importlib
    import importlib.util

    spec = importlib.util.spec_from_file_location("zturbo_pack", Path(repo) / "__init__.py",
                                                  submodule_search_locations=[str(repo)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["zturbo_pack"] = pack
    spec.loader.exec_module(pack)
    pack._load_core()
    return importlib.import_module("zturbo_pack.nodes.accelerate")
