"""A tiny random-weight Z-Image with the real classes and key layouts, for the demo, tests and benchmarks.

Same model classes, same layout on disk (a diffusers folder with ``model_index.json``), a few hundred
thousand parameters: it runs the whole path on a CPU in about a second. Its images are noise-like
patterns; it exists to prove the plumbing and to compare our numbers against the reference pipeline.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from .formats import shipped_config

log = logging.getLogger("zimage_core")
TINY_VERSION = "v1"

TINY_TRANSFORMER = dict(dim=64, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=1, cap_feat_dim=32,
                        axes_dims=[8, 12, 12])
TINY_TEXT_ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, max_window_layers=3)
TINY_VAE = dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1)
# The branches of Qwen3-4B's chat template that a single user message reaches (no tools, no history):
# what Z-Image-Turbo's tokenizer/ folder applies in diffusers' pipeline.
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
MODEL_INDEX = {
    "_class_name": "ZImagePipeline",
    "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3Model"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "ZImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def tiny_configs(transformer: dict | None = None, text_encoder: dict | None = None, vae: dict | None = None):
    """Real configs with the tiny sizes (or other overrides) put in."""
    t = {k: v for k, v in shipped_config("transformer").items() if not k.startswith("_")}
    t.update(TINY_TRANSFORMER if transformer is None else transformer)
    te = shipped_config("text_encoder")
    te.update(TINY_TEXT_ENCODER if text_encoder is None else text_encoder)
    v = {k: v for k, v in shipped_config("vae").items() if not k.startswith("_")}
    v.update(TINY_VAE if vae is None else vae)
    return t, te, v


def randomize_(model: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Deterministic random weights with activations of order one: fan-in scaled matrices, norms near 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                value = 1.0 + 0.1 * noise
            elif p.ndim == 1:
                value = 0.02 * noise
            elif "embed_tokens" in name or "pad_token" in name:
                value = noise
            else:
                value = noise * gain / (p[0].numel() ** 0.5)
            p.copy_(value.to(p.dtype))
    return model


def build_tiny_models(seed: int = 0, configs=None):
    """(transformer, full Qwen3Model, vae) in fp32 with deterministic random weights."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    t_cfg, te_cfg, v_cfg = configs or tiny_configs()
    transformer = randomize_(ZImageTransformer2DModel(**t_cfg), seed)
    qcfg = Qwen3Config(**{k: v for k, v in te_cfg.items() if k != "architectures"})
    qcfg._attn_implementation = "sdpa"
    text_encoder = randomize_(Qwen3Model(qcfg), seed + 1)
    vae = randomize_(AutoencoderKL(**v_cfg), seed + 2)
    return transformer.eval(), text_encoder.eval(), vae.eval()


def save_diffusers_folder(path: str | os.PathLike, models, tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write the models as a diffusers ``ZImagePipeline`` folder (safetensors; transformer in fp32 shards)."""
    path = Path(path)
    transformer, text_encoder, vae = models
    path.mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    transformer.save_pretrained(path / "transformer", safe_serialization=True, max_shard_size="200KB")
    text_encoder.save_pretrained(path / "text_encoder", safe_serialization=True)
    vae.save_pretrained(path / "vae", safe_serialization=True)
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(shipped_config("scheduler"), indent=2))
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, path / "tokenizer")
    return path


def copy_tokenizer(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy a tokenizer folder and give it Qwen3's chat template, as in the real model folder."""
    source, target = Path(source), Path(target)
    shutil.copytree(source, target, dirs_exist_ok=True)
    cfg_file = target / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    cfg["chat_template"] = QWEN3_CHAT_TEMPLATE
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    (target / "chat_template.jinja").unlink(missing_ok=True)
    return target


def _byte_level_tokenizer(path: Path) -> Path:
    """A small byte-level BPE with Qwen's special tokens, for the demo where no Qwen tokenizer is installed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["a photo of a cat", "a red fox in the snow", "user assistant", "portrait, soft light, 35mm"] * 8
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    fast.save_pretrained(str(path))
    return path


def cache_root() -> Path:
    base = os.environ.get("ZIMAGE_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zimage_core"


def tiny_model_dir(root: str | os.PathLike | None = None) -> Path:
    """The demo's tiny diffusers folder, built once (deterministically) and cached."""
    from .tokenizer import comfy_tokenizer_dirs

    from .inputs import check_model_dir

    path = Path(root) if root else cache_root() / f"tiny-{TINY_VERSION}"
    check_model_dir(path, "model_dir")  # a file there: refused before anything is written next to it
    if (path / "model_index.json").is_file():
        return path
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        found = comfy_tokenizer_dirs()
        if found:
            tokenizer_dir = found[0]
        else:
            log.warning("no Qwen tokenizer installed: the demo uses a small byte-level BPE instead (random weights "
                        "don't care which tokens they get).")
            tokenizer_dir = _byte_level_tokenizer(tmp / "_bpe")
        save_diffusers_folder(tmp, build_tiny_models(), tokenizer_dir=tokenizer_dir)
        shutil.rmtree(tmp / "_bpe", ignore_errors=True)
        tmp.rename(path)
    except BaseException:  # a failed or interrupted build leaves nothing behind (~20 MB)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
