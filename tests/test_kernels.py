"""The fused eager-path kernels (zimage_core/kernels.py) equal the torch reference of blocks.py, on the CPU.

Triton's interpreter runs the kernels on CPU tensors, but only if ``TRITON_INTERPRET=1`` is set before the
kernels are defined (when ``zimage_core.blocks`` is first imported), so the checks run in one child process (this
file run as a script) that prints its measurements as JSON; the tests here assert on them. Kernel results are
compared with the torch reference on random inputs of odd sizes and strided (non-contiguous) layouts: fp32 to 1e-5
(only the order of the fp32 sum of squares differs), bf16/fp16 bit for bit or within one ulp of the compute dtype
(the kernels make the reference's roundings, see kernels.py), and a whole ``block_forward`` with kernels on vs off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ULP = {"float32": 2.0 ** -23, "bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}  # spacing at 1.0


# ------------------------------------------------------------------------------------ the child process
def _err(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    """Max error in units of the compute dtype's ulp at the reference's magnitude, share of unequal elements."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, (ours.shape, ref.shape, ours.dtype, ref.dtype)
    o, r = ours.double(), ref.double()
    ulp = ULP[str(ref.dtype).split(".")[-1]] * torch.clamp(r.abs(), min=2.0 ** -10)
    return {"max_abs": (o - r).abs().max().item(), "max_ulps": ((o - r).abs() / ulp).max().item(),
            "unequal": (ours != ref).double().mean().item(), "finite": bool(torch.isfinite(o).all()),
            "rel_l2": ((o - r).norm() / r.norm().clamp_min(1e-30)).item()}


