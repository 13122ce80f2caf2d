"""The one owner of a model's weights as the fast paths see them.

``TransformerWeights.of(transformer)`` is the single object that knows, for a diffusers
``ZImageTransformer2DModel``:

- the fused views: q/k/v (and w1/w3) of each block concatenated into one tensor, the modules' own weights turned
  into views of it (no extra memory; diffusers' block forward, used by the guard's probes, runs on the same
  numbers);
- fp8 weights with their per-row scales (``FP8Linear``), seen through the same views;
- the precision guard's sticky blocks: which block runs in which higher dtype, and that dtype's copy;
- LoRA merges (``merge``): each patched weight is recomputed from its original, kept on the CPU, and written in
  place (fp8 weights are requantized with fresh row scales), so fused views, CUDA graphs and offload masters see
  the new values; strength 0 or a removed LoRA writes the original back bit for bit;
- a ``version`` that changes whenever any of this changes (a sticky block, new weights, a LoRA merge). CUDA graphs
  key on it, offload re-collects its tensors when it moved, so a change of weights is picked up everywhere.

The text encoder and the VAE have sticky blocks and (the text encoder) LoRA merges too: ``WeightOwner.of(model)``
gives theirs. Owners are found through a
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
from .errors import ZImageError
from .fp8 import quantize_rowwise
from .int8 import quantize_rowwise_int8

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
        self._originals: dict[str, tuple] = {}  # weight name -> (CPU copy, fp8 scale copy) while a LoRA changes it
        # The LoRA set merged into the weights now, as ((LoRA key, strength), ...) in order; () = the original weights.
        # Several ZImages (several loader nodes of the same files) share one model: each states the set it wants
        # before it runs (``apply_loras``), and this owner brings the weights to exactly that set.
        self.applied: tuple = ()
        self._applied_patches: dict[str, list] = {}

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
            self._copies[key] = plain_copy(module, dtype)
        return self._copies[key]

    def clear_sticky(self) -> None:
        """Forget every sticky block (benchmarks and tests start over with it)."""
        self.sticky.clear()
        self.drop_copies()

    def drop_copies(self) -> None:
        """Forget the higher-precision copies (they are remade from the current weights when next needed)."""
        self._copies.clear()
        self.changed()

    # ------------------------------------------------------------------ LoRA merges
    def target(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the tensor holding weight ``name``, its fp8 row scale or None), written in place by ``merge``."""
        module_name, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        scale = getattr(module, "weight_scale", None) if attr == "weight" else None
        return getattr(module, attr), scale

    def apply_loras(self, signature: tuple, patches: dict[str, list]) -> bool:
        """Bring the weights to the LoRA set ``signature`` (its ``patches``: see ``merge``) unless they are there.

        All or nothing: when the merge fails (a non-finite result, out of memory), the weights go back to the set
        merged before and the error is raised. Returns whether anything was merged."""
        if signature == self.applied:
            return False
        previous = self._applied_patches
        try:
            self.merge(patches)
        except BaseException:
            self.merge(previous)  # every weight recomputed from its original: exactly the set before
            raise
        self.applied, self._applied_patches = signature, patches
        return True

    def merge(self, patches: dict[str, list]) -> int:
        """Make the weights equal their originals plus ``patches`` (name -> [(Patch, strength, LoRA name)], in order).

        Weights patched before and not now go back to their originals. A merged weight that is not finite (NaN or
        Inf in the LoRA, or a product beyond the storage dtype's range) raises ``ZImageError`` naming the LoRA and
        the key; ``apply_loras`` then restores the set before. Returns how many weights changed."""
        touched = set(self._originals) | {n for n, plist in patches.items() if any(e[1] for e in plist)}
        with torch.no_grad():
            for name in sorted(touched):
                weight, scale = self.target(name)
                if name not in self._originals:
                    self._originals[name] = (_host_copy(weight), None if scale is None else _host_copy(scale))
                original, original_scale = self._originals[name]
                active = [e for e in patches.get(name, []) if e[1]]
                if not active:  # strength 0 or removed: the original, bit for bit
                    weight.copy_(original)
                    if scale is not None:
                        scale.copy_(original_scale)
                    del self._originals[name]
                    continue
                merged = original.to(weight.device, copy=True).float()  # never the kept original itself
                if original_scale is not None:
                    merged = merged * original_scale.to(weight.device).float()
                for patch, strength, *label in active:
                    view = merged if patch.rows is None else merged.narrow(0, patch.rows[0], patch.rows[1])
                    view += patch.delta(view, strength).to(view.device)
                    if not bool(torch.isfinite(view).all()):
                        _not_finite(name, patch, strength, label, "the merged weight is NaN or Inf in fp32")
                if scale is not None:  # fp8/int8: fresh row scales for the merged weight (int8: unrotated ones)
                    w8, new_scale = (quantize_rowwise_int8 if weight.dtype == torch.int8 else quantize_rowwise)(merged)
                    weight.copy_(w8)
                    scale.copy_(new_scale.to(scale.dtype))
                else:
                    cast = merged.to(weight.dtype)
                    if not bool(torch.isfinite(cast).all()):
                        patch, strength, *label = active[-1]
                        _not_finite(name, patch, strength, label,
                                    f"the merged weight exceeds {weight.dtype}'s range (the model's storage dtype)")
                    weight.copy_(cast)
        if touched:
            self.drop_copies()  # sticky high-precision copies were made from the old weights
        return len(touched)


