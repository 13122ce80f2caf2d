"""The fp8 attention kernels (zimage_core/fp8_attention.py) on the CPU, through Triton's interpreter.

As in tests/test_kernels.py, the interpreter only runs kernels defined after ``TRITON_INTERPRET=1`` is set, so
the checks run in one child process (this file run as a script) that prints its measurements as JSON, and the
rest of the suite's process is unaffected; the tests here assert on them.

What the interpreter exercises: the three kernels end to end (quantization of q/k per row and of v per channel,
transposed and padded; the attention kernel's fp8 dots, fp32 online softmax in exp2, P's e4m3 rounding, the key
tail's masking, the final scales), with real e4m3 operands in both dots (the interpreter multiplies fp8 exactly:
it widens them to fp16 and sums in fp32). What it cannot: its fp32 -> fp8 cast is wrong (a rounded-up mantissa
does not carry into the exponent), so the kernels round to the e4m3 grid with their own arithmetic first
(``_EMULATE``, compiled out on the GPU, where the hardware cast rounds); ``test_e4m3_rounding_matches_torch``
checks that arithmetic against torch's cast on every e4m3 value and every midpoint. Nor does it model Hopper's
wgmma (its reduced-precision fp8 accumulation, the autotuned configs, speed): benchmarks/bench_fp8_attention.py.

Tolerances, from e4m3's precision: 3 mantissa bits round each element with a relative error of at most 2^-4
(measured RMS ~0.025 on gaussian data). q, k and v each carry one, so fp32 SDPA on the *dequantized* inputs is
already ~0.045 (rel-L2) from fp32 SDPA on the originals at these shapes (logit errors are amplified by the
softmax), and P's rounding adds ~0.02 in quadrature: the kernel is asserted within 0.07 of the fp32 reference
and within 0.035 of the dequantized-input reference, and also at least 0.02 away from the fp32 reference (bf16
SDPA is ~0.004 away: an accidental bf16/fp32 path would show). Against a torch re-implementation of the same
blockwise algorithm (same block size, same roundings: ``_emulate``, in fp32) it must agree to 1e-3 for fp32 and
fp16 outputs (only the order of fp32 sums differs, which may flip a rare P rounding; measured 1e-7 and 2e-4) and
to 2^-7 for bf16 outputs (the output's own rounding; the interpreter's bf16 cast truncates; measured 3e-3).
A kernel given v's scale 10% off, or ignoring k's scales, must fail those same checks.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((64, 32), (100, 64), (130, 64), (20, 32))  # (S, head_dim): 64 has no key tail, 20 only a tail


# ------------------------------------------------------------------------------------ the child process
def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _emulate(q8, qs, k8, ks, v8t, vmax, S, block_n, p_scale):
    """The kernel's algorithm in torch: blockwise online softmax, P * p_scale rounded to e4m3 per key block."""
    import torch

    from zimage_core import fp8_attention as fa

    D = q8.shape[-1]
    qf, kf = q8.float()[:, :, :S], k8.float()[:, :, :S]
    vf = v8t.float()[..., :S].transpose(-1, -2)
    qsc = qs[:, :, :S] * (1.0 / math.sqrt(D) * fa.LOG2E)
    m = torch.full(qf.shape[:3], -math.inf)
    l = torch.zeros(qf.shape[:3])
    acc = torch.zeros(qf.shape)
    for n0 in range(0, S, block_n):
        n1 = min(n0 + block_n, S)
        s = (qf @ kf[:, :, n0:n1].transpose(-1, -2)) * qsc[..., None] * ks[:, :, None, n0:n1]
        m_new = torch.maximum(m, s.amax(-1))
        p = torch.exp2(s - m_new[..., None])
        alpha = torch.exp2(m - m_new)
        l = l * alpha + p.sum(-1)
        p8 = (p * p_scale).to(torch.float8_e4m3fn).float()
        acc = acc * alpha[..., None] + p8 @ vf[:, :, n0:n1]
        m = m_new
    return acc / (l * p_scale)[..., None] * fa.v_scale(vmax)[:, :, None, :]


def _dequant(q8, qs, k8, ks, v8t, vmax, S):
    from zimage_core import fp8_attention as fa

    return ((q8.float() * qs[..., None])[:, :, :S], (k8.float() * ks[..., None])[:, :, :S],
            (v8t.float() * fa.v_scale(vmax)[..., None]).transpose(-1, -2)[:, :, :S])


