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


FP16_MAX = 65504.0


def clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """ComfyUI's fp16 clamp (``nan_to_num`` to ±65504; other dtypes unchanged)."""
    if x.dtype != torch.float16:
        return x
    return torch.nan_to_num(x, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)


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


def original_block_modules(block) -> BlockWeights:
    """The modules of a block in the original checkpoint layout (ComfyUI's ``JointTransformerBlock``), in the places
    ``BlockWeights`` gives their weights: linear layers, then the norms (whose weight is the norm's)."""
    attn, ffn = block.attention, block.feed_forward
    modulation = block.adaLN_modulation[-1] if getattr(block, "modulation", False) else None
    norms = (block.attention_norm1, block.attention_norm2, block.ffn_norm1, block.ffn_norm2, attn.q_norm, attn.k_norm)
    return BlockWeights(modulation, norms, attn.qkv, attn.out, (ffn.w1, ffn.w3), ffn.w2)


def map_block(modules: BlockWeights, linear, norm) -> BlockWeights:
    """``modules`` (``original_block_modules``) with ``linear(module)`` for each linear layer and ``norm(module)``
    for each norm."""
    modulation, norms, qkv, out, (w1, w3), w2 = modules
    return BlockWeights(linear(modulation) if modulation is not None else None, tuple(norm(n) for n in norms),
                        linear(qkv), linear(out), (linear(w1), linear(w3)), linear(w2))


def original_block_weights(block) -> BlockWeights:
    """The view of a block in the original checkpoint layout (ComfyUI's ``JointTransformerBlock``), read now."""
    return map_block(original_block_modules(block), linear_of, lambda n: n.weight)


def original_block_shape(block) -> BlockShape:
    attn = block.attention
    eps = block.attention_norm1.eps
    qk_eps = attn.q_norm.eps if attn.q_norm.eps is not None else torch.finfo(torch.float32).eps
    return BlockShape(attn.n_local_heads, float(eps), float(qk_eps))


class Fetched:
    """A weight that its owner hands out only around its use: ComfyUI's ``cast_bias_weight`` (then
    ``uncast_bias_weight``) under low VRAM, dynamic VRAM or per-op LoRA, where the weight is streamed, patched or
    dequantized per use into a buffer that is reused. ``block_forward`` calls ``get(x)`` just before the op that
    reads it and ``done()`` right after, and never holds more than two at a time (the q/k norms, or the norms
    around a residual), as ComfyUI's own ops do with its two offload streams.

    ``get`` returns a ``Linear`` for a linear layer, a tensor for a norm weight. ``dtype``, ``rotation`` and
    ``shape`` describe the weight ``get`` will return (``float8_e4m3fn`` for a raw fp8 weight, ``int8`` with its
    Hadamard group for a raw int8 one): ``block_forward`` decides with them, before fetching, whether the kernel
    that makes the layer's input writes it in fp8 or int8."""

    dtype: torch.dtype
    rotation: int | None = None
    shape: tuple = ()  # [out, in]

    def get(self, x: torch.Tensor):
        raise NotImplementedError

    def done(self) -> None:
        pass


def _take(w, x: torch.Tensor):
    return w.get(x) if isinstance(w, Fetched) else w


def _drop(*ws) -> None:
    for w in ws:
        if isinstance(w, Fetched):
            w.done()


def _dtype(lin) -> torch.dtype:
    return lin.dtype if isinstance(lin, Fetched) else lin.weight.dtype


def _meta(lin) -> torch.Tensor:
    """The weight, or for a ``Fetched`` one a stand-in of its dtype and shape (what the int8 check reads)."""
    return torch.empty(lin.shape, dtype=lin.dtype, device="meta") if isinstance(lin, Fetched) else lin.weight


