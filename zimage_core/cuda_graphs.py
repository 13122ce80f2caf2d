"""CUDA graphs: replay a whole transformer step, or a whole text-encoder pass, as one launch.

A step launches a few hundred kernels; launched one by one from Python they leave the GPU idle between
them. A captured graph replays them back to back. Graphs are cached by everything whose change would make
them wrong: shapes, the addresses of the weights, and the version of the weights' owner (``weights.py``), which
changes with every sticky block of the precision guard, every LoRA merge and every re-fusing. A new key's first
generation runs eagerly (warm-up, ``torch.compile``); the capture comes with its next generation. Any failure to
capture falls back to eager launches with a one-line log.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, fields

import torch

from .attention import plans_bought
from .weights import WeightOwner

log = logging.getLogger("zimage_core")
MAX_GRAPHS = 4


def graphs_usable(model, guard) -> bool:
    """Whether a graph may replay ``model``'s work now: not while accelerate hooks move its weights (offload),
    and not while the precision guard probes or clamps (it then runs other code each time)."""
    if hasattr(model, "_hf_hook"):
        return False
    return not (guard is not None and (guard.probing or guard.policy == "clamp"))


def _capture(fn, *static_inputs, pool=None):
    """Warm up ``fn`` on a side stream, then capture it; returns (graph, static output). ``auto`` attention buys
    cuDNN's plans in the warm-up (a graph keeps the kernel of capture time for every replay; a plan can't be built
    while capturing)."""
    with plans_bought():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn(*static_inputs)
    return graph, out


@dataclass
class _StepGraph:
    graph: torch.cuda.CUDAGraph
    ctx: object  # the context whose tensors the graph reads (static buffers)
    latents: torch.Tensor
    timestep: torch.Tensor
    out: torch.Tensor


class StepGraphs:
    """Graphs of ``FastDenoiser._forward`` keyed by shapes, weight addresses and the weights' version."""

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.graphs: OrderedDict[tuple, _StepGraph] = OrderedDict()
        self.seen: set[tuple] = set()  # keys run eagerly by an earlier generation: captured when met again
        self.pool = None
        self.failed = False

    def _key(self, ctx, latents: torch.Tensor) -> tuple:
        d = self.denoiser
        weights = tuple(t.data_ptr() for name in d.names for t in _tensors(d.weights.block(name, d.fuse_ffn))
                        if t is not None)
        # A sticky block (or one escalated from bf16 to fp32) runs another copy: the owner's version changes.
        return (tuple(latents.shape), latents.dtype, tuple(ctx.cap_stream.shape), tuple(ctx.cap_seqlens),
                d.transformer.x_pad_token.data_ptr(), weights, d.weights.version)

    def __call__(self, ctx, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        d = self.denoiser
        if self.failed:
            return d._forward(ctx, latents, timestep)
        key = self._key(ctx, latents)
        g = self.graphs.get(key)
        if g is None:
            # A key met for the first time runs eagerly for the whole generation (warm-up and compile for free);
            # the capture comes with the next generation of that key. Capturing within the first one cost its
            # image an extra step and the recording, for graphs that gain ~0.4% per step at 1024² on an H200.
            if key not in self.seen or ctx.extras.get("eager_key") == key:
                if len(self.seen) >= 8 * MAX_GRAPHS:  # keys of sizes and weights long gone
                    self.seen.clear()
                self.seen.add(key)
                ctx.extras["eager_key"] = key
                return d._forward(ctx, latents, timestep)
            try:
                self.pool = self.pool or torch.cuda.graph_pool_handle()
                static_lat, static_t = latents.clone(), timestep.clone()
                graph, out = _capture(lambda a, b: d._forward(ctx, a, b), static_lat, static_t, pool=self.pool)
            except Exception as err:  # e.g. a kernel that can't be captured: stay correct, just slower
                log.warning("CUDA graph capture failed (%s); running the transformer without graphs.", err)
                self.failed = True
                return d._forward(ctx, latents, timestep)
            g = self.graphs[key] = _StepGraph(graph, ctx, static_lat, static_t, out)
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        elif g.ctx is not ctx and ctx.extras.get("graph_ctx") is not g:
            _copy_context(ctx, g.ctx)  # a new generation of the same shape: new values, same buffers
            ctx.extras["graph_ctx"] = g
        self.graphs.move_to_end(key)
        g.latents.copy_(latents)
        g.timestep.copy_(timestep)
        g.graph.replay()
        return g.out.clone()


def _tensors(tree):
    """Every tensor in nested tuples/lists/dicts."""
    if torch.is_tensor(tree):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (tuple, list)):
        for v in tree:
            yield from _tensors(v)


def _copy_context(source, target) -> None:
    for f in fields(source):
        a, b = getattr(source, f.name), getattr(target, f.name)
        if torch.is_tensor(a) and torch.is_tensor(b):
            b.copy_(a)


class EncoderGraphs:
    """Graphs of the text encoder per length bucket. Attention is causal, so tokens padded on at the end
    change nothing before them: a prompt of L tokens runs in the graph of the next multiple of 64."""

    BUCKET = 64
    PAD_ID = 151643

    def __init__(self):
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()
        self.failed = False

    def __call__(self, encoder, ids: torch.Tensor, run) -> torch.Tensor | None:
        """Embeddings ``[L, hidden]``, or None when graphs can't be used (the caller runs eagerly)."""
        if self.failed or ids.shape[0] != 1:
            return None
        length = ids.shape[1]
        bucket = -(-length // self.BUCKET) * self.BUCKET
        key = (bucket, tuple(p.data_ptr() for p in encoder.parameters()), WeightOwner.of(encoder).version)
        entry = self.graphs.get(key)
        if entry is None:
            static = torch.full((1, bucket), self.PAD_ID, dtype=torch.long, device=ids.device)
            try:
                graph, out = _capture(run, static)
            except Exception as err:
                log.warning("CUDA graph capture of the text encoder failed (%s); running it eagerly.", err)
                self.failed = True
                return None
            entry = self.graphs[key] = (graph, static, out)
            while len(self.graphs) > 2 * MAX_GRAPHS:
                self.graphs.popitem(last=False)
        graph, static, out = entry
        static.fill_(self.PAD_ID)
        static[:, :length].copy_(ids)
        graph.replay()
        return out[:length].clone()
