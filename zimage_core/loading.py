"""Load the transformer, the Qwen3 text encoder and the Flux VAE from diffusers folders or split files.

Models are built on the meta device (accelerate's ``init_empty_weights``) and filled tensor by tensor
from the safetensors files (``safetensors_io``), each tensor cast to its storage dtype and moved to its
device as it is read: no fp32 copy of the model, no second copy. Original-layout transformer keys go
through diffusers' own ``convert_z_image_transformer_checkpoint_to_diffusers`` and BFL-layout VAE keys
through ``convert_ldm_vae_checkpoint``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device

from . import formats
from .dtypes import (QUANTIZED_STORAGE, ComponentDtype, apply_storage_casting, component_dtype, dtype_name,
                     set_component_dtype)
from .errors import ZImageError
from .fp8 import FP8Linear, swap_linears
from .int8 import Int8Linear
from .quantized import QuantizedReader, split_fp8_rows
from .inputs import read_json
from .safetensors_io import Checkpoint, StagingBuffer, check_finite, check_loaded_tensor, finite_probe

log = logging.getLogger("zimage_core")

TRANSFORMER_FP8_LINEARS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
TEXT_ENCODER_FP8_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# component -> (key, weak reference to the model): the last one loaded. Weak, so that a model nobody uses
# any more (ComfyUI dropped the loader's output) is freed rather than kept alive by this cache.
_CACHE: dict[str, tuple[tuple, weakref.ref]] = {}


def _source_key(source) -> tuple:
    if isinstance(source, tuple):  # (file, folder whose config.json it takes)
        return _source_key(source[0]) + (str(source[1]),)
    path = Path(source)
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    return tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists())


def cached_load(component: str, source, cdtype: ComponentDtype, device, stats: list | None = None):
    """The last model loaded for ``component`` if it came from the same files with the same dtypes, else a
    fresh load (wherever the cached one lives now: the caller places it). Changing one component's dtype or
    the offload mode then reloads only what changed."""
    key = (_source_key(source), cdtype)
    hit = _CACHE.get(component)
    model = hit[1]() if hit is not None and hit[0] == key else None
    if model is not None:
        log.info("reusing the loaded %s (%s)", component, cdtype)
        return model
    _CACHE.pop(component, None)
    model = load_component(component, source, cdtype, device, stats)
    _CACHE[component] = (key, weakref.ref(model))
    return model


def load_component(component: str, source, cdtype: ComponentDtype, device, stats: list | None = None):
    loader = {"transformer": load_transformer, "text_encoder": load_text_encoder, "vae": load_vae}[component]
    return loader(source, cdtype, device, stats)


def clear_cache() -> None:
    _CACHE.clear()


@dataclass
class LoadStats:
    """What a load read and how fast: for the memory and loading reports."""

    source: str
    bytes_read: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / 1e9 / max(self.seconds, 1e-9)


def _component_source(path: str | os.PathLike, component: str) -> tuple[Checkpoint, dict | None, str]:
    """Checkpoint, folder config (if any) and a display name for a file, a component folder or a pipeline folder.

    A single file given as ``(file, config_dir)`` (``ZImage.load`` does so for a split file given with a model
    folder) takes that folder's ``config.json`` instead of one guessed from its shapes: a model of non-standard
    size needs it (its RoPE split cannot be read off the shapes).
    """
    config_dir = None
    if isinstance(path, tuple):
        path, config_dir = path
    path = Path(path)
    if (path / "model_index.json").is_file():
        path = path / component
    if path.is_dir():
        cfg_file = path / "config.json"
        config = read_json(cfg_file) if cfg_file.is_file() else None
        return Checkpoint.from_path(path), config, str(path)
    cfg_file = Path(config_dir) / "config.json" if config_dir is not None else None
    config = read_json(cfg_file) if cfg_file is not None and cfg_file.is_file() else None
    return Checkpoint.from_path(path), config, path.name


def _shapes(ckpt: Checkpoint) -> dict[str, tuple]:
    return {k: ckpt.shape(k) for k in ckpt.keys()}


def _place(model: nn.Module, name: str, tensor: torch.Tensor, device, dtype: torch.dtype) -> None:
    """Put one tensor into the meta model: cast, move, or quantize it for an FP8Linear or Int8Linear."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if isinstance(module, FP8Linear) and attr == "weight":
        exact = getattr(tensor, "zimage_fp8_rows", None)  # an e4m3 file's own bits and scales (quantized.py)
        if exact is not None:
            module.weight = nn.Parameter(exact[0].to(device), requires_grad=False)
            module.weight_scale = nn.Parameter(exact[1].to(device), requires_grad=False)
            return
        module.load_weight(tensor.to(device))
        return
    if isinstance(module, Int8Linear) and attr == "weight":
        module.load_weight(tensor.to(device))
        return
    if isinstance(module, (FP8Linear, Int8Linear)) and attr == "bias":
        dtype = module.compute_dtype
    set_module_tensor_to_device(model, name, device, value=tensor, dtype=dtype)


