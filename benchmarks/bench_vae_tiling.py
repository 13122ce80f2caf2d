"""Benchmark: exact tiled VAE decode vs untiled, diffusers' enable_tiling and ComfyUI-style three-pass tiling.

Prints a table and writes a JSON of metrics. GPU run (the numbers that matter):

    python benchmarks/bench_vae_tiling.py --device cuda --dtype bf16 --sizes 1024,2048,4096 --out results.json

CPU smoke test (small VAE, seconds):

    python benchmarks/bench_vae_tiling.py --device cpu --dtype fp32 --sizes 256,512 --tiny --out /tmp/smoke.json

The VAE has the real Flux config (``zimage_core/configs/vae.json``) with random weights, built directly on the
device; ``--tiny`` shrinks it to toy widths. Errors are max abs differences on the 0..1 image
(``((x + 1) / 2).clamp(0, 1)``); times are medians of CUDA-synchronised runs after a warm-up; extra memory is
``torch.cuda.max_memory_allocated`` during the call minus the allocation before it (CUDA only).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import AutoencoderKL  # noqa: E402

from zimage_core.vae_tiling import decode_tiled, estimate_decode_bytes  # noqa: E402

GIB = 1 << 30
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TINY = {"block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 8}


# ------------------------------------------------------------------------------------------------ inputs
def build_vae(device: torch.device, dtype: torch.dtype, tiny: bool, seed: int = 0) -> AutoencoderKL:
    """Flux-config AutoencoderKL with random weights, created on the device; GroupNorm affines randomised so
    every norm matters (a trained VAE's are far from 1/0)."""
    config = json.loads((Path(__file__).resolve().parents[1] / "zimage_core/configs/vae.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if tiny:
        config.update(TINY)
    torch.manual_seed(seed)
    with torch.device(device):
        vae = AutoencoderKL(**config)
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)
    with torch.no_grad():
        for module in vae.decoder.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.copy_(1 + 0.3 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=generator))
            elif tiny and isinstance(module, torch.nn.Conv2d):
                module.weight.mul_(1.5)
    return vae.to(dtype).eval().requires_grad_(False)


def smooth_latents(batch: int, height: int, width: int, device, dtype, seed: int = 0) -> torch.Tensor:
    """Low-frequency sinusoids plus a little noise: structured like real latents, not white noise."""
    generator = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    c = torch.arange(16.0)[:, None, None]
    z = torch.sin(2 * math.pi * (x * (1 + c % 3) + 0.7 * y * (1 + c % 4)) + c) + 0.5 * torch.cos(3 * y + c)
    z = 1.5 * z + 0.3 * torch.randn(batch, 16, height, width, generator=generator)
    return z.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------- methods
def untiled(vae, z):
    return vae.decode(z).sample


def diffusers_tiled(vae, z):
    """diffusers' enable_tiling with its default tile settings (each tile normalised on its own)."""
    vae.enable_tiling()
    try:
        return vae.decode(z).sample
    finally:
        vae.disable_tiling()


def feathered_tiling(vae, z, tile_h: int, tile_w: int, overlap: int) -> torch.Tensor:
    """One tiled decode: overlapping tiles decoded independently by ``vae.decode`` and blended with linear
    feathering: weights ramp linearly from each tile edge over ``overlap`` latent pixels (x8 output pixels);
    the output is sum(w * tile) / sum(w)."""
    batch, _, height, width = z.shape
    out = torch.zeros(batch, 3, 8 * height, 8 * width, dtype=torch.float32, device=z.device)
    weights = torch.zeros(1, 1, 8 * height, 8 * width, dtype=torch.float32, device=z.device)

    def starts(size, tile):
        if size <= tile:
            return [0]
        step = max(1, tile - overlap)
        positions = list(range(0, size - tile, step))
        return positions + [size - tile]

    def ramp(length: int, feather: int) -> torch.Tensor:
        position = torch.arange(length, dtype=torch.float32, device=z.device)
        if feather <= 0:
            return torch.ones_like(position)
        return torch.minimum((position + 1) / feather, (length - position) / feather).clamp(max=1.0)

    for top in starts(height, tile_h):
        for left in starts(width, tile_w):
            tile = vae.decode(z[:, :, top:top + tile_h, left:left + tile_w]).sample.float()
            h, w = tile.shape[-2:]
            mask = ramp(h, 8 * overlap)[:, None] * ramp(w, 8 * overlap)[None, :]
            out[:, :, 8 * top:8 * top + h, 8 * left:8 * left + w] += tile * mask
            weights[:, :, 8 * top:8 * top + h, 8 * left:8 * left + w] += mask
    return (out / weights).to(z.dtype)


def comfy_three_pass(vae, z, tile_size: int, overlap: int) -> torch.Tensor:
    """Reimplements, for comparison only, the method ComfyUI's VAEDecodeTiled is described to use (no ComfyUI
    code): three feathered tilings with tile shapes (t, t), (t/2, 2t), (2t, t/2) in latent units
    (t = tile_size / 8), averaged."""
    t, lap = tile_size // 8, overlap // 8
    passes = [feathered_tiling(vae, z, a, b, lap) for a, b in ((t, t), (t // 2, 2 * t), (2 * t, t // 2))]
    return (passes[0].float() + passes[1].float() + passes[2].float()).div(3).to(z.dtype)


# ------------------------------------------------------------------------------------------- measuring
def image(sample: torch.Tensor) -> torch.Tensor:
    return ((sample.float() + 1) / 2).clamp(0, 1)


def errors(sample: torch.Tensor, reference: torch.Tensor | None) -> dict:
    if reference is None:
        return {}
    diff = (image(sample.cpu()) - image(reference)).abs()
    return {"max_abs_err": diff.max().item(), "mean_abs_err": diff.mean().item()}


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Run ``fn`` (warm-up first); return its last output (on CPU), median time and extra peak memory."""
    free_memory(device)
    result = {}
    try:
        times, peaks, output = [], [], None
        for i in range(warmup + repeats):
            output = None
            free_memory(device)
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            with torch.no_grad():
                output = fn()
            synchronize(device)
            elapsed = time.perf_counter() - start
            if device.type == "cuda":
                peaks.append((torch.cuda.max_memory_allocated(device) - base) / GIB)
            if i >= warmup:
                times.append(elapsed)
                if elapsed > 20 and len(times) >= 1:
                    break  # slow (host-store or many-tile) runs: one timed run is enough
        result.update(status="ok", time_s=statistics.median(times), times_s=times,
                      extra_vram_gib=max(peaks) if peaks else None)
        result["output"] = output.cpu()
    except Exception as error:  # noqa: BLE001 - report OOM, re-raise everything else
        if not is_oom(error):
            raise
        result.update(status="oom", error=str(error).splitlines()[0][:200])
    finally:
        free_memory(device)
    return result


# ------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--sizes", default="1024,2048,4096", help="square output sizes (multiples of 8)")
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--bounded-budget-gib", type=float, default=1.0,
                        help="activation-store device budget of the 'ours_bounded' run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fp32-check-max-size", type=int, default=1024,
                        help="largest size at which ours is also checked in fp32 against untiled fp32")
    parser.add_argument("--skip-comfy", action="store_true", help="skip the (slow) three-pass comparison")
    parser.add_argument("--tiny", action="store_true", help="toy-width VAE (for CPU smoke tests)")
    parser.add_argument("--out", default="results.json")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    sizes = [int(s) for s in args.sizes.split(",") if s]
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons must be fp32
    torch.backends.cudnn.allow_tf32 = False
    vae = build_vae(device, dtype, args.tiny)
    bounded = int(args.bounded_budget_gib * GIB)
    methods = {
        "untiled": lambda z: untiled(vae, z),
        "ours": lambda z: decode_tiled(vae, z, args.tile_size, args.overlap),
        "ours_overlap0": lambda z: decode_tiled(vae, z, args.tile_size, 0),
        "ours_bounded": lambda z: decode_tiled(vae, z, args.tile_size, args.overlap, memory_budget_bytes=bounded),
        "diffusers_enable_tiling": lambda z: diffusers_tiled(vae, z),
    }
    if not args.skip_comfy:
        methods["comfy_three_pass"] = lambda z: comfy_three_pass(vae, z, args.tile_size, args.overlap)

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": args.dtype, "tiny_vae": args.tiny, "tile_size": args.tile_size, "overlap": args.overlap,
        "bounded_budget_gib": args.bounded_budget_gib, "torch": torch.__version__,
        "notes": {
            "errors": "max abs on the 0..1 image vs the untiled decode of the same dtype",
            "ours": "decode_tiled with tile_size/overlap as given and the default memory budget",
            "ours_overlap0": "decode_tiled with overlap=0 (overlap is extra halo only; the result is exact anyway)",
            "ours_bounded": "decode_tiled with memory_budget_bytes = bounded_budget_gib (activations on the host)",
            "tiled_decode_4096_extra_vram_gib": "ours_bounded at 4096",
            "comfy_three_pass": "reimplementation of the described ComfyUI VAEDecodeTiled method, for comparison",
        },
        "sizes": {},
    }
    print(f"device {report['device']}  dtype {args.dtype}  tile {args.tile_size}  overlap {args.overlap}"
          f"{'  (tiny VAE)' if args.tiny else ''}")
    print(f"{'size':>6} {'method':<24} {'status':<6} {'max err':>9} {'mean err':>9} {'time s':>8} {'+VRAM GiB':>9}")
    for size in sizes:
        z = smooth_latents(1, size // 8, size // 8, device, dtype)
        entry = {"estimate_untiled_gib": estimate_decode_bytes(vae, z.shape, dtype) / GIB, "methods": {}}
        reference = None
        for name, fn in methods.items():
            result = measure(lambda: fn(z), device, args.repeats)
            output = result.pop("output", None)
            if name == "untiled" and output is not None:
                reference = output
                entry["image_std"] = image(output).std().item()
            elif output is not None:
                result.update(errors(output, reference))
            entry["methods"][name] = result
            print(f"{size:>6} {name:<24} {result['status']:<6} {fmt(result.get('max_abs_err'), '.2e'):>9} "
                  f"{fmt(result.get('mean_abs_err'), '.2e'):>9} {fmt(result.get('time_s'), '.3f'):>8} "
                  f"{fmt(result.get('extra_vram_gib'), '.2f'):>9}")
            del output
        if reference is None:
            print(f"{size:>6} untiled decode did not fit: no error reference at this size")
        if size <= args.fp32_check_max_size:
            entry["fp32_check"] = fp32_check(vae, z, args, device, dtype)
            print(f"{size:>6} fp32 check: {entry['fp32_check']}")
        report["sizes"][str(size)] = entry
        del reference, z
        free_memory(device)

    summarise(report, sizes)
    print(json.dumps({k: v for k, v in report.items() if k.startswith("tiled_decode")}, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return report


def fp32_check(vae, z, args, device, dtype) -> dict:
    """Exactness of the method itself: ours vs untiled, both fp32 (TF32 off); and how far the compute dtype's
    own untiled decode already is from fp32, for scale."""
    vae32 = vae if dtype == torch.float32 else build_vae(device, torch.float32, args.tiny)
    if dtype != torch.float32:
        vae32.load_state_dict({k: v.float() for k, v in vae.state_dict().items()})
    z32 = z.float()
    with torch.no_grad():
        reference = untiled(vae32, z32).cpu()
        ours = decode_tiled(vae32, z32, args.tile_size, args.overlap).cpu()
        check = {"ours_fp32_vs_untiled_fp32_max_abs_err": errors(ours, reference)["max_abs_err"]}
        if dtype != torch.float32:
            low = untiled(vae, z).cpu()
            ours_low = decode_tiled(vae, z, args.tile_size, args.overlap).cpu()
            check[f"untiled_{args.dtype}_vs_fp32_max_abs_err"] = errors(low, reference)["max_abs_err"]
            check[f"ours_{args.dtype}_vs_fp32_max_abs_err"] = errors(ours_low, reference)["max_abs_err"]
    del vae32
    free_memory(device)
    return check


def summarise(report: dict, sizes: list[int]) -> None:
    """The headline keys."""
    def method(size, name):
        return report["sizes"].get(str(size), {}).get("methods", {}).get(name, {})

    fitting = [s for s in sizes if method(s, "untiled").get("status") == "ok"]
    if fitting:
        largest = max(fitting)
        report["tiled_decode_max_abs_err"] = method(largest, "ours").get("max_abs_err")
        report["tiled_decode_max_abs_err_size"] = largest
    checks = [e["fp32_check"]["ours_fp32_vs_untiled_fp32_max_abs_err"] for e in report["sizes"].values()
              if "fp32_check" in e]
    if checks:
        report["tiled_decode_fp32_max_abs_err"] = max(checks)
    for size in sizes:
        ours, bounded, base = method(size, "ours"), method(size, "ours_bounded"), method(size, "untiled")
        if bounded.get("extra_vram_gib") is not None:
            report[f"tiled_decode_{size}_extra_vram_gib"] = bounded["extra_vram_gib"]
        if ours.get("extra_vram_gib") is not None:
            report[f"tiled_decode_{size}_extra_vram_gib_default_budget"] = ours["extra_vram_gib"]
        if base.get("time_s") and ours.get("time_s"):
            report[f"tiled_decode_{size}_time_ratio"] = ours["time_s"] / base["time_s"]
            overlap0 = method(size, "ours_overlap0")
            if overlap0.get("time_s"):
                report[f"tiled_decode_{size}_time_ratio_overlap0"] = overlap0["time_s"] / base["time_s"]


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
