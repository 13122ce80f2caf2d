"""The one owner of a model's weights as the fast paths see them.

``TransformerWeights.of(transformer)`` is the single object that knows, for a diffusers
``ZImageTransformer2DModel``:

- the fused views: q/k/v (and w1/w3) of each block concatenated into one tensor, the modules' own weights turned
  into views of it (no extra memory; diffusers' block forward, used by the guard's probes, runs on the same
  numbers);
- fp8 weights with their per-row scales (``FP8Linear``), seen through the same views;
- the precision guard's sticky blocks: which block runs in which higher dtype, and that dtype's copy;
- a ``version`` that changes whenever any of this changes (a sticky block, new weights, a LoRA merge). CUDA graphs
  key on it, offload re-collects its tensors when it moved, so a change of weights is picked up everywhere.

Text encoder and VAE only have sticky blocks: ``WeightOwner.of(model)`` gives theirs. Owners are found through a
weak registry keyed by the model, so state never lives in attributes stamped on torch modules and dies with
the model. The guard and LoRA change weights only through these objects.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn

from .blocks import BlockShape, BlockWeights, Linear, linear_of

_OWNERS: "weakref.WeakKeyDictionary[nn.Module, WeightOwner]" = weakref.WeakKeyDictionary()


def transformer_blocks(transformer) -> dict[str, nn.Module]:
    """Every block of the transformer by name, in the order a generation runs them (caption refiner once,
    then per step the noise refiner and the main layers)."""
    return {f"{group}.{i}": block for group in ("context_refiner", "noise_refiner", "layers")
            for i, block in enumerate(getattr(transformer, group))}


class WeightOwner:
    """Sticky higher-precision blocks of one model, and the version of its weights."""

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)
        self.version = 0
        self.sticky: dict[str, torch.dtype] = {}  # block name -> the dtype it runs in
        self._copies: dict[tuple[str, torch.dtype], nn.Module] = {}

    @classmethod
    def of(cls, model: nn.Module) -> "WeightOwner":
        owner = _OWNERS.get(model)
        if owner is None or not isinstance(owner, cls):
            owner = _OWNERS[model] = cls(model)
        return owner

    @property
    def model(self) -> nn.Module:
        return self._model()

    def changed(self) -> None:
        """Something about the weights changed: compiled graphs, CUDA graphs and offload must look again."""
        self.version += 1

    # ------------------------------------------------------------------ sticky blocks (the precision guard)
    def set_sticky(self, name: str, dtype: torch.dtype) -> None:
        if self.sticky.get(name) != dtype:
            self.sticky[name] = dtype
            self.changed()

    def high_precision_copy(self, name: str, module: nn.Module, dtype: torch.dtype) -> nn.Module:
        """``module`` (block ``name``) copied to ``dtype``, made once. The copy runs its class's forward: hooks that
        others registered on the original (the guard's, layerwise casting) are not carried over."""
        key = (name, dtype)
        if key not in self._copies:
            clone = copy.deepcopy(module)
            for sub in clone.modules():  # hooks live in the instance dict (diffusers/accelerate registries)
                for attr in ("forward", "_diffusers_hook", "_hf_hook", "_old_forward"):
                    sub.__dict__.pop(attr, None)
                sub._forward_hooks.clear()
                sub._forward_pre_hooks.clear()
            clone.to(dtype)
            for sub in clone.modules():
                if hasattr(sub, "compute_dtype"):
                    sub.compute_dtype = dtype
            self._copies[key] = clone
        return self._copies[key]

    def drop_copies(self) -> None:
        """Forget the higher-precision copies (they are remade from the current weights when next needed)."""
        self._copies.clear()
        self.changed()


@dataclass
class _Fused:
    qkv: Linear
    w13: Linear
    w1: Linear
    w3: Linear


def _fuse(linears: list[nn.Module]) -> Linear:
    """Concatenate the weights (and fp8 scales) of ``linears`` by rows; each module's weight becomes a view."""
    weight = torch.cat([m.weight.data for m in linears])
    scales = [getattr(m, "weight_scale", None) for m in linears]
    scale = torch.cat([s.data for s in scales]) if scales[0] is not None else None
    rows = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(weight[rows:rows + n], requires_grad=False)
        if scale is not None:
            m.weight_scale = nn.Parameter(scale[rows:rows + n], requires_grad=False)
        rows += n
    return Linear(weight, scale, None)


class TransformerWeights(WeightOwner):
    """The weight owner of a diffusers ``ZImageTransformer2DModel``; see the module docstring."""

    def __init__(self, transformer: nn.Module):
        super().__init__(transformer)
        self.blocks = {n: b for n, b in transformer_blocks(transformer).items()}
        self._fused: dict[str, _Fused] = {}
        self.layout = 0  # counts the times fused tensors were made anew (offload re-collects its tensors then)
        first = transformer.layers[0]
        self.shape = BlockShape(first.attention.heads, float(first.attention_norm1.eps),
                                float(first.attention.norm_q.eps))

    def fused(self, name: str) -> _Fused:
        block = self.blocks[name]
        attn, ffn = block.attention, block.feed_forward
        current = self._fused.get(name)
        # Still fused when to_q's weight is a view of the fused matrix (offload moves both together); otherwise the
        # module was given new weights since (``model.to(dtype)``, a reload) and is fused again.
        if current is not None and (current.qkv.weight.untyped_storage().data_ptr()
                                    == attn.to_q.weight.untyped_storage().data_ptr()):
            return current
        qkv = _fuse([attn.to_q, attn.to_k, attn.to_v])
        w13 = _fuse([ffn.w1, ffn.w3])
        self._fused[name] = _Fused(qkv, w13, linear_of(ffn.w1), linear_of(ffn.w3))
        self.layout += 1
        if current is not None:  # the module was given new weights (e.g. ``.to(dtype)``): a new version
            self.changed()
        return self._fused[name]

    def block(self, name: str, fuse_ffn: bool = False, module: nn.Module | None = None) -> BlockWeights:
        """The block maths' view of block ``name`` (of ``module`` instead, e.g. a sticky copy, when given).
        ``fuse_ffn=False`` runs w1 and w3 as two matrix multiplies: on an H100 two N=10240 GEMMs beat one
        N=20480 GEMM."""
        if module is not None:
            return diffusers_block_weights(module, fuse_ffn)
        block, fused = self.blocks[name], self.fused(name)
        attn = block.attention
        modulation = linear_of(block.adaLN_modulation[0]) if block.modulation else None
        norms = (block.attention_norm1.weight, block.attention_norm2.weight, block.ffn_norm1.weight,
                 block.ffn_norm2.weight, attn.norm_q.weight, attn.norm_k.weight)
        ffn = fused.w13 if fuse_ffn else (linear_of(block.feed_forward.w1), linear_of(block.feed_forward.w3))
        return BlockWeights(modulation, norms, fused.qkv, linear_of(attn.to_out[0]), ffn,
                            linear_of(block.feed_forward.w2))

    def extra_tensors(self, names=None) -> list[torch.Tensor]:
        """Tensors the fast path uses that no module holds as a parameter (the fused matrices made so far) of the
        named blocks (all by default), for offload."""
        out = []
        for name, f in self._fused.items():
            if names is None or name in names:
                out += [t for t in (f.qkv.weight, f.qkv.scale, f.w13.weight, f.w13.scale) if t is not None]
        return out


def diffusers_block_weights(block: nn.Module, fuse_ffn: bool = False) -> BlockWeights:
    """The view of a diffusers ``ZImageTransformerBlock`` not owned by a ``TransformerWeights`` (a sticky copy):
    q/k/v concatenated on the fly."""
    attn, ffn = block.attention, block.feed_forward
    qkv = [linear_of(m) for m in (attn.to_q, attn.to_k, attn.to_v)]
    scale = torch.cat([l.scale for l in qkv]) if qkv[0].scale is not None else None
    qkv = Linear(torch.cat([l.weight for l in qkv]), scale, None)
    w1, w3 = linear_of(ffn.w1), linear_of(ffn.w3)
    if fuse_ffn:
        w13 = Linear(torch.cat([w1.weight, w3.weight]),
                     torch.cat([w1.scale, w3.scale]) if w1.scale is not None else None, None)
    modulation = linear_of(block.adaLN_modulation[0]) if block.modulation else None
    norms = (block.attention_norm1.weight, block.attention_norm2.weight, block.ffn_norm1.weight,
             block.ffn_norm2.weight, attn.norm_q.weight, attn.norm_k.weight)
    return BlockWeights(modulation, norms, qkv, linear_of(attn.to_out[0]), w13 if fuse_ffn else (w1, w3),
                        linear_of(ffn.w2))
