"""Low precision on this card (issue 23): the matrix rates that set the floor, our fused quantization, the attention
kernels worth trying, torchao's float8 linear, and our whole block in bf16, fp8 and int8.

At Z-Image's shapes (dim 3840, FFN 10240, 30 heads x 128, 4096 + 128 tokens = one 1024² step, batch 1), each time the
median of ``--repeat`` CUDA-event timings after warm-up:

- ``gemm_*``: the block's four GEMM shapes (q/k/v 3840->11520, out 3840->3840, w1 and w3 3840->10240 each, w2
  10240->3840) in bf16 (``F.linear``), fp8 (``torch._scaled_mm`` row-wise, operands already quantized), int8
  (``torch._int_mm``, operands already quantized; and with our fp32 epilogue ``kernels.int8_epilogue``; and
  ``int8_triton``: both in one kernel, ``kernels.int8_matmul``, with the share of its outputs that differ), and whole
  ``fp8_linear``/``int8_linear`` calls on a bf16 input (quantization included); comfy-kitchen's ``int8_linear``
  where it imports. TFLOP/s = 2·M·K·N / time. ``floor8_*_s``: 8 steps x 32 blocks (30 layers + 2 noise refiners,
  all counted at 4224 tokens) of these GEMMs plus cuDNN's attention: the README's floor for each precision (the
  adaLN, embedders and final layer, under 1% of the FLOPs, left out).
- ``int8cfg_*``: ``kernels.int8_matmul``'s tilings swept per GEMM shape (time per shape and per step, the best,
  what ``mm_config`` picks).
- ``parity_*``: on this device, the share of the kernels' fp8/int8 codes (fused into ``rms_norm`` and standalone) that
  differ from torch's quantization of the same rows, and whether the scales are equal (0 and 1 expected; the fp8
  kernel writes +0 for a few of torch's -0).
- ``quant_step_*``: a block's activation quantization for fp8 and int8 (also int8 rotated by Hadamard groups of
  256), per step (x32): fused into the kernels that make the activations (``rms_norm``/``residual``/``silu_mul``
  with ``quantize=``, plus the attention output through ``quantize_rows``) against the same kernels writing bf16
  followed by a separate ``quantize_rows`` pass, and against torch's quantization (``fp8/int8.*_rowwise``).
- ``attn_*``: per kernel, time per call, TFLOP/s (4·B·H·S²·D / time), rel-L2 against attention computed in fp32
  from the same bf16 inputs and (``_vs_bf16``) against the first SDPA kernel's bf16 output (cuDNN on the GPU; the
  issue's bar for a default: within 0.02 of it), speed-up over cuDNN. Kernels: SDPA cuDNN / flash / efficient, our
  ``fp8_attention``, comfy-kitchen's ``int8_attention`` (as ComfyUI 0.33's ``attention_comfy_kitchen_int8`` calls
  it: [B, H, S, D] views), ``flash_attn_interface`` (FlashAttention 3), ``flash_attn.cute`` (flash-attn-4),
  ``flash_attn`` 2, SageAttention (1.0.6: int8 QK, Triton), transformer-engine's ``DotProductAttention`` (bf16, and
  fp8 under ``fp8_autocast``). A package that does not import is reported as missing (``notes``), not as an error.
- ``torchao_*``: torchao's float8 dynamic-activation / float8-weight row-wise config on one block's five linears,
  eager and ``torch.compile``d, against our ``fp8_linear`` (quantization included and with pre-quantized input).
- ``block_*``: ``blocks.block_forward`` at 1024² in bf16, fp8 (row-scaled e4m3, fp8 matmuls, fused quantization),
  int8 (W8A8, fused quantization) and int8 rotated (groups of 256), each int8 also with the product as two passes
  (``*_int_mm``: ``torch._int_mm`` + ``int8_epilogue``), per call, ``steps8_*_s`` = 8 x 32 calls, and
  rel-L2 against the bf16 and the fp32 block, for weights of two distributions (normal and uniform, both of
  variance 1/fan_in).

    python benchmarks/bench_lowp.py --out benchmarks/results/lowp_h200     # writes <out>/lowp.json
    python benchmarks/bench_lowp.py --smoke --out /tmp/lowp_smoke          # CPU, tiny shapes, Triton's interpreter

``--smoke`` runs every section on tiny shapes on the CPU (the kernels under Triton's interpreter) so that the code
paths are checked without a GPU; its times mean nothing. JSON: ``{"gpu": name, "metrics": {...}, "notes": {...}}``,
written after every metric (a crash keeps what was measured).
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before the first import of triton: the kernels are defined at import
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["ZIMAGE_KERNELS"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Results, section  # noqa: E402
from zimage_core import fp8, int8, kernels  # noqa: E402
from zimage_core.blocks import BlockShape, BlockWeights, Linear, block_forward  # noqa: E402

REAL = dict(dim=3840, ffn=10240, heads=30, head_dim=128, seq=4096 + 128, text=128)
SMOKE = dict(dim=96, ffn=256, heads=3, head_dim=32, seq=40, text=8)
BLOCKS_PER_STEP = 32  # 30 main layers + 2 noise refiners (the refiners see 4096 tokens: counted at 4224)
STEPS = 8


class Bench:
    def __init__(self, args):
        self.smoke = args.smoke
        self.device = torch.device("cpu" if args.smoke else "cuda")
        self.shape = SMOKE if args.smoke else REAL
        self.repeat = 1 if args.smoke else args.repeat
        self.warmup = 0 if args.smoke else 3
        self.gen = torch.Generator(device=self.device).manual_seed(0)

    def randn(self, *shape, dtype=torch.bfloat16, scale=1.0):
        return (torch.randn(*shape, generator=self.gen, device=self.device) * scale).to(dtype)

    def time_us(self, fn) -> float:
        """Median of ``repeat`` timings (CUDA events on the GPU) after ``warmup`` calls, in microseconds."""
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeat):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(times)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _missing(results: Results, name: str, err: BaseException) -> None:
    text = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    results.note(f"{name}_missing", text)
    print(f"  {name}: missing ({text})", flush=True)


# ------------------------------------------------------------------------------------------------ GEMMs
def gemm_shapes(s: dict) -> dict[str, tuple[int, int]]:
    """(K, N) of the block's GEMMs; w1 and w3 are two GEMMs of the same shape (fuse_ffn off, the default)."""
    return {"qkv": (s["dim"], 3 * s["dim"]), "out": (s["dim"], s["dim"]), "w13": (s["dim"], s["ffn"]),
            "w2": (s["ffn"], s["dim"])}


