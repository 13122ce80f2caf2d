"""Memory benchmark: offload modes (peak GPU memory and time against none), and loading throughput and
host-RAM peak from real-size checkpoint files.

    python benchmarks/bench_memory.py --out benchmarks/results/memory_h100.json
    python benchmarks/bench_memory.py --tiny --device cpu --size 128 --out /tmp/memory.json   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import GIB, ROOT, Results, build_models, fp8_copy, out_dir, peak_gib, prompt_of_tokens, section, timed

sys.path.insert(0, str(ROOT / "tests"))
from zimage_core import ZImage  # noqa: E402
from zimage_core.dtypes import resolve_policy  # noqa: E402
from zimage_core.tokenizer import PromptTokenizer, find_tokenizer  # noqa: E402
from zimage_core.weights import TransformerWeights  # noqa: E402

LOAD = """
import json, resource, sys, time, torch
from zimage_core.dtypes import ComponentDtype
from zimage_core.loading import load_transformer
from diffusers import ZImageTransformer2DModel
import diffusers.loaders.single_file_utils
def rss_mib():
    # peak resident set (VmHWM): ru_maxrss read 0 in the GPU machine's VM
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
if sys.argv[2] == "cuda":
    torch.zeros(1, device="cuda")
base = rss_mib()
stats = []
start = time.perf_counter()
model = load_transformer(sys.argv[1], ComponentDtype(torch.bfloat16, torch.bfloat16), sys.argv[2], stats)
if sys.argv[2] == "cuda":
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
bf16_bytes = sum(p.numel() for p in model.parameters()) * 2
print(json.dumps({"seconds": seconds, "file_gb_per_s": stats[0].bytes_read / 1e9 / seconds,
                  "bf16_gib": bf16_bytes / 2**30, "rss_growth_gib": (rss_mib() - base) / 1024,
                  "rss_growth_ratio": (rss_mib() - base) * 2**20 / bf16_bytes,
                  "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
"""


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def unfuse(model):
    """Let the weights' owner drop its fused matrices (plain tensors that ``Module.to`` would not move)."""
    if hasattr(model, "layers") and hasattr(model, "noise_refiner"):
        TransformerWeights.of(model).forget_fused()
    return model


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--sections", default="offload,load")
    p.add_argument("--workdir", default=None, help="where to write checkpoint files (needs ~40 GB)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    res = Results(args.out or out_dir() / "memory.json", {"setting": f"{args.size}x{args.size}, batch 1, 8 steps, "
                                                           "end to end (encode, sample, decode), random weights"})
    sections = set(args.sections.split(","))
    t0 = time.perf_counter()
    transformer, _, te, vae = build_models(device, torch.bfloat16, tiny=args.tiny)
    tok = PromptTokenizer(find_tokenizer())
    prompt = prompt_of_tokens(tok, 128)
    kw = dict(seed=1, width=args.size, height=args.size, steps=8, tiled_decode=False)
    policy = resolve_policy(device, "bf16")

    def e2e(z):
        def run():
            z.prompt_encoder.clear_cache()
            return z.generate(prompt, **kw)
        return run

    @section("offload modes")
    def offload(results):
        nonlocal transformer, te, vae
        z = ZImage(transformer, te, vae, tok, policy, device)
        results["time_offload_none_s"], _ = timed(e2e(z), repeat=args.repeat)
        results["peak_vram_gib_none_bf16"] = peak_gib(e2e(z))
        q = fp8_copy(transformer, torch.bfloat16, device)
        del z
        transformer, te, vae, q = (unfuse(m).to("cpu") for m in (transformer, te, vae, q))
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
        results.note("gpu_allocated_before_offload_gib", torch.cuda.memory_allocated() / GIB if device.type == "cuda" else 0)
        for label, model, pol, mode in (("bf16", transformer, policy, "model"),
                                        ("fp8", q, resolve_policy(device, "bf16", "fp8"), "model"),
                                        ("bf16", transformer, policy, "sequential")):
            z = ZImage(model, te, vae, tok, pol, device)
            z.set_offload(mode)
            name = f"model_offload_{label}" if mode == "model" else "sequential"
            results[f"time_{name}_s"], _ = timed(e2e(z), repeat=args.repeat)
            results[f"peak_vram_gib_{name}"] = peak_gib(e2e(z))
            results[f"time_ratio_{name}_vs_none"] = (results.data["metrics"][f"time_{name}_s"]
                                                     / results.data["metrics"]["time_offload_none_s"])
            z.set_offload("none")
            for m in (model, te, vae):
                unfuse(m).to("cpu")
            del z
            gc.collect()
            torch.cuda.empty_cache() if device.type == "cuda" else None

    @section("loading")
    def load(results):
        from helpers import transformer_to_original
        from safetensors.torch import save_file

        work = Path(args.workdir or tempfile.mkdtemp())
        work.mkdir(parents=True, exist_ok=True)
        model = unfuse(transformer).to("cpu")
        single = work / "z_image_turbo_bf16.safetensors"
        start = time.perf_counter()
        save_file(transformer_to_original(model.state_dict()), str(single))
        results["write_bf16_single_file_s"] = time.perf_counter() - start
        shards = work / "transformer"
        start = time.perf_counter()
        model.to(torch.float32).save_pretrained(shards, safe_serialization=True, max_shard_size="10GB")
        model.to(torch.bfloat16)
        results["write_fp32_shards_s"] = time.perf_counter() - start
        env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
        for label, path, target in (("bf16_file_to_gpu", single, args.device), ("fp32_shards_to_gpu", shards, args.device),
                                    ("fp32_shards_to_cpu", shards, "cpu")):
            cold = drop_page_cache()
            out = subprocess.run([sys.executable, "-c", LOAD, str(path), target], capture_output=True, text=True,
                                 env=env, timeout=900)
            if out.returncode != 0:
                results.note(f"load_{label}_error", out.stderr[-1500:])
                continue
            data = json.loads(out.stdout.strip().splitlines()[-1])
            data["page_cache_dropped"] = cold
            results.note(f"load_{label}", data)
            results[f"load_{label}_gb_per_s"] = data["file_gb_per_s"]
            results[f"load_{label}_s"] = data["seconds"]
            results[f"load_{label}_rss_growth_ratio"] = data["rss_growth_ratio"]
        results["load_peak_host_ram_ratio"] = results.data["metrics"].get("load_fp32_shards_to_cpu_rss_growth_ratio",
                                                                          float("nan"))

    if "offload" in sections:
        offload(res)
    if "load" in sections:
        load(res)
    print(f"total {time.perf_counter() - t0:.1f} s")
    for k, v in res.data["metrics"].items():
        print(f"{k:48s} {v}")


if __name__ == "__main__":
    sys.exit(main())