def _qkv(S, D, dtype, seed, heads=2, strided=True):
    """Random q/k/v [1, heads, S, D]; strided: views of a [1, S, heads, D] tensor, as the block maths pass them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if strided:
        return [torch.randn(1, S, heads, D, generator=g).to(dtype).transpose(1, 2) for _ in range(3)]
    return [torch.randn(1, heads, S, D, generator=g).to(dtype) for _ in range(3)]


def _accuracy(q, k, v, blocks, p_scale) -> dict:
    import torch
    import torch.nn.functional as F

    from zimage_core import fp8_attention as fa

    S = q.shape[2]
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    q8, qs = fa.quantize_rows(q)
    k8, ks = fa.quantize_rows(k)
    v8t, vmax = fa.quantize_v(v)
    deq = F.scaled_dot_product_attention(*_dequant(q8, qs, k8, ks, v8t, vmax, S))
    emu = _emulate(q8, qs, k8, ks, v8t, vmax, S, blocks[1], p_scale)
    out = fa.attention_quantized(q8, qs, k8, ks, v8t, vmax, S, q.dtype, blocks=blocks, p_scale=p_scale)
    res = {"ref": _rel(out, ref), "deq": _rel(out, deq), "emu": _rel(out, emu), "finite": bool(out.isfinite().all()),
           "dtype": str(out.dtype).split(".")[-1], "shape": list(out.shape),
           "bsh_layout": out.transpose(1, 2).is_contiguous()}
    # deliberately wrong variants: v's scale 10% off; k's per-row scales ignored
    bad_v = fa.attention_quantized(q8, qs, k8, ks, v8t, vmax * 1.1, S, q.dtype, blocks=blocks, p_scale=p_scale)
    bad_k = fa.attention_quantized(q8, qs, k8, torch.ones_like(ks), v8t, vmax, S, q.dtype, blocks=blocks,
                                   p_scale=p_scale)
    res["bad_v"] = {"ref": _rel(bad_v, ref), "deq": _rel(bad_v, deq), "emu": _rel(bad_v, emu)}
    res["bad_k"] = {"ref": _rel(bad_k, ref), "deq": _rel(bad_k, deq), "emu": _rel(bad_k, emu)}
    bf16 = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    res["bf16_sdpa_ref"] = _rel(bf16, ref)
    return res


def _quant_roundtrip(x, per_row: bool) -> dict:
    """Quantization kernels vs torch's cast of the same scaled values, and the dequantization error bound."""
    import torch

    from zimage_core import fp8_attention as fa

    B, H, S, D = x.shape
    xf = x.float()
    if per_row:
        x8, scale = fa.quantize_rows(x)
        pad_zero = bool((x8[:, :, S:].float() == 0).all())
        x8, scale = x8[:, :, :S], scale[:, :, :S]
        want_scale = torch.clamp(xf.abs().amax(-1) / 448.0, min=1e-12)
        bscale = scale[..., None]
    else:
        x8t, amax = fa.quantize_v(x)
        pad_zero = bool((x8t[..., S:].float() == 0).all())
        x8 = x8t[..., :S].transpose(-1, -2)
        scale = fa.v_scale(amax)
        want_scale = torch.clamp(xf.abs().amax(2) / 448.0, min=1e-12)
        bscale = scale[:, :, None, :]
    want8 = (xf / bscale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    deq = x8.float() * bscale
    # round to nearest: at most half a step, 2^-4 relative for normal e4m3, 2^-10 * scale among the subnormals
    bound = 2.0 ** -4 * xf.abs() + 2.0 ** -10 * bscale
    return {"scale_max_rel": ((scale - want_scale).abs() / want_scale).max().item(),
            "bits_equal": (x8.contiguous().view(torch.uint8) == want8.view(torch.uint8)).double().mean().item(),
            "excess": (((deq - xf).abs() - bound) / bscale).max().item(),
            "max_rel_err": ((deq - xf).abs() / xf.abs().clamp_min(1e-3)).max().item(),
            "pad_zero": pad_zero, "layout": list(x8.shape)}


def _rounding() -> dict:
    """The emulated e4m3 rounding on every finite e4m3 value, every midpoint between neighbours (ties to even)
    and points just off the midpoints, both signs, plus out-of-range values (saturated to ±448)."""
    import torch
    import triton
    import triton.language as tl

    from zimage_core import fp8_attention

    globals()["_to_e4m3"] = fp8_attention._to_e4m3  # a jit function resolves the names it calls in its globals

    @triton.jit
    def _round(X, Y, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < N, other=0.0)
        tl.store(Y + offs, _to_e4m3(x, True, True), mask=offs < N)  # noqa: F821

    codes = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448, no NaN
    mids = (codes[1:] + codes[:-1]) / 2
    near = torch.cat([mids * (1 + 2.0 ** -20), mids * (1 - 2.0 ** -20)])
    pos = torch.cat([codes, mids, near, torch.tensor([448.1, 460.0, 1e4, 2.0 ** -11, 2.0 ** -10, 1e-30])])
    x = torch.cat([pos, -pos]).contiguous()
    y = torch.empty(x.shape, dtype=torch.float8_e4m3fn)
    _round[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), BLOCK=256)
    want = x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return {"n": x.numel(), "mismatch": int((y.view(torch.uint8) != want.view(torch.uint8)).sum())}