GEMM_COUNT = {"qkv": 1, "out": 1, "w13": 2, "w2": 1}


@section("gemm")
def bench_gemm(b: Bench, results: Results) -> dict:
    m = b.shape["seq"]
    per_kind: dict[str, float] = {}
    try:
        import comfy_kitchen as ck
    except Exception as err:  # noqa: BLE001 - any import failure means "not here"
        ck = None
        _missing(results, "comfy_kitchen", err)
    for name, (k, n) in gemm_shapes(b.shape).items():
        flops = 2.0 * m * k * n
        x = b.randn(m, k)
        w = b.randn(n, k, scale=k ** -0.5)
        x8, xs = fp8.quantize_activation_rowwise(x)
        w8, ws = fp8.quantize_rowwise(w)
        xi, xis = int8.quantize_activation_rowwise_int8(x)
        wi, wis = int8.quantize_rowwise_int8(w)
        wis_n = wis.reshape(-1).contiguous()
        wir, wirs = int8.quantize_rowwise_int8(w, 256 if k % 256 == 0 and not b.smoke else 16)
        rot = 256 if k % 256 == 0 and not b.smoke else 16
        runs = {
            "bf16": lambda: F.linear(x, w),
            "fp8_scaled_mm": lambda: torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16),
            "int8_int_mm": lambda: torch._int_mm(xi, wi.t()),
            "int8_mm_epilogue": lambda: (kernels.int8_epilogue if kernels.active(x) else int8._epilogue)(
                int8.int8_mm(xi, wi), xis, wis_n, None, torch.bfloat16),
            "int8_triton": lambda: kernels.int8_matmul(xi, xis, wi, wis_n, None, torch.bfloat16),
            "fp8_linear": lambda: fp8.fp8_linear(x, w8, ws, None, True),
            "int8_linear": lambda: int8.int8_linear(x, wi, wis, None),
            "int8_linear_rot": lambda: int8.int8_linear(x, wir, wirs, None, rotation_groupsize=rot),
        }
        if ck is not None:
            wck, sck = wi, wis_n  # per-output-channel scales: ck.int8_linear takes them (its eager docs)
            runs["ck_int8_linear"] = lambda: ck.int8_linear(x, wck, sck, None, torch.bfloat16)
            runs["ck_int8_linear_convrot"] = lambda: ck.int8_linear(x, wir, wirs.reshape(-1), None, torch.bfloat16,
                                                                    convrot=True, convrot_groupsize=rot)
        ref = F.linear(x.float(), w.float())
        outs = {}
        for kind, fn in runs.items():
            try:
                out = fn()
                t = b.time_us(fn)
            except Exception as err:  # noqa: BLE001 - a path this card/build lacks: say so, keep going
                results.note(f"gemm_{name}_{kind}_error", f"{type(err).__name__}: {err}"[:500])
                print(f"  gemm {name} {kind}: {type(err).__name__}: {str(err)[:200]}", flush=True)
                continue
            results[f"gemm_{name}_{kind}_us"] = t
            results[f"gemm_{name}_{kind}_tflops"] = flops / t * 1e-6
            if out.dtype != torch.int32:
                results[f"gemm_{name}_{kind}_rel_l2"] = rel_l2(out.float(), ref)
            per_kind[kind] = per_kind.get(kind, 0.0) + t * GEMM_COUNT[name]
            outs[kind] = out
        if "int8_triton" in outs and "int8_mm_epilogue" in outs:  # the same sums and fp32 epilogue: bits expected
            a, e = outs["int8_triton"].float(), outs["int8_mm_epilogue"].float()
            results[f"gemm_{name}_int8_triton_differs"] = (a != e).float().mean().item()
            results[f"gemm_{name}_int8_triton_vs_epilogue_rel_l2"] = rel_l2(a, e)
        del x, w, x8, w8, xi, wi, wir, outs
    for kind, us in per_kind.items():
        results[f"gemm_block_{kind}_us"] = us
        results[f"gemm_step_{kind}_ms"] = us * BLOCKS_PER_STEP / 1e3
    return per_kind