def _strided(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The same values as a non-contiguous view (every other element of a twice-as-long tensor along ``dim``)."""
    shape = list(t.shape)
    shape[dim] *= 2
    big = torch.zeros(shape, dtype=t.dtype)
    idx = [slice(None)] * t.dim()
    idx[dim] = slice(0, None, 2)
    big[tuple(idx)] = t
    out = big[tuple(idx)]
    assert not out.is_contiguous()
    return out


def _checks() -> dict:
    import torch.nn.functional as F

    from zimage_core import blocks, kernels
    from zimage_core.tiny import build_tiny_models
    from zimage_core.weights import TransformerWeights

    assert kernels.available()
    g = torch.Generator().manual_seed(0)
    res = {}

    def rnd(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    def reference(fn, *args):
        with kernels.enabled(False):
            return fn(*args)

    calls = {}
    for name in ("rms_norm", "residual", "silu_mul", "qk_norm_rope", "rope", "_qk_planes"):  # what the dispatch calls
        fn = getattr(kernels, name)

        def counted(*a, _fn=fn, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*a, **k)

        setattr(kernels, name, counted)

    for dt in (torch.float32, torch.bfloat16, torch.float16):
        tag = str(dt).split(".")[-1]
        # (a) RMSNorm: odd width, 2-4 dims, strided rows and strided last dim, weight stored in another dtype
        for n, shape in ((37, (3, 5)), (100, (2, 7)), (64, (2, 3, 4))):
            x = rnd(*shape, n, dtype=dt, scale=3.0)
            w = rnd(n, scale=0.3) + 1.0  # fp32 weight, cast to the compute dtype as the reference does
            res[f"rms_{tag}_{n}"] = _err(kernels.rms_norm(x, w, 1e-6), reference(blocks.rms, x, w, 1e-6))
            xs = _strided(x)
            res[f"rms_{tag}_{n}_strided"] = _err(kernels.rms_norm(xs, w, 1e-6), reference(blocks.rms, xs, w, 1e-6))
            xt = _strided(x, 0)
            res[f"rms_{tag}_{n}_strided_rows"] = _err(blocks.rms(xt, w, 1e-6), reference(blocks.rms, xt, w, 1e-6))
        # (a) with the modulation multiply: (1 + scale) of a [B, 1, N] chunk, broadcast over the sequence
        x = rnd(2, 9, 48, dtype=dt)
        mod = rnd(2, 1, 4 * 48, dtype=dt, scale=0.5)
        scale = 1.0 + mod.chunk(4, dim=2)[0]
        w = rnd(48, dtype=dt, scale=0.2) + 1
        res[f"rms_scale_{tag}"] = _err(kernels.rms_norm(x, w, 1e-5, scale), reference(blocks.rms, x, w, 1e-5) * scale)
        # (d) gated residual, with and without the fused next norm
        o = _strided(rnd(2, 9, 48, dtype=dt, scale=4.0))
        gate = mod.chunk(4, dim=2)[1].tanh()
        w2 = rnd(48, dtype=dt, scale=0.2) + 1
        ref_x = x + gate * reference(blocks.rms, o, w, 1e-5)
        ref_h = reference(blocks.rms, ref_x, w2, 1e-6) * scale
        new_x, h = kernels.residual(x, o, w, 1e-5, gate, w2, 1e-6, scale)
        res[f"residual_{tag}"] = _err(new_x, ref_x)
        res[f"residual_next_{tag}"] = _err(h, ref_h)
        res[f"residual_plain_{tag}"] = _err(kernels.residual(x, o, w, 1e-5), x + reference(blocks.rms, o, w, 1e-5))
        _, h = kernels.residual(x, o, w, 1e-5, None, w2, 1e-6)
        res[f"residual_next_noscale_{tag}"] = _err(h, reference(blocks.rms, x + reference(blocks.rms, o, w, 1e-5),
                                                               w2, 1e-6))
        # (c) SiLU(g1) * g3 on the strided halves of a fused matmul result, odd width
        g13 = rnd(2, 5, 2 * 75, dtype=dt, scale=3.0)
        g1, g3 = g13.chunk(2, dim=-1)
        res[f"silu_mul_{tag}"] = _err(kernels.silu_mul(g1, g3), F.silu(g1) * g3)
        # (b) q/k norm + RoPE out of [B, S, 3, H, D] (odd head count, cos broadcast over the batch or not)
        for heads, d, cb in ((3, 16, 2), (5, 32, 1), (1, 8, 2)):
            qkv = rnd(2, 7, 3, heads, d, dtype=dt, scale=2.0)
            ang = torch.rand(cb, 7, 1, d // 2, generator=g) * 6.28
            cos, sin = ang.cos(), ang.sin()
            wq, wk = rnd(d, dtype=dt, scale=0.3) + 1, rnd(d, dtype=dt, scale=0.3) + 1
            q, k = kernels.qk_norm_rope(qkv, wq, wk, 1e-5, cos, sin)
            rq = reference(lambda: blocks.rope(blocks.rms(qkv[:, :, 0], wq, 1e-5), cos, sin))
            rk = reference(lambda: blocks.rope(blocks.rms(qkv[:, :, 1], wk, 1e-5), cos, sin))
            res[f"qk_rope_{tag}_{heads}x{d}_q"] = _err(q, rq)
            res[f"qk_rope_{tag}_{heads}x{d}_k"] = _err(k, rk)
            res[f"qk_rope_{tag}_{heads}x{d}_layout"] = {"contiguous": q.is_contiguous() and k.is_contiguous(),
                                                        "shape": list(q.shape)}
            # a strided qkv (a transposed buffer), and RoPE alone on a strided q
            qkv_t = qkv.transpose(0, 1).contiguous().transpose(0, 1)
            q2, _ = kernels.qk_norm_rope(qkv_t, wq, wk, 1e-5, cos, sin)
            res[f"qk_rope_{tag}_{heads}x{d}_strided"] = _err(q2, rq)
            xq = qkv[:, :, 2]
            res[f"rope_{tag}_{heads}x{d}"] = _err(blocks.rope(xq, cos, sin), reference(blocks.rope, xq, cos, sin))

    # fp8 row quantization (the fp8 matmul's activations): bit for bit fp8.quantize_activation_rowwise, rows of
    # wide dynamic range (subnormal e4m3 results), an all-zero row, rows wider than one block, strided rows
    from zimage_core.fp8 import quantize_activation_rowwise

    for dt in (torch.float32, torch.bfloat16, torch.float16):
        tag = str(dt).split(".")[-1]
        for rows, n in ((5, 37), (3, 2500), (4, 4100), (2, 17000)):  # the last: two sweeps of one row
            x = (rnd(rows, n) * torch.logspace(-3, 3, rows)[:, None]).to(dt)
            x[0] = 0
            for layout, xx in (("", x), ("_strided_rows", _strided(x, 0))):
                q, s = kernels.quantize_rows(xx)
                rq, rs = quantize_activation_rowwise(xx)
                res[f"quant_{tag}_{n}{layout}"] = {
                    "scale_equal": torch.equal(s, rs), "q_equal": torch.equal(q.view(torch.uint8), rq.view(torch.uint8)),
                    "dtype": str(q.dtype), "subnormals": int(((q.float().abs() < 2 ** -6) & (q.float() != 0)).sum())}
    # the same quantization fused into the kernels that make an fp8 matmul's input: bit for bit the kernel's plain
    # result quantized afterwards (rows wider than 2048 too: silu_mul then runs one program per row)
    def same_bits(got, ref_tensor):
        rq, rs = quantize_activation_rowwise(ref_tensor.reshape(-1, ref_tensor.shape[-1]))
        diff = got.q.view(torch.uint8) != rq.view(torch.uint8)
        return {"q_equal": torch.equal(got.q.view(torch.uint8), rq.view(torch.uint8)),
                "differing": [[a, b, c] for a, b, c in zip(got.q.float()[diff][:4].tolist(), rq.float()[diff][:4].tolist(),
                                                           ref_tensor.reshape(rq.shape).float()[diff][:4].tolist())],
                "scale_equal": torch.equal(got.scale, rs), "shape": list(got.shape) == list(ref_tensor.shape),
                "dtype": got.dtype == ref_tensor.dtype}

    for dt in (torch.float32, torch.bfloat16):
        tag = str(dt).split(".")[-1]
        for n in (48, 2500):
            x = rnd(2, 5, n, dtype=dt, scale=3.0)
            w = rnd(n, dtype=dt, scale=0.2) + 1
            mscale = 1.0 + rnd(2, 1, n, dtype=dt, scale=0.5)
            res[f"fused_quant_rms_{tag}_{n}"] = same_bits(kernels.rms_norm(x, w, 1e-6, mscale, quantize=True),
                                                          kernels.rms_norm(x, w, 1e-6, mscale))
            o = rnd(2, 5, n, dtype=dt, scale=4.0)
            gate = rnd(2, 1, n, dtype=dt).tanh()
            _, hq = kernels.residual(x, o, w, 1e-5, gate, w, 1e-6, mscale, quantize_next=True)
            _, h = kernels.residual(x, o, w, 1e-5, gate, w, 1e-6, mscale)
            res[f"fused_quant_residual_{tag}_{n}"] = same_bits(hq, h)
            g13 = rnd(2, 5, 2 * n, dtype=dt, scale=3.0)
            g1, g3 = g13.chunk(2, dim=-1)
            res[f"fused_quant_silu_{tag}_{n}"] = same_bits(kernels.silu_mul(g1, g3, quantize=True),
                                                           kernels.silu_mul(g1, g3))
    # non-finite activations stay non-finite through the quantization, as with torch's (the fp16 guard and the NaN
    # errors depend on it): NaN/inf scales equal; the codes equal wherever torch's code is not NaN (Triton's
    # interpreter casts NaN to a number; the GPU's cvt keeps it), so every such row multiplies to non-finite values
    def nonfinite_case(q, s, ref_q, ref_s):
        keep = ~ref_q.float().isnan()
        w8, w_scale = quantize_rowwise(rnd(8, q.shape[1]))
        out = torch._scaled_mm(q, w8.t(), scale_a=s, scale_b=w_scale.t(), out_dtype=torch.bfloat16)
        return {"scales_equal": torch.equal(s.isnan(), ref_s.isnan()) and torch.equal(s[~s.isnan()], ref_s[~ref_s.isnan()]),
                "codes_equal": torch.equal(q.view(torch.uint8)[keep], ref_q.view(torch.uint8)[keep]),
                "nonfinite_rows": (~torch.isfinite(out.float())).any(1).tolist()}

    from zimage_core.fp8 import quantize_rowwise

    for n in (300, 17000):
        x = rnd(4, n, dtype=torch.bfloat16)
        x[1, 3], x[2, 5], x[3, 7] = float("nan"), float("inf"), float("-inf")
        res[f"quant_nonfinite_{n}"] = nonfinite_case(*kernels.quantize_rows(x), *quantize_activation_rowwise(x))
    g1, g3 = rnd(4, 300, dtype=torch.bfloat16), rnd(4, 300, dtype=torch.bfloat16)
    g1[1, 4] = float("-inf")  # silu(-inf) is NaN
    fused = kernels.silu_mul(g1, g3, quantize=True)
    res["quant_nonfinite_fused_silu"] = nonfinite_case(fused.q, fused.scale,
                                                       *quantize_activation_rowwise(kernels.silu_mul(g1, g3)))
    res["rope_calls"] = calls.get("rope", 0)  # the standalone RoPE went through blocks.rope's dispatch
    # whole blocks (modulated, unmodulated), kernels on vs off, fp32 and bf16 compute, fused and split FFN
    transformer = build_tiny_models(seed=0)[0]
    owner = TransformerWeights.of(transformer)
    dim = transformer.config.dim
    head_dim = dim // transformer.config.n_heads
    for dt in (torch.float32, torch.bfloat16):
        tag = str(dt).split(".")[-1]
        for name, fuse in (("layers.1", True), ("noise_refiner.0", False), ("context_refiner.0", True)):
            x = rnd(2, 11, dim, dtype=dt)
            ang = torch.rand(2, 11, 1, head_dim // 2, generator=g) * 6.28
            cos, sin = ang.cos(), ang.sin()
            adaln = rnd(2, min(dim, 256), dtype=dt)
            mask = torch.ones(2, 1, 1, 11, dtype=torch.bool)
            mask[1, ..., 8:] = False
            view = owner.block(name, fuse)
            if dt != torch.float32:
                view = owner.block(name, fuse, module=owner.high_precision_copy(name, owner.blocks[name], dt))
            args = (x, mask, cos, sin, adaln, view, owner.shape, False)
            before = dict(calls)
            ours = blocks.block_forward(*args)
            used = {k: calls.get(k, 0) - before.get(k, 0) for k in calls}
            ref = reference(blocks.block_forward, *args)
            res[f"block_{name}_{tag}"] = dict(_err(ours, ref), calls=used)
    # an fp8 block (row-scaled e4m3 weights, fp8 matmuls): the kernels hand three of its four matmuls their input
    # already quantized; only the attention output goes through quantize_rows. Against the torch path (kernels off,
    # torch quantization): the kernels' ulp differences move a rare value across an e4m3 rounding boundary.
    from zimage_core.blocks import Linear
    from zimage_core.fp8 import quantize_rowwise

    def fp8_view(view):
        def q(lin):
            w8, s8 = quantize_rowwise(lin.weight)
            return Linear(w8, s8, lin.bias)
        ffn = q(view.ffn) if isinstance(view.ffn, Linear) else tuple(q(f) for f in view.ffn)
        return view._replace(qkv=q(view.qkv), out=q(view.out), ffn=ffn, w2=q(view.w2))

    quantized = {"n": 0}
    plain_quantize = kernels.quantize_rows

    def counted_quantize(*a, **k):
        quantized["n"] += 1
        return plain_quantize(*a, **k)

    kernels.quantize_rows = counted_quantize
    for dt in (torch.float32, torch.bfloat16):
        tag = str(dt).split(".")[-1]
        for name, fuse in (("layers.1", True), ("noise_refiner.0", False), ("context_refiner.0", True)):
            x = rnd(2, 11, dim, dtype=dt)
            ang = torch.rand(2, 11, 1, head_dim // 2, generator=g) * 6.28
            view = fp8_view(owner.block(name, fuse))
            args = (x, None, ang.cos(), ang.sin(), rnd(2, min(dim, 256), dtype=dt), view, owner.shape, True)
            before = quantized["n"]
            ours = blocks.block_forward(*args)
            res[f"fp8_block_{name}_{tag}"] = dict(_err(ours, reference(blocks.block_forward, *args)),
                                                  quantize_rows_calls=quantized["n"] - before)
    kernels.quantize_rows = plain_quantize
    # int8 (zimage_core/int8.py): the same row quantization with 127 (round to nearest even, NaN codes 0), rotated by
    # the Hadamard groups of int8_convrot first when asked; bit for bit int8.quantize_activation_rowwise_int8 of
    # int8.hadamard_rows (the same fp32 butterflies), standalone and fused into the three kernels
    from zimage_core import int8 as i8

    def int8_ref(t, rot):
        t2 = t.reshape(-1, t.shape[-1])
        return i8.quantize_activation_rowwise_int8(i8.hadamard_rows(t2, rot) if rot else t2)

    for dt in (torch.float32, torch.bfloat16, torch.float16):
        tag = str(dt).split(".")[-1]
        for rows, n, rot in ((5, 48, None), (3, 256, 16), (4, 1024, 256), (2, 17000, None), (2, 20480, 64)):
            x = (rnd(rows, n) * torch.logspace(-3, 3, rows)[:, None]).to(dt)
            x[0] = 0
            for layout, xx in (("", x), ("_strided_rows", _strided(x, 0))):
                q, s = kernels.quantize_rows(xx, "int8", rot)
                rq, rs = int8_ref(xx, rot)
                res[f"int8quant_{tag}_{n}_{rot}{layout}"] = {
                    "scale_equal": torch.equal(s, rs), "q_equal": torch.equal(q, rq), "dtype": str(q.dtype),
                    "saturated": int((q.abs() == 127).sum())}
        # ties: amax 15.875 makes the scale exactly 0.125, so odd sixteenths land halfway between two codes
        ties = torch.tensor([[15.875] + [(2 * k + 1) / 16 * (-1) ** k for k in range(40)]], dtype=dt)
        q, s = kernels.quantize_rows(ties, "int8")
        rq, rs = int8_ref(ties, None)
        res[f"int8ties_{tag}"] = {"q_equal": torch.equal(q, rq), "scale_equal": torch.equal(s, rs),
                                  "codes": q[0, 1:9].tolist(), "scale": s.item()}

    def same_int8(got, ref_tensor, rot):
        rq, rs = int8_ref(ref_tensor, rot)
        return {"q_equal": torch.equal(got.q, rq), "scale_equal": torch.equal(got.scale, rs),
                "shape": list(got.shape) == list(ref_tensor.shape), "dtype": got.dtype == ref_tensor.dtype,
                "int8": got.q.dtype == torch.int8, "rotation": got.rotation == rot}

    for dt in (torch.float32, torch.bfloat16, torch.float16):
        tag = str(dt).split(".")[-1]
        for n, rot in ((48, None), (256, 64), (2560, 256)):
            x = rnd(2, 5, n, dtype=dt, scale=3.0)
            w = rnd(n, dtype=dt, scale=0.2) + 1
            mscale = 1.0 + rnd(2, 1, n, dtype=dt, scale=0.5)
            res[f"fused_int8_rms_{tag}_{n}"] = same_int8(
                kernels.rms_norm(x, w, 1e-6, mscale, quantize="int8", rotation=rot),
                kernels.rms_norm(x, w, 1e-6, mscale), rot)
            o = rnd(2, 5, n, dtype=dt, scale=4.0)
            gate = rnd(2, 1, n, dtype=dt).tanh()
            _, hq = kernels.residual(x, o, w, 1e-5, gate, w, 1e-6, mscale, quantize_next="int8", rotation=rot)
            _, h = kernels.residual(x, o, w, 1e-5, gate, w, 1e-6, mscale)
            res[f"fused_int8_residual_{tag}_{n}"] = same_int8(hq, h, rot)
            g13 = rnd(2, 5, 2 * n, dtype=dt, scale=3.0)
            g1, g3 = g13.chunk(2, dim=-1)
            res[f"fused_int8_silu_{tag}_{n}"] = same_int8(kernels.silu_mul(g1, g3, quantize="int8", rotation=rot),
                                                          kernels.silu_mul(g1, g3), rot)
    # non-finite rows: NaN/inf scales equal (codes of NaN 0 on both sides), and the int8 product's rows non-finite
    def int8_nonfinite(q, s, ref_q, ref_s, rot=None):
        w8, w_scale = i8.quantize_rowwise_int8(rnd(24, q.shape[1]), rot)
        rows = kernels.QuantizedRows(q, s, q.shape, torch.bfloat16, rot)
        out = i8.int8_linear(rows, w8, w_scale, None, rotation_groupsize=rot)
        return {"scales_equal": torch.equal(s.isnan(), ref_s.isnan()) and torch.equal(s[~s.isnan()], ref_s[~ref_s.isnan()]),
                "codes_equal": torch.equal(q, ref_q), "nonfinite_rows": (~torch.isfinite(out.float())).any(1).tolist()}

    for n, rot in ((320, None), (17000, None), (1024, 256)):
        x = rnd(4, n, dtype=torch.bfloat16)
        x[1, 3], x[2, 5], x[3, 7] = float("nan"), float("inf"), float("-inf")
        res[f"int8_nonfinite_{n}_{rot}"] = int8_nonfinite(*kernels.quantize_rows(x, "int8", rot), *int8_ref(x, rot), rot)
    g1, g3 = rnd(4, 320, dtype=torch.bfloat16), rnd(4, 320, dtype=torch.bfloat16)
    g1[1, 4] = float("-inf")  # silu(-inf) is NaN
    fused = kernels.silu_mul(g1, g3, quantize="int8")
    res["int8_nonfinite_fused_silu"] = int8_nonfinite(fused.q, fused.scale, *int8_ref(kernels.silu_mul(g1, g3), None))
    # the int8 product's epilogue ((acc * x_scale) * w_scale + bias, rounded once): bit for bit int8._epilogue
    acc = torch.randint(-2 ** 26, 2 ** 26, (37, 300), generator=g, dtype=torch.int32)
    xs, ws = torch.rand(37, 1, generator=g) * 1e-3, torch.rand(300, generator=g) * 1e-2
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        tag = str(dt).split(".")[-1]
        bias = rnd(300, dtype=dt)
        res[f"int8_epilogue_{tag}"] = {
            "bias": torch.equal(kernels.int8_epilogue(acc, xs, ws, bias, dt), i8._epilogue(acc, xs, ws, bias, dt)),
            "plain": torch.equal(kernels.int8_epilogue(acc, xs, ws, None, dt), i8._epilogue(acc, xs, ws, None, dt))}
    # the fused int8 matmul (int32 sums in registers, the same epilogue): bit for bit torch._int_mm + int8._epilogue,
    # for row counts under _int_mm's 17, widths that are not whole tiles, k not a whole number of tile depths, and a
    # row with a NaN scale (its output row NaN, the others untouched); a bigger tiling than the interpreter's own too
    for m, n, k in ((37, 300, 96), (5, 40, 64), (64, 64, 64), (33, 72, 200)):
        a8, a_s = i8.quantize_activation_rowwise_int8(rnd(m, k, scale=3.0))
        w8, w_s = i8.quantize_rowwise_int8(rnd(n, k))
        w_s = w_s.reshape(-1).contiguous()
        if m == 37:
            a_s[4] = float("nan")
        def same(a, b):  # bit for bit, NaN where NaN
            return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())

        for dt in (torch.float32, torch.bfloat16, torch.float16):
            bias = rnd(n, dtype=dt)
            ref = i8._epilogue(i8.int8_mm(a8, w8), a_s, w_s, bias, dt)
            res[f"int8_matmul_{m}x{n}x{k}_{str(dt).split('.')[-1]}"] = {
                "bias": same(kernels.int8_matmul(a8, a_s, w8, w_s, bias, dt), ref),
                "plain": same(kernels.int8_matmul(a8, a_s, w8, w_s, None, dt),
                              i8._epilogue(i8.int8_mm(a8, w8), a_s, w_s, None, dt)),
                "tiles_64": same(kernels.int8_matmul(a8, a_s, w8, w_s, bias, dt,
                                                     kernels.MMConfig(64, 64, 64, 2, 4, 2)), ref),
                "nan_rows": torch.isnan(ref.float()).any(1).nonzero().flatten().tolist()}
    no_rows = kernels.int8_matmul(torch.zeros(0, 64, dtype=torch.int8), torch.zeros(0, 1), w8[:, :64].contiguous(),
                                  w_s, None, torch.bfloat16)
    res["int8_matmul_no_rows"] = [list(no_rows.shape), str(no_rows.dtype)]
    # an int8 block (dim 96, FFN 256: every matmul int8-able) with the kernels against the torch path: the kernels hand
    # q/k/v, w1/w3 and w2 their input already quantized (and rotated); only the attention output is quantized apart
    from diffusers import ZImageTransformer2DModel

    from zimage_core.tiny import TINY_TRANSFORMER, randomize_, tiny_configs

    cfg96 = tiny_configs(transformer={**TINY_TRANSFORMER, "dim": 96, "n_heads": 3, "n_kv_heads": 3})[0]
    owner96 = TransformerWeights.of(randomize_(ZImageTransformer2DModel(**cfg96), 3).eval())

    def int8_view(view, rot):
        def q(lin):
            w8, s8 = i8.quantize_rowwise_int8(lin.weight, rot)
            return Linear(w8, s8, lin.bias, rot)
        ffn = q(view.ffn) if isinstance(view.ffn, Linear) else tuple(q(f) for f in view.ffn)
        return view._replace(qkv=q(view.qkv), out=q(view.out), ffn=ffn, w2=q(view.w2))

    counts = {"quantize_rows": 0, "int8_matmul": 0}
    plain = {k: getattr(kernels, k) for k in counts}

    def counter(name):
        def run(*a, **k):
            counts[name] += 1
            return plain[name](*a, **k)
        return run

    for k in counts:
        setattr(kernels, k, counter(k))
    for dt in (torch.float32, torch.bfloat16):
        tag = str(dt).split(".")[-1]
        for name, fuse in (("layers.1", True), ("noise_refiner.0", False), ("context_refiner.0", True)):
            for rot in (None, 16):
                x = rnd(2, 11, 96, dtype=dt)
                ang = torch.rand(2, 11, 1, 16, generator=g) * 6.28
                view = int8_view(owner96.block(name, fuse), rot)  # fp32 norms/adaLN: cast at use, as fp8's
                args = (x, None, ang.cos(), ang.sin(), rnd(2, 96, dtype=dt), view, owner96.shape, True)
                before = dict(counts)
                ours = blocks.block_forward(*args)
                res[f"int8_block_{name}_{tag}_{rot}"] = dict(
                    _err(ours, reference(blocks.block_forward, *args)),
                    **{k: counts[k] - before[k] for k in counts})
    # the same int8 block with every weight handed out around its use (blocks.Fetched: how the Accelerate node gets
    # ComfyUI's streamed or quantized weights): the kernels' quantized rows reach fetched int8 weights, the result is
    # bit for bit the plain view's, at most two weights are held at once and every one is given back
    class Held(blocks.Fetched):
        live = peak = 0

        def __init__(self, value, dtype, rotation=None, shape=()):
            self.value, self.dtype, self.rotation, self.shape = value, dtype, rotation, shape

        def get(self, x):
            assert torch.is_tensor(x) and x.dtype in (torch.float32, torch.bfloat16), type(x)
            Held.live += 1
            Held.peak = max(Held.peak, Held.live)
            return self.value

        def done(self):
            Held.live -= 1

    def held_view(view, dt):
        lin = lambda l: Held(l, l.weight.dtype, l.rotation, tuple(l.weight.shape))  # noqa: E731
        ffn = lin(view.ffn) if isinstance(view.ffn, Linear) else tuple(lin(f) for f in view.ffn)
        return blocks.BlockWeights(lin(view.modulation) if view.modulation is not None else None,
                                   tuple(Held(n, dt) for n in view.norms), lin(view.qkv), lin(view.out), ffn,
                                   lin(view.w2))

    for rot in (None, 16):
        x = rnd(2, 11, 96, dtype=torch.bfloat16)
        ang = torch.rand(2, 11, 1, 16, generator=g) * 6.28
        view = int8_view(owner96.block("layers.1", False), rot)
        args = (x, None, ang.cos(), ang.sin(), rnd(2, 96, dtype=torch.bfloat16))
        before = dict(counts)
        Held.live = Held.peak = 0
        fetched = blocks.block_forward(*args, held_view(view, torch.bfloat16), owner96.shape, True)
        res[f"int8_block_fetched_{rot}"] = {
            "equal": torch.equal(fetched, blocks.block_forward(*args, view, owner96.shape, True)),
            "live": Held.live, "peak": Held.peak, **{k: counts[k] - before[k] for k in counts}}
    for k, fn in plain.items():
        setattr(kernels, k, fn)
    # under torch.compile the row kernels step aside (dynamo traces the plain torch ops, which inductor fuses) and
    # the q/k norm + RoPE is our kernel as one opaque op (kernels.qk_norm_rope_op); backend "eager" runs the traced
    # graph as it is, inductor (C++ on the CPU) calls the op from its generated code
    ang = torch.rand(2, 11, 1, head_dim // 2, generator=g) * 6.28
    qkv = rnd(2, 11, 3, 2, head_dim, dtype=torch.bfloat16)
    wq, wk = rnd(head_dim, dtype=torch.bfloat16) + 1, rnd(head_dim, dtype=torch.bfloat16) + 1
    res["qk_op_opcheck"] = {k: str(v) for k, v in torch.library.opcheck(
        torch.ops.zimage.qk_norm_rope.default, (qkv, wq, wk, 1e-5, ang.cos(), ang.sin())).items()}
    for dt, backend in ((torch.float32, "eager"), (torch.bfloat16, "eager"), (torch.float32, "inductor")):
        tag = str(dt).split(".")[-1]
        args = (rnd(2, 11, dim, dtype=dt), None, ang.cos(), ang.sin(), rnd(2, min(dim, 256), dtype=dt),
                owner.block("layers.0"), owner.shape, False)
        if dt != torch.float32:
            args = args[:5] + (owner.block("layers.0", module=owner.high_precision_copy(
                "layers.0", owner.blocks["layers.0"], dt)),) + args[6:]
        torch._dynamo.reset()
        before = dict(calls)
        with torch.no_grad():  # inference, as the samplers run it (with gradients on, the traced torch ops stay)
            compiled = torch.compile(blocks.block_forward, backend=backend, fullgraph=True)(*args)
        res[f"compiled_{backend}_{tag}"] = dict(_err(compiled, reference(blocks.block_forward, *args)),
                                                calls={k: calls.get(k, 0) - before.get(k, 0) for k in calls})
    # and with the kernels switched off, the dispatch calls none of them
    before = dict(calls)
    with kernels.enabled(False):
        blocks.block_forward(*args)
    res["off"] = {"calls": {k: calls.get(k, 0) - before.get(k, 0) for k in calls}}
    return res


# ------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def measured() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", ZIMAGE_KERNELS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _within(m: dict, dtype: str, fp32_tol: float = 1e-5):
    assert m["finite"], m
    if dtype == "float32":
        assert m["max_abs"] <= fp32_tol, m
    else:  # the reference's roundings, made in the same places: at most one ulp where fp32 sat on a boundary
        assert m["max_ulps"] <= 1.0 + 1e-9, m
        assert m["unequal"] <= 0.02, m


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_rms_norm_matches_reference(measured, dtype):
    keys = [k for k in measured if k.startswith(f"rms_{dtype}_") or k == f"rms_scale_{dtype}"]
    assert len(keys) == 10, keys
    for k in keys:
        _within(measured[k], dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_gated_residual_and_next_norm_match_reference(measured, dtype):
    for k in ("residual", "residual_next", "residual_plain", "residual_next_noscale"):
        _within(measured[f"{k}_{dtype}"], dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_silu_mul_matches_reference(measured, dtype):
    _within(measured[f"silu_mul_{dtype}"], dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_qk_norm_rope_matches_reference(measured, dtype):
    for heads, d in ((3, 16), (5, 32), (1, 8)):
        for part in ("q", "k", "strided"):
            _within(measured[f"qk_rope_{dtype}_{heads}x{d}_{part}"], dtype)
        _within(measured[f"rope_{dtype}_{heads}x{d}"], dtype)
        layout = measured[f"qk_rope_{dtype}_{heads}x{d}_layout"]
        assert layout == {"contiguous": True, "shape": [2, 7, heads, d]}  # [B, S, H, D], as the reference
    assert measured["rope_calls"] == 9  # 3 dtypes x 3 shapes, each through blocks.rope's dispatch


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["layers.1", "noise_refiner.0", "context_refiner.0"])
def test_block_forward_with_kernels_matches_without(measured, dtype, name):
    m = measured[f"block_{name}_{dtype}"]
    # every fused spot was taken: first norm, q/k norm + RoPE, residual (x2), SiLU·gate
    used = {k: v for k, v in m["calls"].items() if v}
    assert used == {"rms_norm": 1, "qk_norm_rope": 1, "_qk_planes": 1, "residual": 2, "silu_mul": 1}, m["calls"]
    assert m["finite"], m
    if dtype == "float32":
        assert m["max_abs"] <= 1e-5, m
    else:  # rare one-ulp differences, carried through the matmuls: far below bf16's own noise (eps 7.8e-3)
        assert m["rel_l2"] <= 1e-3, m


def test_fp8_row_quantization_is_bit_exact(measured):
    keys = [k for k in measured if k.startswith("quant_") and not k.startswith("quant_nonfinite")]
    assert len(keys) == 24, keys
    for k in keys:
        m = measured[k]
        assert m["scale_equal"] and m["q_equal"] and m["dtype"] == "torch.float8_e4m3fn", (k, m)
    assert sum(measured[k]["subnormals"] for k in keys) > 0  # the subnormal rounding was exercised


def test_fp8_quantization_keeps_non_finite_rows_non_finite(measured):
    for k in ("quant_nonfinite_300", "quant_nonfinite_17000"):
        m = measured[k]
        assert m["scales_equal"] and m["codes_equal"], (k, m)
        assert m["nonfinite_rows"] == [False, True, True, True], (k, m)  # NaN, +inf and -inf rows
    m = measured["quant_nonfinite_fused_silu"]
    assert m["scales_equal"] and m["codes_equal"] and m["nonfinite_rows"] == [False, True, False, False], m


def test_fused_fp8_quantization_is_bit_exact(measured):
    keys = [k for k in measured if k.startswith("fused_quant_")]
    assert len(keys) == 12, keys
    for k in keys:
        m = measured[k]
        assert m["q_equal"] and m["scale_equal"] and m["shape"] and m["dtype"], (k, m)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["layers.1", "noise_refiner.0", "context_refiner.0"])
def test_fp8_block_with_kernels_matches_torch(measured, dtype, name):
    m = measured[f"fp8_block_{name}_{dtype}"]
    assert m["quantize_rows_calls"] == 1, m  # the attention output; the other three came quantized from kernels
    assert m["finite"], m
    assert m["rel_l2"] <= 2e-2, m  # fp8 matmuls of inputs that differ by kernel ulps (rare e4m3 flips)


def test_int8_row_quantization_is_bit_exact(measured):
    keys = [k for k in measured if k.startswith("int8quant_")]
    assert len(keys) == 30, keys
    for k in keys:
        m = measured[k]
        assert m["scale_equal"] and m["q_equal"] and m["dtype"] == "torch.int8", (k, m)
    assert sum(measured[k]["saturated"] for k in keys) >= 30  # every row's largest value maps to ±127
    for dt in ("float32", "bfloat16", "float16"):
        m = measured[f"int8ties_{dt}"]
        assert m["q_equal"] and m["scale_equal"] and m["scale"] == 0.125, m
        assert m["codes"] == [0, -2, 2, -4, 4, -6, 6, -8], m  # 0.5, 1.5, 2.5, ... to the even neighbour


def test_fused_int8_quantization_is_bit_exact(measured):
    keys = [k for k in measured if k.startswith("fused_int8_")]
    assert len(keys) == 27, keys
    for k in keys:
        assert all(measured[k].values()), (k, measured[k])


def test_int8_quantization_keeps_non_finite_rows_non_finite(measured):
    for k in ("int8_nonfinite_320_None", "int8_nonfinite_17000_None", "int8_nonfinite_1024_256"):
        m = measured[k]
        assert m["scales_equal"] and m["codes_equal"], (k, m)
        assert m["nonfinite_rows"] == [False, True, True, True], (k, m)
    m = measured["int8_nonfinite_fused_silu"]
    assert m["scales_equal"] and m["codes_equal"] and m["nonfinite_rows"] == [False, True, False, False], m


def test_int8_epilogue_is_bit_exact(measured):
    for dt in ("float32", "bfloat16", "float16"):
        assert measured[f"int8_epilogue_{dt}"] == {"bias": True, "plain": True}, dt


def test_int8_matmul_is_bit_exact(measured):
    """``kernels.int8_matmul`` (one kernel: int8 dot, int32 sums, fp32 epilogue) gives torch._int_mm + the torch
    epilogue's bits, whatever the tiling; a NaN row scale makes that row NaN and no other."""
    assert measured["int8_matmul_no_rows"] == [[0, 72], "torch.bfloat16"]
    cases = [k for k in measured if k.startswith("int8_matmul_") and k != "int8_matmul_no_rows"]
    assert len(cases) == 12, cases
    for key in cases:
        m = measured[key]
        assert m["bias"] and m["plain"] and m["tiles_64"], (key, m)
        assert m["nan_rows"] == ([4] if key.startswith("int8_matmul_37x") else []), (key, m)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["layers.1", "noise_refiner.0", "context_refiner.0"])
