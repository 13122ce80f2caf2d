"""The fast transformer path: the same model and numbers as ``Denoiser``, fewer passes over memory.

What it changes, each measured in ``benchmarks/bench_speed.py``:
- q/k/v and w1/w3 are fused into one matrix multiply each. The fused weights are new tensors and the
  module's own ``to_q``/``to_k``/``to_v``/``w1``/``w3`` weights become views into them, so memory does
  not grow and diffusers' block forward (used by the precision guard) still works on the same weights.
- RoPE in real arithmetic on cos/sin tables built once per generation (diffusers builds complex tables
  and goes through ``view_as_complex`` every block of every step).
- Everything the step does not change (positions, masks, caption stream) is prepared once.
- Optionally the block function is compiled with ``torch.compile`` (one graph for all blocks, sequence
  length dynamic so a new prompt length does not recompile), the attention kernel can be chosen, and
  whole steps replay as CUDA graphs (``cuda_graphs.py``).
- fp8 weights (``FP8Linear``) multiply in fp8 with row-wise scales where the GPU has fp8 tensor cores.

Every block while the precision guard probes, and every block under the clamp policy, go through diffusers'
block forward instead, so the guard works unchanged. Blocks the guard runs in higher precision ("sticky")
go through the same fast block function on their higher-precision copy's fused weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from .denoiser import F_PATCH, PATCH, DenoiseContext, Denoiser, transformer_blocks
from .cuda_graphs import StepGraphs
from .fp8 import FP8Linear, quantize_activation_rowwise

ATTENTION_BACKENDS = ("auto", "sdpa", "cudnn", "flash", "efficient", "math")


# ----------------------------------------------------------------------------------- fused weights
def _fuse(linears: list[torch.nn.Module], dtype: torch.dtype) -> tuple:
    """Concatenate the weights of ``linears`` (rows) and make each module's weight a view of the result."""
    if isinstance(linears[0], FP8Linear):
        weight = torch.cat([m.weight.data for m in linears])
        scale = torch.cat([m.weight_scale.data for m in linears])
        rows = 0
        for m in linears:
            n = m.out_features
            m.weight = torch.nn.Parameter(weight[rows:rows + n], requires_grad=False)
            m.weight_scale = torch.nn.Parameter(scale[rows:rows + n], requires_grad=False)
            rows += n
        return weight, scale
    weight = torch.cat([m.weight.data for m in linears])
    rows = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(weight[rows:rows + n], requires_grad=False)
        rows += n
    return weight, None


def _lin(module: torch.nn.Module) -> tuple:
    """(weight, scale or None, bias or None) of an nn.Linear or FP8Linear."""
    scale = module.weight_scale if isinstance(module, FP8Linear) else None
    return module.weight, scale, module.bias


@dataclass
class BlockWeights:
    modulation: tuple | None  # adaLN linear (weight, scale, bias)
    norms: tuple  # attention_norm1, attention_norm2, ffn_norm1, ffn_norm2, norm_q, norm_k weights
    qkv: tuple
    out: tuple
    w13: tuple
    w2: tuple
    w1: tuple
    w3: tuple

    def tensors(self, fuse_ffn: bool = True) -> tuple:
        """What ``block_forward`` takes. With ``fuse_ffn=False`` w1 and w3 run as two matrix multiplies
        (views of the same fused weight): on an H100 two N=10240 GEMMs beat one N=20480 GEMM."""
        ffn = self.w13 if fuse_ffn else (self.w1, self.w3)
        return (self.modulation, self.norms, self.qkv, self.out, ffn, self.w2)


