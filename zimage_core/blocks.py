"""The maths of one Z-Image transformer block, on a view of its weights rather than on a module class.

``block_forward`` is what the fast path runs (eagerly or compiled) for every noise-refiner and main block. It
takes a ``BlockWeights`` view, so the same code runs

- diffusers' ``ZImageTransformer2DModel`` (``to_q``/``to_k``/``to_v``, ``to_out.0``, ``norm_q``/``norm_k``), whose
  q/k/v the weight owner (``weights.TransformerWeights``) fuses into one matrix, and
- the original checkpoint layout that ComfyUI's own Z-Image model (its ``NextDiT``) keeps: fused
  ``attention.qkv``, ``attention.out``, ``feed_forward.w1/w2/w3``, ``adaLN_modulation.0``, ``q_norm``/``k_norm``.

Both views are read from the modules at call time by duck typing; nothing here imports ComfyUI. Weights may be
stored in another dtype than the computation (bf16 storage under fp32 compute, say): they are cast at use. fp8
weights carry a per-row fp32 scale and multiply in fp8 where the caller asks for it (``fp8.fp8_linear``); int8
weights likewise in int8 (``int8.int8_linear``, optionally Hadamard-rotated as int8_convrot files store them).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import kernels as _kernels
from .attention import attention
from .fp8 import fp8_linear, is_fp8
from .int8 import int8_linear, int8_matmul_usable


class Linear(NamedTuple):
    weight: torch.Tensor  # [out, in]: float, or fp8/int8 with ``scale``
    scale: torch.Tensor | None  # fp32 [out, 1] for fp8/int8 weights
    bias: torch.Tensor | None
    rotation: int | None = None  # int8: stored rotated by the Hadamard matrix per group of this many input columns


class BlockWeights(NamedTuple):
    modulation: Linear | None  # adaLN linear; None for the caption refiner's unmodulated blocks
    norms: tuple  # attention_norm1, attention_norm2, ffn_norm1, ffn_norm2, q norm, k norm weights
    qkv: Linear  # q, k and v rows in one matrix [3 * dim, dim]
    out: Linear
    ffn: Linear | tuple  # w1 and w3 fused in one matrix, or (w1, w3) as two matrix multiplies
    w2: Linear


class BlockShape(NamedTuple):
    heads: int
    eps: float  # the block norms' epsilon
    qk_eps: float  # the q/k norms' epsilon (diffusers: 1e-5; ComfyUI: float32's machine epsilon)


def _attr(module, name: str):
    """``getattr(module, name, None)`` for an ``nn.Module`` without raising inside ``Module.__getattr__`` for a
    missing name (a raised and caught AttributeError is most of a lookup's cost; the views are read per call)."""
    d = module.__dict__
    if name in d:
        return d[name]
    for store in ("_parameters", "_buffers", "_modules"):
        if name in d.get(store, ()):
            return d[store][name]
    return getattr(type(module), name, None)


def linear_of(module) -> Linear:
    """The ``Linear`` view of an ``nn.Linear``-like module (fp8/int8 ones carry ``weight_scale``, rotated int8 ones
    ``rotation``)."""
    return Linear(module.weight, _attr(module, "weight_scale"), module.bias, _attr(module, "rotation"))


def original_block_weights(block) -> BlockWeights:
    """The view of a block in the original checkpoint layout (ComfyUI's ``JointTransformerBlock``), read now."""
    attn, ffn = block.attention, block.feed_forward
    modulation = linear_of(block.adaLN_modulation[-1]) if getattr(block, "modulation", False) else None
    norms = (block.attention_norm1.weight, block.attention_norm2.weight, block.ffn_norm1.weight,
             block.ffn_norm2.weight, attn.q_norm.weight, attn.k_norm.weight)
    return BlockWeights(modulation, norms, linear_of(attn.qkv), linear_of(attn.out),
                        (linear_of(ffn.w1), linear_of(ffn.w3)), linear_of(ffn.w2))


def original_block_shape(block) -> BlockShape:
    attn = block.attention
    eps = block.attention_norm1.eps
    qk_eps = attn.q_norm.eps if attn.q_norm.eps is not None else torch.finfo(torch.float32).eps
    return BlockShape(attn.n_local_heads, float(eps), float(qk_eps))


def _linear(x: torch.Tensor, lin: Linear, fp8_matmul: bool) -> torch.Tensor:
    """``x @ W.T + b``; ``fp8_matmul`` lets fp8 and int8 weights multiply in their own precision (else dequantized)."""
    weight, scale, bias = lin.weight, lin.scale, lin.bias
    if is_fp8(weight):
        return fp8_linear(x, weight, scale, bias, fp8_matmul)
    if weight.dtype == torch.int8:
        return int8_linear(x, weight, scale, bias, rotation_groupsize=lin.rotation, matmul=fp8_matmul)
    if scale is not None:  # an fp8 layer cast to a float dtype (the guard's sticky copy: weights.plain_copy casts
        # the codes, not their meaning): codes times row scale, as fp8_linear dequantizes (before: the scale was lost)
        weight = (weight.float() * scale.float()).to(x.dtype)
    if weight.dtype != x.dtype:  # storage dtype other than the compute dtype: cast at use
        weight = weight.to(x.dtype)
        bias = bias.to(x.dtype) if bias is not None else None
    return F.linear(x, weight, bias)


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """diffusers' RMSNorm: statistics in fp32, cast to the compute dtype, then scaled."""
    if _kernels.active(x) and _kernels.rows_ok(x):  # eager CUDA: one fused pass (kernels.py); this code is the reference
        return _kernels.rms_norm(x, weight, eps)
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(weight.dtype) * weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Complex multiplication by (cos + i sin) on interleaved pairs, in fp32 like the reference."""
    if _kernels.active(x) and _kernels.rope_supported(x, cos):  # eager CUDA: one fused pass (kernels.py)
        return _kernels.rope(x, cos, sin)
    pairs = x.float().unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


def block_forward(x, attn_mask, cos, sin, adaln, weights: BlockWeights, shape: BlockShape, fp8_matmul: bool,
                  backend: str = "auto"):
    """One Z-Image transformer block: ``x`` [B, S, dim], ``cos``/``sin`` [B, S, 1, head_dim / 2] in fp32,
    ``attn_mask`` None or bool [B, 1, 1, S], ``adaln`` [B, 256] (ignored for unmodulated blocks)."""
    modulation, norms, qkv_w, out_w, ffn_w, w2_w = weights
    heads, eps, qk_eps = shape
    n_attn1, n_attn2, n_ffn1, n_ffn2, n_q, n_k = norms
    fused = _kernels.active(x)  # eager CUDA: fused Triton kernels, same roundings (kernels.py); never when compiling

    def q8(*linears) -> tuple:
        """(quantize, rotation) for the kernel making these matmuls' input: it writes the codes with row scales
        itself, e4m3 for fp8 matmuls, int8 (rotated like the weights) for int8 ones; (False, None) otherwise."""
        if not (fused and fp8_matmul):
            return False, None
        if all(lin.weight.dtype == torch.float8_e4m3fn for lin in linears):
            return "fp8", None
        rotation = linears[0].rotation or None
        if all(int8_matmul_usable(lin.weight, x.device) and (lin.rotation or None) == rotation for lin in linears):
            return "int8", rotation
        return False, None

    ffn_linears = (ffn_w,) if isinstance(ffn_w, Linear) else tuple(ffn_w)
    if modulation is not None:
        mod = _linear(adaln, modulation, False).unsqueeze(1)
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=2)
        scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp
        gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
        h = (_kernels.rms_norm(x, n_attn1, eps, scale_msa, *q8(qkv_w)) if fused
             else rms(x, n_attn1, eps) * scale_msa)
    else:
        h = _kernels.rms_norm(x, n_attn1, eps, None, *q8(qkv_w)) if fused else rms(x, n_attn1, eps)
    batch, seq, dim = x.shape
    qkv = _linear(h, qkv_w, fp8_matmul).view(batch, seq, 3, heads, dim // heads)
    if fused and _kernels.qk_supported(qkv, cos):
        (q, k), v = _kernels.qk_norm_rope(qkv, n_q, n_k, qk_eps, cos, sin), qkv[:, :, 2]
    elif _kernels.in_graph(x) and _kernels.qk_supported(qkv, cos):  # compiled: our kernel as one op (kernels.py)
        (q, k), v = _kernels.qk_norm_rope_op(qkv, n_q, n_k, qk_eps, cos, sin), qkv[:, :, 2]
    else:
        q, k, v = qkv.unbind(2)
        q = rope(rms(q, n_q, qk_eps), cos, sin)
        k = rope(rms(k, n_k, qk_eps), cos, sin)
    o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask, backend)
    # the attention output is quantized (fp8/int8) inside the out matmul's call: SDPA/cuDNN makes it, not our kernel
    o = _linear(o.transpose(1, 2).reshape(batch, seq, dim), out_w, fp8_matmul)
    if fused:  # residual, gate and the FFN's norm in one pass
        quantize, rotation = q8(*ffn_linears)
        x, h = _kernels.residual(x, o, n_attn2, eps, gate_msa if modulation is not None else None, n_ffn1, eps,
                                 scale_mlp if modulation is not None else None, quantize_next=quantize,
                                 rotation=rotation)
    else:
        o = rms(o, n_attn2, eps)
        x = x + gate_msa * o if modulation is not None else x + o
        h = rms(x, n_ffn1, eps)
        h = h * scale_mlp if modulation is not None else h
    if isinstance(ffn_w, Linear):
        g1, g3 = _linear(h, ffn_w, fp8_matmul).chunk(2, dim=-1)
    else:
        g1, g3 = _linear(h, ffn_w[0], fp8_matmul), _linear(h, ffn_w[1], fp8_matmul)
    f = _linear(_kernels.silu_mul(g1, g3, *q8(w2_w)) if fused else F.silu(g1) * g3, w2_w, fp8_matmul)
    if fused:
        return _kernels.residual(x, f, n_ffn2, eps, gate_mlp if modulation is not None else None)
    f = rms(f, n_ffn2, eps)
    return x + gate_mlp * f if modulation is not None else x + f
