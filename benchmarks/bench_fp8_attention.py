"""The fp8 attention kernel (zimage_core/fp8_attention.py) against PyTorch's SDPA backends, at the model's shape.

For random bf16 q/k/v ``[1, 30, S, 128]`` at S = 4224 (4096 image + 128 text tokens) and S = 4096, laid out as
the block maths pass them (transposed views of ``[1, S, 30, 128]``), and optionally for q/k/v saved from the
model (``--qkv file.safetensors`` with keys q, k, v, each ``[B, heads, S, D]``), it reports:

- median time per call (``triton.testing.do_bench``) of SDPA pinned to cuDNN, flash and efficient (each skipped
  with a message if it cannot run), of ``fp8_attention`` as the backend calls it (the three quantization
  kernels, the v amax reduction and the attention kernel), of the quantization alone and of the attention
  kernel alone on pre-quantized inputs; TFLOP/s as 4 * S^2 * D * heads * B / time;
- accuracy: rel-L2 and max-abs error against an fp64 reference (SDPA's math backend in float64, a few heads at a
  time) for the fp8 kernel and for each bf16 SDPA backend;
- the autotuner's choice (BLOCK_M, BLOCK_N, warps, stages) and the first call's time (autotuning, compiling).

    python benchmarks/bench_fp8_attention.py --out benchmarks/results/fp8_attention_h200.json
    python benchmarks/bench_fp8_attention.py --qkv /tmp/qkv_layer10.safetensors --out /tmp/x.json
    python benchmarks/bench_fp8_attention.py --smoke      # CPU, tiny shapes, Triton's interpreter: no timings

``measure(q, k, v)`` is importable from another benchmark (accuracy on the model's own activations)::

    sys.path.insert(0, "benchmarks"); from bench_fp8_attention import measure
    metrics = measure(q, k, v, timing=False)   # {"fp8_rel_l2": ..., "sdpa_cudnn_rel_l2": ..., ...}

JSON (``--out``): ``{"gpu": name, "metrics": {name: number}}``, metric names prefixed with ``s<S>_`` (or
``qkv_`` for ``--qkv``).
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # must precede the first import of triton (the kernels are defined at import)
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zimage_core import fp8_attention as fa  # noqa: E402

SDPA_BACKENDS = ("cudnn", "flash", "efficient")


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _time_us(fn) -> float:
    """Median time of ``fn`` in microseconds (CUDA only)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def _errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    o, r = out.double(), ref.double()
    return ((o - r).norm() / r.norm().clamp_min(1e-300)).item(), (o - r).abs().max().item()