def _finish(model: nn.Module, expected: set[str], loaded: set[str], source: str, device, cdtype: ComponentDtype):
    missing = sorted(expected - loaded)
    if missing:
        raise ZImageError(
            f"{source} is missing {len(missing)} tensors the model needs (first: {', '.join(missing[:4])}). "
            "The file is incomplete or is a different model variant; download it again."
        )
    model.to(device)  # non-persistent buffers (rotary tables) built on the CPU at init
    model.eval().requires_grad_(False)
    if cdtype.storage != cdtype.compute and cdtype.storage not in QUANTIZED_STORAGE:
        apply_storage_casting(model, cdtype, skip=("norm", "t_embedder", "cap_embedder", "rotary_emb"))
    set_component_dtype(model, cdtype)
    return model


def _target_dtype(cdtype: ComponentDtype) -> torch.dtype:
    """With fp8/int8 storage only the swapped linears hold e4m3/int8; every other tensor keeps the compute dtype."""
    return cdtype.compute if cdtype.storage in QUANTIZED_STORAGE else cdtype.storage


def _stream_into(model, items, cdtype: ComponentDtype, device, expected: set[str], source: str) -> set[str]:
    dtype = _target_dtype(cdtype)
    loaded = set()
    params = dict(model.named_parameters())
    probes = []  # one device-side sum per tensor, read once at the end: NaN/Inf in the file
    for name, tensor in items:
        if name not in expected:
            raise ZImageError(
                f"{source} has tensor {name!r} that this model does not have: it is a different variant "
                "(e.g. Z-Image Omni/Edit or a ControlNet) or not a Z-Image file."
            )
        check_loaded_tensor(name, tensor, params[name], source)
        _place(model, name, tensor, device, dtype)
        module_name, _, attr = name.rpartition(".")
        probes.append((name, finite_probe(getattr(model.get_submodule(module_name) if module_name else model, attr))))
        loaded.add(name)
    check_finite(probes, source)
    return loaded


def _fp8_targets(model: nn.Module, suffixes: tuple[str, ...]) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(suffixes)
            and (".layers." in f".{n}" or "refiner." in n)]


def _swap_quantized(model: nn.Module, cdtype: ComponentDtype, suffixes: tuple[str, ...]) -> set[str]:
    """With fp8 or int8 storage, the linears named by ``suffixes`` become (empty) ``FP8Linear``/``Int8Linear``
    modules; returns their names (none for other storage dtypes)."""
    if cdtype.storage not in QUANTIZED_STORAGE:
        return set()
    names = set(_fp8_targets(model, suffixes))
    cls = FP8Linear if cdtype.storage == torch.float8_e4m3fn else Int8Linear
    swap_linears(model, sorted(names), cdtype.compute, cls)
    return names


def load_transformer(source, cdtype: ComponentDtype, device="cpu", stats: list | None = None):
    """A ``ZImageTransformer2DModel`` from a single file (original or diffusers keys) or a folder of shards."""
    from diffusers import ZImageTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    start = time.perf_counter()
    ckpt, config, name = _component_source(source, "transformer")
    formats.expect("transformer", ckpt.keys(), name)
    quant = QuantizedReader(ckpt)  # fp8/nvfp4/mxfp8/int8 layouts: dequantized as ComfyUI does
    shapes = {k: quant.shape(k) for k in quant.weight_keys()}
    config = {k: v for k, v in (config or formats.transformer_config(shapes, name)).items()
              if not k.startswith("_")}
    with init_empty_weights():
        model = ZImageTransformer2DModel(**config)
    fp8 = _swap_quantized(model, cdtype, TRANSFORMER_FP8_LINEARS)
    exact = bool(fp8) and cdtype.storage == torch.float8_e4m3fn  # an e4m3 file's bits kept (int8: requantized)
    expected = {n for n, _ in model.named_parameters()} - {f"{m}.weight_scale" for m in fp8}
    original = "all_x_embedder.2-1.weight" not in ckpt

    staging = StagingBuffer(_target_dtype(cdtype), device)

    def items():
        for key, tensor in quant.iter_tensors(_target_dtype(cdtype), staging, fp8_exact=exact):
            if original:
                converted = convert_z_image_transformer_checkpoint_to_diffusers({key: tensor})
                yield from split_fp8_rows(key, tensor, converted).items()
            else:
                yield key, tensor

    loaded = _stream_into(model, items(), cdtype, device, expected, name)
    model = _finish(model, expected, loaded, name, device, cdtype)
    _record(stats, name, ckpt.nbytes, start)
    return model


