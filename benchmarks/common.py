"""Shared pieces of the GPU benchmarks: real-size models with random weights built on the device, timing,
and the results file format (one JSON per run under benchmarks/results/)."""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zimage_core.formats import shipped_config  # noqa: E402
from zimage_core.tiny import TINY_TEXT_ENCODER, TINY_TRANSFORMER, TINY_VAE  # noqa: E402

GIB = 1 << 30


def configs(tiny: bool):
    t = {k: v for k, v in shipped_config("transformer").items() if not k.startswith("_")}
    te = shipped_config("text_encoder")
    v = {k: v for k, v in shipped_config("vae").items() if not k.startswith("_")}
    if tiny:
        t.update(TINY_TRANSFORMER)
        te.update(TINY_TEXT_ENCODER)
        v.update(TINY_VAE)
    return t, te, v


@torch.no_grad()
def random_(model: nn.Module, seed: int) -> nn.Module:
    """Random weights in place on the model's device: fan-in scaled matrices, norms near 1."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 1 and "norm" in name and name.endswith("weight"):
            p.normal_(1.0, 0.1, generator=gen)
        elif p.ndim == 1:
            p.normal_(0.0, 0.02, generator=gen)
        elif "embed_tokens" in name or "pad_token" in name:
            p.normal_(0.0, 1.0, generator=gen)
        else:
            p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
    return model


def build_models(device, dtype, tiny=False, seed=0):
    """(transformer, full 36-layer Qwen3Model, our 35-layer view of it, vae), random weights on ``device``.

    Ours shares the full model's embedding and first layers (no extra memory) and has no final norm,
    as ``loading.load_text_encoder`` builds it.
    """
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from zimage_core.dtypes import ComponentDtype, set_component_dtype

    t_cfg, te_cfg, v_cfg = configs(tiny)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = random_(ZImageTransformer2DModel(**t_cfg), seed)
            qcfg = Qwen3Config(**{k: v for k, v in te_cfg.items() if k != "architectures"})
            qcfg._attn_implementation = "sdpa"
            full = random_(Qwen3Model(qcfg), seed + 1)
            vae = random_(AutoencoderKL(**v_cfg), seed + 2)
    finally:
        torch.set_default_dtype(previous)
    ours = copy.copy(full)  # shallow: same submodules
    ours._modules = dict(full._modules)
    ours.layers = nn.ModuleList(list(full.layers)[:-1])
    ours.norm = nn.Identity()
    ours.config = copy.deepcopy(full.config)
    ours.config.num_hidden_layers -= 1
    for m in (transformer, full, ours, vae):
        m.eval().requires_grad_(False)
        set_component_dtype(m, ComponentDtype(dtype, dtype))
    return transformer, full, ours, vae


def fp8_copy(transformer, compute_dtype=torch.bfloat16, work_device=None):
    """A copy with e4m3 row-scaled block linears (``loading``'s choice of layers), quantized layer by layer on
    ``work_device`` (default: where the weights are)."""
    from zimage_core.dtypes import ComponentDtype, set_component_dtype
    from zimage_core.fp8 import FP8Linear
    from zimage_core.loading import TRANSFORMER_FP8_LINEARS

    q = copy.deepcopy(transformer)
    for name, module in list(q.named_modules()):
        if isinstance(module, nn.Linear) and name.endswith(TRANSFORMER_FP8_LINEARS) and (
                name.startswith("layers.") or "refiner." in name):
            parent, _, child = name.rpartition(".")
            layer = FP8Linear.like(module, compute_dtype)
            layer.load_weight(module.weight.data.to(work_device or module.weight.device))
            layer.to(module.weight.device)
            if module.bias is not None:
                layer.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
            setattr(q.get_submodule(parent), child, layer)
    set_component_dtype(q, ComponentDtype(torch.float8_e4m3fn, compute_dtype))
    return q


def random_lora(shapes, rank: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A rank-``rank`` LoRA in ComfyUI's native naming (``diffusion_model.…lora_up/lora_down/alpha``) on every
    attention and FFN matrix among ``shapes`` ((original-layout weight name, shape) pairs, in a fixed order)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes:
        if name.endswith(("attention.qkv.weight", "attention.out.weight", "feed_forward.w1.weight",
                          "feed_forward.w2.weight", "feed_forward.w3.weight")):
            base = "diffusion_model." + name[:-len(".weight")]
            sd[f"{base}.lora_up.weight"] = torch.randn(shape[0], rank, generator=g) * 0.01
            sd[f"{base}.lora_down.weight"] = torch.randn(rank, shape[1], generator=g) / shape[1] ** 0.5
            sd[f"{base}.alpha"] = torch.tensor(float(rank))
    return sd


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_once(fn) -> tuple[float, object]:
    """(seconds, result) of one synchronised call of ``fn``."""
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def timed(fn, warmup: int = 1, repeat: int = 3) -> tuple[float, list[float]]:
    """Median seconds of ``repeat`` synchronised runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def profile_eager_step(denoiser, feats, size: int, table_path) -> float:
    """Profile one transformer call of ``denoiser`` at ``size``² (after a warm-up call), write the top CUDA kernels
    to ``table_path``; returns the step's total CUDA time in ms."""
    from torch.profiler import ProfilerActivity, profile

    device = denoiser.device
    ctx = denoiser.prepare(feats)
    lat = torch.randn(1, 16, size // 8, size // 8, device=device)
    tt = torch.full((1,), 0.5, device=device)
    denoiser(ctx, lat, tt)
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        denoiser(ctx, lat, tt)
        sync()
    Path(table_path).write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
    return sum(e.device_time_total for e in prof.key_averages()) / 1e3


def peak_gib(fn) -> float:
    """Peak allocated GPU memory (GiB, absolute) while ``fn`` runs."""
    if not torch.cuda.is_available():
        return float("nan")
    sync()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() / GIB


def rel_l2(a, b) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm()).item()


class Results:
    """The results format of the speed issue, written after every metric so a crash keeps what was measured."""

    def __init__(self, path: Path, extra: dict | None = None):
        import diffusers

        self.path = Path(path)
        self.data = {
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "date": datetime.date.today().isoformat(),
            "metrics": {},
            "notes": {},
            **(extra or {}),
        }

    def __setitem__(self, name: str, value) -> None:
        self.data["metrics"][name] = round(value, 6) if isinstance(value, float) else value
        print(f"  {name} = {self.data['metrics'][name]}", flush=True)
        self.save()

    def note(self, name: str, text) -> None:
        self.data["notes"][name] = text
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2))


def section(name: str):
    """Decorator: run a benchmark section, log and keep going on failure."""
    def wrap(fn):
        def run(*args, **kwargs):
            print(f"== {name}", flush=True)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # a failed section must not lose the others' numbers
                import traceback

                traceback.print_exc()
                results = kwargs.get("results") or next((a for a in args if isinstance(a, Results)), None)
                if results is not None:
                    results.note(f"{name}_error", f"{type(err).__name__}: {err}"[:2000])
            finally:
                print(f"== {name} took {time.perf_counter() - start:.1f} s", flush=True)
        return run
    return wrap


def prompt_of_tokens(tokenizer, n: int) -> str:
    """A natural-ish prompt whose templated token count is exactly ``n`` (or as close as words allow)."""
    words = ("a detailed photograph of a red fox standing in fresh snow at sunrise, soft golden light, "
             "mist over the pine forest, shallow depth of field, 85mm lens, high dynamic range, ").split()
    text = ""
    i = 0
    while len(tokenizer(text + " " + words[i % len(words)])) <= n:
        text = (text + " " + words[i % len(words)]).strip()
        i += 1
    return text


def out_dir() -> Path:
    return Path(os.environ.get("OUT", ROOT / "benchmarks" / "out"))