def fuse_block(block) -> BlockWeights:
    """Fused weights of a block, made once; made again if the module's weights were replaced since
    (e.g. ``model.to(torch.float16)`` gives every parameter a new tensor)."""
    attn, ffn = block.attention, block.feed_forward
    cached = block.__dict__.get("_zimage_fused")
    if cached is not None and cached.qkv[0].untyped_storage().data_ptr() == attn.to_q.weight.untyped_storage().data_ptr():
        return cached
    dtype = block.attention_norm1.weight.dtype
    qkv = _fuse([attn.to_q, attn.to_k, attn.to_v], dtype)
    w13 = _fuse([ffn.w1, ffn.w3], dtype)
    weights = BlockWeights(
        modulation=_lin(block.adaLN_modulation[0]) if block.modulation else None,
        norms=(block.attention_norm1.weight, block.attention_norm2.weight, block.ffn_norm1.weight,
               block.ffn_norm2.weight, attn.norm_q.weight, attn.norm_k.weight),
        qkv=(qkv[0], qkv[1], None),
        out=_lin(attn.to_out[0]),
        w13=(w13[0], w13[1], None),
        w2=_lin(ffn.w2),
        w1=_lin(ffn.w1),
        w3=_lin(ffn.w3),
    )
    block._zimage_fused = weights
    return weights


# ----------------------------------------------------------------------------------- the block
def _linear(x, lin: tuple, fp8_matmul: bool):
    weight, scale, bias = lin
    if weight.dtype == torch.float8_e4m3fn:
        if fp8_matmul:
            shape = x.shape
            x8, x_scale = quantize_activation_rowwise(x.reshape(-1, shape[-1]))
            out = torch._scaled_mm(x8, weight.t(), scale_a=x_scale, scale_b=scale.t(), bias=bias,
                                   out_dtype=torch.bfloat16)
            return out.reshape(*shape[:-1], weight.shape[0]).to(x.dtype)
        weight = (weight.float() * scale).to(x.dtype)
    return F.linear(x, weight, bias)


def _rms(x, weight, eps):
    """diffusers' RMSNorm: statistics in fp32, cast to the weight dtype, then scaled."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(weight.dtype) * weight


def _rope(x, cos, sin):
    """Complex multiplication by (cos + i sin) on interleaved pairs, in fp32 like the reference."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