def _linear(x: torch.Tensor, lin, fp8_matmul: bool) -> torch.Tensor:
    """``x @ W.T + b``; ``fp8_matmul`` lets fp8 and int8 weights multiply in their own precision (else dequantized);
    a ``Fetched`` weight is fetched around the product."""
    if isinstance(lin, Fetched):
        # the owner needs the input's device and compute dtype (an input quantized by its kernel carries them)
        like = x if torch.is_tensor(x) else x.q.new_empty((0,), dtype=x.dtype)
        try:
            return _linear(x, lin.get(like), fp8_matmul)
        finally:
            lin.done()
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
                  backend="auto", mod_select: torch.Tensor | None = None, clamp: bool = False):
    """One Z-Image transformer block: ``x`` [B, S, dim], ``cos``/``sin`` [B, S, 1, head_dim / 2] in fp32,
    ``attn_mask`` None, bool [B, 1, 1, S] (True: attend) or an additive float mask, ``adaln`` [B, 256] (ignored for
    unmodulated blocks). ``weights`` may hold ``Fetched`` weights, each fetched just around its use.

    ``mod_select`` (omni/edit calls): ``adaln`` then has 2B rows, and token ``s`` is modulated by the second half
    where ``mod_select[s]`` is True, by the first half elsewhere (ComfyUI's ``timestep_zero_index``).

    ``clamp``: ComfyUI's fp16 clamps (``clamp_fp16`` on the attention output, the SwiGLU product and the FFN
    output, as its ``JointTransformerBlock`` does): the guard's ``clamp`` policy, and what ``off`` runs in fp16 on a
    ComfyUI whose own blocks clamp (0.33), so turning the guard off never changes native's result."""
    modulation, norms, qkv_w, out_w, ffn_w, w2_w = weights
    heads, eps, qk_eps = shape
    n_attn1, n_attn2, n_ffn1, n_ffn2, n_q, n_k = norms
    fused = _kernels.active(x)  # eager CUDA: fused Triton kernels, same roundings (kernels.py); never when compiling

    def q8(*linears) -> tuple:
        """(quantize, rotation) for the kernel making these matmuls' input: it writes the codes with row scales
        itself, e4m3 for fp8 matmuls, int8 (rotated like the weights) for int8 ones; (False, None) otherwise."""
        if not (fused and fp8_matmul):
            return False, None
        if all(_dtype(lin) == torch.float8_e4m3fn for lin in linears):
            return "fp8", None
        rotation = linears[0].rotation or None
        if all(int8_matmul_usable(_meta(lin), x.device) and (lin.rotation or None) == rotation for lin in linears):
            return "int8", rotation
        return False, None

    one_ffn = isinstance(ffn_w, (Linear, Fetched))  # w1|w3 as one matrix, or the pair (w1, w3)
    ffn_linears = (ffn_w,) if one_ffn else tuple(ffn_w)
    w = _take(n_attn1, x)
    if modulation is not None:
        mod = _linear(adaln, modulation, False).unsqueeze(1)
        if mod_select is not None:  # per token: [B, S, 4 * dim]
            half = mod.shape[0] // 2
            mod = torch.where(mod_select.view(1, -1, 1), mod[half:], mod[:half])
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=2)
        scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp
        gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
        h = (_kernels.rms_norm(x, w, eps, scale_msa, *q8(qkv_w)) if fused
             else rms(x, w, eps) * scale_msa)
    else:
        h = _kernels.rms_norm(x, w, eps, None, *q8(qkv_w)) if fused else rms(x, w, eps)
    _drop(n_attn1)
    batch, seq, dim = x.shape
    qkv = _linear(h, qkv_w, fp8_matmul).view(batch, seq, 3, heads, dim // heads)
    wq, wk = _take(n_q, x), _take(n_k, x)
    if fused and _kernels.qk_supported(qkv, cos):
        (q, k), v = _kernels.qk_norm_rope(qkv, wq, wk, qk_eps, cos, sin), qkv[:, :, 2]
    elif _kernels.in_graph(x) and _kernels.qk_supported(qkv, cos):  # compiled: our kernel as one op (kernels.py)
        (q, k), v = _kernels.qk_norm_rope_op(qkv, wq, wk, qk_eps, cos, sin), qkv[:, :, 2]
    else:
        q, k, v = qkv.unbind(2)
        q = rope(rms(q, wq, qk_eps), cos, sin)
        k = rope(rms(k, wk, qk_eps), cos, sin)
    _drop(n_q, n_k)
    o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask, backend)
    # the attention output is quantized (fp8/int8) inside the out matmul's call: SDPA/cuDNN makes it, not our kernel
    o = _linear(o.transpose(1, 2).reshape(batch, seq, dim), out_w, fp8_matmul)
    o = clamp_fp16(o) if clamp else o
    w2, wf1 = _take(n_attn2, x), _take(n_ffn1, x)
    if fused:  # residual, gate and the FFN's norm in one pass
        quantize, rotation = q8(*ffn_linears)
        x, h = _kernels.residual(x, o, w2, eps, gate_msa if modulation is not None else None, wf1, eps,
                                 scale_mlp if modulation is not None else None, quantize_next=quantize,
                                 rotation=rotation)
    else:
        o = rms(o, w2, eps)
        x = x + gate_msa * o if modulation is not None else x + o
        h = rms(x, wf1, eps)
        h = h * scale_mlp if modulation is not None else h
    _drop(n_attn2, n_ffn1)
    if one_ffn:
        g1, g3 = _linear(h, ffn_w, fp8_matmul).chunk(2, dim=-1)
    else:
        g1, g3 = _linear(h, ffn_w[0], fp8_matmul), _linear(h, ffn_w[1], fp8_matmul)
    if clamp:  # the product clamped before w2 (no fused low-precision input then), and w2's output
        f = clamp_fp16(_linear(clamp_fp16(_kernels.silu_mul(g1, g3) if fused else F.silu(g1) * g3), w2_w,
                               fp8_matmul))
    else:
        f = _linear(_kernels.silu_mul(g1, g3, *q8(w2_w)) if fused else F.silu(g1) * g3, w2_w, fp8_matmul)
    w = _take(n_ffn2, x)
    if fused:
        x = _kernels.residual(x, f, w, eps, gate_mlp if modulation is not None else None)
    else:
        f = rms(f, w, eps)
        x = x + gate_mlp * f if modulation is not None else x + f
    _drop(n_ffn2)
    return x