def sweep_configs(b: Bench) -> list:
    """Tilings of ``kernels.int8_matmul`` to time: ``kernels.MM_CONFIGS`` and around them, those whose pipeline fits
    this device's shared memory (the smoke run: two small ones)."""
    C = kernels.MMConfig
    if b.smoke:
        return [C(32, 32, 32, 1, 4, 1), C(16, 32, 32, 2, 4, 2)]
    grid = [C(128, 256, 128, 8, 8, 3), C(128, 256, 128, 8, 8, 4), C(128, 256, 64, 8, 8, 4), C(128, 256, 64, 8, 8, 5),
            C(256, 128, 128, 8, 8, 3), C(256, 128, 64, 8, 8, 4), C(128, 128, 128, 8, 4, 4), C(128, 128, 128, 8, 8, 4),
            C(128, 128, 64, 8, 4, 5), C(64, 256, 128, 8, 4, 4), C(128, 256, 128, 16, 8, 3), C(256, 256, 64, 8, 8, 3)]
    limit = kernels._shared_limit(b.device)
    return [c for c in dict.fromkeys([*kernels.MM_CONFIGS, *grid]) if c.shared_bytes() <= limit]


@section("int8cfg")
def bench_int8_configs(b: Bench, results: Results) -> None:
    """``int8cfg_<shape>_<tiling>_us`` per tiling and GEMM shape; ``int8cfg_step_<tiling>_ms`` a step of them (x32
    blocks); ``int8cfg_step_best_per_shape_ms`` with each shape's fastest; ``notes.int8cfg_best`` which tiling won
    where, and ``int8cfg_picked_*`` what ``mm_config`` picks here."""
    m = b.shape["seq"]
    step: dict = {}
    best_total = 0.0
    for name, (k, n) in gemm_shapes(b.shape).items():
        xi, xis = int8.quantize_activation_rowwise_int8(b.randn(m, k))
        wi, wis = int8.quantize_rowwise_int8(b.randn(n, k, scale=k ** -0.5))
        wis = wis.reshape(-1).contiguous()
        ref = kernels.int8_matmul(xi, xis, wi, wis, None, torch.bfloat16)
        times = {}
        for c in sweep_configs(b):
            tag = f"{c.bm}x{c.bn}x{c.bk}_g{c.group_m}_w{c.warps}_s{c.stages}"
            fn = lambda c=c: kernels.int8_matmul(xi, xis, wi, wis, None, torch.bfloat16, c)  # noqa: E731
            try:
                same = torch.equal(fn(), ref)
                t = b.time_us(fn)
            except Exception as err:  # noqa: BLE001 - a tiling this card cannot build: say so, keep going
                results.note(f"int8cfg_{name}_{tag}_error", f"{type(err).__name__}: {err}"[:300])
                continue
            if not same:
                results.note(f"int8cfg_{name}_{tag}_differs", "not bit-equal to the default tiling")
            times[tag] = t
            results[f"int8cfg_{name}_{tag}_us"] = t
            step[tag] = step.get(tag, 0.0) + t * GEMM_COUNT[name]
        best = min(times, key=times.get)
        best_total += times[best] * GEMM_COUNT[name]
        tops = 2.0 * m * k * n / times[best] * 1e-6
        results.note(f"int8cfg_best_{name}", f"{best}: {times[best]:.1f} us, {tops:.0f} TOPS")
        picked = kernels.mm_config(b.device)
        results.note(f"int8cfg_picked_{name}", str(picked))
        print(f"  int8cfg {name}: best {best} {times[best]:.1f} us; picked {picked}", flush=True)
        del xi, wi, ref
    for tag, us in step.items():
        if all(f"int8cfg_{s}_{tag}_us" in results.data["metrics"] for s in gemm_shapes(b.shape)):
            results[f"int8cfg_step_{tag}_ms"] = us * BLOCKS_PER_STEP / 1e3
    results["int8cfg_step_best_per_shape_ms"] = best_total * BLOCKS_PER_STEP / 1e3