def block_forward(x, attn_mask, cos, sin, adaln, weights: tuple, heads: int, eps: float, fp8_matmul: bool):
    """One ZImageTransformerBlock on fused weights; ``weights`` is ``BlockWeights.tensors()``."""
    modulation, norms, qkv_w, out_w, w13_w, w2_w = weights
    n_attn1, n_attn2, n_ffn1, n_ffn2, n_q, n_k = norms
    if modulation is not None:
        mod = _linear(adaln, modulation, False).unsqueeze(1)
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=2)
        scale_msa, scale_mlp = 1.0 + scale_msa, 1.0 + scale_mlp
        gate_msa, gate_mlp = gate_msa.tanh(), gate_mlp.tanh()
        h = _rms(x, n_attn1, eps) * scale_msa
    else:
        h = _rms(x, n_attn1, eps)
    batch, seq, dim = x.shape
    q, k, v = _linear(h, qkv_w, fp8_matmul).view(batch, seq, 3, heads, dim // heads).unbind(2)
    q = _rope(_rms(q, n_q, 1e-5), cos, sin)
    k = _rope(_rms(k, n_k, 1e-5), cos, sin)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
    o = _linear(o.transpose(1, 2).reshape(batch, seq, dim), out_w, fp8_matmul)
    o = _rms(o, n_attn2, eps)
    x = x + gate_msa * o if modulation is not None else x + o
    h = _rms(x, n_ffn1, eps)
    h = h * scale_mlp if modulation is not None else h
    if isinstance(w13_w[0], tuple):  # separate w1, w3
        g1, g3 = _linear(h, w13_w[0], fp8_matmul), _linear(h, w13_w[1], fp8_matmul)
    else:
        g1, g3 = _linear(h, w13_w, fp8_matmul).chunk(2, dim=-1)
    f = _rms(_linear(F.silu(g1) * g3, w2_w, fp8_matmul), n_ffn2, eps)
    return x + gate_mlp * f if modulation is not None else x + f


# ----------------------------------------------------------------------------------- the denoiser
@dataclass
class FastContext(DenoiseContext):
    x_tokens: int = 0  # image tokens per item before padding
    x_pad: int = 0
    x_cos: torch.Tensor | None = None
    x_sin: torch.Tensor | None = None
    x_freqs: torch.Tensor | None = None
    u_cos: torch.Tensor | None = None
    u_sin: torch.Tensor | None = None
    u_freqs: torch.Tensor | None = None
    u_mask: torch.Tensor | None = None  # bool [B, 1, 1, S] for SDPA, None when all items have equal length
    u_mask_2d: torch.Tensor | None = None  # bool [B, S] for diffusers' blocks
    grid: tuple = ()


class FastDenoiser(Denoiser):
    """``Denoiser`` with fused weights, real-arithmetic RoPE, optional compile, attention and fp8 choices."""

    context_type = FastContext

    def __init__(self, transformer, device=None, *, compile: bool = False, attention: str = "auto",
                 fp8_matmul: bool = False, cuda_graph: bool = False, fuse_ffn: bool = True):
        super().__init__(transformer, device)
        if attention not in ATTENTION_BACKENDS:
            from .errors import ZImageError

            raise ZImageError(f"attention {attention!r} is unknown: use one of {', '.join(ATTENTION_BACKENDS)}.")
        t = transformer
        self.blocks = {n: b for n, b in transformer_blocks(t).items() if not n.startswith("context_refiner.")}
        self.weights = {name: fuse_block(b).tensors(fuse_ffn) for name, b in self.blocks.items()}
        self.heads = t.layers[0].attention.heads
        self.eps = t.layers[0].attention_norm1.eps
        self.attention = attention
        self.fp8_matmul = fp8_matmul
        self.fuse_ffn = fuse_ffn
        self.compiled = compile
        self._block = torch.compile(block_forward, fullgraph=True, dynamic=None) if compile else block_forward
        self.graphs = StepGraphs(self) if cuda_graph and self.device.type == "cuda" else None

    def _sdpa_context(self):
        if self.attention in ("auto", "sdpa"):
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[self.attention]
        return sdpa_kernel([backend])

    def _mark(self, *tensors):
        if self.compiled:
            for t in tensors:
                if t is not None:
                    torch._dynamo.mark_dynamic(t, 1)

    def _tables(self, ctx: FastContext, batch: int, h: int, w: int) -> None:
        """Positions, RoPE tables and masks for latents of ``h x w`` (once per generation)."""
        t, device = self.transformer, self.device
        dummy = [torch.zeros(t.in_channels, 1, h, w, device=device, dtype=self.dtype)] * batch
        x_p, _, _, x_pos_ids, _, x_pad_mask, _ = t.patchify_and_embed(dummy, ctx.cap_feats, PATCH, F_PATCH)
        x_seqlens = [len(p) for p in x_p]
        feats = [torch.zeros(n, 1, device=device, dtype=self.dtype) for n in x_seqlens]
        x_feats, x_freqs, x_mask, _, _ = t._prepare_sequence(feats, x_pos_ids, x_pad_mask,
                                                             torch.zeros(1, 1, device=device, dtype=self.dtype),
                                                             None, device)
        _, u_freqs, u_mask, _ = t._build_unified_sequence(
            x_feats, x_freqs, x_seqlens, None, torch.zeros(batch, ctx.cap_stream.shape[1], 1, device=device),
            ctx.cap_freqs, ctx.cap_seqlens, None, None, None, None, None, False, device)
        ctx.x_tokens = (h // PATCH) * (w // PATCH)
        ctx.x_pad = x_seqlens[0] - ctx.x_tokens
        ctx.x_freqs, ctx.u_freqs, ctx.u_mask_2d = x_freqs, u_freqs, u_mask
        ctx.x_cos, ctx.x_sin = x_freqs.real.unsqueeze(2).contiguous(), x_freqs.imag.unsqueeze(2).contiguous()
        ctx.u_cos, ctx.u_sin = u_freqs.real.unsqueeze(2).contiguous(), u_freqs.imag.unsqueeze(2).contiguous()
        ctx.u_mask = u_mask[:, None, None, :] if u_mask is not None else None
        ctx.grid = (batch, h, w)

    def _run(self, name, block, x, mask, mask_2d, freqs, cos, sin, adaln, weights):
        if self.guard is not None and self.guard.wants_module_forward(block):
            hp = self.guard.sticky_copy(block)
            if hp is None:
                return block(x, mask_2d, freqs, adaln)  # diffusers' forward, wrapped or hooked by the guard
            dtype = hp.attention_norm1.weight.dtype
            x_hp = x.to(dtype)
            self._mark(x_hp)
            hp_weights = fuse_block(hp).tensors(self.fuse_ffn)
            out = self._block(x_hp, mask, cos, sin, adaln.to(dtype), hp_weights, self.heads, self.eps, False)
            return out.to(x.dtype)
        if self.streamer is not None:  # sequential offload: the block function bypasses the module's hooks
            self.streamer.before(name)
            out = self._block(x, mask, cos, sin, adaln, weights, self.heads, self.eps, self.fp8_matmul)
            self.streamer.after(name)
            return out
        return self._block(x, mask, cos, sin, adaln, weights, self.heads, self.eps, self.fp8_matmul)

    def _graphs_usable(self) -> bool:
        return (self.graphs is not None and self.streamer is None and not hasattr(self.transformer, "_hf_hook")
                and not (self.guard is not None and (self.guard.probing or self.guard.policy == "clamp")))

    @torch.no_grad()
    def forward(self, ctx: FastContext, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        batch, _, h, w = latents.shape
        if ctx.grid != (batch, h, w):
            self._tables(ctx, batch, h, w)
        latents, timestep = latents.to(self.device), timestep.to(self.device)
        if self._graphs_usable():
            return self.graphs(ctx, latents, timestep)
        return self._forward(ctx, latents, timestep)

    def _forward(self, ctx: FastContext, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        t = self.transformer
        batch, channels, h, w = latents.shape
        x = latents.to(device=self.device, dtype=self.dtype)
        adaln = t.t_embedder(timestep.to(self.device) * t.t_scale).type_as(x)
        hp, wp = h // PATCH, w // PATCH
        patches = x.view(batch, channels, hp, PATCH, wp, PATCH).permute(0, 2, 4, 3, 5, 1)
        x = t.all_x_embedder[f"{PATCH}-{F_PATCH}"](patches.reshape(batch, hp * wp, PATCH * PATCH * channels))
        if ctx.x_pad:
            x = torch.cat([x, t.x_pad_token.to(x.dtype).expand(batch, ctx.x_pad, -1)], dim=1)
        with self._sdpa_context():
            self._mark(x, ctx.x_cos, ctx.x_sin)
            for i, block in enumerate(t.noise_refiner):
                name = f"noise_refiner.{i}"
                x = self._run(name, block, x, None, None, ctx.x_freqs, ctx.x_cos, ctx.x_sin, adaln, self.weights[name])
            if ctx.u_mask is None:
                u = torch.cat([x, ctx.cap_stream], dim=1)
            else:
                u = pad_sequence([torch.cat([x[i], ctx.cap_stream[i, :ctx.cap_seqlens[i]]]) for i in range(batch)],
                                 batch_first=True)
            self._mark(u, ctx.u_cos, ctx.u_sin, ctx.u_mask)
            for i, block in enumerate(t.layers):
                name = f"layers.{i}"
                u = self._run(name, block, u, ctx.u_mask, ctx.u_mask_2d, ctx.u_freqs, ctx.u_cos, ctx.u_sin, adaln,
                              self.weights[name])
        out = t.all_final_layer[f"{PATCH}-{F_PATCH}"](u[:, :ctx.x_tokens], c=adaln)
        out = out.view(batch, hp, wp, PATCH, PATCH, channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(batch, channels, h, w)
