"""Real-size configs: parameter counts, and configs read off checkpoint shapes."""

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from helpers import transformer_to_original, vae_to_original
from zimage_core import formats


def meta_models():
    t_cfg = {k: v for k, v in formats.shipped_config("transformer").items() if not k.startswith("_")}
    v_cfg = {k: v for k, v in formats.shipped_config("vae").items() if not k.startswith("_")}
    with init_empty_weights():
        transformer = ZImageTransformer2DModel(**t_cfg)
        text_encoder = Qwen3Model(Qwen3Config(**formats.shipped_config("text_encoder")))
        vae = AutoencoderKL(**v_cfg)
    return transformer, text_encoder, vae


def test_real_size_parameter_counts():
    transformer, text_encoder, vae = meta_models()
    assert sum(p.numel() for p in transformer.parameters()) == 6_154_908_736
    assert sum(p.numel() for p in text_encoder.parameters()) == 4_022_468_096
    assert sum(p.numel() for p in vae.parameters()) == 83_819_683


def test_configs_read_off_real_shapes_equal_the_shipped_ones():
    transformer, text_encoder, vae = meta_models()
    shapes = {k: tuple(v.shape) for k, v in transformer_to_original(transformer.state_dict()).items()}
    t_cfg = formats.transformer_config(shapes, "z_image_turbo_bf16.safetensors")
    assert t_cfg == {k: v for k, v in formats.shipped_config("transformer").items() if not k.startswith("_")}
    shapes = {f"model.{k}": tuple(v.shape) for k, v in text_encoder.state_dict().items()}
    assert formats.text_encoder_config(shapes, "qwen_3_4b.safetensors") == formats.shipped_config("text_encoder")
    shapes = {k: tuple(v.shape) for k, v in vae_to_original(vae.state_dict(), vae.config).items()}
    v_cfg = formats.vae_config(shapes, "ae.safetensors")
    assert v_cfg == {k: v for k, v in formats.shipped_config("vae").items() if not k.startswith("_")}


def test_identify_components():
    transformer, text_encoder, vae = meta_models()
    assert formats.identify(transformer_to_original(transformer.state_dict()))[0] == "transformer"
    assert formats.identify(transformer.state_dict())[0] == "transformer"
    assert formats.identify({f"model.{k}" for k in text_encoder.state_dict()})[0] == "text_encoder"
    assert formats.identify(vae_to_original(vae.state_dict(), vae.config))[0] == "vae"
    assert formats.identify(["double_blocks.0.img_attn.qkv.weight"])[1].startswith("a Flux transformer")
    assert "LoRA" in formats.identify(["layers.0.attention.qkv.lora_A.weight"])[1]


def test_text_encoder_is_cut_after_the_layer_used(zimage, tiny_models):
    """35 of 36 layers in the real model: here all but the last, and no final norm."""
    full = tiny_models[1]
    assert len(zimage.text_encoder.layers) == len(full.layers) - 1
    assert isinstance(zimage.text_encoder.norm, torch.nn.Identity)
    ids = torch.tensor([zimage.prompt_encoder.tokenizer("a cat")])
    with torch.no_grad():
        reference = full(input_ids=ids, output_hidden_states=True).hidden_states[-2][0]
    ours = zimage.encode_prompt("a cat")[0]
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max() < 1e-5