# ------------------------------------------------------------------------------------------------ quantization
@section("quant")
def bench_quant(b: Bench, results: Results) -> None:
    """A block's four GEMM inputs, quantized by the kernels that make them vs separately, per step."""
    s = b.shape
    m, dim, ffn = s["seq"], s["dim"], s["ffn"]
    x = b.randn(1, m, dim)
    o = b.randn(1, m, dim)
    attn_out = b.randn(m, dim)
    w = b.randn(dim, scale=0.1) + 1
    scale = 1 + b.randn(1, 1, dim, scale=0.1)
    gate = b.randn(1, 1, dim).tanh()
    g13 = b.randn(1, m, 2 * ffn)
    g1, g3 = g13.chunk(2, dim=-1)
    rot_big = 256 if not b.smoke else 16

    # parity on this device: the kernels' codes and scales against torch's quantization of the same rows (the tests
    # prove bit equality under Triton's interpreter; here the compiled kernels and the GPU's torch are compared)
    h = kernels.rms_norm(x, w, 1e-6, scale)
    for label, kind, rot in (("fp8", "fp8", None), ("int8", "int8", None), ("int8rot", "int8", rot_big)):
        fused = kernels.rms_norm(x, w, 1e-6, scale, quantize=kind, rotation=rot)
        rows = h.view(m, dim)
        ref_q, ref_s = (fp8.quantize_activation_rowwise(rows) if kind == "fp8" else
                        int8.quantize_activation_rowwise_int8(int8.hadamard_rows(rows, rot) if rot else rows))
        for how, (q, sc) in (("fused", (fused.q, fused.scale)), ("rows", kernels.quantize_rows(rows, kind, rot))):
            unequal = (q.view(torch.uint8) != ref_q.view(torch.uint8)).float().mean().item()
            results[f"parity_{label}_{how}_codes_unequal"] = unequal
            results[f"parity_{label}_{how}_scales_equal"] = int(torch.equal(sc, ref_s))
    acc = torch.randint(-2 ** 24, 2 ** 24, (m, dim), generator=b.gen, device=b.device, dtype=torch.int32)
    xs, ws = b.randn(m, 1, dtype=torch.float32).abs() * 1e-3, b.randn(dim, dtype=torch.float32).abs()
    bias = b.randn(dim)
    if kernels.active(x):  # the epilogue kernel against torch's five passes (an fma may differ in the last fp32 bit)
        ours = kernels.int8_epilogue(acc, xs, ws, bias, torch.bfloat16)
        ref = int8._epilogue(acc, xs, ws, bias, torch.bfloat16)
        results["parity_int8_epilogue_unequal"] = (ours != ref).float().mean().item()
        results["parity_int8_epilogue_rel_l2"] = rel_l2(ours.float(), ref.float())

    def plain():
        kernels.rms_norm(x, w, 1e-6, scale)
        kernels.residual(x, o, w, 1e-5, gate, w, 1e-6, scale)
        kernels.silu_mul(g1, g3)

    results["quant_step_producers_bf16_ms"] = b.time_us(plain) * BLOCKS_PER_STEP / 1e3
    torch_quant = {"fp8": fp8.quantize_activation_rowwise, "int8": int8.quantize_activation_rowwise_int8}
    for label, kind, rot in (("fp8", "fp8", None), ("int8", "int8", None), ("int8rot", "int8", rot_big)):
        def fused():
            kernels.rms_norm(x, w, 1e-6, scale, quantize=kind, rotation=rot)
            kernels.residual(x, o, w, 1e-5, gate, w, 1e-6, scale, quantize_next=kind, rotation=rot)
            kernels.silu_mul(g1, g3, quantize=kind, rotation=rot)
            kernels.quantize_rows(attn_out, kind, rot)  # the attention output: made by SDPA, quantized apart

        def separate():
            kernels.quantize_rows(kernels.rms_norm(x, w, 1e-6, scale).view(m, dim), kind, rot)
            kernels.quantize_rows(kernels.residual(x, o, w, 1e-5, gate, w, 1e-6, scale)[1].view(m, dim), kind, rot)
            kernels.quantize_rows(kernels.silu_mul(g1, g3).view(m, ffn), kind, rot)
            kernels.quantize_rows(attn_out, kind, rot)

        def with_torch():
            for t in (kernels.rms_norm(x, w, 1e-6, scale).view(m, dim),
                      kernels.residual(x, o, w, 1e-5, gate, w, 1e-6, scale)[1].view(m, dim),
                      kernels.silu_mul(g1, g3).view(m, ffn), attn_out):
                torch_quant[kind](int8.hadamard_rows(t, rot) if rot else t)

        for how, fn in (("fused", fused), ("separate_kernel", separate), ("separate_torch", with_torch)):
            results[f"quant_step_{label}_{how}_ms"] = b.time_us(fn) * BLOCKS_PER_STEP / 1e3
        results[f"quant_step_{label}_saved_ms"] = (results.data["metrics"][f"quant_step_{label}_separate_kernel_ms"]
                                                   - results.data["metrics"][f"quant_step_{label}_fused_ms"])


