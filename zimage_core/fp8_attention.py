"""fp8 (e4m3) flash attention: a Triton forward kernel with per-row and per-channel scales, backend ``"fp8"``.

What it computes: ``softmax(q k^T / sqrt(D)) v`` for non-causal, unmasked ``[B, heads, S, D]`` q/k/v (the
transformer's self-attention), with both matrix products on fp8 tensor cores (Hopper wgmma, which Triton's
``tl.dot`` emits for fp8 operands on sm_90; mma on sm_89). ``fp8_attention(q, k, v, mask)`` is registered as the
attention backend ``"fp8"`` (``zimage_core.attention``); every case it does not cover goes to PyTorch's
``scaled_dot_product_attention`` instead, so calling it is always correct:

- a mask (``mask is not None``): SDPA with that mask, bit for bit what the other backends compute;
- inputs that need gradients (the kernel has no backward), not 4-D, q/k/v of different shapes, dtypes or devices;
- where ``supported(q)`` is false: not a CUDA device of compute capability >= 8.9 (ROCm excluded: its fp8 is
  e4m3fnuz), Triton missing, a dtype other than fp32/bf16/fp16, a head dim that is not a power of two in 16..256.
  On the CPU the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` before this module is
  imported): the tests.

Scaling scheme (q, k and v quantized by three Triton launches and one torch amax, then the attention kernel):

- q and k: one fp32 scale per (batch, head, token) row, ``scale = max(amax over D / 448, 1e-12)``; the row is
  divided by it, clamped to ±448 and rounded to nearest even e4m3 (``float8_e4m3fn``). One Triton pass each
  (``quantize_rows``). In the kernel ``S_tile = dot(q8, k8^T) * (q_scale[:, None] * k_scale[None, :])``, with
  ``sm_scale * log2(e)`` folded into q's scales, so the online softmax uses ``exp2``; its statistics (running max,
  row sum) and the output accumulator are fp32.
- P = ``exp2(S - running max)`` lies in [0, 1]; it is multiplied by ``P_SCALE`` = 256 (a power of two, so
  exact) and rounded to e4m3 for the P@V product, so weights down to 2^-6 / 256 are still normal e4m3 numbers
  instead of e4m3's coarse subnormals below 2^-6; the output is divided by ``P_SCALE`` and by the row sum, which
  is summed from the unrounded fp32 P. Measured on the CPU (interpreter, S=256, D=64, gaussian q scaled by 2 for
  peaked rows, error against fp32 SDPA on the dequantized inputs, i.e. P's rounding alone): 0.0140 and 0.0134
  (two seeds) with no multiplier, 0.0131/0.0126 with 64 or 256, 0.0132/0.0130 with 448; with unscaled gaussian
  inputs all are the same (0.022). A small gain, kept.
- v: one fp32 scale per (batch, head, channel), ``max(amax over tokens / 448, 1e-12)`` (the amax is one
  ``torch.linalg.vector_norm(ord=inf)`` reduction, the quantization one Triton pass). A per-channel scale is
  constant along P@V's reduction, so it factors out and multiplies the output once at the end. v8 is stored
  transposed, ``[B, heads, D, S]``: Hopper's fp8 wgmma wants its second operand K-major (the reduction dim, here
  the tokens, contiguous).

Every quantized tensor's token dim is zero-padded to a multiple of 128 (the largest block), so the kernel loads
whole tiles without masks; keys past ``S`` get ``-inf`` logits in the last key block (any ``S``, e.g. 4133 or
4224), query rows past ``S`` are not stored. The output is ``[B, heads, S, D]`` in the input dtype, laid out in
memory as ``[B, S, heads, D]`` (the layout the block maths reshape it to, so that reshape is free).

Numerics and expected accuracy: e4m3 keeps 3 mantissa bits, a relative rounding error of at most 2^-4 per
element (measured RMS 0.025 on gaussian data). q, k and v each carry that error (fp32 SDPA on the dequantized
q/k/v is already 0.044-0.047 rel-L2 from fp32 SDPA on the originals: q/k's errors move the logits, which the
softmax amplifies), P's rounding adds about 0.02 in quadrature. So on gaussian inputs the output's relative L2
error against an fp32 reference is 0.042-0.052 (tests, S 20..130), 10-25 times bf16 SDPA's (0.002-0.004);
more peaked attention (larger logits) does worse (0.07 with q scaled by 2), and outlier-heavy rows too, since one
large element sets the scale of its whole row. Whether that is acceptable for the model's images is for the
benchmark's ``measure`` on the model's own q/k/v (``benchmarks/bench_fp8_attention.py``) and an image
comparison to decide. On sm_90 Triton accumulates fp8 wgmma with Hopper's reduced-precision fp8 accumulator
(``max_num_imprecise_acc`` left at its default); its error is far below the fp8 roundings (the benchmark's
rel-L2 on the GPU includes it). Speed is whatever ``benchmarks/bench_fp8_attention.py`` measures; nothing here
claims a number.

Triton's interpreter (the CPU tests) rounds fp32 to fp8 wrongly (a mantissa overflow does not carry into the
exponent: 1.97 becomes 1.0), so under the interpreter (``_EMULATE``) the kernels first round to the e4m3 grid
with their own fp32 arithmetic (round to nearest even on the bits; subnormals by adding and subtracting
1.5 * 2^14) and the cast then only re-encodes exact values. Everything else is the same code: the dots take real
fp8 operands in both places (the interpreter multiplies them exactly in fp16 with an fp32 sum). On the GPU the
cast is the hardware's round-to-nearest-even ``cvt`` and the emulation is compiled out.

Tuning: ``triton.autotune`` over a short explicit list of (BLOCK_M, BLOCK_N, num_warps, num_stages), keyed on
(S, head dim): the first call at a new sequence length benchmarks them (H200: 17.8 s for the first call in a
process, compiling included; 1.5 s at each further sequence length, i.e. each new prompt length); under the
interpreter one small fixed config is used. Under ``torch.compile`` the attention
is one opaque custom op (``torch.ops.zimage.fp8_attention``), so a ``fullgraph=True`` compile still works.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F

from . import attention as _attention
from .fp8 import E4M3_MAX

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl

    from .kernels import _e4m3  # the bit-level e4m3 rounding, one copy for the package

    _TRITON = True
except Exception:  # pragma: no cover - depends on the install
    _TRITON = False

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_EMULATE = _INTERPRET  # round to e4m3 with our own arithmetic (the interpreter's fp32 -> fp8 cast is wrong)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HEAD_DIMS = (16, 32, 64, 128, 256)
P_SCALE = 256.0  # P in [0, 1] times this before its e4m3 rounding (see the docstring for the measurement)
PAD = 128  # token dims of the quantized tensors are padded to a multiple of this (>= every BLOCK_M/BLOCK_N)
LOG2E = 1.4426950408889634
INTERPRET_BLOCKS = (32, 32)  # (BLOCK_M, BLOCK_N) under the interpreter
stats = {"kernel": 0, "fallback": 0}  # calls that ran the Triton kernels / went to SDPA (tests read it)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


_CAPABILITY: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


def supported(q: torch.Tensor) -> bool:
    """Whether the Triton kernels can take ``q`` (and k, v of its shape): a CUDA device of compute capability
    >= 8.9 with Triton (or the CPU under ``TRITON_INTERPRET=1``), fp32/bf16/fp16, 4-D, head dim a power of two
    in 16..256, at least one token."""
    if not _TRITON or q.dim() != 4 or q.dtype not in _DTYPES or q.shape[-1] not in _HEAD_DIMS:
        return False
    if q.numel() == 0:
        return False
    if q.device.type == "cuda":
        return torch.version.hip is None and _capability(q.device) >= (8, 9)
    return q.device.type == "cpu" and _INTERPRET


# ------------------------------------------------------------------------------------------------ kernels
if _TRITON:

    @triton.jit
    def _to_e4m3(x, EMULATE: tl.constexpr, CLAMP: tl.constexpr):
        """fp32 -> e4m3 (round to nearest even, saturated to ±448 when ``CLAMP``)."""
        if CLAMP:
            x = tl.minimum(tl.maximum(x, -448.0), 448.0)
        if EMULATE:  # the interpreter's cast does not carry a rounded-up mantissa: round on the e4m3 grid first
            x = _e4m3(x)  # (kernels.py; on the GPU the hardware cast rounds in the attention's inner loop)
        return x.to(tl.float8e4nv)

    @triton.jit
    def _load_rows(X, S, H, sxb, sxh, sxs, sxd, D: tl.constexpr, BLOCK_R: tl.constexpr):
        """This program's BLOCK_R token rows of X [B, H, S, D] (any strides) in fp32, rows past S zero; with the
        row indices, the channel indices and the (batch, head) index."""
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, D)
        src = X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + rows[:, None].to(tl.int64) * sxs + d[None, :] * sxd
        return tl.load(src, mask=rows[:, None] < S, other=0.0).to(tl.float32), rows, d, bh

    @triton.jit
    def _quant_rows_kernel(X, X8, XS, S, S_PAD, H, sxb, sxh, sxs, sxd,
                           D: tl.constexpr, BLOCK_R: tl.constexpr, EMULATE: tl.constexpr):
        """One scale per token row: X [B, H, S, D] (any strides) -> X8 [B*H, S_PAD, D] e4m3, XS [B*H, S_PAD]."""
        x, rows, d, bh = _load_rows(X, S, H, sxb, sxh, sxs, sxd, D, BLOCK_R)
        scale = tl.maximum(tl.max(tl.abs(x), axis=1) / 448.0, 1e-12)
        x8 = _to_e4m3(x / scale[:, None], EMULATE, True)
        base = bh.to(tl.int64) * S_PAD
        tl.store(X8 + (base + rows[:, None]) * D + d[None, :], x8)  # padding rows: zeros
        tl.store(XS + base + rows, scale)

    @triton.jit
    def _quant_v_kernel(V, VMAX, V8T, S, S_PAD, H, svb, svh, svs, svd,
                        D: tl.constexpr, BLOCK_R: tl.constexpr, EMULATE: tl.constexpr):
        """One scale per channel: V [B, H, S, D] (any strides), VMAX [B*H, D] amax over tokens ->
        V8T [B*H, D, S_PAD] e4m3, transposed (tokens contiguous: K-major for the P@V dot)."""
        x, rows, d, bh = _load_rows(V, S, H, svb, svh, svs, svd, D, BLOCK_R)
        scale = tl.maximum(tl.load(VMAX + bh * D + d) / 448.0, 1e-12)
        x8 = _to_e4m3(x / scale[None, :], EMULATE, True)
        base = bh.to(tl.int64) * D * S_PAD
        tl.store(V8T + base + d[None, :] * S_PAD + rows[:, None], x8)

    @triton.jit
    def _attn_block(acc, l_i, m_i, q8, qs, K8, KS, V8T, start_n, S, S_PAD, kv_base, ks_base,
                    D: tl.constexpr, BLOCK_N: tl.constexpr, P_MULT: tl.constexpr, MASK: tl.constexpr,
                    EMULATE: tl.constexpr):
        """One key block of the online softmax: returns the updated (acc, row sum, running max)."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        d = tl.arange(0, D)
        k8 = tl.load(K8 + kv_base + offs_n[:, None] * D + d[None, :])  # [N, D], D contiguous (K-major)
        ks = tl.load(KS + ks_base + offs_n)
        s = tl.dot(q8, tl.trans(k8))  # fp32 [M, N]
        s = s * qs[:, None] * ks[None, :]  # log2 domain: sm_scale * log2(e) is in qs
        if MASK:
            s = tl.where(offs_n[None, :] < S, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        v8 = tl.load(V8T + kv_base + d[:, None] * S_PAD + offs_n[None, :])  # [D, N], tokens contiguous
        p8 = _to_e4m3(p * P_MULT, EMULATE, False)
        acc = tl.dot(p8, tl.trans(v8), acc)
        return acc, l_i, m_new

    @triton.jit
    def _attn_kernel(Q8, QS, K8, KS, V8T, VMAX, O, qk_scale, S, S_PAD, H, sob, soh, sos,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     P_MULT: tl.constexpr, EMULATE: tl.constexpr):
        """Program (query block, batch*head): fp8 QK^T and PV, fp32 online softmax, output in O's dtype."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, HEAD_DIM)
        kv_base = bh.to(tl.int64) * S_PAD * HEAD_DIM  # q8, k8 [BH, S_PAD, D] and v8t [BH, D, S_PAD]: same size
        ks_base = bh.to(tl.int64) * S_PAD
        q8 = tl.load(Q8 + kv_base + offs_m[:, None] * HEAD_DIM + d[None, :])
        qs = tl.load(QS + ks_base + offs_m) * qk_scale
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        n_full = (S // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            acc, l_i, m_i = _attn_block(acc, l_i, m_i, q8, qs, K8, KS, V8T, start_n, S, S_PAD, kv_base, ks_base,
                                        HEAD_DIM, BLOCK_N, P_MULT, False, EMULATE)
        if n_full < S:  # the key tail: padded keys get -inf
            acc, l_i, m_i = _attn_block(acc, l_i, m_i, q8, qs, K8, KS, V8T, n_full, S, S_PAD, kv_base, ks_base,
                                        HEAD_DIM, BLOCK_N, P_MULT, True, EMULATE)
        vscale = tl.maximum(tl.load(VMAX + bh * HEAD_DIM + d) / 448.0, 1e-12)
        out = acc * (1.0 / (l_i * P_MULT))[:, None] * vscale[None, :]
        b = bh // H
        h = bh % H
        dst = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None].to(tl.int64) * sos + d[None, :]
        tl.store(dst, out.to(O.dtype.element_ty), mask=offs_m[:, None] < S)

    # (BLOCK_M, BLOCK_N, num_warps, num_stages): 64/128 blocks, 4 or 8 warps, 2-4 stages; 128x128 tiles need 8
    # warps (the fp32 S tile and accumulator alone are 256 registers a thread with 4)
    _CONFIGS = [
        (128, 128, 8, 2), (128, 128, 8, 3), (128, 128, 8, 4),
        (128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 4, 4), (128, 64, 8, 3), (128, 64, 8, 4),
        (64, 128, 4, 2), (64, 128, 4, 3),
        (64, 64, 4, 3), (64, 64, 4, 4),
    ]
    _attn_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in _CONFIGS],
        key=["S", "HEAD_DIM"],
    )(_attn_kernel)


# ------------------------------------------------------------------------------------------------ launches
def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [B, H, S, D] (any strides) -> (x8 [B, H, S_pad, D] e4m3, scale [B, H, S_pad] fp32), S_pad = S
    rounded up to 128, padding rows zero; ``x8 * scale[..., None]`` approximates ``x``."""
    B, H, S, D = x.shape
    s_pad = _round_up(S, PAD)
    x8 = torch.empty(B, H, s_pad, D, device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(B, H, s_pad, device=x.device, dtype=torch.float32)
    block = 32
    _quant_rows_kernel[(s_pad // block, B * H)](x, x8, scale, S, s_pad, H, *x.stride(), D=D, BLOCK_R=block,
                                                 EMULATE=_EMULATE, num_warps=4)
    return x8, scale


def quantize_v(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``v`` [B, H, S, D] (any strides) -> (v8t [B, H, D, S_pad] e4m3, transposed and zero-padded; amax
    [B, H, D] fp32, the per-channel max |v| over tokens). The channel scale is ``max(amax / 448, 1e-12)``."""
    B, H, S, D = v.shape
    s_pad = _round_up(S, PAD)
    amax = torch.linalg.vector_norm(v, ord=math.inf, dim=2, dtype=torch.float32).contiguous()
    v8t = torch.empty(B, H, D, s_pad, device=v.device, dtype=torch.float8_e4m3fn)
    block = 64
    _quant_v_kernel[(s_pad // block, B * H)](v, amax, v8t, S, s_pad, H, *v.stride(), D=D, BLOCK_R=block,
                                              EMULATE=_EMULATE, num_warps=4)
    return v8t, amax


def v_scale(amax: torch.Tensor) -> torch.Tensor:
    """The per-channel v scale the kernels derive from ``quantize_v``'s amax."""
    return torch.clamp(amax / E4M3_MAX, min=1e-12)


def attention_quantized(q8, q_scale, k8, k_scale, v8t, v_amax, seq_len: int, out_dtype: torch.dtype,
                        sm_scale: float | None = None, blocks: tuple[int, int] | None = None,
                        p_scale: float = P_SCALE) -> torch.Tensor:
    """The attention kernel alone on quantized inputs (``quantize_rows`` for q and k, ``quantize_v`` for v).

    Returns ``[B, H, S, D]`` in ``out_dtype``, laid out as ``[B, S, H, D]``. ``blocks`` = (BLOCK_M, BLOCK_N)
    pins a config instead of the autotuned one (tests); ``p_scale`` is P's multiplier before its e4m3 rounding.
    """
    B, H, s_pad, D = q8.shape
    S = seq_len
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    out = torch.empty(B, S, H, D, device=q8.device, dtype=out_dtype).transpose(1, 2)
    args = (q8, q_scale, k8, k_scale, v8t, v_amax, out, sm_scale * LOG2E, S, s_pad, H,
            out.stride(0), out.stride(1), out.stride(2))
    if blocks is None and _INTERPRET:
        blocks = INTERPRET_BLOCKS
    if blocks is not None:
        bm, bn = blocks
        assert PAD % bm == 0 and PAD % bn == 0, blocks
        _attn_kernel[(triton.cdiv(S, bm), B * H)](*args, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, P_MULT=float(p_scale),
                                                  EMULATE=_EMULATE, num_warps=4, num_stages=2)
    else:
        grid = lambda meta: (triton.cdiv(S, meta["BLOCK_M"]), B * H)  # noqa: E731
        _attn_tuned[grid](*args, HEAD_DIM=D, P_MULT=float(p_scale), EMULATE=False)
    return out


def _sdpa_into_layout(q, k, v) -> torch.Tensor:
    """SDPA's result in the op's output layout ([B, H, S, D] viewed from [B, S, H, D] memory)."""
    o = F.scaled_dot_product_attention(q, k, v)
    out = torch.empty(o.shape[0], o.shape[2], o.shape[1], o.shape[3], device=o.device, dtype=o.dtype)
    out = out.transpose(1, 2)
    out.copy_(o)
    return out


def _kernel_ok(q, k, v) -> bool:
    return (supported(q) and q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype
            and q.device == k.device == v.device)


@torch.library.custom_op("zimage::fp8_attention", mutates_args=())
def _fp8_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if not _kernel_ok(q, k, v):
        stats["fallback"] += 1
        return _sdpa_into_layout(q, k, v)
    stats["kernel"] += 1
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        q8, qs = quantize_rows(q)
        k8, ks = quantize_rows(k)
        v8t, vmax = quantize_v(v)
        return attention_quantized(q8, qs, k8, ks, v8t, vmax, q.shape[2], q.dtype)


@_fp8_attention_op.register_fake
def _(q, k, v):
    B, H, S, _ = q.shape
    return q.new_empty(B, S, H, v.shape[-1]).transpose(1, 2)


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Attention of ``[B, heads, S, D]`` q/k/v through the fp8 kernels (see the module docstring).

    With a ``mask`` (True where a key may be attended), inputs that need gradients, or inputs that are not 4-D,
    this is exactly ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask)``; other unsupported inputs
    (``supported``) get SDPA's result too, inside the custom op. Output in q's dtype.
    """
    if mask is not None or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        stats["fallback"] += 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        stats["fallback"] += 1
        return F.scaled_dot_product_attention(q, k, v)
    return _fp8_attention_op(q, k, v)


_attention.register("fp8", fp8_attention)
