"""Memory policy: keep weights off the GPU except while they are needed.

- ``none``: every model stays on the GPU.
- ``model``: each model is on the GPU only while it runs (text encoder, then transformer, then VAE).
- ``sequential``: the transformer's blocks and the text encoder's layers are streamed one at a time,
  the next one copied in on a side stream while the current one computes; the VAE is moved as a whole.

Weights keep one pinned CPU copy ("master"). Loading copies it to the GPU; offloading just points the
tensors back at the master, with no device-to-host copy (the weights never change), which is what
``module.to("cpu")`` would cost on every cycle. Moves work on storages, so tensors that share one (the
fast path's fused q/k/v and w1/w3 weights and the module weights that are views into them) stay shared.
The triggers are accelerate hooks (``ModelHook``), so a model's forward (and diffusers' ``decode``, which
calls the hook) brings it in.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

from .errors import ZImageError
from .weights import TransformerWeights, transformer_blocks

log = logging.getLogger("zimage_core")
from .options import OFFLOAD_MODES


def module_tensors(module: nn.Module, extra: list[torch.Tensor] = ()) -> list[torch.Tensor]:
    """Parameters and buffers of a module plus ``extra`` tensors (the fast path's fused weights), each once."""
    found = {}
    for t in [*module.parameters(), *module.buffers(), *extra]:
        found[id(t)] = t
    return list(found.values())


def fused_tensors(transformer: nn.Module, names=None) -> list[torch.Tensor]:
    """The fused weights the weights' owner has made for the named blocks (all blocks by default)."""
    return TransformerWeights.of(transformer).extra_tensors(names)


class StorageSet:
    """A group of tensors moved together, storage by storage, between a pinned CPU master and a device."""

    def __init__(self, tensors: list[torch.Tensor], pin: bool):
        self.tensors = tensors
        self.masters: dict[int, torch.UntypedStorage] = {}
        for t in tensors:  # make the pinned masters and point every tensor at them
            key = t.untyped_storage().data_ptr()
            if key not in self.masters:
                storage = t.untyped_storage()
                if storage.device.type != "cpu":
                    storage = storage.cpu()
                if pin and not storage.is_pinned():
                    storage = storage.pin_memory()
                self.masters[key] = storage
        self._views = [(t, self.masters[t.untyped_storage().data_ptr()]) for t in tensors]
        self._set({id(m): m for m in self.masters.values()})
        self.loaded = False
        self.ready: torch.cuda.Event | None = None

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self.masters.values())

    def _set(self, storages: dict[int, torch.UntypedStorage]) -> None:
        # ``.data =`` may change device (``set_`` may not, since torch 2.11); the new tensor is a view of the
        # shared storage, so tensors that shared one before still do.
        with torch.no_grad():
            for t, master in self._views:
                storage = storages[id(master)]
                t.data = torch.empty(0, dtype=t.dtype, device=storage.device).set_(
                    storage, t.storage_offset(), t.size(), t.stride())

    def load(self, device: torch.device, stream: torch.cuda.Stream | None = None,
             consumer: torch.cuda.Stream | None = None) -> None:
        """Copy to ``device`` (on ``stream`` when given; then ``wait`` before use)."""
        if self.loaded:
            return
        copies = {}
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for master in self.masters.values():
                storage = torch.empty(master.nbytes(), dtype=torch.uint8, device=device)
                storage.copy_(torch.empty(0, dtype=torch.uint8).set_(master), non_blocking=True)
                if consumer is not None:
                    storage.record_stream(consumer)
                copies[id(master)] = storage.untyped_storage()
            if stream is not None:
                self.ready = torch.cuda.Event()
                self.ready.record(stream)
        self._set(copies)
        self.loaded = True

    def wait(self) -> None:
        if self.ready is not None:
            torch.cuda.current_stream().wait_event(self.ready)
            self.ready = None

    def drop(self) -> None:
        """Point back at the CPU masters; the device copies are freed once nothing uses them."""
        if self.loaded:
            self._set({id(m): m for m in self.masters.values()})
            self.loaded = False


class ComponentHook(ModelHook):
    """accelerate hook: load the whole model before its forward, dropping the previous model first."""

    def __init__(self, storage: StorageSet, device: torch.device, previous: "ComponentHook | None" = None):
        self.storage, self.device, self.previous = storage, device, previous

    def pre_forward(self, module, *args, **kwargs):
        if self.previous is not None:
            self.previous.offload()
        self.storage.load(self.device)
        return args, kwargs

    def offload(self) -> None:
        self.storage.drop()


class BlockStreamer:
    """Streams the named blocks in order: block i computes while block i+1 is copied in."""

    def __init__(self, blocks: dict[str, nn.Module], device: torch.device, loop_from: str | None = None,
                 extra: dict[str, list[torch.Tensor]] | None = None):
        """``loop_from``: the block that follows the last one (the sampler runs the blocks once per step);
        ``extra``: more tensors per block (the fused weights)."""
        self.device = device
        names = list(blocks)
        self.next = dict(zip(names, names[1:]))
        if loop_from is not None:
            self.next[names[-1]] = loop_from
        extra = extra or {}
        self.sets = {name: StorageSet(module_tensors(m, extra.get(name, ())), pin=device.type == "cuda")
                     for name, m in blocks.items()}
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.hooks = []
        for name, module in blocks.items():
            self.hooks.append(module.register_forward_pre_hook(lambda m, a, n=name: self.before(n)))
            self.hooks.append(module.register_forward_hook(lambda m, a, o, n=name: self.after(n)))

    def before(self, name: str) -> None:
        current = self.sets[name]
        consumer = torch.cuda.current_stream(self.device) if self.stream is not None else None
        current.load(self.device, self.stream, consumer)
        current.wait()
        upcoming = self.next.get(name)
        if upcoming is not None:
            self.sets[upcoming].load(self.device, self.stream, consumer)

    def after(self, name: str) -> None:
        self.sets[name].drop()

    def drop_all(self) -> None:
        for s in self.sets.values():
            s.drop()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def _rest_of(module: nn.Module, streamed: list[nn.Module], extra=()) -> list[torch.Tensor]:
    inside = {id(t) for m in streamed for t in module_tensors(m)} | {id(t) for t in extra}
    return [t for t in module_tensors(module) if id(t) not in inside]


