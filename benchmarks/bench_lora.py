"""What a merged LoRA costs per generation: 8 steps at 1024² with and without one LoRA, compiled with CUDA graphs,
in bf16 and with fp8 storage, on real-size random weights, in one process (rounds interleaved).

A merge writes the weights in place, so the step runs the same kernels on the same tensors: the expected cost is
nothing beyond run-to-run noise. Also timed: the merge itself (strength change) and the undo.

    python benchmarks/bench_lora.py --out benchmarks/results/lora_h200.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Results, build_models, fp8_copy, random_lora, rel_l2, sync  # noqa: E402

from zimage_core import SpeedOptions, ZImage  # noqa: E402
from zimage_core.dtypes import resolve_policy  # noqa: E402
from zimage_core.tokenizer import PromptTokenizer, find_tokenizer  # noqa: E402
from zimage_core.weights import TransformerWeights  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "lora.json"))
    args = p.parse_args()
    device = torch.device(args.device)
    res = Results(Path(args.out), {"setting": f"{args.size}x{args.size}, batch 1, 8 steps, compiled + CUDA graphs, "
                                              f"rank-{args.rank} LoRA on every block matrix, random weights"})
    transformer, _, our_te, vae = build_models(device, torch.bfloat16, tiny=args.tiny)
    tokenizer = PromptTokenizer(find_tokenizer())
    opts = SpeedOptions(compile=True, cuda_graph=device.type == "cuda")
    feats = [torch.randn(128, transformer.config.cap_feat_dim, device=device, dtype=torch.bfloat16)]
    kw = dict(seed=42, width=args.size, height=args.size, steps=8)
    models = {"bf16": ZImage(transformer, our_te, vae, tokenizer, resolve_policy(device, "bf16"), device, speed=opts)}
    q = fp8_copy(transformer)
    models["fp8"] = ZImage(q, our_te, vae, tokenizer, resolve_policy(device, "bf16", overrides={
        "transformer": ("fp8", "bf16")}), device, speed=opts)
    lora = random_lora(TransformerWeights.of(transformer).canonical_shapes().items(), args.rank)
    for tag, z in models.items():
        z.sample(feats, **kw)  # compile, capture
        plain = z.sample(feats, **kw)
        start = time.perf_counter()
        z.load_lora(lora, 1.0, name="lora")
        sync()
        res[f"lora_merge_{tag}_s"] = time.perf_counter() - start
        merged = z.sample(feats, **kw)
        res[f"lora_effect_{tag}_rel_l2"] = rel_l2(merged, plain)
        times = {"with": [], "without": []}
        for r in range(args.rounds):
            for which in (("with", "without") if r % 2 == 0 else ("without", "with")):
                z.set_lora_strength("lora", 1.0 if which == "with" else 0.0)
                z.sample(feats, **kw)  # a strength change bumps the weights' version: a new graph key runs eagerly
                z.sample(feats, **kw)  # once, and is captured at its second generation (cuda_graphs.py)
                sync()
                start = time.perf_counter()
                z.sample(feats, **kw)
                sync()
                times[which].append(time.perf_counter() - start)
        res[f"ours_steps8_{tag}_no_lora_s"] = statistics.median(times["without"])
        res[f"ours_steps8_{tag}_lora_s"] = statistics.median(times["with"])
        res[f"lora_overhead_{tag}_ratio"] = res.data["metrics"][f"ours_steps8_{tag}_lora_s"] / \
            res.data["metrics"][f"ours_steps8_{tag}_no_lora_s"]
        z.set_lora_strength("lora", 1.0)
        sync()
        start = time.perf_counter()
        z.remove_lora("lora")
        sync()
        res[f"lora_undo_{tag}_s"] = time.perf_counter() - start
        res[f"lora_undo_{tag}_bit_exact"] = float(torch.equal(z.sample(feats, **kw), plain))
        res.note(f"spread_{tag}", {k: [round(min(v), 4), round(max(v), 4)] for k, v in times.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
