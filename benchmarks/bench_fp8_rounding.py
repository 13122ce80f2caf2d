"""Where an fp8 GEMM's error comes from, per GEMM of a Z-Image block (CPU, exact roundings, no GPU needed).

Issue 23 compares the 8-step latents of our fp8 path and native ComfyUI 0.33.0's on the same comfy_quant e4m3 file
(one scale per weight tensor): 0.0928 vs 0.0942 from bf16 on normal weights, 0.0682 vs 0.0653 on uniform ones
(H100, ``users_part7_h100.json``). Both read the same fp8 weights; they differ only in how the activations are rounded:

- ours: e4m3 with one scale per row, from the fp32 value (``zimage_core.fp8.quantize_activation_rowwise``, the
  reference of our fused kernels);
- native: the bf16 activation cast to e4m3 with scale 1 (ComfyUI's quantized Linear without an ``input_scale``,
  through comfy-kitchen's ``quantize_per_tensor_fp8``).

This script measures, for each GEMM shape and weight distribution, the product's rel-L2 to the bf16 product with
(a) the fp8 weights only (activations bf16), (b) ours, (c) native, over three activation kinds (post-norm
Gaussian with per-row spread, SwiGLU outputs, small-magnitude rows). It says whether the latents' difference is
systematic (one rounding worse per GEMM) or the 8-step trajectory's sensitivity to which bits round where.

    .venv-comfy033/bin/python benchmarks/bench_fp8_rounding.py --out benchmarks/results/fp8_rounding_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import rel_l2 as rel  # noqa: E402  (benchmarks/, this script's folder)
from zimage_core.fp8 import quantize_activation_rowwise  # noqa: E402

DIM, HIDDEN = 3840, 10240  # Z-Image's block: qkv 3840 -> 3x3840, out 3840 -> 3840, w1/w3 3840 -> 10240, w2 back
SHAPES = {"qkv": (DIM, 3 * DIM), "out": (DIM, DIM), "w13": (DIM, HIDDEN), "w2": (HIDDEN, DIM)}


def file_weight(w: torch.Tensor) -> torch.Tensor:
    """A comfy_quant e4m3 weight as ``bench_users.py`` writes it (one scale per tensor), dequantized."""
    scale = w.abs().amax() / 448.0
    return (w / scale).to(torch.float8_e4m3fn).float() * scale


def ours(x: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_activation_rowwise(x)
    return q.float() * scale


def native(x: torch.Tensor) -> torch.Tensor:
    import comfy_kitchen as ck

    one = torch.ones((), dtype=torch.float32)
    return ck.quantize_per_tensor_fp8(x.bfloat16(), one, torch.float8_e4m3fn).float()


def activations(kind: str, rows: int, k: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "norm":  # RMS-normed rows times a modulation scale that differs per token
        return torch.randn(rows, k, generator=gen) * (1 + 0.3 * torch.randn(rows, 1, generator=gen))
    if kind == "swiglu":
        return F.silu(torch.randn(rows, k, generator=gen)) * torch.randn(rows, k, generator=gen)
    return torch.randn(rows, k, generator=gen) * 0.05  # small rows: e4m3's subnormals without a scale


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=512, help="tokens per product (the model has 4224)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    metrics = {}
    for dist in ("normal", "uniform"):
        for name, (k, n) in SHAPES.items():
            if dist == "normal":
                w = torch.randn(n, k, generator=gen) / k ** 0.5
            else:
                w = (torch.rand(n, k, generator=gen) * 2 - 1) * (3.0 / k) ** 0.5
            w = w.bfloat16().float()
            wq = file_weight(w)
            for kind in ("norm", "swiglu", "small"):
                x = activations(kind, args.rows, k, gen)
                ref = x.bfloat16().float() @ w.t()
                row = {"weights_only": rel(x.bfloat16().float() @ wq.t(), ref), "ours": rel(ours(x) @ wq.t(), ref),
                       "native": rel(native(x) @ wq.t(), ref)}
                for key, value in row.items():
                    metrics[f"{dist}_{name}_{kind}_{key}_rel_l2"] = round(value, 6)
                print(f"{dist:8s} {name:4s} {kind:7s} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()),
                      flush=True)
    for dist in ("normal", "uniform"):
        mine = [v for k, v in metrics.items() if k.startswith(dist) and k.endswith("_ours_rel_l2")]
        theirs = [v for k, v in metrics.items() if k.startswith(dist) and k.endswith("_native_rel_l2")]
        metrics[f"{dist}_ours_minus_native_max"] = round(max(a - b for a, b in zip(mine, theirs)), 6)
        print(f"{dist}: ours - native per GEMM, at most {metrics[f'{dist}_ours_minus_native_max']:+.5f}")
    if args.out:
        from importlib.metadata import version

        reference = (f"ComfyUI 0.33.0's rounding of a quantized Linear's input without input_scale: comfy-kitchen "
                     f"{version('comfy-kitchen')} quantize_per_tensor_fp8, scale 1")
        args.out.write_text(json.dumps({"gpu": "cpu (exact roundings; no GPU involved)", "native": reference,
                                        "metrics": metrics, "command": " ".join(sys.argv), "rows": args.rows},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
