"""Where a step's time goes, against the card's own measured rates: the roofline behind the speed targets.

Measures on the GPU, in one process:

- ``ceilings``: the bf16 and fp8 (tensor-wise scaled) matrix rates on 8192³, the copy bandwidth;
- ``gemms``: every matrix shape of a Z-Image step at 1024² (4096 image + 128 text tokens) in bf16, in fp8 with
  row-wise scales (our path: ``torch._scaled_mm`` with [M, 1] and [1, N] scales) and with tensor-wise scales
  (ComfyUI's ``fp8_e4m3fn_fast``), and the cost of our row-wise activation quantization; summed to one step;
- ``attention``: SDPA (cuDNN, flash) at the model's shape;
- ``profiles``: one transformer step of our fast path profiled kernel by kernel (bf16 eager, fp8 eager, fp8
  compiled) and 8 bf16 steps sustained (kernel time against wall time: clocks, launch gaps).

    python benchmarks/bench_costs.py --out benchmarks/results/costs_h200.json --tables /tmp/tables.txt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results, configs, fp8_copy, random_, section, sync, timed_once  # noqa: E402

from zimage_core.fp8 import quantize_activation_rowwise  # noqa: E402

TOKENS = 4096 + 128


def gpu_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def shapes(dim: int = 3840, hidden: int = 10240) -> dict[str, tuple[int, int]]:
    """(out, in) of each block matrix, as the fast path runs them (q/k/v fused, w1/w3 fused)."""
    return {"qkv": (3 * dim, dim), "out": (dim, dim), "w13": (2 * hidden, dim), "w2": (dim, hidden)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--tables", required=True, help="text file the kernel tables are appended to")
    p.add_argument("--sections", default="ceilings,gemms,attention,profiles")
    args = p.parse_args()
    device = torch.device("cuda")
    res = Results(Path(args.out), {"setting": f"1024x1024 ({TOKENS} tokens), bf16 / fp8 e4m3, batch 1"})
    tables = Path(args.tables)
    sections = args.sections.split(",")
    layers, refiners = 30, 2

    @section("ceilings")
    def ceilings(results):
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        ms = gpu_ms(lambda: a @ b)
        results["bf16_matmul_tflops"] = 2 * n ** 3 / ms / 1e9
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.ones((), device=device)
        ms = gpu_ms(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
        results["fp8_tensorwise_matmul_tflops"] = 2 * n ** 3 / ms / 1e9
        sa, sb = torch.ones(n, 1, device=device), torch.ones(1, n, device=device)
        ms = gpu_ms(lambda: torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16))
        results["fp8_rowwise_matmul_tflops"] = 2 * n ** 3 / ms / 1e9
        x = torch.empty(1 << 28, device=device, dtype=torch.uint8)
        y = torch.empty_like(x)
        ms = gpu_ms(lambda: y.copy_(x))
        results["copy_gbps"] = 2 * x.numel() / ms / 1e6

    @section("gemms")
    def gemms(results):
        step = {"bf16": 0.0, "fp8_rowwise": 0.0, "fp8_tensorwise": 0.0, "quant": 0.0}
        for name, (n_out, n_in) in shapes().items():
            for m, count in ((TOKENS, layers), (4096, refiners)):
                x = torch.randn(m, n_in, device=device, dtype=torch.bfloat16)
                w = torch.randn(n_out, n_in, device=device, dtype=torch.bfloat16) / n_in ** 0.5
                w8 = w.to(torch.float8_e4m3fn)
                x8 = x.to(torch.float8_e4m3fn)
                sa, sb = torch.ones(m, 1, device=device), torch.ones(1, n_out, device=device)
                one = torch.ones((), device=device)
                t = {"bf16": gpu_ms(lambda: F.linear(x, w)),
                     "fp8_rowwise": gpu_ms(lambda: torch._scaled_mm(x8, w8.t(), scale_a=sa, scale_b=sb,
                                                                    out_dtype=torch.bfloat16)),
                     "fp8_tensorwise": gpu_ms(lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one,
                                                                       out_dtype=torch.bfloat16)),
                     "quant": gpu_ms(lambda: quantize_activation_rowwise(x))}
                for k, v in t.items():
                    step[k] += v * count
                if m == TOKENS:
                    flops = 2 * m * n_out * n_in
                    for k in ("bf16", "fp8_rowwise", "fp8_tensorwise"):
                        results[f"gemm_{name}_{k}_tflops"] = flops / t[k] / 1e9
                    results[f"quant_{name}_us"] = t["quant"] * 1e3
        for k, v in step.items():
            results[f"step_gemm_{k}_ms"] = v

    @section("quant_kernel")
    def quant_kernel(results):
        from zimage_core import kernels

        for name, n in (("3840", 3840), ("10240", 10240)):
            x = torch.randn(TOKENS, n, device=device, dtype=torch.bfloat16) * 3
            q, s = kernels.quantize_rows(x)
            rq, rs = quantize_activation_rowwise(x)
            results[f"quant_kernel_{name}_bit_exact"] = float(torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
                                                              and torch.equal(s, rs))
            results[f"quant_kernel_{name}_scales_equal"] = float(torch.equal(s, rs))
            results[f"quant_kernel_{name}_unequal_fraction"] = (q.view(torch.uint8) != rq.view(torch.uint8)
                                                                ).float().mean().item()
            # how far apart the unequal codes are, in e4m3 steps (adjacent codes of one sign differ by 1)
            diff = (q.view(torch.uint8).int() - rq.view(torch.uint8).int()).abs()
            results[f"quant_kernel_{name}_max_code_difference"] = float(diff.max())
            # ten calls back to back per timing: one call alone times the launcher, not the kernel
            results[f"quant_kernel_{name}_us"] = gpu_ms(lambda: [kernels.quantize_rows(x) for _ in range(10)]) * 100
            results[f"quant_torch_{name}_us"] = gpu_ms(lambda: [quantize_activation_rowwise(x) for _ in range(10)]
                                                       ) * 100
        # the fused outputs (RMSNorm with modulation, the residual's next norm, SiLU-gate) against the kernel's plain
        # result quantized by torch; and rows with NaN / inf
        def compare(tag, got, plain):
            rq, rs = quantize_activation_rowwise(plain.reshape(-1, plain.shape[-1]))
            keep = ~rq.float().isnan()
            results[f"fused_{tag}_scales_equal"] = float(torch.equal(got.scale.isnan(), rs.isnan()) and torch.equal(
                got.scale[~got.scale.isnan()], rs[~rs.isnan()]))
            results[f"fused_{tag}_unequal_fraction"] = (got.q.view(torch.uint8)[keep] != rq.view(torch.uint8)[keep]
                                                        ).float().mean().item()
            results[f"fused_{tag}_nan_positions_equal"] = float(torch.equal(got.q.float().isnan(), rq.float().isnan()))

        dim, hidden = 3840, 10240
        x = torch.randn(1, TOKENS, dim, device=device, dtype=torch.bfloat16)
        w = torch.randn(dim, device=device, dtype=torch.bfloat16) * 0.2 + 1
        sc = torch.randn(1, 1, dim, device=device, dtype=torch.bfloat16) * 0.5 + 1
        o = torch.randn_like(x) * 4
        gate = torch.randn(1, 1, dim, device=device, dtype=torch.bfloat16).tanh()
        x[0, 5, 7], o[0, 9, 1] = float("nan"), float("inf")
        compare("rms", kernels.rms_norm(x, w, 1e-6, sc, quantize=True), kernels.rms_norm(x, w, 1e-6, sc))
        compare("residual", kernels.residual(x, o, w, 1e-5, gate, w, 1e-6, sc, quantize_next=True)[1],
                kernels.residual(x, o, w, 1e-5, gate, w, 1e-6, sc)[1])
        g1 = torch.randn(1, TOKENS, hidden, device=device, dtype=torch.bfloat16) * 3
        g3 = torch.randn_like(g1)
        g1[0, 3, 3] = float("-inf")
        compare("silu", kernels.silu_mul(g1, g3, quantize=True), kernels.silu_mul(g1, g3))

    @section("host_copy")
    def host_copy(results):
        """What keeping LoRA originals on the host costs: 3 GiB of bf16 block matrices copied out and back,
        pageable against page-locked (pinned) memory (allocation included)."""
        tensors = [torch.randn(10240, 3840, device=device, dtype=torch.bfloat16) for _ in range(40)]
        gib = sum(t.numel() * t.element_size() for t in tensors) / (1 << 30)

        s, pageable = timed_once(lambda: [t.to("cpu", copy=True) for t in tensors])
        results["host_pageable_out_s_per_gib"] = s / gib
        s, _ = timed_once(lambda: [t.copy_(c) for t, c in zip(tensors, pageable)])
        results["host_pageable_back_s_per_gib"] = s / gib
        del pageable
        s, pinned = timed_once(lambda: [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t) for t in tensors])
        results["host_pinned_out_s_per_gib"] = s / gib
        s, _ = timed_once(lambda: [t.copy_(c) for t, c in zip(tensors, pinned)])
        results["host_pinned_back_s_per_gib"] = s / gib

    @section("attention")
    def attention_costs(results):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v = (torch.randn(1, 30, TOKENS, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * TOKENS * TOKENS * 128 * 30
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel([backend]):
                    ms = gpu_ms(lambda: F.scaled_dot_product_attention(q, k, v))
                results[f"sdpa_{name}_us"] = ms * 1e3
                results[f"sdpa_{name}_tflops"] = flops / ms / 1e9
            except RuntimeError as err:
                results.note(f"sdpa_{name}", str(err)[:300])

    @section("profiles")
    def profiles(results):
        from diffusers import ZImageTransformer2DModel
        from torch.profiler import ProfilerActivity, profile

        from zimage_core import sampler as core_sampler
        from zimage_core.dtypes import ComponentDtype, set_component_dtype
        from zimage_core.fast_denoiser import FastDenoiser

        with torch.device(device):
            transformer = random_(ZImageTransformer2DModel(**configs(False)[0]).to(torch.bfloat16), 0)
        transformer.eval().requires_grad_(False)
        set_component_dtype(transformer, ComponentDtype(torch.bfloat16, torch.bfloat16))
        q8 = fp8_copy(transformer)
        feats = [torch.randn(128, 2560, device=device, dtype=torch.bfloat16)]

        def one_step(name, d):
            ctx = d.prepare(feats)
            lat = torch.randn(1, 16, 128, 128, device=device)
            tt = torch.full((1,), 0.5, device=device)
            d(ctx, lat, tt)
            d(ctx, lat, tt)
            sync()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                d(ctx, lat, tt)
                sync()
            total = sum(e.device_time_total for e in prof.key_averages()) / 1e3
            with tables.open("a") as f:
                f.write(f"\n=== {name}: one step, {total:.2f} ms of kernels\n")
                f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
            results[f"profile_{name}_step_kernels_ms"] = total
            results[f"{name}_step_ms"] = gpu_ms(lambda: d(ctx, lat, tt), reps=10)

        variants = {
            "bf16_eager": FastDenoiser(transformer, device, dtype=torch.bfloat16),
            "fp8_eager": FastDenoiser(q8, device, dtype=torch.bfloat16, fp8_matmul=True),
            "fp8_compiled": FastDenoiser(q8, device, dtype=torch.bfloat16, fp8_matmul=True, compile=True),
        }
        for name, d in variants.items():
            one_step(name, d)
        # 8 bf16 steps sustained: kernel time per step against wall time per step (clocks, launch gaps)
        d = variants["bf16_eager"]
        kw = dict(seed=42, width=1024, height=1024, steps=8)
        core_sampler.sample(d, feats, **kw)
        sync()
        start = time.perf_counter()
        core_sampler.sample(d, feats, **kw)
        sync()
        results["bf16_eager_steps8_wall_s"] = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            core_sampler.sample(d, feats, **kw)
            sync()
        results["bf16_eager_steps8_kernels_s"] = sum(e.device_time_total for e in prof.key_averages()) / 1e6
        with tables.open("a") as f:
            f.write("\n=== bf16_eager: 8 steps sustained\n")
            f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))

    for name, fn in (("ceilings", ceilings), ("gemms", gemms), ("quant_kernel", quant_kernel),
                     ("host_copy", host_copy), ("attention", attention_costs),
                     ("profiles", profiles)):
        if name in sections:
            fn(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