@pytest.mark.parametrize("rot", ["None", "16"])
def test_int8_block_with_kernels_matches_torch(measured, dtype, name, rot):
    m = measured[f"int8_block_{name}_{dtype}_{rot}"]
    assert m["quantize_rows"] == 1, m  # the attention output; the other inputs came quantized from the kernels
    assert m["int8_matmul"] == (5 if name == "noise_refiner.0" else 4), m  # every matmul in int8 (w1/w3 fused or not)
    assert m["finite"], m
    # int8 matmuls of inputs that differ by kernel ulps: measured 0 to 1e-7 (fp32), 0 (bf16) but one case at 2.0e-4
    # where a bf16 ulp moved a value across an int8 rounding boundary
    assert m["rel_l2"] <= 2e-3, m


@pytest.mark.parametrize("rot", ["None", "16"])
def test_fetched_int8_weights_take_the_kernels_quantized_rows(measured, rot):
    """Weights fetched around their use (the Accelerate node's ComfyUI weights): the same bits as the plain view, the
    inputs quantized by the kernels reach them (one separate quantization: the attention output), at most two held
    at once, all given back."""
    m = measured[f"int8_block_fetched_{rot}"]
    assert m["equal"] and m["live"] == 0 and 1 <= m["peak"] <= 2, m
    assert m["quantize_rows"] == 2, m  # one per run (fetched and plain): the attention output