def _not_finite(name: str, patch, strength: float, label: list, why: str):
    lora = label[0] if label else "a LoRA"
    raise ZImageError(f"{lora}: key {patch.source or name} at strength {strength:g} makes {name} non-finite ({why}). "
                      "The LoRA file is damaged or its strength too large: re-download or re-export it, or lower "
                      "the strength. Nothing was merged.")


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``t`` in ordinary (pageable) memory. Not page-locked, although copies back from pinned pages
    are ~8x faster (H200 machine: 0.020 against 0.153 s/GiB, ``benchmarks/results/host_copy_h200.json``): torch's
    pinned allocator rounds every block up to a power of two, about +54% host memory for this model's matrices by
    that rule (a 79 MB w1 takes 128 MB), memory that can't be swapped out."""
    return t.detach().to("cpu", copy=True)


def plain_copy(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A deep copy of ``module`` (in ``dtype`` when given) that runs its class's forward: the hooks others
    registered on the original (the guard's, layerwise casting, offload) are not carried over."""
    clone = copy.deepcopy(module)
    for sub in clone.modules():  # hooks live in the instance dict (diffusers/accelerate registries)
        for attr in ("forward", "_diffusers_hook", "_hf_hook", "_old_forward"):
            sub.__dict__.pop(attr, None)
        sub._forward_hooks.clear()
        sub._forward_pre_hooks.clear()
    if dtype is not None:
        clone.to(dtype)
        for sub in clone.modules():
            if hasattr(sub, "compute_dtype"):
                sub.compute_dtype = dtype
    return clone


@dataclass
class _Fused:
    qkv: Linear
    w13: Linear
    w1: Linear
    w3: Linear


def _cat(linears: list[Linear]) -> Linear:
    """The rows of ``linears`` (weights, and fp8/int8 row scales when they have them) in one matrix."""
    scale = torch.cat([l.scale.detach() for l in linears]) if linears[0].scale is not None else None
    return Linear(torch.cat([l.weight.detach() for l in linears]), scale, None, linears[0].rotation)


def _fuse(modules: list[nn.Module]) -> Linear:
    """``_cat`` of the modules' weights; each module's weight (and scale) becomes a view of the result."""
    fused = _cat([linear_of(m) for m in modules])
    rows = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(fused.weight[rows:rows + n], requires_grad=False)
        if fused.scale is not None:
            m.weight_scale = nn.Parameter(fused.scale[rows:rows + n], requires_grad=False)
        rows += n
    return fused


def _view(block: nn.Module, qkv: Linear, ffn) -> BlockWeights:
    """The ``BlockWeights`` of a diffusers ``ZImageTransformerBlock`` around its q/k/v matrix and FFN input
    weights (``ffn``: w1|w3 fused, or the pair)."""
    attn = block.attention
    modulation = linear_of(block.adaLN_modulation[0]) if block.modulation else None
    norms = (block.attention_norm1.weight, block.attention_norm2.weight, block.ffn_norm1.weight,
             block.ffn_norm2.weight, attn.norm_q.weight, attn.norm_k.weight)
    return BlockWeights(modulation, norms, qkv, linear_of(attn.to_out[0]), ffn, linear_of(block.feed_forward.w2))


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
        return _view(block, fused.qkv, fused.w13 if fuse_ffn else (fused.w1, fused.w3))

    def forget_fused(self) -> None:
        """Drop the fused matrices (e.g. before ``model.to(...)``, which would leave them behind); the modules keep
        their weights as views until they are re-fused on next use."""
        self._fused.clear()
        self.layout += 1
        self.changed()

    def target(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight ``name`` in the original checkpoint layout (LoRA's canonical names): the fused q/k/v matrix for
        ``…attention.qkv.weight``, the diffusers parameter otherwise."""
        from .lora import diffusers_name

        block, _, rest = name.partition(".attention.qkv.")
        if rest and block in self.blocks:
            fused = self.fused(block).qkv
            return fused.weight, fused.scale
        return super().target(diffusers_name(name))

    def canonical_shapes(self) -> dict[str, tuple]:
        """Every weight by its original-layout name (what LoRA files name), with its shape: diffusers' to_q, to_k
        and to_v are one ``attention.qkv`` matrix there."""
        out = {}
        for name, p in self.model.named_parameters():
            if name.endswith(".attention.to_q.weight"):
                out[name.replace(".attention.to_q.", ".attention.qkv.")] = (3 * p.shape[0], p.shape[1])
                continue
            if any(f".attention.to_{x}." in name for x in "qkv"):  # k, v (and fp8 scales): in the qkv matrix
                continue
            for old, new in _TO_ORIGINAL.items():
                name = name.replace(old, new)
            out[name] = tuple(p.shape)
        return out

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
    qkv = _cat([linear_of(m) for m in (attn.to_q, attn.to_k, attn.to_v)])
    w1, w3 = linear_of(ffn.w1), linear_of(ffn.w3)
    return _view(block, qkv, _cat([w1, w3]) if fuse_ffn else (w1, w3))


_TO_ORIGINAL = {".attention.to_out.0.": ".attention.out.", ".attention.norm_q.": ".attention.q_norm.",
                ".attention.norm_k.": ".attention.k_norm.", "all_x_embedder.2-1.": "x_embedder.",
                "all_final_layer.2-1.": "final_layer."}
