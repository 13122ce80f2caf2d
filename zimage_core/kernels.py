"""Fused Triton kernels for the eager (uncompiled) transformer path.

Why: an eager bf16 step at 1024² spent ~75 of its ~150 ms in unfused elementwise kernels (H200 profile,
``benchmarks/results/raw/eager_step_profile_h200.txt``): every RMSNorm is six passes over the activations in fp32
(float, pow, mean, rsqrt, to, mul), RoPE five more on q and on k, and the modulation multiply, tanh gate,
residual add and SiLU·gate one pass each. Each kernel here reads its inputs once and writes its result once.
Measured on the H200 (``benchmarks/results/eager_kernels_h200.json``): 8 steps at 1024² take 0.747 s instead of
1.256 s (torch.compile'd: ~0.78 s; native ComfyUI eager: 0.94 s); what is left of the step is matmuls and
attention (``benchmarks/results/raw/eager_step_profile_kernels_h200.txt``). Per call at the real shapes these
kernels move 3.3-4.1 TB/s, as fast as inductor's fusions of the same ops or faster (q/k norm + RoPE 35 us against
inductor's 138 us; RMSNorm·(1+scale) 20 against 23; gated residual + next norm 39 against 38).

Which kernels (``benchmarks/bench_eager.py`` times each against the torch reference and its ``torch.compile``):

- ``rms_norm(x, w, eps, scale)``: RMSNorm, optionally times the ``(1 + scale)`` modulation.
- ``qk_norm_rope(qkv, wq, wk, eps, cos, sin)``: the q and k RMSNorms and RoPE, read straight out of the
  ``[B, S, 3, H, D]`` qkv matmul result, written as ``[B, S, H, D]`` (the layout the reference hands SDPA,
  transposed to ``[B, H, S, D]`` as a view). ``rope(x, cos, sin)`` is the same kernel without the norm.
- ``residual(x, o, w, eps, gate, w_next, scale_next)``: ``x + gate * rms(o, w)`` and, fused in the same pass,
  the next norm ``rms(x_new, w_next) * scale_next`` (the FFN's input), so ``x_new`` is not read again.
- ``silu_mul(g1, g3)``: ``silu(g1) * g3`` on the (possibly strided) halves of the fused w1/w3 matmul.
- ``quantize_rows(x)``: the fp8 matmul's row-wise activation quantization (amax, scale, e4m3 cast) in one kernel,
  equal to ``fp8.quantize_activation_rowwise`` (40 ms of torch passes per 1024² step before, on the H200).
- ``rms_norm``, ``residual`` (its next norm) and ``silu_mul`` can write their result that way themselves
  (``quantize=True``: ``QuantizedRows``, e4m3 rows and fp32 scales), so three of a block's four fp8 matmuls get
  their input without another pass (8 fp8 steps at 1024² on the H200: 0.577 s before, 0.560 s after, two runs).
- The same for int8 W8A8 (``int8.int8_linear``): ``quantize="int8"`` (scale amax/127, round to nearest even), and
  ``rotation=G`` rotates each group of G columns by the regular Hadamard matrix first (Comfy-Org's int8_convrot;
  a radix-4 fast transform in registers, ``_hadamard``), in the same kernel; ``quantize_rows(x, "int8", G)``
  for the attention output. Bit for bit the torch reference under the interpreter; they compile for sm_80/sm_90.
- ``int8_matmul``: the int8 product and its epilogue (row scale, column scale, bias, one rounding) in one kernel,
  so the int32 sums stay in registers (``torch._int_mm`` writes them, 4 bytes an element, and ``int8_epilogue``
  read them back: on the H100 that pair ran at 600-780 TOPS against ``_int_mm``'s 740-890 alone,
  ``benchmarks/results/lowp_h100.json``); in one kernel a step's int8 GEMMs take 50.8 ms instead of 70.5
  (``lowp_int8mm_h100.json``). Bit for bit ``_int_mm`` + the torch epilogue under the interpreter and on the H100;
  builds to wgmma (sm_90) and mma.sync (sm_80) behind a cp.async pipeline (tests/test_kernels.py).

Numerics: the statistics are in fp32 and every rounding the torch reference (``blocks.rms``/``blocks.rope``,
diffusers' order of operations) makes to the compute dtype is made here too, in registers: rms result rounded,
times the weight rounded, times ``(1 + scale)`` rounded; rope in fp32 from the rounded norm, rounded once; gate
product rounded, then the residual sum rounded; silu rounded before the multiply. What differs from torch eager:
the order of the fp32 sum of squares (a tree in one program instead of torch's reduction kernel), the hardware
rsqrt, and Triton may contract ``a*b - c*d`` in RoPE into an fma. Each is ≤ a few fp32 ulps before the rounding
to bf16, so a bf16 result differs from the reference by at most one bf16 ulp, and only where the fp32 value sat
on a rounding boundary (tests/test_kernels.py, Triton's interpreter: bf16/fp16 bit for bit, fp32 to 1e-6; on the
H200, 2e-6 of the gated residual's elements differ by one ulp, rel-L2 1.5e-5 from the reference, where
``torch.compile`` of the same ops, which skips the intermediate roundings, is 2e-3 to 4e-3 away).

When: only on CUDA tensors (or on the CPU under Triton's interpreter, ``TRITON_INTERPRET=1``, when forced on —
the tests), only when Triton imports, never for tensors that need gradients. While ``torch.compile`` traces
(``torch.compiler.is_compiling()``) the row kernels step aside, since inductor fuses those plain torch ops as fast
itself; the q/k norm + RoPE, where inductor's fusion took 4x our kernel's time, is called from the compiled graph
as one custom op (``qk_norm_rope_op``, ``in_graph``; H200, 8 steps at 1024²: compiled blocks 0.791 -> 0.765 s,
``benchmarks/results/native_h200.json``).
``ZIMAGE_KERNELS=0`` turns them off, ``=1`` forces them on (the interpreter tests); ``enabled(...)`` does the
same from code. Shapes the kernels don't cover (a head dim that is not a power of two, more than four dims) fall
back to the torch code, silently and correctly.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl

    _TRITON = True
except Exception:  # pragma: no cover - depends on the install
    _TRITON = False

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MODE = {"0": "off", "1": "on"}.get(os.environ.get("ZIMAGE_KERNELS", ""), "auto")


def available() -> bool:
    """Whether the fused kernels can run at all here (Triton importable)."""
    return _TRITON


def set_mode(mode: str) -> None:
    """``"auto"`` (CUDA tensors only), ``"on"`` (also CPU tensors under ``TRITON_INTERPRET=1``) or ``"off"``."""
    global _MODE
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"kernel mode {mode!r}: use 'auto', 'on' or 'off'")
    _MODE = mode


@contextlib.contextmanager
def enabled(on: bool | None = True):
    """Kernels forced on (``True``), off (``False``) or automatic (``None``) inside the block."""
    previous = _MODE
    set_mode("auto" if on is None else ("on" if on else "off"))
    try:
        yield
    finally:
        set_mode(previous)


def active(x: torch.Tensor) -> bool:
    """Whether the block maths should take the fused kernels for activations ``x``."""
    if torch.compiler.is_compiling() or _MODE == "off" or not _TRITON:  # first: dynamo folds it, no guards
        return False
    if x.dtype not in _DTYPES or (x.requires_grad and torch.is_grad_enabled()):
        return False
    if x.is_cuda:
        return True
    return _MODE == "on" and _INTERPRET and x.device.type == "cpu"


def in_graph(x: torch.Tensor) -> bool:
    """Whether ``torch.compile`` is tracing activations ``x`` that ``qk_norm_rope_op`` should handle: inductor's
    fusion of the q/k norms and RoPE took 138 us a call on the H200 against our kernel's 35 us (the other kernels
    here run at inductor's speed, so inductor keeps fusing those ops itself). Inference only: the op has no
    backward, so with gradients enabled the traced torch ops stay."""
    if not torch.compiler.is_compiling() or _MODE == "off" or not _TRITON:
        return False
    if x.dtype not in _DTYPES or torch.is_grad_enabled():
        return False
    return x.is_cuda or (_MODE == "on" and _INTERPRET and x.device.type == "cpu")


# ------------------------------------------------------------------------------------------------ helpers
def _lead3(t: torch.Tensor, shape: torch.Size) -> tuple[int, int, int]:
    """Strides of ``t`` broadcast to ``shape`` (``[*lead, N]``, at most 3 leading dims), leading dims padded to 3."""
    t = t.expand(shape)
    st = list(t.stride()[:-1])
    return tuple([0] * (3 - len(st)) + st)


def _sizes3(shape) -> tuple[int, int, int]:
    lead = list(shape[:-1])
    return tuple([1] * (3 - len(lead)) + lead)


def _last_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _warps(block: int) -> int:
    """Warps per program: 4 was fastest or within 4% at the real widths on the H200 (2, 4, 8, 16 swept by
    benchmarks/bench_eager.py: e.g. the gated residual + next norm 55/51/51/54 us)."""
    return 4 if block >= 1024 else 2 if block >= 256 else 1


def rows_ok(x: torch.Tensor) -> bool:
    """The row kernels cover 1 to 4 dims."""
    return 1 <= x.dim() <= 4 and x.numel() > 0


_BITS_ROUNDING = _INTERPRET or torch.version.hip is not None  # the CUDA version below is PTX

if _TRITON and _BITS_ROUNDING:

    @triton.jit
    def _round(x, DT: tl.constexpr):
        """``x`` (fp32) rounded to the compute dtype ``DT`` and back, as torch stores each intermediate: bf16 to
        nearest even on the bits (Triton's CPU interpreter truncates in its bf16 cast, 3.8's ``_convert_float``)."""
        if DT == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
        elif DT == tl.float16:
            return x.to(tl.float16).to(tl.float32)
        else:
            return x

elif _TRITON:

    @triton.jit
    def _round(x, DT: tl.constexpr):
        """``x`` (fp32) rounded to the compute dtype ``DT`` (to nearest even) and back, by one ``cvt.rn`` each.
        Why PTX: with a plain ``x.to(bf16).to(fp32)`` the compiler dropped some of the round trips on the H200 (the
        gated residual then differed from torch in 22% of its elements, by one ulp); the bit version above is
        exact too but ~5 integer ops a rounding, which made the row kernels ~2x slower (compute-bound). bf16 uses
        the paired ``cvt.rn.bf16x2.f32`` (gated residual + next norm 39 us; 50 us one value per instruction).
        fp16 (one per instruction) was checked for exactness on the H200, not tuned."""
        if DT == tl.bfloat16:
            return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=tl.bfloat16,
                                             is_pure=True, pack=2).to(tl.float32)
        elif DT == tl.float16:
            return tl.inline_asm_elementwise("cvt.rn.f16.f32 $0, $1;", "=h,r", [x], dtype=tl.float16,
                                             is_pure=True, pack=1).to(tl.float32)
        else:
            return x

if _TRITON:

    @triton.jit
    def _e4m3(y):
        """``y`` (fp32, |y| ≤ 448) rounded to e4m3's grid (to nearest even) on the bits, so that the cast after it
        is exact whatever the backend's own rounding: Triton's interpreter halves values whose rounding carries
        into the exponent (127.0 became 64). Normals keep 3 mantissa bits; below 2**-6 the subnormal step is 2**-9
        (the magnitude rounded by adding and subtracting 1.5 * 2**14, the sign bit put back: tiny negatives and -0.0
        give -0.0, as torch's; the H200's cast then still writes -0.0 as +0)."""
        bits = y.to(tl.uint32, bitcast=True)
        normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
        small = (tl.abs(y) + 24576.0) - 24576.0
        rounded = tl.where(tl.abs(y) < 0.015625, tl.where((bits >> 31) != 0, -small, small), normal)  # sign kept
        return tl.where(y != y, y, rounded)  # NaN stays NaN (the carry above would wrap a NaN's bits to 0)

    @triton.jit
    def _max_nan(a, b):
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _scale_of(amax, RECIPROCAL: tl.constexpr):
        """The row scale as torch computes it (NaN and inf carried through, as ``clamp``/``amax`` do)."""
        return tl.maximum(amax, 1e-12, propagate_nan=tl.PropagateNan.ALL) * RECIPROCAL

    @triton.jit
    def _clamp_nan(y, MAX: tl.constexpr):
        """``clamp(y, -MAX, MAX)`` that keeps NaN (Triton's min/max drop it by default; torch's clamp keeps it)."""
        return tl.minimum(tl.maximum(y, -MAX, propagate_nan=tl.PropagateNan.ALL), MAX,
                          propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _rint(y):
        """``y`` (fp32, |y| < 2**22) rounded to the nearest integer, ties to even, as ``torch.round``: adding and
        subtracting 1.5 * 2**23 leaves no fraction bits; IEEE addition rounds to nearest even (the same trick as
        ``_e4m3``'s subnormals). The caller's clamp sits between the multiply and this add, so no fma contracts
        them. NaN stays NaN."""
        return (y + 12582912.0) - 12582912.0

    @triton.jit
    def _h4_stage(y, A: tl.constexpr, B: tl.constexpr):
        """One radix-4 stage of the regular Hadamard transform on ``y`` [A * 4 * B]: on the digit of stride ``B``,
        ``out_i = (s - 2 * x_(3 - i)) * 0.5`` with ``s = (x0 + x1) + (x2 + x3)`` (the rows of the normalised
        [[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]] / 2). ``int8.hadamard_rows`` makes the same fp32 operations in
        the same order, so both round alike (the times 2 and the halving are exact)."""
        t = tl.permute(tl.reshape(y, (A, 4, B)), (0, 2, 1))  # [A, B, 4]: the digit last
        even, odd = tl.split(tl.reshape(t, (A, B, 2, 2)))  # [x0, x2], [x1, x3]
        x0, x2 = tl.split(even)
        x1, x3 = tl.split(odd)
        s = (x0 + x1) + (x2 + x3)
        y0, y1, y2, y3 = (s - 2.0 * x3) * 0.5, (s - 2.0 * x2) * 0.5, (s - 2.0 * x1) * 0.5, (s - 2.0 * x0) * 0.5
        t = tl.reshape(tl.join(tl.join(y0, y2), tl.join(y1, y3)), (A, B, 4))  # index 2j + i holds y_(2j+i)
        return tl.reshape(tl.permute(t, (0, 2, 1)), (A * 4 * B,))

    @triton.jit
    def _hadamard(y, BLOCK: tl.constexpr, G: tl.constexpr):
        """``y`` [BLOCK] times the normalised regular Hadamard matrix of size ``G`` (a power of 4, 4..4096) on each
        group of ``G`` consecutive values: the rotation of Comfy-Org's int8_convrot layers (``quantized.hadamard``),
        as a fast transform (one stage per base-4 digit, lowest first)."""
        y = _h4_stage(y, BLOCK // 4, 1)
        if G >= 16:
            y = _h4_stage(y, BLOCK // 16, 4)
        if G >= 64:
            y = _h4_stage(y, BLOCK // 64, 16)
        if G >= 256:
            y = _h4_stage(y, BLOCK // 256, 64)
        if G >= 1024:
            y = _h4_stage(y, BLOCK // 1024, 256)
        if G >= 4096:
            y = _h4_stage(y, BLOCK // 4096, 1024)
        return y

    @triton.jit
    def _codes(y, inverse, QUANT: tl.constexpr):
        """The stored codes of fp32 values ``y`` times their row's ``inverse`` scale: e4m3 (QUANT 1: clamp to 448,
        round on e4m3's grid) or int8 (QUANT 2: clamp to 127, round to nearest even; a NaN, whose row scale is NaN
        or inf anyway, stores 0 — torch's own cast of NaN to int8 is undefined)."""
        if QUANT == 1:
            return _e4m3(_clamp_nan(y * inverse, 448.0))
        else:
            r = _rint(_clamp_nan(y * inverse, 127.0))
            return tl.where(r != r, 0.0, r)

    @triton.jit
    def _store_quant_row(y, q_ptr, s_ptr, row, offs, mask, QUANT: tl.constexpr, ROT: tl.constexpr,
                         BLOCK: tl.constexpr):
        """Store row ``y`` at ``q_ptr`` (the row's start; fp32 values of the compute dtype, masked lanes 0) quantized
        with its row scale, as ``quantize_rows`` does: rotated first when ``ROT`` (int8 only, groups of ``ROT``
        columns), scale = max(amax, 1e-12) * fp32(1/448 or 1/127), codes of y * (1/scale) (``_codes``)."""
        if ROT > 0:
            y = _hadamard(y, BLOCK, ROT)
        if QUANT == 1:
            scale = _scale_of(tl.reduce(tl.abs(y), 0, _max_nan), 1.0 / 448.0)
        else:
            scale = _scale_of(tl.reduce(tl.abs(y), 0, _max_nan), 1.0 / 127.0)
        tl.store(s_ptr + row, scale)
        q = _codes(y, tl.math.div_rn(1.0, scale), QUANT)
        tl.store(q_ptr + offs, q.to(q_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _row_index(n1, n2):
        """This program's row and its indices in the (up to) three leading dims: int32 index maths (cheap), int64
        results (offsets into large tensors)."""
        row = tl.program_id(0)
        i2 = (row % n2).to(tl.int64)
        i1 = ((row // n2) % n1).to(tl.int64)
        i0 = (row // (n1 * n2)).to(tl.int64)
        return row.to(tl.int64), i0, i1, i2

    @triton.jit
    def _rms_rows(x, n, eps, w, DT: tl.constexpr):
        """Reference ``rms``: fp32 statistics, rounded to the compute dtype, times the weight (cast to it), rounded."""
        var = tl.sum(x * x, axis=0) / n
        y = _round(x * tl.math.rsqrt(var + eps), DT)
        return _round(y * _round(w, DT), DT)

    @triton.jit
    def _rms_kernel(x_ptr, w_ptr, s_ptr, y_ptr, qs_ptr, n, eps, n1, n2,
                    xs0, xs1, xs2, ss0, ss1, ss2,
                    HAS_SCALE: tl.constexpr, QUANT: tl.constexpr, ROT: tl.constexpr, BLOCK: tl.constexpr):
        row, i0, i1, i2 = _row_index(n1, n2)
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        DT: tl.constexpr = x_ptr.dtype.element_ty
        # every load first, then the maths: no DRAM round trip waits behind the reduction (measured on the H200)
        x = tl.load(x_ptr + i0 * xs0 + i1 * xs1 + i2 * xs2 + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            s = tl.load(s_ptr + i0 * ss0 + i1 * ss1 + i2 * ss2 + offs, mask=mask, other=0.0).to(tl.float32)
        y = _rms_rows(x, n, eps, w, DT)
        if HAS_SCALE:  # ``scale`` is the already rounded ``1 + scale`` of the reference; the product rounds once
            y = y * s
        if QUANT:  # the fp8/int8 matmul's input: codes and the row scale instead of the compute dtype
            _store_quant_row(_round(y, DT), y_ptr + row * n, qs_ptr, row, offs, mask, QUANT, ROT, BLOCK)
        else:
            tl.store(y_ptr + row * n + offs, _round(y, DT).to(DT), mask=mask)

    @triton.jit
    def _residual_kernel(x_ptr, o_ptr, w_ptr, g_ptr, w2_ptr, s2_ptr, out_ptr, h_ptr, qs_ptr, n, eps, eps2, n1, n2,
                         xs0, xs1, xs2, os0, os1, os2, gs0, gs1, gs2, ss0, ss1, ss2,
                         HAS_GATE: tl.constexpr, HAS_NEXT: tl.constexpr, HAS_SCALE: tl.constexpr,
                         QUANT: tl.constexpr, ROT: tl.constexpr, BLOCK: tl.constexpr):
        row, i0, i1, i2 = _row_index(n1, n2)
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        DT: tl.constexpr = out_ptr.dtype.element_ty
        # every load first, then the maths: no DRAM round trip waits behind a reduction (measured on the H200)
        o = tl.load(o_ptr + i0 * os0 + i1 * os1 + i2 * os2 + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + i0 * xs0 + i1 * xs1 + i2 * xs2 + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            g = tl.load(g_ptr + i0 * gs0 + i1 * gs1 + i2 * gs2 + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_NEXT:
            w2 = tl.load(w2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SCALE:
                s = tl.load(s2_ptr + i0 * ss0 + i1 * ss1 + i2 * ss2 + offs, mask=mask, other=0.0).to(tl.float32)
        y = _rms_rows(o, n, eps, w, DT)
        if HAS_GATE:  # gate = tanh(gate), rounded by the caller as the reference does; the product rounds
            y = _round(g * y, DT)
        x = _round(x + y, DT)
        tl.store(out_ptr + row * n + offs, x.to(DT), mask=mask)
        if HAS_NEXT:  # the next norm on the new residual stream, from registers
            h = _rms_rows(x, n, eps2, w2, DT)
            if HAS_SCALE:
                h = h * s
            if QUANT:  # the FFN's fp8/int8 matmul input
                _store_quant_row(_round(h, DT), h_ptr + row * n, qs_ptr, row, offs, mask, QUANT, ROT, BLOCK)
            else:
                tl.store(h_ptr + row * n + offs, _round(h, DT).to(DT), mask=mask)

    @triton.jit
    def _silu_mul_kernel(a_ptr, b_ptr, y_ptr, qs_ptr, n, n1, n2, as0, as1, as2, bs0, bs1, bs2,
                         QUANT: tl.constexpr, ROT: tl.constexpr, BLOCK: tl.constexpr):
        row, i0, i1, i2 = _row_index(n1, n2)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        DT: tl.constexpr = a_ptr.dtype.element_ty
        a = tl.load(a_ptr + i0 * as0 + i1 * as1 + i2 * as2 + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + i0 * bs0 + i1 * bs1 + i2 * bs2 + offs, mask=mask, other=0.0).to(tl.float32)
        s = _round(a / (1.0 + tl.exp(-a)), DT)  # F.silu's result, rounded as torch stores it
        if QUANT:  # one program holds the whole row (the grid has one column): w2's fp8/int8 matmul input
            _store_quant_row(tl.where(mask, _round(s * b, DT), 0.0), y_ptr + row * n, qs_ptr, row, offs, mask,
                             QUANT, ROT, BLOCK)
        else:
            tl.store(y_ptr + row * n + offs, _round(s * b, DT).to(DT), mask=mask)

    @triton.jit
    def _qk_rope_kernel(x_ptr, wq_ptr, wk_ptr, c_ptr, s_ptr, y_ptr, heads, seq, eps,
                        xsb, xss, xsw, xsh, csb, css, out_stride,
                        HAS_NORM: tl.constexpr, BH: tl.constexpr, D: tl.constexpr):
        """One token (all heads) of q (program_id(1) == 0) or k (== 1): [rms →] RoPE on interleaved pairs."""
        tok = tl.program_id(0)
        which = tl.program_id(1)
        b = (tok // seq).to(tl.int64)
        s = (tok % seq).to(tl.int64)
        tok = tok.to(tl.int64)
        HALF: tl.constexpr = D // 2
        DT: tl.constexpr = y_ptr.dtype.element_ty
        h = tl.arange(0, BH)
        d = tl.arange(0, D)
        hmask = h < heads
        mask = hmask[:, None] & (d[None, :] < D)
        base = x_ptr + b * xsb + s * xss + which * xsw
        x = tl.load(base + h[:, None] * xsh + d[None, :], mask=mask, other=0.0).to(tl.float32)
        j = tl.arange(0, HALF)
        c = tl.load(c_ptr + b * csb + s * css + j).to(tl.float32)[None, :]
        sn = tl.load(s_ptr + b * csb + s * css + j).to(tl.float32)[None, :]
        if HAS_NORM:
            var = tl.sum(x * x, axis=1) / D
            x = _round(x * tl.math.rsqrt(var + eps)[:, None], DT)
            if which == 0:
                w = _round(tl.load(wq_ptr + d).to(tl.float32), DT)
            else:
                w = _round(tl.load(wk_ptr + d).to(tl.float32), DT)
            x = _round(x * w[None, :], DT)
        x1, x2 = tl.split(tl.reshape(x, (BH, HALF, 2)))
        y = tl.reshape(tl.join(x1 * c - x2 * sn, x1 * sn + x2 * c), (BH, D))
        out = y_ptr + which * out_stride + tok * heads * D
        tl.store(out + h[:, None] * D + d[None, :], _round(y, DT).to(DT), mask=mask)


    @triton.jit
    def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, n, xs, qs, QUANT: tl.constexpr, ROT: tl.constexpr,
                           BLOCK: tl.constexpr, SINGLE: tl.constexpr):
        """One row: rotated by the Hadamard groups when ``ROT`` (int8 only), amax of |x| (fp32, NaN-propagating),
        scale = max(amax, 1e-12) * fp32(1/448 or 1/127), codes of x times the IEEE reciprocal of scale (``_codes``).
        A row that fits one block is read once (SINGLE); wider rows are swept twice (the second read comes from
        cache; with ``ROT`` each block, a whole number of groups, is rotated in both sweeps)."""
        row = tl.program_id(0).to(tl.int64)
        src = x_ptr + row * xs
        if SINGLE:
            offs = tl.arange(0, BLOCK)
            x = tl.load(src + offs, mask=offs < n, other=0.0).to(tl.float32)
            _store_quant_row(x, q_ptr + row * qs, s_ptr, row, offs, offs < n, QUANT, ROT, BLOCK)
        else:
            amax = tl.zeros((BLOCK,), dtype=tl.float32)
            for start in range(0, n, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                x = tl.load(src + offs, mask=offs < n, other=0.0).to(tl.float32)
                if ROT > 0:
                    x = _hadamard(x, BLOCK, ROT)
                amax = _max_nan(amax, tl.abs(x))
            if QUANT == 1:
                scale = _scale_of(tl.reduce(amax, 0, _max_nan), 1.0 / 448.0)
            else:
                scale = _scale_of(tl.reduce(amax, 0, _max_nan), 1.0 / 127.0)
            tl.store(s_ptr + row, scale)
            inverse = tl.math.div_rn(1.0, scale)
            for start in range(0, n, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                x = tl.load(src + offs, mask=offs < n, other=0.0).to(tl.float32)
                if ROT > 0:
                    x = _hadamard(x, BLOCK, ROT)
                y = _codes(x, inverse, QUANT)
                tl.store(q_ptr + row * qs + offs, y.to(q_ptr.dtype.element_ty), mask=offs < n)

    @triton.jit
    def _int8_epilogue_kernel(acc_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, m, n, HAS_BIAS: tl.constexpr,
                              BM: tl.constexpr, BN: tl.constexpr):
        """``((acc * x_scale) * w_scale + bias)`` in fp32, rounded once to the output dtype: the int8 matmul's
        int32 result [m, n] read once, the result written once (torch's version is five passes over it)."""
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        mask = (rm[:, None] < m) & (rn[None, :] < n)
        offs = rm[:, None].to(tl.int64) * n + rn[None, :]
        acc = tl.load(acc_ptr + offs, mask=mask, other=0)
        _int8_scale_store(acc, rm, rn, xs_ptr, ws_ptr, b_ptr, out_ptr, m, n, n, HAS_BIAS)

    @triton.jit
    def _int8_scale_store(acc, rm, rn, xs_ptr, ws_ptr, bias_ptr, out_ptr, m, n, so, HAS_BIAS: tl.constexpr):
        """``((acc * xs[rm]) * ws[rn] + bias[rn])`` in fp32 for the int32 sums ``acc`` [rm, rn], rounded once to the
        output dtype and stored where ``rm < m`` and ``rn < n`` (output rows ``so`` apart)."""
        xs = tl.load(xs_ptr + rm, mask=rm < m, other=0.0)
        ws = tl.load(ws_ptr + rn, mask=rn < n, other=0.0)
        y = acc.to(tl.float32) * xs[:, None]
        y = y * ws[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + rn, mask=rn < n, other=0.0).to(tl.float32)[None, :]
        DT: tl.constexpr = out_ptr.dtype.element_ty
        mask = (rm[:, None] < m) & (rn[None, :] < n)
        tl.store(out_ptr + rm.to(tl.int64)[:, None] * so + rn[None, :], _round(y, DT).to(DT), mask=mask)

    @triton.jit
    def _tile_of(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
        """(row tile, column tile) of linear tile ``tile`` in groups of ``GROUP_M`` rows of tiles (the order that
        keeps the weight's tiles in L2 across neighbouring programs)."""
        per_group = GROUP_M * tiles_n
        first_m = (tile // per_group) * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        return first_m + (tile % per_group) % group_m, (tile % per_group) // group_m

    @triton.jit
    def _int8_mm_kernel(a_ptr, b_ptr, xs_ptr, ws_ptr, bias_ptr, out_ptr, m, n, k, sa, sb, so,
                        HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, GROUP_M: tl.constexpr):
        """``int8_epilogue(a @ b.T)`` in one kernel: int8 ``a`` [m, k] times int8 ``b`` [n, k] (both rows k-major, the
        layout int8 tensor cores take) summed exactly in int32, then ``((acc * xs) * ws + bias)`` in fp32 rounded
        once to the output dtype, so the int32 result never goes to memory."""
        pid_m, pid_n = _tile_of(tl.program_id(0), tl.cdiv(m, BM), tl.cdiv(n, BN), GROUP_M)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        a = a_ptr + (rm % m).to(tl.int64)[:, None] * sa + rk[None, :]  # rows past m/n read row 0: never stored
        b = b_ptr + (rn % n).to(tl.int64)[None, :] * sb + rk[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.int32)
        for start in range(0, k, BK):
            if EVEN_K:
                av, bv = tl.load(a), tl.load(b)
            else:
                av = tl.load(a, mask=rk[None, :] < k - start, other=0)
                bv = tl.load(b, mask=rk[:, None] < k - start, other=0)
            acc = tl.dot(av, bv, acc, out_dtype=tl.int32)
            a += BK
            b += BK
        _int8_scale_store(acc, rm, rn, xs_ptr, ws_ptr, bias_ptr, out_ptr, m, n, so, HAS_BIAS)


# ------------------------------------------------------------------------------------------------ wrappers
QUANT_KINDS = {"fp8": 1, "int8": 2}  # the kernels' QUANT codes
_CODE_DTYPES = {1: torch.float8_e4m3fn, 2: torch.int8}
MAX_ROTATION = 4096  # the largest Hadamard group ``_hadamard`` unrolls


def _quant_code(quantize) -> int:
    """0 (no quantization), 1 (e4m3) or 2 (int8) for ``quantize`` False/None, True/"fp8" or "int8"."""
    if quantize is None or quantize is False:
        return 0
    if quantize is True:
        return 1
    if quantize not in QUANT_KINDS:
        raise ValueError(f"quantize={quantize!r}: use False, True/'fp8' or 'int8'")
    return QUANT_KINDS[quantize]


def _rotation(code: int, rotation: int | None, n: int) -> int:
    """The kernels' ROT (0: none) for a Hadamard group ``rotation`` on rows ``n`` wide; checked."""
    if not rotation:
        return 0
    if code != 2:
        raise ValueError("a Hadamard rotation goes with int8 quantization only")
    if rotation < 4 or rotation > MAX_ROTATION or rotation & (rotation - 1) or (rotation.bit_length() - 1) % 2:
        raise ValueError(f"Hadamard group {rotation}: use a power of 4 from 4 to {MAX_ROTATION}")
    if n % rotation:
        raise ValueError(f"rows {n} wide are not a whole number of Hadamard groups of {rotation}")
    return int(rotation)


def quantize_rows(x: torch.Tensor, kind: str = "fp8", rotation: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise quantization of a 2-D activation in one kernel: (codes [rows, n], fp32 scale [rows, 1]).

    ``kind="fp8"``: ``fp8.quantize_activation_rowwise`` (amax in fp32, scale = amax times the fp32 reciprocal of 448,
    rows times the IEEE reciprocal of their scale, clamp, round to nearest even; NaN and inf carried as torch does):
    bit for bit on the CPU interpreter; on the H200 the scales are equal and the only differing codes are zeros
    written +0 where torch writes -0 (2-3 in a million; ``benchmarks/results/quant_kernel_h200.json``).
    ``kind="int8"``: ``int8.quantize_activation_rowwise_int8`` the same way with 127 (codes rounded to nearest even,
    clamped to ±127; a NaN's code 0, its row's scale NaN or inf), of the rows rotated per group of ``rotation``
    columns first when given (``int8.hadamard_rows``, the same fp32 operations): bit for bit on the interpreter
    (tests/test_kernels.py); unmeasured on a GPU.

    Why: torch's version is six passes over the activation (abs, amax, float, divide, clamp, cast); before every
    fp8 matmul of a step that was 40 ms of a 1024² step on an H200 (``benchmarks/results/costs_h200.json``,
    ``step_gemm_quant_ms``), as much as the fp8 matmuls themselves."""
    code = _quant_code(kind)
    x = _last_contig(x)
    rows, n = x.shape
    rot = _rotation(code, rotation, n)
    q = torch.empty((rows, n), device=x.device, dtype=_CODE_DTYPES[code])
    scale = torch.empty((rows, 1), device=x.device, dtype=torch.float32)
    block = min(16384, triton.next_power_of_2(n))  # one read per row up to 16384 wide, 32 values per thread
    _quant_rows_kernel[(rows,)](x, q, scale, n, x.stride(0), q.stride(0), QUANT=code, ROT=rot,
                                BLOCK=block, SINGLE=block >= n, num_warps=max(4, min(16, block // 1024)))
    return q, scale


def int8_epilogue(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    """``((acc.float() * x_scale) * w_scale.T + bias.float()).to(dtype)`` for the int32 result ``acc`` [m, n] of an
    int8 matmul, ``x_scale`` [m, 1] and ``w_scale`` [n] fp32, in one pass (``int8.int8_linear``'s torch epilogue is
    the reference: the same fp32 operations in the same order, bit for bit under the interpreter; on a GPU the
    compiler may fuse the bias add into an fma, a difference of at most one fp32 rounding before the cast).

    Not on the pack's path since ``int8_matmul`` does this inside the product: kept as the baseline
    ``benchmarks/bench_lowp.py`` times it against (``int8_mm_epilogue``, the blocks' ``*_int_mm``)."""
    m, n = acc.shape
    out = torch.empty((m, n), device=acc.device, dtype=dtype)
    bm, bn = 32, 128
    _int8_epilogue_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        acc, x_scale, w_scale, bias if bias is not None else w_scale, out, m, n, HAS_BIAS=bias is not None,
        BM=bm, BN=bn, num_warps=4)
    return out


class MMConfig(NamedTuple):
    """One tiling of ``_int8_mm_kernel``: tile rows, columns and depth, tile rows per group, warps, pipeline stages."""

    bm: int
    bn: int
    bk: int
    group_m: int
    warps: int
    stages: int

    def shared_bytes(self) -> int:
        """Shared memory its pipeline asks for at most (int8 tiles of ``a`` and ``b`` per stage)."""
        return self.stages * (self.bm + self.bn) * self.bk


# In order of preference, the first whose pipeline fits the device's shared memory per block is used. 128 x 256 x 128
# in 3 stages was the fastest tiling on the H100 at every GEMM shape of the block or within 0.4% (14 tried,
# benchmarks/results/lowp_int8mm_h100.json: 49.9 ms of int8 GEMMs a 1024² step, 942-1017 TOPS, against 57.3 ms for
# torch._int_mm alone and 70.5 with its epilogue). A persistent kernel fed by TMA (Hopper's tensor memory
# accelerator; 9 tilings) was no faster on a second H100 (56.5 ms against this one's 56.0 there, whole int8 blocks
# within 2% either way: lowp_int8mm_tma_h100.json), so it was taken out again (commit 1231e44 has it).
MM_CONFIGS = (MMConfig(128, 256, 128, 8, 8, 3), MMConfig(128, 128, 128, 8, 4, 4), MMConfig(64, 128, 64, 8, 4, 3),
              MMConfig(32, 32, 32, 1, 4, 1))
_SHARED: dict[tuple, int] = {}


def _shared_limit(device: torch.device) -> int:
    key = (device.type, device.index)
    if key not in _SHARED:
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            _SHARED[key] = getattr(props, "shared_memory_per_block_optin", 48 * 1024)
        else:  # the interpreter: no limit that matters
            _SHARED[key] = 1 << 30
    return _SHARED[key]


def mm_config(device: torch.device) -> MMConfig:
    """The tiling ``int8_matmul`` takes on ``device`` (one for every shape: the sweep found no shape of the block
    that another tiling ran more than 0.4% faster)."""
    if device.type != "cuda":  # the interpreter: small tiles keep the CPU tests quick
        return MM_CONFIGS[-1]
    limit = _shared_limit(device)
    return next((c for c in MM_CONFIGS if c.shared_bytes() <= limit), MM_CONFIGS[-1])


def int8_matmul(x8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, dtype: torch.dtype, config: MMConfig | None = None) -> torch.Tensor:
    """``int8_epilogue(x8 @ weight.T, x_scale, w_scale, bias, dtype)`` in one kernel: int8 ``x8`` [m, k] and int8
    ``weight`` [n, k], ``x_scale`` [m, 1] and ``w_scale`` [n] fp32; the int32 sums are exact as
    ``torch._int_mm``'s, the epilogue the same fp32 operations (``int8._epilogue``: bit for bit under the
    interpreter and on the H100). Any m (no padding to 17 rows), any n and k."""
    m, k = x8.shape
    n = weight.shape[0]
    if x8.stride(1) != 1:
        x8 = x8.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    x_scale, w_scale = x_scale.reshape(m).contiguous(), w_scale.reshape(n).contiguous()  # the kernel steps by 1
    c = config or mm_config(x8.device)
    out = torch.empty((m, n), device=x8.device, dtype=dtype)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(m, c.bm) * triton.cdiv(n, c.bn),)
    _int8_mm_kernel[grid](x8, weight, x_scale, w_scale, bias if bias is not None else w_scale, out, m, n, k,
                          x8.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                          EVEN_K=k % c.bk == 0, BM=c.bm, BN=c.bn, BK=c.bk, GROUP_M=c.group_m, num_warps=c.warps,
                          num_stages=c.stages)
    return out


class QuantizedRows(NamedTuple):
    """A row-wise quantized activation, as ``fp8.fp8_linear`` (e4m3 ``q``) or ``int8.int8_linear`` (int8 ``q``) take
    it: ``q`` [rows, n], ``scale`` [rows, 1] fp32, and the shape of the activation it stands for (``[*lead, n]``)."""

    q: torch.Tensor
    scale: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype  # the compute dtype it was rounded to (the matmul's result comes back in it)
    rotation: int | None = None  # int8: the Hadamard group the rows were rotated by before quantization


def _outputs(shape, device, dtype, code: int):
    """(output buffer, row-scale buffer) for a row kernel: codes (e4m3 or int8) and fp32 scales when ``code``."""
    if not code:
        return torch.empty(shape, device=device, dtype=dtype), None
    rows = shape.numel() // shape[-1]
    return (torch.empty((rows, shape[-1]), device=device, dtype=_CODE_DTYPES[code]),
            torch.empty((rows, 1), device=device, dtype=torch.float32))


def _result(out, qs, shape, dtype, code: int, rot: int):
    return QuantizedRows(out, qs, shape, dtype, rot or None) if code else out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, scale: torch.Tensor | None = None,
             quantize: bool | str = False, rotation: int | None = None):
    """``blocks.rms(x, weight, eps)`` (times ``scale``, broadcast to ``x``, when given) in one pass; ``x`` may be a
    strided view with up to 4 dims. Contiguous result in ``x``'s dtype; with ``quantize`` (True or "fp8", "int8"),
    that result quantized for an fp8 or int8 matmul instead (``QuantizedRows``, the same bits as ``quantize_rows``
    of it, rotated by the Hadamard groups of ``rotation`` first for int8 when given)."""
    x = _last_contig(x)
    n = x.shape[-1]
    code = _quant_code(quantize)
    rot = _rotation(code, rotation, n)
    out, qs = _outputs(x.shape, x.device, x.dtype, code)
    n0, n1, n2 = _sizes3(x.shape)
    block = triton.next_power_of_2(n)
    s = _last_contig(scale) if scale is not None else x
    _rms_kernel[(n0 * n1 * n2,)](x, weight, s, out, qs if code else x, n, float(eps), n1, n2,
                                 *_lead3(x, x.shape), *_lead3(s, x.shape), HAS_SCALE=scale is not None,
                                 QUANT=code, ROT=rot, BLOCK=block, num_warps=_warps(block))
    return _result(out, qs, x.shape, x.dtype, code, rot)


def residual(x: torch.Tensor, o: torch.Tensor, weight: torch.Tensor, eps: float, gate: torch.Tensor | None = None,
             next_weight: torch.Tensor | None = None, next_eps: float | None = None,
             next_scale: torch.Tensor | None = None, quantize_next: bool | str = False,
             rotation: int | None = None):
    """``x + gate * rms(o, weight, eps)`` (``x + rms(o)`` without gate) in one pass. With ``next_weight``, also
    ``rms(x_new, next_weight, next_eps) * next_scale`` from the same registers: returns ``(x_new, h)``, ``h`` as
    ``QuantizedRows`` with ``quantize_next`` (True or "fp8", "int8"; ``rotation`` as in ``rms_norm``)."""
    x, o = _last_contig(x), _last_contig(o)
    n = x.shape[-1]
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    code = _quant_code(quantize_next) if next_weight is not None else 0
    rot = _rotation(code, rotation, n)
    h, qs = _outputs(x.shape, x.device, x.dtype, code) if next_weight is not None else (out, None)
    n0, n1, n2 = _sizes3(x.shape)
    block = triton.next_power_of_2(n)
    g = _last_contig(gate) if gate is not None else x
    s = _last_contig(next_scale) if next_scale is not None else x
    _residual_kernel[(n0 * n1 * n2,)](
        x, o, weight, g, next_weight if next_weight is not None else weight, s, out, h, qs if code else x,
        n, float(eps), float(next_eps if next_eps is not None else eps), n1, n2, *_lead3(x, x.shape),
        *_lead3(o, x.shape), *_lead3(g, x.shape), *_lead3(s, x.shape), HAS_GATE=gate is not None,
        HAS_NEXT=next_weight is not None, HAS_SCALE=next_scale is not None, QUANT=code, ROT=rot, BLOCK=block,
        num_warps=_warps(block))
    if next_weight is None:
        return out
    return out, _result(h, qs, x.shape, x.dtype, code, rot)


def silu_mul(g1: torch.Tensor, g3: torch.Tensor, quantize: bool | str = False, rotation: int | None = None):
    """``F.silu(g1) * g3`` in one pass (the halves of the fused w1/w3 result may be strided views); with
    ``quantize`` (True or "fp8", "int8"; ``rotation`` as in ``rms_norm``), as ``QuantizedRows`` for an fp8 or int8
    matmul (rows up to 16384 wide: one program per row; wider rows come back unquantized)."""
    g1, g3 = _last_contig(g1), _last_contig(g3)
    n = g1.shape[-1]
    code = _quant_code(quantize) if n <= 16384 else 0
    rot = _rotation(code, rotation, n)
    out, qs = _outputs(g1.shape, g1.device, g1.dtype, code)
    n0, n1, n2 = _sizes3(g1.shape)
    block = triton.next_power_of_2(n) if code else min(2048, triton.next_power_of_2(n))
    grid = (n0 * n1 * n2, triton.cdiv(n, block))
    _silu_mul_kernel[grid](g1, g3, out, qs if code else g1, n, n1, n2, *_lead3(g1, g1.shape),
                           *_lead3(g3, g1.shape), QUANT=code, ROT=rot, BLOCK=block,
                           num_warps=max(4, min(16, block // 1024)) if code else _warps(block))
    return _result(out, qs, g1.shape, g1.dtype, code, rot)


def rope_supported(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """The fused RoPE covers ``x`` [B, S, H, D] with D a power of two ≥ 2 and fp32 ``cos``/``sin`` [B or 1, S, 1, D/2]."""
    if x.dim() != 4 or cos.dim() != 4 or x.numel() == 0:
        return False
    b, s, _, d = x.shape
    return (d >= 2 and d & (d - 1) == 0 and cos.shape[1:] == (s, 1, d // 2) and cos.shape[0] in (1, b))


def _rope_launch(src: torch.Tensor, plane_stride: int, planes: int, wq, wk, eps, cos, sin, shape, dtype):
    b, s, heads, d = shape
    cos, sin = _last_contig(cos), _last_contig(sin)
    if sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty((planes, b, s, heads, d), device=src.device, dtype=dtype)
    csb = cos.stride(0) if cos.shape[0] > 1 else 0
    bh = triton.next_power_of_2(heads)
    _qk_rope_kernel[(b * s, planes)](
        src, wq if wq is not None else cos, wk if wk is not None else cos, cos, sin, out, heads, s,
        float(eps), src.stride(0), src.stride(1), plane_stride, src.stride(2 if planes == 1 else 3), csb,
        cos.stride(1), b * s * heads * d, HAS_NORM=wq is not None, BH=bh, D=d, num_warps=_warps(bh * d))
    return out


def qk_norm_rope(qkv: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, eps: float, cos: torch.Tensor,
                 sin: torch.Tensor):
    """``rope(rms(q, wq, eps), cos, sin)`` and the same for k, read from ``qkv`` [B, S, 3, H, D] (the fused matmul's
    result viewed per head); returns q and k as contiguous [B, S, H, D] (the reference's layout)."""
    out = _qk_planes(qkv, wq, wk, eps, cos, sin)
    return out[0], out[1]


def _qk_planes(qkv, wq, wk, eps, cos, sin) -> torch.Tensor:
    """q and k as the two planes of one new [2, B, S, H, D] tensor."""
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    b, s, _, heads, d = qkv.shape
    return _rope_launch(qkv, qkv.stride(2), 2, wq, wk, eps, cos, sin, (b, s, heads, d), qkv.dtype)


if _TRITON:
    @torch.library.custom_op("zimage::qk_norm_rope", mutates_args=())
    def _qk_norm_rope_op(qkv: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, eps: float, cos: torch.Tensor,
                         sin: torch.Tensor) -> torch.Tensor:
        return _qk_planes(qkv, wq, wk, eps, cos, sin)

    @_qk_norm_rope_op.register_fake
    def _(qkv, wq, wk, eps, cos, sin):
        b, s, _, heads, d = qkv.shape
        return qkv.new_empty((2, b, s, heads, d))


def qk_norm_rope_op(qkv: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, eps: float, cos: torch.Tensor,
                    sin: torch.Tensor):
    """``qk_norm_rope`` as one opaque custom op (``torch.ops.zimage.qk_norm_rope``) for ``torch.compile``'d code
    (see ``in_graph``): inductor calls our kernel instead of fusing the ops itself."""
    both = torch.ops.zimage.qk_norm_rope(qkv, wq, wk, float(eps), cos, sin)
    return both[0], both[1]


def qk_supported(qkv: torch.Tensor, cos: torch.Tensor) -> bool:
    return qkv.dim() == 5 and qkv.shape[2] == 3 and rope_supported(qkv[:, :, 0], cos)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``blocks.rope`` (fp32 pair rotation, one rounding) in one pass; ``x`` [B, S, H, D] may be strided."""
    x = _last_contig(x)
    return _rope_launch(x, 0, 1, None, None, 0.0, cos, sin, tuple(x.shape), x.dtype)[0]
