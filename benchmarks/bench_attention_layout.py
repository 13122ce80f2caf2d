"""Benchmark: does cuDNN's attention care how q, k and v lie in memory? At the model's shape (1 × 30 heads ×
4224 tokens × 128, bf16), three layouts of the same values, interleaved rounds, CUDA events:

- ``ours``: what ``blocks.block_forward`` hands SDPA: q and k [B, S, H, D] (our q/k kernel's output) and v a
  strided slice of the fused qkv matmul result [B, S, 3, H, D], all transposed to [B, H, S, D] as views;
- ``bhsd``: q, k and v contiguous [B, H, S, D];
- ``qk_bhsd``: q and k contiguous [B, H, S, D], v as in ``ours``.

    python benchmarks/bench_attention_layout.py --out benchmarks/results/attention_layout_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=30)
    args = p.parse_args()
    b, s, h, d = 1, 4224, 30, 128
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    qkv = torch.randn(b, s, 3, h, d, device=dev, dtype=torch.bfloat16, generator=g)
    q_bshd, k_bshd = qkv[:, :, 0].contiguous(), qkv[:, :, 1].contiguous()
    layouts = {
        "ours": (q_bshd.transpose(1, 2), k_bshd.transpose(1, 2), qkv[:, :, 2].transpose(1, 2)),
        "bhsd": tuple(t.transpose(1, 2).contiguous() for t in (q_bshd, k_bshd, qkv[:, :, 2])),
        "qk_bhsd": (q_bshd.transpose(1, 2).contiguous(), k_bshd.transpose(1, 2).contiguous(),
                    qkv[:, :, 2].transpose(1, 2)),
    }
    ref = None
    times = {name: [] for name in layouts}
    with torch.inference_mode(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        for name, (q, k, v) in layouts.items():  # warm-up (plans) and equality of the results
            o = F.scaled_dot_product_attention(q, k, v)
            ref = o if ref is None else ref
            assert torch.equal(o, ref) or (o.float() - ref.float()).abs().max().item() < 1e-2, name
        for r in range(args.rounds):
            for name in (layouts if r % 2 == 0 else list(reversed(layouts))):
                q, k, v = layouts[name]
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(args.iters):
                    F.scaled_dot_product_attention(q, k, v)
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) * 1e3 / args.iters)
    flops = 4 * b * h * s * s * d
    metrics = {}
    for name, values in times.items():
        us = statistics.median(values)
        metrics[f"attention_{name}_us"] = us
        metrics[f"attention_{name}_tflops"] = flops / us / 1e6
        print(f"{name}: {us:.1f} us, {flops / us / 1e6:.0f} TFLOP/s", flush=True)
    result = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "metrics": metrics,
              "code": "python benchmarks/bench_attention_layout.py"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
