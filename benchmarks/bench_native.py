"""Benchmark: ComfyUI's native Z-Image path with and without Z-Image Turbo Accelerate, in one process.

The same random real-size weights, written once as a ComfyUI checkpoint (original layout, bf16) and loaded by
``comfy.sd.load_diffusion_model`` (what UNETLoader calls); ModelSamplingAuraFlow(3); ComfyUI's own sampler
(``comfy.sample.sample``: what KSampler runs) with euler, ``simple``, cfg 1, 8 steps, 1024², batch 1. Variants:

- ``native``: the template as is;
- ``native_compiled``: + ComfyUI's ``TorchCompileModel`` (inductor);
- ``ours_eager`` / ``ours_compiled``: + our Accelerate node (compile off / on);
- each again with a random rank-32 LoRA (``LoraLoaderModelOnly``'s ``load_lora_for_models``).

First calls (compile included) are timed separately; then rounds interleave the variants (LoRA variants in their
own group: switching LoRA on and off re-patches weights inside ComfyUI's sampler call) and the median is kept.
Latents are compared with native's (relative L2).

    python benchmarks/bench_native.py --comfy /path/to/ComfyUI --out benchmarks/results/native_h200.json
    python benchmarks/bench_native.py --comfy /path/to/ComfyUI --smoke --out /tmp/native_smoke.json   # CPU, tiny

PyAV is absent on the GPU machine: when ``import av`` fails, inert ``av`` modules are registered before ComfyUI
is imported (only ComfyUI's video types use it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import importlib.abc
import importlib.machinery
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def boot_comfy(comfy: Path, cpu: bool) -> None:
    """Import ComfyUI in-process (no server), the way main.py sets it up."""
    sys.path.insert(0, str(comfy))
    sys.argv = ["main.py"] + (["--cpu"] if cpu else [])
    try:
        import av  # noqa: F401
    except ImportError:  # no PyAV: inert modules, enough for ComfyUI's imports (its video types are never used here)
        sys.meta_path.insert(0, _InertAV())
    import comfy.options

    comfy.options.enable_args_parsing()
    try:
        import utils.install_util  # noqa: F401  (main.py imports it before nodes; 0.33 needs it)
    except ImportError:
        pass


class _Inert(type):
    """A dummy class whose every public attribute is another dummy class (``ColorTrc.ARIB_STD_B67`` at import)."""

    def __getattr__(cls, attr):
        return _inert_attr(attr)


def _inert_attr(attr: str):
    if attr.startswith("__"):
        raise AttributeError(attr)
    return _Inert(attr, (), {})


class _InertAV(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``av`` and any ``av.*`` submodule as inert packages: any public name is a dummy class; dunder lookups
    (inspect asks for ``__file__``) fail as for a real module. ComfyUI 0.33 imports ``av.video.reformatter``."""

    def find_spec(self, name, path=None, target=None):
        if name == "av" or name.startswith("av."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _inert_attr
        return module

    def exec_module(self, module):
        pass


def load_pack():
    """The node pack as ComfyUI imports it, its Accelerate node module (the tests' loader)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import load_pack as pack_loader

    return pack_loader(ROOT)


def original_state(transformer) -> dict:
    """A diffusers ZImageTransformer2DModel's weights in the original (ComfyUI checkpoint) layout."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import transformer_to_original  # the tests' inverse of diffusers' converter

    return {k: v.detach().to("cpu").contiguous()
            for k, v in transformer_to_original(transformer.state_dict(), prefix="").items()}


def write_checkpoint(path: Path, tiny: bool, device) -> Path:
    """Random weights of the real shapes (tiny in smoke mode), as ``model.diffusion_model.*`` bf16 safetensors."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import configs, random_

    from diffusers import ZImageTransformer2DModel

    t_cfg = configs(tiny)[0]
    with torch.device(device):
        transformer = random_(ZImageTransformer2DModel(**t_cfg).to(torch.bfloat16), 0)
    state = {f"model.diffusion_model.{k}": v for k, v in original_state(transformer).items()}
    del transformer
    save_file(state, str(path))
    return path


def load_model(path: Path, tiny: bool):
    import comfy.sd

    if tiny:  # ComfyUI detects Z-Image by width 3840: the tests' mapping teaches it the tiny config
        sys.path.insert(0, str(ROOT / "tests"))
        import torch
        from comfy_zimage import tiny_native_model
        from safetensors.torch import load_file

        return tiny_native_model(load_file(str(path)), dtype=torch.bfloat16)
    return comfy.sd.load_diffusion_model(str(path))


def random_lora(patcher, rank: int, seed: int = 0) -> dict:
    """``common.random_lora`` on the weights of a ComfyUI model (its NextDiT's own parameter names)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import random_lora as lora_of

    return lora_of(((n, p.shape) for n, p in patcher.model.diffusion_model.named_parameters()), rank, seed)


def node_output(out):
    """The first output of a V1 node (a tuple) or a V3 node (NodeOutput)."""
    return out.result[0] if hasattr(out, "result") else out[0]


def core_metrics(args, ckpt, positive, native_latents, lora_sd, metrics, rel_l2) -> None:
    """Our own loader's transformer path on the same file and conditioning: defaults (eager, fused kernels, CUDA
    graphs), compiled, and compiled with a merged LoRA; first calls and medians of interleaved rounds."""
    import torch

    from zimage_core import sampler as core_sampler
    from zimage_core.dtypes import ComponentDtype
    from zimage_core.fast_denoiser import FastDenoiser
    from zimage_core.loading import load_transformer
    from zimage_core.lora import load_lora
    from zimage_core.weights import TransformerWeights

    device = torch.device("cuda") if torch.cuda.is_available() and not args.smoke else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformer = load_transformer(ckpt, ComponentDtype(dtype, dtype), device)
    feats = [positive[0][0][0].to(device, dtype)]
    kw = dict(seed=42, width=args.size, height=args.size, steps=args.steps)
    graphs = device.type == "cuda"
    variants = {"core_default": FastDenoiser(transformer, device, dtype=dtype, cuda_graph=graphs, fuse_ffn=False),
                "core_compiled": FastDenoiser(transformer, device, dtype=dtype, compile=True, cuda_graph=graphs,
                                              fuse_ffn=False)}

    def run(d):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = core_sampler.sample(d, feats, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    outs = {}
    for name, d in variants.items():
        metrics[f"{name}_first_call_s"], outs[name] = run(d)
        print(f"{name}: first call {metrics[f'{name}_first_call_s']:.2f} s", flush=True)
    owner = TransformerWeights.of(transformer)
    lora = load_lora(lora_sd, shapes=owner.canonical_shapes())
    patches = {k: [(p, 1.0) for p in v] for k, v in lora.transformer.items()}
    times = {"core_default": [], "core_compiled": [], "core_compiled_lora": []}
    for r in range(args.rounds):  # no merge in between: a merge changes the weights' version (graphs re-captured)
        for name in ("core_default", "core_compiled"):
            seconds, outs[name] = run(variants[name])
            times[name].append(seconds)
    start = time.perf_counter()
    owner.merge(patches)
    metrics["core_lora_merge_s"] = time.perf_counter() - start
    run(variants["core_compiled"])  # the weights' version changed: graphs are captured again, untimed
    for r in range(args.rounds):
        seconds, outs["core_compiled_lora"] = run(variants["core_compiled"])
        times["core_compiled_lora"].append(seconds)
    owner.merge({})  # back to the originals
    for name, values in times.items():
        metrics[f"{name}_s"] = statistics.median(values)
        metrics[f"{name}_all_s"] = values
    from zimage_core.vae import to_vae_space

    # ComfyUI's sampler returns raw VAE space; ours model space
    metrics["core_default_rel_l2_vs_native"] = rel_l2(to_vae_space(None, outs["core_default"]), native_latents)
    metrics["core_compiled_rel_l2_vs_native"] = rel_l2(to_vae_space(None, outs["core_compiled"]), native_latents)
    metrics["core_lora_overhead_compiled_ratio"] = metrics["core_compiled_lora_s"] / metrics["core_compiled_s"]
    metrics["core_default_over_native"] = metrics["core_default_s"] / metrics["native_s"]
    metrics["core_default_first_image_over_native"] = metrics["core_default_first_call_s"] / metrics["native_s"]
    for name in times:
        print(f"{name}: {metrics[f'{name}_s']:.3f} s", flush=True)


def profile_samples(path, variants, timed, metrics) -> None:
    """One sample of each variant under the profiler: GPU kernel time against wall time (what is not kernel time
    is the GPU waiting for the host: launch overhead, syncs), and the kernel table."""
    from torch.profiler import ProfilerActivity, profile

    for name, model in variants.items():
        timed(model)
        wall, _ = timed(model)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:  # kernels (and runtime calls): no CPU ops
            timed(model)
        events = prof.key_averages()
        kernels = sum(e.device_time_total for e in events) / 1e6
        idle, gaps = device_gaps(prof.events())
        metrics[f"{name}_wall_s"] = wall
        metrics[f"{name}_kernels_s"] = kernels
        metrics[f"{name}_gpu_busy_fraction"] = kernels / wall
        metrics[f"{name}_idle_between_kernels_s"] = idle
        with open(path, "a") as f:
            f.write(f"\n=== {name}: one sample, wall {wall:.3f} s (unprofiled), kernels {kernels:.3f} s, "
                    f"idle between its first and last kernel {idle:.4f} s\n")
            f.write(events.table(sort_by="cuda_time_total", row_limit=25))
            f.write("\nidle gaps of 50 us or more between kernels, in time order (ms from the first kernel, gap "
                    "in us, kernel before -> kernel after, host runtime calls meanwhile):\n")
            for at, gap, before, after, host in gaps:
                f.write(f"{at:9.2f} {gap:8.1f}  {before[:50]} -> {after[:50]}  [{host}]\n")


def device_gaps(events, least_us: float = 50.0):
    """(seconds the GPU sat idle between its first and last kernel, the gaps of ``least_us`` or more in time order):
    from a profile's events, kernels by start time; a gap names the host-side runtime calls that ran during it
    (a sync shows)."""
    kernels, host = [], []
    for e in events:
        start, end = e.time_range.start, e.time_range.end
        if e.device_type.name == "CUDA":
            kernels.append((start, end, e.name))
        elif e.name.startswith("cuda") and end - start > 20:
            host.append((start, end, e.name))
    kernels.sort()
    gaps, idle, reach = [], 0.0, None
    for (s0, e0, n0), (s1, _, n1) in zip(kernels, kernels[1:]):
        reach = e0 if reach is None else max(reach, e0)
        if s1 > reach:
            idle += s1 - reach
            if s1 - reach >= least_us:
                calls = sorted({n for hs, he, n in host if hs < s1 and he > reach})
                gaps.append(((reach - kernels[0][0]) / 1e3, s1 - reach, n0, n1, ", ".join(calls)))
    return idle / 1e6, gaps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfy", required=True, help="a ComfyUI tree (0.3.75 or 0.33.0)")
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", help="reuse this ComfyUI-layout checkpoint instead of writing random weights")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script, times nothing real")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--skip-native-compile", action="store_true", help="leave out TorchCompileModel (its ~50 s)")
    p.add_argument("--native-compile-lora", action="store_true", help="TorchCompileModel on the LoRA model too")
    p.add_argument("--core", action="store_true",
                   help="also our own loader's path (zimage_core: defaults, compiled, compiled + a merged LoRA) on the "
                        "same checkpoint and conditioning, in the same process")
    p.add_argument("--profile", help="append kernel tables of one timed sample of native and ours_eager to this file")
    args = p.parse_args()
    if args.smoke:
        args.size, args.steps, args.rounds, args.tokens = 64, 2, 2, 19

    boot_comfy(Path(args.comfy), cpu=args.smoke)
    import torch

    import comfy.model_management
    import comfy.sample
    import comfy.sd
    import comfyui_version
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow
    from comfy_extras.nodes_torch_compile import TorchCompileModel
    from common import rel_l2, timed_once

    accel_mod = load_pack()
    device = comfy.model_management.get_torch_device()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tmp = None
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench_native_")
        start = time.perf_counter()
        ckpt = write_checkpoint(Path(tmp.name) / "z_image_turbo_random_bf16.safetensors", args.smoke, device)
        print(f"checkpoint written in {time.perf_counter() - start:.1f} s", flush=True)
    base = load_model(ckpt, args.smoke)
    base = ModelSamplingAuraFlow().patch_aura(base, 3.0)[0]
    dm = base.model.diffusion_model
    cap_dim = dm.cap_embedder[0].weight.shape[0]
    g = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, args.tokens, cap_dim, generator=g), {}]]
    negative = [[torch.zeros(1, args.tokens, cap_dim), {}]]  # ConditioningZeroOut; unused at cfg 1
    h = w = args.size // 8
    latent = torch.zeros(1, 16, h, w)

    def sample(model):
        noise = comfy.sample.prepare_noise(latent, 42)
        with torch.inference_mode():
            out = comfy.sample.sample(model, noise, args.steps, 1.0, "euler", "simple", positive, negative, latent,
                                      denoise=1.0, disable_pbar=True, seed=42)
        return out.float().cpu()

    def timed(model):
        comfy.model_management.soft_empty_cache()
        return timed_once(lambda: sample(model))

    lora = comfy.sd.load_lora_for_models(base, None, random_lora(base, args.rank), 1.0, 0)[0]
    groups = {}
    for tag, model in (("", base), ("_lora", lora)):
        variants = {f"native{tag}": model}
        if not args.skip_native_compile and (tag == "" or args.native_compile_lora):
            variants[f"native_compiled{tag}"] = node_output(TorchCompileModel.execute(model, "inductor"))
        variants[f"ours_eager{tag}"] = accel_mod.accelerate(model, compile=False)[0]
        variants[f"ours_compiled{tag}"] = accel_mod.accelerate(model, compile=True)[0]
        groups[tag] = variants

    metrics: dict = {}
    latents: dict = {}
    for tag, variants in groups.items():
        # first call of each variant: weights loaded and patched, compile included
        for name, model in variants.items():
            seconds, latents[name] = timed(model)
            metrics[f"{name}_first_call_s"] = seconds
            print(f"{name}: first call {seconds:.2f} s", flush=True)
        times = {name: [] for name in variants}
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                seconds, latents[name] = timed(variants[name])
                times[name].append(seconds)
        for name, values in times.items():
            metrics[f"{name}_s"] = statistics.median(values)
            metrics[f"{name}_all_s"] = values
            metrics[f"{name}_rel_l2_vs_native"] = rel_l2(latents[name], latents[f"native{tag}"])
            print(f"{name}: {metrics[f'{name}_s']:.3f} s (median of {len(values)}), rel-L2 vs native "
                  f"{metrics[f'{name}_rel_l2_vs_native']:.2e}", flush=True)
    metrics["lora_effect_rel_l2"] = rel_l2(latents["native_lora"], latents["native"])
    if args.profile and device.type == "cuda":
        profile_samples(args.profile, {n: groups[""][n] for n in ("native", "ours_eager")}, timed, metrics)
    if args.core:
        core_metrics(args, ckpt, positive, latents["native"], random_lora(base, args.rank), metrics, rel_l2)
    metrics["accelerate_speedup_vs_native"] = metrics["native_s"] / metrics["ours_compiled_s"]
    metrics["accelerate_speedup_vs_native_lora"] = metrics["native_lora_s"] / metrics["ours_compiled_lora_s"]
    metrics["accelerate_eager_speedup_vs_native"] = metrics["native_s"] / metrics["ours_eager_s"]
    if not args.skip_native_compile:
        metrics["accelerate_speedup_vs_native_compiled"] = metrics["native_compiled_s"] / metrics["ours_compiled_s"]
        metrics["first_call_ratio_vs_native_compiled"] = (metrics["ours_compiled_first_call_s"]
                                                          / metrics["native_compiled_first_call_s"])
    if device.type == "cuda":
        metrics["peak_gib"] = torch.cuda.max_memory_allocated(device) / (1 << 30)
    result = {"gpu": gpu, "comfyui": comfyui_version.__version__, "torch": torch.__version__,
              "setting": f"{args.size}x{args.size}, batch 1, {args.steps} steps, euler/simple, cfg 1, shift 3, "
                         f"{args.tokens} text tokens, bf16, random real-size weights as a ComfyUI checkpoint, "
                         f"rank-{args.rank} LoRA, median of {args.rounds} interleaved rounds"
                         + (" (SMOKE: tiny model on the CPU, not a measurement)" if args.smoke else ""),
              "metrics": metrics}
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)), metrics
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in metrics.items() if not k.endswith("_all_s")}, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