def load_text_encoder(source, cdtype: ComponentDtype, device="cpu", stats: list | None = None):
    """Qwen3 as a ``Qwen3Model`` cut after the layer whose output Z-Image uses (``hidden_states[-2]``).

    The last decoder layer and the final norm are never loaded or run: ``model.norm`` is an identity, so
    ``last_hidden_state`` is the embedding.
    """
    from transformers import Qwen3Config, Qwen3Model

    start = time.perf_counter()
    ckpt, config, name = _component_source(source, "text_encoder")
    formats.expect("text_encoder", ckpt.keys(), name)
    quant = QuantizedReader(ckpt)
    config = config or formats.text_encoder_config({k: quant.shape(k) for k in quant.weight_keys()}, name)
    full_layers = config["num_hidden_layers"]
    config = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version", "torch_dtype", "dtype")}
    config["num_hidden_layers"] = full_layers - 1
    config["max_window_layers"] = min(config.get("max_window_layers", full_layers), full_layers - 1)
    config.pop("layer_types", None)
    qcfg = Qwen3Config(**config)
    qcfg._attn_implementation = "sdpa"
    with init_empty_weights():
        model = Qwen3Model(qcfg)
    model.norm = nn.Identity()
    fp8 = _swap_quantized(model, cdtype, TEXT_ENCODER_FP8_LINEARS)
    exact = bool(fp8) and cdtype.storage == torch.float8_e4m3fn
    expected = {n for n, _ in model.named_parameters()} - {f"{m}.weight_scale" for m in fp8}
    prefix = formats.text_encoder_prefix(ckpt.keys())
    skip = (f"layers.{full_layers - 1}.", "norm.", "lm_head.")
    wanted = {k for k in quant.weight_keys() if k.startswith(prefix) and not k[len(prefix):].startswith(skip)}
    extra = [k for k in quant.weight_keys() if not k.startswith(prefix) and not k.startswith("lm_head.")]
    if extra:
        raise ZImageError(f"{name}: unexpected tensors outside {prefix!r} (e.g. {extra[0]!r}); not a Qwen3 text encoder file.")

    staging = StagingBuffer(_target_dtype(cdtype), device)

    def items():
        for key, tensor in quant.iter_tensors(_target_dtype(cdtype), staging, keys=wanted, fp8_exact=exact):
            yield key[len(prefix):], tensor

    loaded = _stream_into(model, items(), cdtype, device, expected, name)
    model = _finish(model, expected, loaded, name, device, cdtype)
    model.zimage_full_layers = full_layers
    _record(stats, name, ckpt.nbytes_of(wanted), start)
    return model


def load_vae(source, cdtype: ComponentDtype, device="cpu", stats: list | None = None):
    """Flux ``AutoencoderKL`` from a BFL-layout single file (ComfyUI ``ae.safetensors``) or a diffusers folder."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    start = time.perf_counter()
    ckpt, config, name = _component_source(source, "vae")
    formats.expect("vae", ckpt.keys(), name)
    config = {k: v for k, v in (config or formats.vae_config(_shapes(ckpt), name)).items() if not k.startswith("_")}
    with init_empty_weights():
        model = AutoencoderKL(**config)
    expected = {n for n, _ in model.named_parameters()}
    if formats.vae_is_original_layout(ckpt.keys()):
        # The converter needs every key at once; the VAE is 84 M parameters, so this is small.
        state = dict(ckpt.iter_tensors())
        items = convert_ldm_vae_checkpoint(state, config).items()
    else:
        prefix = formats.vae_prefix(ckpt.keys())
        items = ((k[len(prefix):], t) for k, t in ckpt.iter_tensors(StagingBuffer(_target_dtype(cdtype), device)))
    loaded = _stream_into(model, items, cdtype, device, expected, name)
    model = _finish(model, expected, loaded, name, device, cdtype)
    _record(stats, name, ckpt.nbytes, start)
    return model


def _record(stats, name, nbytes, start):
    seconds = time.perf_counter() - start
    log.info("loaded %s: %.2f GB in %.1f s (%.2f GB/s)", name, nbytes / 1e9, seconds, nbytes / 1e9 / max(seconds, 1e-9))
    if stats is not None:
        stats.append(LoadStats(name, nbytes, seconds))


def describe_dtype(model: nn.Module) -> str:
    cdtype = component_dtype(model)
    return str(cdtype) if cdtype else dtype_name(next(model.parameters()).dtype)