# ------------------------------------------------------------------------------------------------ attention
def _attention_kernels(b: Bench, results: Results, heads: int, head_dim: int) -> dict:
    """name -> fn(q, k, v) with q/k/v [B, H, S, D] (transposed views of [B, S, H, D], as the block passes them),
    returning [B, H, S, D] (or [B, S, H, D] with ``.bshd``); missing packages are noted."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def run(q, k, v, _backend=backend):
            with sdpa_kernel([_backend]):
                return F.scaled_dot_product_attention(q, k, v)
        out[name] = run
    try:
        from zimage_core import fp8_attention as fa

        out["ours_fp8_attention"] = lambda q, k, v: fa.fp8_attention(q, k, v)
    except Exception as err:  # noqa: BLE001
        _missing(results, "attn_ours_fp8_attention", err)
    try:
        import comfy_kitchen as ck

        if not ck.int8_attention_is_available():
            raise RuntimeError("comfy_kitchen.int8_attention_is_available() is False on this device")
        # ComfyUI 0.33 attention_comfy_kitchen_int8: [B, S, H, D] -> transpose(1, 2) views, scale None, no mask
        out["ck_int8_attention"] = lambda q, k, v: ck.int8_attention(q, k, v, scale=None, attn_mask=None)
    except Exception as err:  # noqa: BLE001
        _missing(results, "attn_ck_int8_attention", err)

    def bshd(fn):  # packages taking [B, S, H, D]: hand them the block's own [B, S, H, D] tensors
        def run(q, k, v):
            r = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            r = r[0] if isinstance(r, tuple) else r
            return r.transpose(1, 2)
        return run

    try:
        import flash_attn_interface  # FlashAttention 3 (Hopper)

        out["fa3"] = bshd(flash_attn_interface.flash_attn_func)
    except Exception as err:  # noqa: BLE001
        _missing(results, "attn_fa3", err)
    try:
        from flash_attn.cute import flash_attn_func as fa4  # flash-attn-4 (CuTe DSL)

        out["fa4_cute"] = bshd(fa4)
    except Exception as err:  # noqa: BLE001
        _missing(results, "attn_fa4_cute", err)
    try:
        from flash_attn import flash_attn_func as fa2

        out["fa2"] = bshd(fa2)
    except Exception as err:  # noqa: BLE001
        _missing(results, "attn_fa2", err)
    try:
        from sageattention import sageattn

        out["sageattention"] = lambda q, k, v: sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    except Exception as err:  # noqa: BLE001
        _missing(results, "attn_sageattention", err)
    try:
        import transformer_engine.pytorch as te

        dpa = te.DotProductAttention(heads, head_dim, attn_mask_type="no_mask", qkv_format="bshd")

        def te_run(q, k, v):
            r = dpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return r.view(q.shape[0], q.shape[2], heads, head_dim).transpose(1, 2)
        out["te_dpa_bf16"] = te_run
        try:
            from transformer_engine.common.recipe import DelayedScaling

            recipe = DelayedScaling(fp8_dpa=True)

            def te_fp8(q, k, v):
                with te.fp8_autocast(enabled=True, fp8_recipe=recipe):
                    return te_run(q, k, v)
            out["te_dpa_fp8"] = te_fp8
        except Exception as err:  # noqa: BLE001
            _missing(results, "attn_te_dpa_fp8", err)
    except Exception as err:  # noqa: BLE001
        _missing(results, "attn_transformer_engine", err)
    return out


@torch.no_grad()
def attention_reference(q, k, v, heads_per_chunk: int = 4) -> torch.Tensor:
    """Attention in fp32 from the same (bf16) inputs, a few heads at a time (the S x S scores' memory)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    backends = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH] if q.is_cuda else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        for h in range(0, q.shape[1], heads_per_chunk):
            sl = (slice(None), slice(h, h + heads_per_chunk))
            out[sl] = F.scaled_dot_product_attention(q[sl].float(), k[sl].float(), v[sl].float())
    return out


@section("attention")
def bench_attention(b: Bench, results: Results) -> dict:
    s = b.shape
    heads, d, seq = s["heads"], s["head_dim"], s["seq"]
    flops = 4.0 * heads * seq * seq * d
    q, k, v = (b.randn(1, seq, heads, d).transpose(1, 2) for _ in range(3))
    ref = attention_reference(q, k, v)
    times, bf16_out = {}, None  # bf16_out: the first exact bf16 kernel's output (cuDNN's on the GPU)
    for name, fn in _attention_kernels(b, results, heads, d).items():
        try:
            o = fn(q, k, v).float()
            err = rel_l2(o, ref)
            t = b.time_us(lambda: fn(q, k, v))
        except Exception as e:  # noqa: BLE001 - a kernel this card or shape can't take
            results.note(f"attn_{name}_error", f"{type(e).__name__}: {e}"[:500])
            print(f"  attention {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        results[f"attn_{name}_us"] = t
        results[f"attn_{name}_tflops"] = flops / t * 1e-6
        results[f"attn_{name}_rel_l2"] = err  # against fp32 attention of the same inputs
        if bf16_out is None and name.startswith("sdpa_"):
            bf16_out = o
            results.note("attn_bf16_reference", name)
        elif bf16_out is not None:  # the bar: within 0.02 of bf16 attention's output
            results[f"attn_{name}_rel_l2_vs_bf16"] = rel_l2(o, bf16_out)
        if "sdpa_cudnn" in times:
            results[f"attn_{name}_speedup_vs_cudnn"] = times["sdpa_cudnn"] / t
        times[name] = t
        print(f"  attention {name:20s} {t:9.1f} us {flops / t * 1e-6:7.1f} TFLOP/s  rel-L2 {err:.3g}", flush=True)
    return times


# ------------------------------------------------------------------------------------------------ torchao
def _block_linears(b: Bench, s: dict, dist: str = "normal") -> dict[str, torch.Tensor]:
    """Random weights [out, in] of one block's five linears, variance 1/fan_in (normal or uniform)."""
    dim, ffn = s["dim"], s["ffn"]
    shapes = {"qkv": (3 * dim, dim), "out": (dim, dim), "w1": (ffn, dim), "w3": (ffn, dim), "w2": (dim, ffn)}
    out = {}
    for name, (n, k) in shapes.items():
        if dist == "uniform":
            w = (torch.rand(n, k, generator=b.gen, device=b.device) * 2 - 1) * math.sqrt(3.0 / k)
        else:
            w = torch.randn(n, k, generator=b.gen, device=b.device) / math.sqrt(k)
        out[name] = w.to(torch.bfloat16)
    return out


@section("torchao")
def bench_torchao(b: Bench, results: Results, compile_: bool) -> None:
    try:
        import torchao
        from torchao.quantization import quantize_

        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

            config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        except ImportError:  # older torchao spelling
            from torchao.quantization import PerRow, float8_dynamic_activation_float8_weight

            config = float8_dynamic_activation_float8_weight(granularity=PerRow())
    except Exception as err:  # noqa: BLE001
        _missing(results, "torchao", err)
        return
    results.note("torchao_version", getattr(torchao, "__version__", "?"))
    s = b.shape
    m = s["seq"]
    weights = _block_linears(b, s)
    linears = torch.nn.ModuleDict()
    for name, w in weights.items():
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=b.device, dtype=torch.bfloat16)
        lin.weight.data.copy_(w)
        linears[name] = lin
    xs = {name: b.randn(1, m, w.shape[1]) for name, w in weights.items()}
    ref = {name: F.linear(xs[name].float(), weights[name].float()) for name in weights}
    ours = {name: fp8.quantize_rowwise(w) for name, w in weights.items()}
    pre = {name: (kernels.quantize_rows if kernels.active(x) else fp8.quantize_activation_rowwise)(x.view(m, -1))
           for name, x in xs.items()}

    def run_ours():
        return {n: fp8.fp8_linear(xs[n], *ours[n], None, True) for n in weights}

    def run_ours_prequant():
        return {n: fp8.fp8_linear(kernels.QuantizedRows(*pre[n], xs[n].shape, xs[n].dtype), *ours[n], None, True)
                for n in weights}

    def record(label, fn):
        outs = fn()
        results[f"torchao_block_{label}_us"] = b.time_us(fn)
        results[f"torchao_block_{label}_rel_l2"] = max(rel_l2(outs[n].float(), ref[n]) for n in weights)

    record("ours_fp8_linear", run_ours)
    record("ours_fp8_linear_prequantized", run_ours_prequant)
    try:
        quantize_(linears, config)
    except Exception as err:  # noqa: BLE001 - e.g. no fp8 on this device (the smoke's CPU)
        results.note("torchao_quantize_error", f"{type(err).__name__}: {err}"[:500])
        print(f"  torchao quantize_: {type(err).__name__}: {str(err)[:200]}", flush=True)
        return

    def run_ao():
        return {n: linears[n](xs[n]) for n in weights}
    try:
        record("torchao_eager", run_ao)
    except Exception as err:  # noqa: BLE001
        results.note("torchao_eager_error", f"{type(err).__name__}: {err}"[:500])
        return
    if compile_:
        compiled = {n: torch.compile(linears[n]) for n in weights}
        t0 = time.perf_counter()
        try:
            for n in weights:
                compiled[n](xs[n])
            results["torchao_compile_first_call_s"] = time.perf_counter() - t0
            record("torchao_compiled", lambda: {n: compiled[n](xs[n]) for n in weights})
        except Exception as err:  # noqa: BLE001
            results.note("torchao_compiled_error", f"{type(err).__name__}: {err}"[:500])


# ------------------------------------------------------------------------------------------------ whole block
def random_block(b: Bench, s: dict, dist: str) -> BlockWeights:
    """A real-size modulated Z-Image block of random weights (bf16), as ``weights.TransformerWeights.block`` views it
    (q/k/v fused, w1 and w3 apart)."""
    lin = _block_linears(b, s, dist)
    dim, hd = s["dim"], s["head_dim"]
    bias = lambda n: b.randn(n, scale=0.02)  # noqa: E731
    modulation = Linear(b.randn(4 * dim, min(dim, 256), scale=256 ** -0.5), None, bias(4 * dim))
    norms = tuple(b.randn(n, scale=0.1) + 1 for n in (dim, dim, dim, dim, hd, hd))
    return BlockWeights(modulation, norms, Linear(lin["qkv"], None, None), Linear(lin["out"], None, None),
                        (Linear(lin["w1"], None, None), Linear(lin["w3"], None, None)), Linear(lin["w2"], None, None))


def quantized_block(view: BlockWeights, kind: str, rotation: int | None = None) -> BlockWeights:
    def q(lin: Linear) -> Linear:
        if kind == "fp8":
            return Linear(*fp8.quantize_rowwise(lin.weight), lin.bias)
        return Linear(*int8.quantize_rowwise_int8(lin.weight, rotation), lin.bias, rotation)
    return view._replace(qkv=q(view.qkv), out=q(view.out), ffn=tuple(q(f) for f in view.ffn), w2=q(view.w2))


@contextlib.contextmanager
def unfused_int8(on: bool):
    """With ``on``, ``kernels.int8_matmul`` replaced by ``torch._int_mm`` + ``kernels.int8_epilogue`` (the int8
    product before the fused kernel: the int32 result written and read back), for a same-process comparison."""
    if not on:
        yield
        return

    def two_pass(x8, x_scale, weight, w_scale, bias, dtype, config=None):
        return kernels.int8_epilogue(int8.int8_mm(x8, weight), x_scale, w_scale, bias, dtype)

    with mock.patch.object(kernels, "int8_matmul", two_pass):
        yield


@section("block")
def bench_block(b: Bench, results: Results) -> None:
    s = b.shape
    dim, heads, hd, seq = s["dim"], s["heads"], s["head_dim"], s["seq"]
    shape = BlockShape(heads, 1e-5, 1e-5)
    rot = 256 if not b.smoke else 16
    for dist in ("normal", "uniform"):
        view = random_block(b, s, dist)
        x = b.randn(1, seq, dim)
        ang = torch.rand(1, seq, 1, hd // 2, generator=b.gen, device=b.device) * 6.28
        cos, sin = ang.cos(), ang.sin()
        adaln = b.randn(1, min(dim, 256))
        args = (x, None, cos, sin, adaln)
        f32 = lambda lin: Linear(lin.weight.float(), None, None if lin.bias is None else lin.bias.float())  # noqa: E731
        fp32_view = view._replace(modulation=f32(view.modulation), norms=tuple(t.float() for t in view.norms),
                                  qkv=f32(view.qkv), out=f32(view.out), ffn=tuple(f32(f) for f in view.ffn),
                                  w2=f32(view.w2))
        with torch.no_grad():
            ref32 = block_forward(x.float(), None, cos, sin, adaln.float(), fp32_view, shape, False)
            ref16 = block_forward(*args, view, shape, False)
            del fp32_view
            variants = {"bf16": (view, False), "fp8": (quantized_block(view, "fp8"), True),
                        "int8": (quantized_block(view, "int8"), True),
                        "int8rot": (quantized_block(view, "int8", rot), True)}
            # the int8 products as before the fused matmul (torch._int_mm, then kernels.int8_epilogue), same process
            variants |= {f"{kind}_int_mm": variants[kind] for kind in ("int8", "int8rot")}
            for kind, (v, lowp) in variants.items():
                try:
                    with unfused_int8(kind.endswith("_int_mm")):
                        out = block_forward(*args, v, shape, lowp)
                    if dist == "normal":
                        with unfused_int8(kind.endswith("_int_mm")):
                            t = b.time_us(lambda: block_forward(*args, v, shape, lowp))
                        results[f"block_{kind}_ms"] = t / 1e3
                        results[f"steps8_{kind}_s"] = t * BLOCKS_PER_STEP * STEPS / 1e6
                    results[f"block_{kind}_{dist}_rel_l2_vs_fp32"] = rel_l2(out.float(), ref32)
                    if kind != "bf16":
                        results[f"block_{kind}_{dist}_rel_l2_vs_bf16"] = rel_l2(out.float(), ref16.float())
                except Exception as err:  # noqa: BLE001
                    results.note(f"block_{kind}_{dist}_error", f"{type(err).__name__}: {err}"[:500])
                    print(f"  block {kind} {dist}: {type(err).__name__}: {str(err)[:200]}", flush=True)
            del variants, view


# ------------------------------------------------------------------------------------------------ main
def floors(results: Results, attention_us: dict) -> None:
    """8 steps of the block's GEMMs at the measured rates plus cuDNN's attention (the README's floor)."""
    metrics = results.data["metrics"]
    if not attention_us:
        return
    attn = attention_us.get("sdpa_cudnn") or min(attention_us.values())
    best = min(attention_us.values())
    for label, kind in (("bf16", "bf16"), ("fp8", "fp8_scaled_mm"), ("int8", "int8_int_mm")):
        gemm = metrics.get(f"gemm_block_{kind}_us")
        if gemm is not None:
            results[f"floor8_{label}_s"] = (gemm + attn) * BLOCKS_PER_STEP * STEPS / 1e6
            results[f"floor8_{label}_best_attention_s"] = (gemm + best) * BLOCKS_PER_STEP * STEPS / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out"), help="folder for lowp.json")
    p.add_argument("--repeat", type=int, default=20, help="timed calls per measurement (median)")
    p.add_argument("--sections", nargs="+", default=["gemm", "int8cfg", "quant", "attention", "torchao", "block"])
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of torchao's linears")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton's interpreter: no real timings")
    args = p.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke on the CPU")
    b = Bench(args)
    results = Results(Path(args.out) / "lowp.json", {"shape": b.shape, "smoke": args.smoke,
                                                      "triton": __import__("triton").__version__})
    print(f"{results.data['gpu']}; torch {torch.__version__}; shapes {b.shape}", flush=True)
    t0 = time.perf_counter()
    torch.set_grad_enabled(False)
    attention_us = {}
    if "gemm" in args.sections:
        bench_gemm(b, results)
    if "int8cfg" in args.sections:
        bench_int8_configs(b, results)
    if "quant" in args.sections:
        bench_quant(b, results)
    if "attention" in args.sections:
        attention_us = bench_attention(b, results) or {}
    if "torchao" in args.sections:
        bench_torchao(b, results, compile_=not args.no_compile and not args.smoke)
    if "block" in args.sections:
        bench_block(b, results)
    floors(results, attention_us)
    results["wall_s"] = time.perf_counter() - t0
    print(f"wrote {results.path}", flush=True)


if __name__ == "__main__":
    main()