@torch.no_grad()
def reference(q, k, v, heads_per_chunk: int = 8) -> torch.Tensor:
    """fp64 attention (SDPA's math backend), a few heads at a time to bound the S x S scores' memory."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64, device=q.device)
    with sdpa_kernel([SDPBackend.MATH]):
        for b in range(q.shape[0]):
            for h in range(0, q.shape[1], heads_per_chunk):
                sl = (slice(b, b + 1), slice(h, h + heads_per_chunk))
                out[sl] = F.scaled_dot_product_attention(q[sl].double(), k[sl].double(), v[sl].double())
    return out


def _sdpa_fn(name: str, q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]

    def run():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)
    return run


@torch.no_grad()
def measure(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, timing: bool | None = None, prefix: str = "",
            log=print) -> dict:
    """Accuracy (and, on CUDA, speed) of the fp8 kernel and of the SDPA backends for q/k/v ``[B, H, S, D]``.

    Returns ``{prefix + name: number}``: ``fp8_rel_l2``/``fp8_max_abs`` against an fp64 reference, the same for
    ``sdpa_<backend>``, and with ``timing`` (default: on CUDA) ``*_us`` (median), ``*_tflops``, the autotuned
    config and ``fp8_first_call_s``. ``fp8_kernel_ran`` is 1 when the Triton kernels ran (0: SDPA fallback).
    """
    timing = q.is_cuda if timing is None else timing
    B, H, S, D = q.shape
    flops = 4.0 * B * H * S * S * D
    m: dict[str, float] = {}

    def put(name, value):
        m[prefix + name] = float(value)

    ref = reference(q, k, v)
    put("seq_len", S)
    put("heads", H)
    put("head_dim", D)

    # the fp8 kernel as the backend calls it; its first call autotunes (and compiles) at this S
    before = fa.stats["kernel"]
    _sync(q.device)
    t0 = time.perf_counter()
    out = fa.fp8_attention(q, k, v)
    _sync(q.device)
    put("fp8_first_call_s", time.perf_counter() - t0)
    put("fp8_kernel_ran", fa.stats["kernel"] > before)
    rel, mx = _errors(out, ref)
    put("fp8_rel_l2", rel)
    put("fp8_max_abs", mx)
    log(f"  fp8 kernel: rel-L2 {rel:.4g}, max abs {mx:.4g} (ran the Triton kernels: {fa.stats['kernel'] > before})")
    del out

    for name in SDPA_BACKENDS:
        try:
            o = _sdpa_fn(name, q, k, v)()
            rel, mx = _errors(o, ref)
            put(f"sdpa_{name}_rel_l2", rel)
            put(f"sdpa_{name}_max_abs", mx)
            del o
            if timing:
                t = _time_us(_sdpa_fn(name, q, k, v))
                put(f"sdpa_{name}_us", t)
                put(f"sdpa_{name}_tflops", flops / t * 1e-6)
                log(f"  sdpa {name:9s}: {t:8.1f} us  {flops / t * 1e-6:6.1f} TFLOP/s  rel-L2 {rel:.4g}")
            else:
                log(f"  sdpa {name:9s}: rel-L2 {rel:.4g}")
        except Exception as e:  # a backend that does not take this shape/dtype/device
            log(f"  sdpa {name:9s}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")

    if timing and fa.supported(q):
        t_total = _time_us(lambda: fa.fp8_attention(q, k, v))

        def quant():
            fa.quantize_rows(q)
            fa.quantize_rows(k)
            fa.quantize_v(v)
        t_quant = _time_us(quant)
        q8, qs = fa.quantize_rows(q)
        k8, ks = fa.quantize_rows(k)
        v8t, vmax = fa.quantize_v(v)
        t_attn = _time_us(lambda: fa.attention_quantized(q8, qs, k8, ks, v8t, vmax, S, q.dtype))
        for name, t in (("fp8_total", t_total), ("fp8_quant", t_quant), ("fp8_attn", t_attn)):
            put(f"{name}_us", t)
        put("fp8_total_tflops", flops / t_total * 1e-6)
        put("fp8_attn_tflops", flops / t_attn * 1e-6)
        best = getattr(fa._attn_tuned, "best_config", None)
        if best is not None:
            put("fp8_block_m", best.kwargs["BLOCK_M"])
            put("fp8_block_n", best.kwargs["BLOCK_N"])
            put("fp8_num_warps", best.num_warps)
            put("fp8_num_stages", best.num_stages)
        if prefix + "sdpa_cudnn_us" in m:
            put("fp8_speedup_vs_cudnn", m[prefix + "sdpa_cudnn_us"] / t_total)
        log(f"  fp8 total   : {t_total:8.1f} us  {flops / t_total * 1e-6:6.1f} TFLOP/s (quantization {t_quant:.1f} us, "
            f"attention kernel {t_attn:.1f} us = {flops / t_attn * 1e-6:.1f} TFLOP/s; config {best})")
    return m


def _random_qkv(S, heads, D, device, dtype, seed):
    """Random q/k/v as the block maths pass them: [B, H, S, D] views of [B, S, H, D] tensors."""
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(1, S, heads, D, generator=g, device=device, dtype=torch.float32).to(dtype).transpose(1, 2)
            for _ in range(3)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "fp8_attention.json"), help="JSON results")
    p.add_argument("--qkv", default=None, help="also measure q/k/v from this safetensors file (keys q, k, v)")
    p.add_argument("--seq", type=int, nargs="+", default=[4224, 4096], help="sequence lengths of the random runs")
    p.add_argument("--heads", type=int, default=30)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton's interpreter, no timings")
    args = p.parse_args()

    if args.smoke:
        device, seqs, heads, dim = torch.device("cpu"), [100, 64], 2, 32
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke on the CPU")
        device, seqs, heads, dim = torch.device("cuda"), args.seq, args.heads, args.head_dim
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{gpu}; torch {torch.__version__}; fp8 kernel supported: "
          f"{fa.supported(torch.empty(1, 1, 1, dim, device=device, dtype=torch.bfloat16))}")
    t0 = time.perf_counter()
    metrics: dict[str, float] = {}
    for i, S in enumerate(seqs):
        print(f"random bf16 q/k/v [1, {heads}, {S}, {dim}]:")
        q, k, v = _random_qkv(S, heads, dim, device, torch.bfloat16, seed=i)
        metrics.update(measure(q, k, v, timing=device.type == "cuda", prefix=f"s{S}_"))
        del q, k, v
    if args.qkv:
        from safetensors.torch import load_file

        t = load_file(args.qkv)
        q, k, v = (t[n].to(device) for n in ("q", "k", "v"))
        print(f"{args.qkv}: q/k/v {list(q.shape)} {q.dtype}:")
        metrics.update(measure(q, k, v, timing=device.type == "cuda", prefix="qkv_"))
    metrics["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": gpu, "metrics": metrics}, indent=2))
    print(f"wrote {out} ({metrics['wall_s']:.1f} s)")


if __name__ == "__main__":
    main()
