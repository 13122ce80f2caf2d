"""The fast transformer path: the same model and numbers as ``Denoiser``, fewer passes over memory.

What it changes, each measured in ``benchmarks/bench_speed.py``:
- q/k/v (and optionally w1/w3) run as one matrix multiply each, on the fused views of the weights' owner
  (``weights.TransformerWeights``): no extra memory.
- The block maths are ``blocks.block_forward`` on a weight view, the same code that runs ComfyUI's own model;
  RoPE in real arithmetic on cos/sin tables built once per generation (diffusers builds complex tables and goes
  through ``view_as_complex`` every block of every step).
- Everything the step does not change (positions, masks, caption stream) is prepared once.
- Optionally the block function is compiled with ``torch.compile`` (one graph for all blocks, sequence
  length dynamic so a new prompt length does not recompile), the attention kernel can be chosen (``attention``),
  and whole steps replay as CUDA graphs (``cuda_graphs.py``).
- fp8 weights multiply in fp8 with row-wise scales where the GPU has fp8 tensor cores.

Every block while the precision guard probes, and every block under the clamp policy, go through diffusers'
block forward instead, so the guard works unchanged. Blocks the guard runs in higher precision ("sticky")
go through the same fast block function on their higher-precision copy.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from . import compile_cache
from . import kernels as _kernels
from .attention import WARM_UP_THREAD, backend_context, sets_global_state
from .blocks import BlockShape, BlockWeights, Linear, block_forward
from .cuda_graphs import StepGraphs, graphs_usable
from .denoiser import F_PATCH, PATCH, DenoiseContext, Denoiser
from .weights import TransformerWeights

log = logging.getLogger(__name__)

_COMPILED = None
WARM_UP_ENV = "ZIMAGE_WARM_UP"  # 0: never; 1: also on the CPU (tests); unset: on CUDA
WARM_UP_TOKENS = 1024  # a 512x512 image's tokens: ~100 MB of activations at Z-Image's size, never the real size's
_WARM_UPS: dict[tuple, threading.Thread] = {}  # per process and kind of call: what a warm-up loads stays loaded
_PROCESS_WARM_UPS: dict[tuple, threading.Thread] = {}  # the weight-free part (our loader: before the weights load)


def wait_warm_ups() -> None:
    """Wait for every running warm-up (no-op when none runs). Whatever moves, reloads or re-points the weights calls
    this first: a warm-up reading a block while its weights move could fuse them again in the wrong place."""
    for thread in list(_PROCESS_WARM_UPS.values()) + list(_WARM_UPS.values()):
        if thread is not threading.current_thread():
            thread.join()


def _warm_up_wanted(device: torch.device) -> bool:
    wanted = os.environ.get(WARM_UP_ENV, "")
    return wanted != "0" and (wanted == "1" or device.type == "cuda")


def _start_once(registry: dict, key: tuple, target, *args) -> threading.Thread:
    """The warm-up thread of ``key`` in ``registry``, started by the first request for it: what a warm-up loads
    stays loaded for the process, so a kind of warm-up runs once."""
    thread = registry.get(key)
    if thread is None:
        thread = registry[key] = threading.Thread(target=target, args=args, daemon=True, name=WARM_UP_THREAD)
        thread.start()
    return thread


def _timed_warm_up(what: str, detail: str, device: torch.device, body) -> None:
    """Run ``body()`` (a warm-up) and wait for its kernels; log "``what````detail`` done in N s", or, when it
    raises, one warning "``what`` failed": the first image then pays its start-up instead, nothing else changes."""
    start = time.perf_counter()
    try:
        body()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        log.info("%s%s done in %.2f s.", what, detail, time.perf_counter() - start)
    except Exception as err:
        log.warning("%s failed (%s: %s); the first image will start up instead.", what, type(err).__name__,
                    str(err)[:300])


def start_process_warm_up(device, dtype: torch.dtype) -> threading.Thread | None:
    """The part of the warm-up that needs no weights, in a thread, once per process: the CUDA libraries' and
    Triton's start-up (a block of small made-up weights with Z-Image's head size through ``block_forward``, eager
    even under ``compile``). ``ZImage.load`` starts it before reading the weights, which it overlaps; the model's
    own warm-up (``FastDenoiser.start_warm_up``) waits for it. Compiling is left to the model's warm-up, after the
    load: inductor's imports hold Python's lock, and overlapped with the weights' read they made that read ~2 s
    slower on the H200 (5.0-5.4 s against 3.0-3.4 s, ``benchmarks/results/first_image_h200.json``) for no net gain
    (``compile_second_process_h200.json``)."""
    device = torch.device(device)
    if not _warm_up_wanted(device):
        return None
    return _start_once(_PROCESS_WARM_UPS, (str(device), dtype), _process_warm_up, device, dtype,
                       torch.is_inference_mode_enabled())


def _process_warm_up(device: torch.device, dtype: torch.dtype, inference: bool) -> None:
    def body():
        dim, heads, hidden, tokens = 256, 2, 512, 32  # head size 128 as Z-Image's: the same attention kernels

        def lin(out_features, in_features):
            return Linear(torch.full((out_features, in_features), 0.01, device=device, dtype=dtype), None, None)

        norms = tuple(torch.ones(n, device=device, dtype=dtype) for n in (dim, dim, dim, dim, 128, 128))
        weights = BlockWeights(lin(4 * dim, 256), norms, lin(3 * dim, dim), lin(dim, dim),
                               (lin(hidden, dim), lin(hidden, dim)), lin(dim, hidden))
        x = torch.full((1, tokens, dim), 0.01, device=device, dtype=dtype)
        cos, sin = torch.ones(1, tokens, 1, 64, device=device), torch.zeros(1, tokens, 1, 64, device=device)
        with torch.inference_mode(inference), torch.no_grad():
            block_forward(x, None, cos, sin, torch.zeros(1, 256, device=device, dtype=dtype), weights,
                          BlockShape(heads, 1e-5, 1e-5), False)

    _timed_warm_up("Z-Image start-up warm-up", "", device, body)


def start_kernel_warm_up(device, dtype: torch.dtype, dim: int, hidden: int, heads: int, fp8: bool
                         ) -> threading.Thread | None:
    """The weight-free start-up of our block maths at a model's own sizes, in a thread, once per process and kind:
    our Triton kernels for these row sizes (their compiled code is specialized by the row length), cuBLAS's (and
    with ``fp8`` cuBLASLt's fp8) first matmul and the attention kernels' first call, on 32 tokens. The Accelerate
    node starts it as ComfyUI's first transformer call returns, and ComfyUI's blocks run the calls until it is done
    (with a precision guard on, the first call starts it and waits; ``NativeAccelerator.call``). No weight of the
    model is read, and it holds a few MB."""
    key = kernel_warm_up_key(device, dtype, dim, hidden, heads, fp8)
    if key is None:
        return None
    return _start_once(_PROCESS_WARM_UPS, key, _kernel_warm_up, torch.device(device), dtype, dim, hidden, heads, fp8,
                       torch.is_inference_mode_enabled())


def kernel_warm_up_key(device, dtype: torch.dtype, dim: int, hidden: int, heads: int, fp8: bool) -> tuple | None:
    """The key of ``start_kernel_warm_up``'s thread for these sizes (``kernel_warm_up_thread``), or None where it
    never runs (not CUDA, no Triton kernels, or ``$ZIMAGE_WARM_UP`` is 0)."""
    device = torch.device(device)
    if device.type != "cuda" or not _warm_up_wanted(device) or not _kernels.available():  # Triton kernels: CUDA
        return None
    return ("kernels", str(device), dtype, dim, hidden, heads, fp8)


def kernel_warm_up_thread(key: tuple) -> threading.Thread | None:
    """The kernel warm-up thread this process started for ``key`` (running or done), or None."""
    return _PROCESS_WARM_UPS.get(key)


def _kernel_warm_up(device, dtype, dim, hidden, heads, fp8, inference) -> None:
    def body():
        tokens, head = 32, dim // heads
        with torch.inference_mode(inference), torch.no_grad():
            full = lambda *shape: torch.full(shape, 0.01, device=device, dtype=dtype)  # noqa: E731
            x, w, mod = full(1, tokens, dim), full(dim), full(1, 1, dim)
            for quantize in {False, fp8}:
                _kernels.rms_norm(x, w, 1e-5, mod, quantize=quantize)
                _kernels.residual(x, x, w, 1e-5, mod, w, 1e-5, mod, quantize_next=quantize)
                _kernels.silu_mul(full(1, tokens, hidden), full(1, tokens, hidden), quantize=quantize)
            _kernels.residual(x, x, w, 1e-5, mod)
            # the caption refiner's unmodulated blocks: each kernel specialization is compiled on its first call
            _kernels.rms_norm(x, w, 1e-5)
            _kernels.residual(x, x, w, 1e-5, None, w, 1e-5, None)
            _kernels.residual(x, x, w, 1e-5)
            cos = torch.ones(1, tokens, 1, head // 2, device=device)
            _kernels.qk_norm_rope(full(1, tokens, 3, heads, head), full(head), full(head), 1e-5, cos, cos * 0)
            q = full(1, heads, tokens, head)
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
            torch.nn.functional.linear(x, full(64, dim))
            if fp8:
                from .fp8 import fp8_linear, quantize_rowwise

                w8, scale = quantize_rowwise(full(64, dim))
                fp8_linear(x, w8, scale, None, True)

    _timed_warm_up("Z-Image Accelerate start-up warm-up", f" ({dtype}, {dim} wide)", device, body)


def compiled_block_forward():
    """``block_forward`` under ``torch.compile``, one object for the process (its compiled code is reused by
    every denoiser; the sequence length is dynamic, so new prompts and sizes don't recompile)."""
    global _COMPILED
    if _COMPILED is None:
        compile_cache.enable()  # compiled code persists across processes (compile_cache.py)
        _COMPILED = torch.compile(block_forward, fullgraph=True, dynamic=None)
    return _COMPILED


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
    """``Denoiser`` running ``blocks.block_forward`` on the owner's weight views, with compile, attention, CUDA-graph
    and fp8 choices."""

    context_type = FastContext

    def __init__(self, transformer, device=None, *, dtype=None, compile: bool = False, attention: str = "auto",
                 fp8_matmul: bool = False, cuda_graph: bool = False, fuse_ffn: bool = True, guard=None,
                 offloader=None):
        super().__init__(transformer, device, dtype=dtype, attention=attention, guard=guard)
        self.weights = TransformerWeights.of(transformer)
        self.names = [n for n in self.weights.blocks if not n.startswith("context_refiner.")]
        for name in self.names:  # fuse now (views: no memory grows), not in the middle of the first step
            self.weights.fused(name)
        self.fp8_matmul = fp8_matmul
        self.fuse_ffn = fuse_ffn
        self.compiled = compile
        self.offloader = offloader  # the pipeline's Offloader: under sequential offload it streams the blocks
        self._block = compiled_block_forward() if compile else block_forward
        self.graphs = StepGraphs(self) if cuda_graph and self.device.type == "cuda" else None
        self._warm_up_pending = True  # the first call waits for any warm-up still running

    # ------------------------------------------------------------------------------- warm-up at load
    # A new process's first image carried 1.0-1.3 s of start-up on an H200 (0.55 s for native ComfyUI's): the first
    # cuBLAS/cuDNN calls, loading our Triton kernels and torch's lazily loaded kernels, and under compile importing
    # inductor, hashing torch's and Triton's sources and tracing the block. None of it depends on the image, so it
    # runs in a thread at load (start_process_warm_up, then this: one step of a 512x512 image), overlapping the
    # weights' read and whatever the workflow does next (the text encoder's load, the prompt's encoding); the first
    # generation waits for what is left. It changes no state that a generation reads. Measured
    # (benchmarks/results/first_image_h200.json, compile_second_process_h200.json): start-up 0.50-0.73 s, of which
    # 0.36-0.49 s is waited for before the first image when nothing overlaps it.
    def _warm_up_key(self) -> tuple:
        return (str(self.device), self.dtype, self.fp8_matmul, self.attention, self.compiled, self.fuse_ffn,
                torch.is_inference_mode_enabled())

    def start_warm_up(self) -> threading.Thread | None:
        """Start the warm-up in a background thread unless one of this kind ran in this process (or ``$ZIMAGE_WARM_UP``
        is 0, or the device is the CPU and it isn't 1, or the attention backend is chosen by switching SDPA's
        process-wide flags, which would switch them under the workflow's other models too). A denoiser's first call
        waits for it."""
        if not _warm_up_wanted(self.device) or sets_global_state(self.attention):
            return None
        key = self._warm_up_key()
        return _start_once(_WARM_UPS, key, self._warm_up, key[-1])

    def _warm_up(self, inference: bool) -> None:
        for thread in list(_PROCESS_WARM_UPS.values()):  # one thread at a time in Triton's and torch's first calls
            thread.join()
        t, device, dtype = self.transformer, self.device, self.dtype

        def body():
            # one step of a small image on its own context: every kernel of a step (the tables, the embedders,
            # the blocks, the final layer) loads; no state a generation reads is touched (no CUDA graph, no guard)
            side = int((WARM_UP_TOKENS if device.type == "cuda" else 16) ** 0.5) * PATCH
            latents = torch.zeros(1, t.in_channels, side, side, device=device, dtype=dtype)
            with torch.inference_mode(inference), torch.no_grad():
                ctx = self._prepare([torch.zeros(32, t.config.cap_feat_dim, device=device, dtype=dtype)])
                self._tables(ctx, 1, side, side)
                self._forward(ctx, latents, torch.full((1,), 0.5, device=device))

        _timed_warm_up("Z-Image warm-up", f" ({'compiled, ' if self.compiled else ''}{self.attention})", device, body)

    def wait_warm_up(self) -> None:
        """Wait for this denoiser's warm-up, and for any other still running: a CUDA graph capture must not overlap
        another thread's kernels (the first call does this)."""
        self._warm_up_pending = False
        wait_warm_ups()

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

    def _run(self, name, x, mask, mask_2d, freqs, cos, sin, adaln):
        owner, shape = self.weights, self.weights.shape
        if self.guard is not None and self.guard.wants_module_forward("transformer", name):
            hp = self.guard.sticky_copy("transformer", name)
            if hp is None:  # diffusers' forward, wrapped by the guard (probing, clamp)
                return owner.blocks[name](x, mask_2d, freqs, adaln)
            dtype = hp.attention_norm1.weight.dtype
            x_hp = x.to(dtype)
            self._mark(x_hp)
            out = self._block(x_hp, mask, cos, sin, adaln.to(dtype), owner.block(name, self.fuse_ffn, module=hp), shape,
                              False, self.attention)
            return out.to(x.dtype)
        weights = owner.block(name, self.fuse_ffn)
        streamer = self.streamer
        if streamer is not None:  # sequential offload: the block function bypasses the module's hooks
            streamer.before(name)
            out = self._block(x, mask, cos, sin, adaln, weights, shape, self.fp8_matmul, self.attention)
            streamer.after(name)
            return out
        return self._block(x, mask, cos, sin, adaln, weights, shape, self.fp8_matmul, self.attention)

    @property
    def streamer(self):
        """Sequential offload's block streamer, or None (asked of the offloader at each call: it may be set up anew)."""
        return self.offloader.transformer_streamer if self.offloader is not None else None

    def graphs_usable(self) -> bool:
        """Whether whole steps may replay as CUDA graphs now (not while weights move or the guard probes)."""
        return self.graphs is not None and graphs_usable(self.transformer, self.guard) and self.streamer is None

    @torch.no_grad()
    def forward(self, ctx: FastContext, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if self._warm_up_pending:
            self.wait_warm_up()
        batch, _, h, w = latents.shape
        if ctx.grid != (batch, h, w):
            self._tables(ctx, batch, h, w)
        latents, timestep = latents.to(self.device), timestep.to(self.device)
        if self.graphs_usable():
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
        with backend_context(self.attention):
            self._mark(x, ctx.x_cos, ctx.x_sin)
            for i, block in enumerate(t.noise_refiner):
                name = f"noise_refiner.{i}"
                x = self._run(name, x, None, None, ctx.x_freqs, ctx.x_cos, ctx.x_sin, adaln)
            if ctx.u_mask is None:
                u = torch.cat([x, ctx.cap_stream], dim=1)
            else:
                u = pad_sequence([torch.cat([x[i], ctx.cap_stream[i, :ctx.cap_seqlens[i]]]) for i in range(batch)],
                                 batch_first=True)
            self._mark(u, ctx.u_cos, ctx.u_sin, ctx.u_mask)
            for i, block in enumerate(t.layers):
                name = f"layers.{i}"
                u = self._run(name, u, ctx.u_mask, ctx.u_mask_2d, ctx.u_freqs, ctx.u_cos, ctx.u_sin, adaln)
        out = t.all_final_layer[f"{PATCH}-{F_PATCH}"](u[:, :ctx.x_tokens], c=adaln)
        out = out.view(batch, hp, wp, PATCH, PATCH, channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(batch, channels, h, w)