def _on(t: torch.Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (device.index is None or t.device.index in (None, device.index))


def place(module: nn.Module, device: torch.device, extra=()) -> None:
    """Put every tensor of ``module`` (and ``extra``: fused weights) on ``device``, keeping shared storages shared."""
    device = torch.device(device)
    tensors = module_tensors(module, extra)
    if all(_on(t, device) for t in tensors):
        return
    moved = StorageSet(tensors, pin=False)  # points everything at CPU copies first
    if device.type != "cpu":
        moved.load(device)


class Offloader:
    """The offload state of one ``ZImage``; ``apply`` switches modes without reloading anything."""

    def __init__(self, zimage):
        self.zimage = zimage
        self.mode = "none"
        self.hooks: dict[str, ComponentHook] = {}
        self.streamers: list[BlockStreamer] = []
        self.layout = None  # the weights' owner layout the hooks were made for

    @property
    def transformer_streamer(self) -> "BlockStreamer | None":
        return self.streamers[0] if self.streamers else None

    def _extra(self, component: str) -> list[torch.Tensor]:
        return fused_tensors(self.zimage.transformer) if component == "transformer" else []

    def apply(self, mode: str) -> None:
        if mode not in OFFLOAD_MODES:
            raise ZImageError(f"offload {mode!r} is unknown: use one of {', '.join(OFFLOAD_MODES)}.")
        self.reset()
        z, device = self.zimage, self.zimage.device
        pin = device.type == "cuda"
        if mode != "none" and device.type == "cpu":
            log.info("offload %s on the CPU moves weights between two copies in the same memory (tests only).", mode)
        self.mode = mode
        if mode == "model":
            previous = None
            for name in ("text_encoder", "transformer", "vae"):
                model = getattr(z, name)
                if model is None:  # left out (ComfyUI's own CLIP/VAE nodes do its work)
                    continue
                hook = ComponentHook(StorageSet(module_tensors(model, self._extra(name)), pin), device, previous)
                add_hook_to_module(model, hook)
                hook.offload()
                self.hooks[name] = previous = hook
        elif mode == "sequential":
            blocks = transformer_blocks(z.transformer)
            extra = {name: fused_tensors(z.transformer, [name]) for name in blocks}
            self.streamers.append(BlockStreamer(blocks, device, loop_from="noise_refiner.0", extra=extra))
            te_hook = None
            if z.text_encoder is not None:
                layers = {f"layers.{i}": layer for i, layer in enumerate(z.text_encoder.layers)}
                self.streamers.append(BlockStreamer(layers, device))
                # Everything outside the streamed blocks is small (embedders, final layer, the VAE) and moves whole.
                te_hook = ComponentHook(StorageSet(_rest_of(z.text_encoder, list(layers.values())), pin), device)
            for s in self.streamers:
                s.drop_all()
            tr_rest = StorageSet(_rest_of(z.transformer, list(blocks.values()), [t for e in extra.values() for t in e]),
                                 pin)
            tr_hook = ComponentHook(tr_rest, device, te_hook)
            vae_hook = ComponentHook(StorageSet(module_tensors(z.vae), pin), device, tr_hook) if z.vae else None
            for name, model, hook in (("text_encoder", z.text_encoder, te_hook), ("transformer", z.transformer, tr_hook),
                                      ("vae", z.vae, vae_hook)):
                if model is None:
                    continue
                add_hook_to_module(model, hook)
                hook.offload()
                self.hooks[name] = hook
        self.layout = TransformerWeights.of(z.transformer).layout
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def refresh(self) -> None:
        """When the weights' owner made new tensors since the hooks were set up (fused or re-fused weights), set
        the current mode up again so that they move with the rest."""
        if self.mode != "none" and TransformerWeights.of(self.zimage.transformer).layout != self.layout:
            mode = self.mode
            self.detach()
            self.apply(mode)

    def before(self, component: str) -> None:
        """Bring a component in where no forward call does it (the fast path calls the blocks directly)."""
        self.refresh()
        hook = self.hooks.get(component)
        if hook is not None:
            hook.pre_forward(getattr(self.zimage, component))

    def finish(self) -> None:
        """After a generation: everything back to the CPU (the next run starts with the text encoder)."""
        for hook in self.hooks.values():
            hook.offload()
        for s in self.streamers:
            s.drop_all()

    def detach(self) -> None:
        """Remove every hook without moving weights (another ``ZImage`` takes the models over)."""
        z = self.zimage
        for name in self.hooks:
            remove_hook_from_module(getattr(z, name))
        for s in self.streamers:
            s.remove()
        self.hooks.clear()
        self.streamers.clear()
        self.mode = "none"

    def reset(self) -> None:
        z = self.zimage
        for name, hook in self.hooks.items():
            model = getattr(z, name)
            remove_hook_from_module(model)
            hook.storage.load(z.device)  # back on the device as in mode none
        for s in self.streamers:
            s.remove()
            for st in s.sets.values():
                st.load(z.device)
        self.hooks.clear()
        self.streamers.clear()
        self.mode = "none"