@pytest.mark.parametrize("case", ["eager_float32", "eager_bfloat16", "inductor_float32"])
def test_compiled_block_takes_only_the_qk_kernel(measured, case):
    """Compiled, the block calls our q/k norm + RoPE kernel once, through the custom op, and no row kernel."""
    m = measured[f"compiled_{case}"]
    used = {k: v for k, v in m["calls"].items() if v}
    assert used == {"_qk_planes": 1}, m["calls"]
    assert m["finite"], m
    if case.endswith("float32"):
        assert m["max_abs"] <= 1e-5, m
    else:
        assert m["rel_l2"] <= 1e-3, m


def test_qk_op_passes_opcheck(measured):
    """The custom op's schema, fake (meta) implementation and dispatch agree with what the kernel returns."""
    checks = measured["qk_op_opcheck"]
    assert checks and all(v == "SUCCESS" for v in checks.values()), checks


def test_kernels_step_aside_when_off(measured):
    assert all(v == 0 for v in measured["off"]["calls"].values()), measured["off"]


def _compile_for(fn, types: dict, consts: dict, warps: int, capability: int, stages: int | None = None,
                 aligned: tuple = ()):
    """``fn`` compiled (not run) by Triton for an NVIDIA GPU of ``capability`` (ptxas ships with Triton): the GPU
    code path, which the interpreter never builds. Untyped arguments are int32 scalars; ``aligned`` names the
    arguments Triton's launcher would find divisible by 16 (it specializes on that when it runs)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: "constexpr" if name in consts else types.get(name, "i32") for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    options = {"num_warps": warps, **({"num_stages": stages} if stages else {})}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", capability, 32), options=options)


@pytest.mark.parametrize("capability", [90, 80])
def test_int8_matmul_compiles_to_tensor_cores(capability):
    """At the model's shapes (every size and stride a multiple of 16) the fused int8 matmul builds to int8 tensor
    core instructions (Hopper's wgmma, Ampere's mma.sync) fed by an asynchronous copy pipeline, for every tiling
    ``mm_config`` can pick that fits the card (an H100's 227 KiB of shared memory, an RTX 3090's 99 KiB)."""
    from zimage_core import kernels

    if not kernels.available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs Triton, compiled (not interpreted)")
    types = {"a_ptr": "*i8", "b_ptr": "*i8", "xs_ptr": "*fp32", "ws_ptr": "*fp32", "bias_ptr": "*bf16",
             "out_ptr": "*bf16"}
    aligned = (*types, "n", "k", "sa", "sb", "so")
    limit = 227 * 1024 if capability == 90 else 99 * 1024
    configs = [c for c in kernels.MM_CONFIGS if c.shared_bytes() <= limit and c.bm >= 64]
    assert configs
    for c in configs:
        consts = {"HAS_BIAS": True, "EVEN_K": True, "BM": c.bm, "BN": c.bn, "BK": c.bk, "GROUP_M": c.group_m}
        built = _compile_for(kernels._int8_mm_kernel, types, consts, c.warps, capability, c.stages, aligned)
        ptx = built.asm["ptx"]
        assert ("wgmma.mma_async" in ptx) if capability == 90 else ("mma.sync.aligned" in ptx and ".s8.s8" in ptx), c
        assert "cp.async" in ptx and built.asm["ttgir"].count("async_copy") >= 2, c  # pipelined, not byte loads
        assert built.metadata.shared <= min(limit, c.shared_bytes() + 256), c  # the estimate bounds it (sm_80: one
        # stage fewer of buffers than asked, Triton's Ampere pipeliner)


@pytest.mark.parametrize("capability,quant,rot", [(90, 1, 0), (90, 2, 0), (90, 2, 256), (80, 2, 256)])
def test_quantizing_kernels_compile_for_the_gpu(capability, quant, rot):
    """The fp8/int8 quantizing kernels (with the Hadamard rotation's reshapes, permutes, splits and joins) build for
    an H100/H200 (sm_90) and an A100 (sm_80, int8 only), at the real widths (3840 -> 4096 lanes, 10240 -> 16384)."""
    from zimage_core import kernels

    if not kernels.available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs Triton, compiled (not interpreted)")
    code = "*fp8e4nv" if quant == 1 else "*i8"
    strides = lambda *names: {n: "i64" for n in names}  # noqa: E731
    rms = {"x_ptr": "*bf16", "w_ptr": "*fp32", "s_ptr": "*bf16", "y_ptr": code, "qs_ptr": "*fp32", "eps": "fp32",
           **strides("xs0", "xs1", "xs2", "ss0", "ss1", "ss2")}
    res = {"x_ptr": "*bf16", "o_ptr": "*bf16", "w_ptr": "*fp32", "g_ptr": "*bf16", "w2_ptr": "*fp32", "s2_ptr": "*bf16",
           "out_ptr": "*bf16", "h_ptr": code, "qs_ptr": "*fp32", "eps": "fp32", "eps2": "fp32",
           **strides("xs0", "xs1", "xs2", "os0", "os1", "os2", "gs0", "gs1", "gs2", "ss0", "ss1", "ss2")}
    silu = {"a_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": code, "qs_ptr": "*fp32",
            **strides("as0", "as1", "as2", "bs0", "bs1", "bs2")}
    rows = {"x_ptr": "*bf16", "q_ptr": code, "s_ptr": "*fp32", "xs": "i64", "qs": "i64"}
    q = {"QUANT": quant, "ROT": rot}
    built = [
        _compile_for(kernels._rms_kernel, rms, {"HAS_SCALE": True, **q, "BLOCK": 4096}, 4, capability),
        _compile_for(kernels._residual_kernel, res, {"HAS_GATE": True, "HAS_NEXT": True, "HAS_SCALE": True, **q,
                                                     "BLOCK": 4096}, 4, capability),
        _compile_for(kernels._silu_mul_kernel, silu, {**q, "BLOCK": 16384}, 16, capability),
        _compile_for(kernels._quant_rows_kernel, rows, {**q, "BLOCK": 4096, "SINGLE": True}, 4, capability),
        _compile_for(kernels._quant_rows_kernel, rows, {**q, "BLOCK": 16384, "SINGLE": False}, 16, capability),
    ]
    if quant == 2:
        epi = {"acc_ptr": "*i32", "xs_ptr": "*fp32", "ws_ptr": "*fp32", "b_ptr": "*bf16", "out_ptr": "*bf16"}
        built.append(_compile_for(kernels._int8_epilogue_kernel, epi, {"HAS_BIAS": True, "BM": 32, "BN": 128}, 4,
                                  capability))
    assert all("cubin" in k.asm for k in built)


def test_kernels_off_on_the_cpu_by_default():
    """Without the interpreter (this process), CPU tensors never take the kernels: the torch code runs."""
    from zimage_core import kernels

    assert not kernels.active(torch.zeros(2, 4))
    with kernels.enabled(True):  # forced on, still not on the CPU without the interpreter
        assert kernels.active(torch.zeros(2, 4)) == (os.environ.get("TRITON_INTERPRET") == "1" and kernels.available())
    with pytest.raises(ValueError, match="auto"):
        kernels.set_mode("fast")


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through pytest (it sets TRITON_INTERPRET=1)"
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    print(json.dumps(_checks()))