def _checks() -> dict:
    import torch
    import torch.nn.functional as F

    from zimage_core import attention, options
    from zimage_core import fp8_attention as fa

    res = {"supported_cpu": fa.supported(torch.zeros(1, 1, 4, 32)),
           "supported_odd_dim": fa.supported(torch.zeros(1, 1, 4, 48)),
           "supported_f64": fa.supported(torch.zeros(1, 1, 4, 32, dtype=torch.float64))}
    res["rounding"] = _rounding()

    # (1) accuracy: shapes with and without a key tail, strided bf16 inputs; fp16, fp32, contiguous; other blocks
    blocks = fa.INTERPRET_BLOCKS
    for i, (S, D) in enumerate(SHAPES):
        res[f"acc_bfloat16_{S}x{D}"] = _accuracy(*_qkv(S, D, torch.bfloat16, i), blocks, fa.P_SCALE)
    res["acc_float16_100x64"] = _accuracy(*_qkv(100, 64, torch.float16, 10, strided=False), blocks, fa.P_SCALE)
    res["acc_float32_100x64"] = _accuracy(*_qkv(100, 64, torch.float32, 11), blocks, fa.P_SCALE)
    res["acc_blocks_64x16"] = _accuracy(*_qkv(130, 32, torch.bfloat16, 12), (64, 16), fa.P_SCALE)
    res["acc_pscale_1"] = _accuracy(*_qkv(130, 32, torch.bfloat16, 12), blocks, 1.0)

    # (2) quantization round trips (strided bf16, contiguous fp32 with a zero row and tiny values)
    q = _qkv(100, 64, torch.bfloat16, 20)[0]
    x = torch.randn(1, 2, 70, 32) * torch.logspace(-3, 2, 70)[None, None, :, None]
    x[0, 1, 5] = 0.0
    for name, t in (("bf16", q), ("fp32", x)):
        res[f"quant_rows_{name}"] = _quant_roundtrip(t, True)
        res[f"quant_v_{name}"] = _quant_roundtrip(t, False)

    # (3) fallbacks: a mask, gradients, an unsupported head dim, mismatched shapes
    q, k, v = _qkv(40, 32, torch.float32, 30)
    mask = torch.ones(1, 1, 1, 40, dtype=torch.bool)
    mask[..., 29:] = False
    before = dict(fa.stats)
    res["mask_equal"] = torch.equal(fa.fp8_attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, mask))
    qg = q.clone().requires_grad_(True)
    res["grad_equal"] = torch.equal(fa.fp8_attention(qg, k, v).detach(), F.scaled_dot_product_attention(q, k, v))
    q48, k48, v48 = _qkv(40, 48, torch.float32, 31)
    res["dim48_equal"] = torch.equal(fa.fp8_attention(q48, k48, v48), F.scaled_dot_product_attention(q48, k48, v48))
    k_short, v_short = k[:, :, :30], v[:, :, :30]
    res["cross_equal"] = torch.equal(fa.fp8_attention(q, k_short, v_short),
                                     F.scaled_dot_product_attention(q, k_short, v_short))
    res["fallback_calls"] = {key: fa.stats[key] - before[key] for key in before}

    # (4) the backend: registered, listed, routed to the kernel (also through a fullgraph compile)
    res["check_backend"] = attention.check_backend("fp8")
    res["in_options"] = "fp8" in options.ATTENTION_BACKENDS
    res["in_backends"] = "fp8" in attention.backends()
    q, k, v = _qkv(100, 64, torch.bfloat16, 40)
    before = dict(fa.stats)
    routed = attention.attention(q, k, v, None, "fp8")
    res["routed_calls"] = {key: fa.stats[key] - before[key] for key in before}
    direct = fa.fp8_attention(q, k, v)
    res["routed_equal"] = torch.equal(routed, direct)
    res["routed_vs_sdpa"] = _rel(routed, F.scaled_dot_product_attention(q, k, v))
    with attention.backend_context("fp8"):
        compiled = torch.compile(lambda a, b, c: attention.attention(a, b, c, None, "fp8"), backend="aot_eager",
                                 fullgraph=True)
        res["compiled_equal"] = torch.equal(compiled(q, k, v), direct)
    return res


# ------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def measured() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


EMU_TOL = {"float32": 1e-3, "float16": 1e-3, "bfloat16": 2.0 ** -7}  # the output's rounding: bf16 keeps 8 bits


def _accurate(m: dict, dtype: str) -> bool:
    """The kernel's result is right: within fp8's error of the references and the algorithm's emulation."""
    return m["ref"] <= 0.07 and m["deq"] <= 0.035 and m["emu"] <= EMU_TOL[dtype]


def test_supported_on_the_interpreter_only_for_power_of_two_head_dims(measured):
    assert measured["supported_cpu"] is True
    assert measured["supported_odd_dim"] is False and measured["supported_f64"] is False


def test_e4m3_rounding_matches_torch(measured):
    assert measured["rounding"]["n"] > 1000 and measured["rounding"]["mismatch"] == 0, measured["rounding"]


@pytest.mark.parametrize("name", [f"bfloat16_{s}x{d}" for s, d in SHAPES]
                         + ["float16_100x64", "float32_100x64", "blocks_64x16", "pscale_1"])
def test_kernel_matches_fp32_sdpa_within_fp8_error(measured, name):
    m = measured[f"acc_{name}"]
    assert m["finite"] and _accurate(m, m["dtype"]), m
    assert m["ref"] >= 0.02 and m["ref"] > 4 * m["bf16_sdpa_ref"], m  # really the fp8 path, not a bf16 one
    assert m["dtype"] == ({"pscale_1": "bfloat16", "blocks_64x16": "bfloat16"}.get(name) or name.split("_")[0])
    assert m["bsh_layout"] is True  # [B, S, H, D] memory, as the block maths reshape it


@pytest.mark.parametrize("name", [f"bfloat16_{s}x{d}" for s, d in SHAPES] + ["float32_100x64"])
def test_wrong_scales_are_caught(measured, name):
    m = measured[f"acc_{name}"]
    # the results change with v's scale (10% off: ~0.1 from the emulation) and with k's
    assert not _accurate(m["bad_v"], m["dtype"]) and m["bad_v"]["emu"] >= 0.05, m["bad_v"]
    assert not _accurate(m["bad_k"], m["dtype"]) and m["bad_k"]["ref"] >= 0.1, m["bad_k"]


@pytest.mark.parametrize("name", ["rows_bf16", "v_bf16", "rows_fp32", "v_fp32"])
def test_quantization_round_trip(measured, name):
    m = measured[f"quant_{name}"]
    assert m["scale_max_rel"] <= 1e-6, m  # amax / 448 per row (q, k) or per channel (v)
    assert m["bits_equal"] == 1.0, m  # torch's round-to-nearest-even cast of the same scaled values
    assert m["excess"] <= 1e-6, m  # |dequant - x| <= 2^-4 |x| + 2^-10 * scale
    assert m["pad_zero"] is True, m
    assert m["max_rel_err"] > 0.01, m  # it really is quantized


def test_fallbacks_equal_sdpa(measured):
    assert measured["mask_equal"] is True
    assert measured["grad_equal"] is True
    assert measured["dim48_equal"] is True and measured["cross_equal"] is True
    assert measured["fallback_calls"] == {"kernel": 0, "fallback": 4}, measured["fallback_calls"]


def test_backend_registered_and_routed(measured):
    assert measured["check_backend"] == "fp8"
    # accepted by the API (registered), not offered by the nodes (options.ATTENTION_BACKENDS): slower than cuDNN
    assert measured["in_options"] is False and measured["in_backends"] is True
    assert measured["routed_calls"] == {"kernel": 1, "fallback": 0}
    assert measured["routed_equal"] is True
    assert 0.02 <= measured["routed_vs_sdpa"] <= 0.07
    assert measured["compiled_equal"] is True


def test_backend_known_without_the_interpreter():
    """In this process (no interpreter): "fp8" is a valid backend and CPU tensors take the exact SDPA fallback."""
    import torch
    import torch.nn.functional as F

    from zimage_core import attention
    from zimage_core import fp8_attention as fa

    assert attention.check_backend("fp8") == "fp8"
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    assert fa.supported(q) == (os.environ.get("TRITON_INTERPRET") == "1")
    if not fa.supported(q):
        assert torch.equal(attention.attention(q, k, v, None, "fp8"), F.scaled_dot_product_attention(q, k, v))


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through pytest (it sets TRITON_INTERPRET=1)"
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(1)
    print(json.dumps(_checks()))
