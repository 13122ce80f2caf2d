"""Our block maths and precision guard on ComfyUI's own Z-Image model (its ``NextDiT``), with no ComfyUI import.

ComfyUI's ``NextDiT._forward`` runs the caption refiner, the noise refiner and the main layers as modules
(``JointTransformerBlock``) and applies the block patches of ``transformer_options["patches"]`` (the Fun
ControlNet's ``noise_refiner`` and ``double_block`` hooks) *between* blocks. ``NativeAccelerator.call`` runs one
call of that ``_forward`` with each block's ``forward`` routed to ``run_block`` for the length of the call (the
instance attribute is removed afterwards), so everything between the blocks stays ComfyUI's own code and the
block patches run unchanged.

**Weights.** ``run_block`` asks a *weight provider* for each block's weights, in ComfyUI's layout. The default,
``ModuleWeights``, reads plain tensors on the compute device from the modules now (a LoRA patched onto the weights
by the ModelPatcher, at any strength, is what it multiplies by). The ComfyUI node gives a provider that gets each
weight the way ComfyUI asks custom nodes to (``comfy.ops.cast_bias_weight`` just before its use, then
``uncast_bias_weight``: ``blocks.Fetched``), so partly loaded models, dynamic VRAM, per-op LoRA, async offload and
quantized weights run our maths around ComfyUI's own weight movement, with no second copy of any weight. A
provider may still decline a block (a format it can't run exactly): that block runs ComfyUI's own forward, with
one log line per reason, counted in ``report()``.

**Calls.** Omni/edit calls (``timestep_zero_index``: two adaLN rows per sample, chosen per token range) run our
maths with per-token modulation (``block_forward``'s ``mod_select``). ComfyUI's attention mask (0.3.75 passes the
caption mask to the caption refiner) is added to the attention logits as ComfyUI's own attention does; a mask for a
batch of several items runs natively, as ComfyUI broadcasts it ([1, 1, B, L]). When another node chose an attention
(``optimized_attention_override``: ``ModelAttentionBackend``, SageAttention packs), the provider's ComfyUI attention
dispatch runs inside our blocks. Lumina 2 models (SiLU modulation) are refused.

Precision guard (the policies of ``guard.py``): per transformer call one finiteness check of the output; when a
call is not finite it runs again with a check after every block, and each overflowing block is recomputed from
its (finite) input in bf16 (fp32 where the device has no bf16, or when bf16 overflows too) and made sticky
through ``WeightOwner.of(diffusion_model)``, so later calls run it in that precision at once. The sticky block
runs our maths with its fp16 weights cast at use, not on a stored copy: the ModelPatcher patches LoRAs into
the weights in place, and a stored copy would keep a stale strength. A check cannot be read one step late
here (ComfyUI's sampler has consumed the output by then), so it costs one host sync per transformer call.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention, backend_context, check_backend
from .blocks import (BlockWeights, Fetched, Linear, _attr, block_forward, map_block, original_block_modules,
                     original_block_shape, original_block_weights)
from .dtypes import device_supports, dtype_name
from .errors import ZImageError
from .fp8 import is_fp8, scaled_mm_available
from .guard import FP16_MAX, GuardEvent, PrecisionOverflow, _finite
from .options import GUARD_POLICIES
from .weights import WeightOwner

log = logging.getLogger("zimage_core")

BLOCK_GROUPS = ("context_refiner", "noise_refiner", "layers")


def native_blocks(diffusion_model: nn.Module) -> dict[str, nn.Module]:
    """Every transformer block of ComfyUI's NextDiT by name (the names our guard and weight owner use)."""
    return {f"{group}.{i}": block for group in BLOCK_GROUPS
            for i, block in enumerate(getattr(diffusion_model, group, None) or ())}


def zimage_reason(diffusion_model: nn.Module) -> str | None:
    """None when ``diffusion_model`` is ComfyUI's NextDiT with the Z-Image config; otherwise what it is not."""
    name = type(diffusion_model).__name__
    if not all(hasattr(diffusion_model, g) for g in BLOCK_GROUPS) or not len(diffusion_model.layers):
        return f"its diffusion model is a {name}, not ComfyUI's NextDiT (Lumina 2 / Z-Image)"
    if getattr(diffusion_model, "pad_tokens_multiple", None) is None:
        return f"its {name} has no pad tokens: a Lumina 2 model, not Z-Image"
    block = diffusion_model.layers[0]
    modulation = getattr(block, "adaLN_modulation", None)
    if modulation is None or len(modulation) != 1:  # Lumina 2: SiLU then Linear; Z-Image: one Linear
        return f"its {name} has Lumina 2's SiLU modulation, not Z-Image's"
    try:
        original_block_weights(block)
        original_block_shape(block)
    except AttributeError as err:
        return f"its {name} blocks are not in the Z-Image layout ({err})"
    return None


def rope_tables(freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, S, 1, head_dim / 2] (fp32) of ComfyUI's rotation matrices ``freqs_cis`` [B, S, 1, D/2, 2, 2]
    (``comfy.ldm.flux.math``: out_i = f[i, 0] * x0 + f[i, 1] * x1, with f = [[cos, -sin], [sin, cos]])."""
    return freqs_cis[..., 0, 0].float().contiguous(), freqs_cis[..., 1, 0].float().contiguous()


def _plain(t) -> bool:
    return t is None or type(t.data if isinstance(t, nn.Parameter) else t) is torch.Tensor


_SCALES = frozenset({"scale_weight", "scale_input"})


def weights_reason(block: nn.Module, device: torch.device) -> str | None:
    """None when every weight of ``block`` is a plain tensor on ``device`` that our maths may read as it is;
    otherwise why ComfyUI's own forward must run the block."""
    # Runs for every block of every call: the module dicts are read directly, because a missed getattr goes
    # through Module.__getattr__'s exception (143 us a block before, 37 after, on this repository's CPU). ComfyUI
    # sets weight_function, bias_function and _v on the instance, scale_weight/scale_input as a parameter,
    # buffer or attribute.
    for module in block.modules():
        d = module.__dict__
        params = d.get("_parameters", {})
        if d.get("weight_function") or d.get("bias_function"):
            return "weights patched per call (low-VRAM LoRA)"
        if "_v" in d:
            return "dynamic VRAM (weights streamed per call)"
        if not (_SCALES.isdisjoint(d) and _SCALES.isdisjoint(params) and _SCALES.isdisjoint(d.get("_buffers", ()))):
            if _attr(module, "scale_weight") is not None or _attr(module, "scale_input") is not None:
                return "a scaled fp8 layer"
        for pname, p in params.items():
            if p is None:
                continue
            if not _plain(p):
                return f"a quantized weight ({type(p.data).__name__})"
            if p.device != device:
                return "weights not on the compute device (partly loaded, low VRAM)"
            if not (p.is_floating_point() or is_fp8(p)):
                return f"weight {pname} of a {type(module).__name__} is {p.dtype}"
    return None


class ModuleWeights:
    """The default weight provider: each block's weights read from its modules, when every one is a plain tensor on
    the compute device (``weights_reason``); otherwise the block runs natively. A provider has ``block(name, block,
    x) -> (BlockWeights or None, reason or None)`` and ``attention(transformer_options, heads) -> (function or None,
    reason or None)``."""

    def block(self, name: str, block: nn.Module, x: torch.Tensor):
        reason = weights_reason(block, x.device)
        return (None, reason) if reason else (original_block_weights(block), None)

    def attention(self, transformer_options, heads: int):
        if transformer_options and transformer_options.get("optimized_attention_override") is not None:
            return None, "another node overrides attention"
        return None, None


class _FetchedNorm(Fetched):
    """A norm's weight through a ``CastWeights`` provider, held from ``get`` to ``done``."""

    __slots__ = ("provider", "module", "dtype", "_held")

    def __init__(self, provider, module, dtype):
        self.provider, self.module, self.dtype, self._held = provider, module, dtype, None

    def _cast(self, x, mode: str):
        self._held = self.provider.cast(self.module, x, mode)
        return self._held

    def get(self, x):
        return self._cast(x, "float")[0]

    def done(self):
        held, self._held = self._held, None
        if held is not None:
            self.provider.uncast(self.module, *held)


class _FetchedLinear(_FetchedNorm):
    """A linear layer's weight through a ``CastWeights`` provider (see there for ``mode``)."""

    __slots__ = ("mode", "scale", "rotation", "shape")

    def __init__(self, provider, module, mode: str, dtype, scale, rotation=None):
        super().__init__(provider, module, dtype)
        self.mode, self.scale = mode, scale
        self.rotation, self.shape = rotation, (module.out_features, module.in_features)

    def get(self, x):
        weight, bias, _ = self._cast(x, self.mode)
        if self.mode == "quantized":  # the raw data of a format our matmuls run, else dequantized per op
            raw = self.provider.raw(weight)
            if raw is not None:
                return Linear(*raw[:2], bias, raw[2] if len(raw) > 2 else None)
            weight = weight.dequantize() if hasattr(weight, "dequantize") else weight
        if self.scale is not None and self.mode == "float":  # legacy scaled fp8 under per-op LoRA: scale after
            weight = weight * self.scale.to(device=weight.device, dtype=weight.dtype)
        return Linear(weight, self.scale if self.mode == "fp8" else None, bias)


class CastWeights(ModuleWeights):
    """A weight provider that gets every weight from its owner just around its use, with no copy of its own: the
    ComfyUI node gives ComfyUI's ``cast_bias_weight``/``uncast_bias_weight`` as ``cast``/``uncast`` (this module
    imports nothing from ComfyUI), so streamed, partly loaded, per-op-LoRA and quantized weights move exactly as
    ComfyUI's own ops move them.

    - ``cast(module, x, mode) -> (weight, bias, token)``: the weight on ``x``'s device; ``mode`` is ``"float"`` (in
      ``x``'s dtype, with any per-op patch applied), ``"fp8"`` (a raw e4m3 weight kept in fp8) or ``"quantized"``
      (a quantized tensor kept as it is); ``uncast(module, weight, bias, token)`` after the last use.
    - ``quantized(weight) -> (how, detail)``: how a quantized weight runs: ``"raw"`` (``raw`` gives its data for our
      matmuls; ``detail`` is (its dtype, its int8 rotation group or None)), ``"dequantize"`` (per op, our maths in the
      compute dtype) or ``"native"`` (ComfyUI's own forward; ``detail`` says why).
    - ``raw(weight) -> (data, scale[, rotation]) | None``: e4m3 or int8 data with its fp32 scale (a scalar or per
      row), and an int8 weight's Hadamard group (int8_convrot).
    - ``attention(transformer_options, heads) -> function or None``: ComfyUI's attention dispatch when another node
      chose an attention.
    - ``stored_dtype(module) -> dtype``: the dtype the owner keeps a layer's plain weight in (under ComfyUI's dynamic
      VRAM the module's tensor is the file's, and the model's dtype, fp8 say, is what ``cast`` gives).

    A block whose weights are all plain tensors on the compute device is read directly (no per-op calls)."""

    def __init__(self, cast, uncast, quantized=None, raw=None, attention=None, fp8_matmul: bool = True,
                 stored_dtype=None):
        self.cast, self.uncast = cast, uncast
        self.stored_dtype = stored_dtype or (lambda module: module.weight.dtype)  # the dtype the owner keeps it in
        self._quantized, self.raw, self._attention = quantized, raw, attention
        self.fp8_matmul = fp8_matmul  # raw fp8 weights may multiply in fp8 (else they are cast per op)
        self._modes: dict[int, tuple] = {}  # id(module) -> (weight identity, mode, dtype, scale, reason)

    def attention(self, transformer_options, heads: int):
        function, reason = super().attention(transformer_options, heads)
        if reason is not None and self._attention is not None:  # another node's attention, through ComfyUI
            return self._attention(transformer_options, heads), None
        return function, reason

    def _mode(self, module, x: torch.Tensor):
        """(mode, dtype get() returns, fp8 scale, int8 rotation, reason to run natively) of a linear layer, by its
        weight now."""
        weight = module.__dict__["_parameters"]["weight"]
        key = id(module)
        cached = self._modes.get(key)
        functions = bool(module.__dict__.get("weight_function") or module.__dict__.get("bias_function"))
        if cached is not None and cached[0] is weight and cached[1] == functions:
            return cached[2:]
        scale = _attr(module, "scale_weight")
        data = weight.data if isinstance(weight, nn.Parameter) else weight
        if type(data) is not torch.Tensor:  # a quantized tensor (comfy_quant, int8, nvfp4, mxfp8 ...)
            how, detail = self._quantized(data) if self._quantized is not None else ("native", "quantized weights")
            if how == "native":
                result = (None, None, None, None, detail)
            elif functions or how == "dequantize" or not self.fp8_matmul:  # per-op LoRA, or dequantized per op
                result = ("quantized", x.dtype, None, None, None)
            else:  # the raw e4m3 or int8 data for our matmuls
                result = ("quantized", detail[0], None, detail[1], None)
        # the dtype the owner keeps the weight in, not the tensor's: under ComfyUI's dynamic VRAM the module holds
        # the file's bf16 tensor of an fp8_e4m3fn_fast model (then ran cast to bf16 per op, on an H100)
        elif self.stored_dtype(module) == torch.float8_e4m3fn and not functions and self.fp8_matmul:
            result = ("fp8", torch.float8_e4m3fn, scale, None, None)
        else:  # float, e5m2, or fp8 under a per-op LoRA: cast to the compute dtype per op
            result = ("float", x.dtype, scale, None, None)
        self._modes[key] = (weight, functions, *result)
        return result

    def block(self, name: str, block: nn.Module, x: torch.Tensor):
        if weights_reason(block, x.device) is None:  # resident plain weights: read them directly
            return original_block_weights(block), None
        modules = original_block_modules(block)
        linears = {}
        for module in (modules.modulation, modules.qkv, modules.out, *modules.ffn, modules.w2):
            if module is None:
                continue
            mode, dtype, scale, rotation, why = self._mode(module, x)
            if mode is None:
                return None, why
            linears[id(module)] = _FetchedLinear(self, module, mode, dtype, scale, rotation)
        return map_block(modules, lambda m: linears[id(m)], lambda m: _FetchedNorm(self, m, x.dtype)), None


def call_reason(x: torch.Tensor, x_mask) -> str | None:
    """None when this call of a block may run our maths; otherwise why it runs natively."""
    if x_mask is not None and x_mask.shape[0] != 1:
        return "an attention mask for a batch (ComfyUI's attention broadcasts it as [1, 1, B, L])"
    return None


def additive_mask(x_mask, dtype: torch.dtype):
    """ComfyUI's caption mask as our attention takes it: ComfyUI's own attention adds the [1, L] mask it is given to
    the logits (a bool mask keeps its meaning: True attends)."""
    if x_mask is None or x_mask.dtype == torch.bool:
        return None if x_mask is None else x_mask.view(1, 1, 1, -1)
    return x_mask.to(dtype).view(1, 1, 1, -1)


def token_select(timestep_zero_index, seq: int, device) -> torch.Tensor:
    """bool [seq], True for the tokens ComfyUI modulates with the second half of the adaLN rows (its
    ``timestep_zero_index`` slices: the image being denoised), False for the others (reference latents)."""
    select = torch.zeros(seq, dtype=torch.bool)
    for start, end in timestep_zero_index:
        select[start:end] = True
    return select.to(device)


def _has_fetched(weights: BlockWeights) -> bool:
    modulation, norms, qkv, out, ffn, w2 = weights
    return any(isinstance(w, Fetched) for w in (modulation, *norms, qkv, out, *ffn, w2))


def _detached(value):
    """The weight view with plain (no-grad) tensors: ComfyUI's loaded weights and its LoRA-patched ones differ in
    ``requires_grad``, which torch.compile would otherwise guard on (one more graph per kind)."""
    if torch.is_tensor(value):
        return value.detach()
    if isinstance(value, tuple):
        items = [_detached(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


class NativeAccelerator:
    """Runs the blocks of ComfyUI's Z-Image NextDiT with ``blocks.block_forward``; see the module docstring.

    One object per Accelerate node output (a ModelPatcher clone), shared by every call through it.
    ``native_clamps``: ComfyUI's own blocks clamp fp16 (0.33 does, 0.3.75 does not); with the guard ``off`` our
    fp16 blocks then clamp the same way. ``weights``: the weight provider (``ModuleWeights`` by default).
    """

    def __init__(self, *, compile: bool = False, attention: str = "auto", fp8_matmul: bool = False,
                 guard: str = "off", native_clamps: bool = False, weights=None):
        if guard not in GUARD_POLICIES:
            raise ZImageError(f"precision guard {guard!r} is unknown: use one of {', '.join(GUARD_POLICIES)}.")
        self.compile = bool(compile)
        self.attention = check_backend(attention)
        self.fp8_matmul = bool(fp8_matmul)
        self.policy = guard
        self.native_clamps = bool(native_clamps)
        self.weights = weights if weights is not None else ModuleWeights()
        self.events: list[GuardEvent] = []
        self.fallbacks: dict[str, str] = {}  # block name -> why it ran natively (last call that did)
        self.native_runs = 0  # blocks run by ComfyUI's forward, over all calls
        self.fast_runs = 0  # blocks run by our maths
        self.fetched_runs = 0  # of those, blocks whose weights the provider fetched per op (streamed, quantized ...)
        self.warming_calls = 0  # transformer calls run by ComfyUI's blocks while our kernels were still loading
        self.weight_dtypes: dict[str, int] = {}  # dtype of the weights our blocks multiplied by -> block runs
        self.calls = 0
        self.probe_runs = 0
        self.checks = 0
        self._logged: set[str] = set()
        self._probing = False
        self._tables: tuple | None = None  # (freqs_cis, cos, sin) of the last table built
        self._call_attention = None  # this call's attention: a backend name, or the provider's function
        self._select: dict = {}  # this call's per-token adaLN choice (omni), by slices and length

    # ------------------------------------------------------------------ what may run fast
    def supported(self, name: str, block: nn.Module, x: torch.Tensor, x_mask=None):
        """(the block's weights for our maths, or None; the reason when None)."""
        reason = call_reason(x, x_mask) or self._call_reason
        if reason:
            return None, reason
        return self.weights.block(name, block, x)

    def _note_fallback(self, name: str, reason: str) -> None:
        self.native_runs += 1
        self.fallbacks[name] = reason
        if reason not in self._logged:
            self._logged.add(reason)
            log.info("Z-Image Accelerate: block %s (and any other with the same reason) runs ComfyUI's own forward: %s",
                     name, reason)

    def _note(self, message: str) -> None:
        if message not in self._logged:
            self._logged.add(message)
            log.info("Z-Image Accelerate: %s", message)

    def _cos_sin(self, freqs_cis: torch.Tensor):
        cached = self._tables
        if cached is None or cached[0] is not freqs_cis:  # one table per call and stream (same tensor object)
            cached = self._tables = (freqs_cis, *rope_tables(freqs_cis))
        return cached[1], cached[2]

    def _mod_select(self, timestep_zero_index, seq: int, device):
        if timestep_zero_index is None:
            return None
        key = (tuple(map(tuple, timestep_zero_index)), seq)
        if key not in self._select:
            self._select[key] = token_select(timestep_zero_index, seq, device)
        return self._select[key]

    def _block_fn(self, eager: bool):
        if self.compile and not eager:
            from .fast_denoiser import compiled_block_forward
            return compiled_block_forward()
        return block_forward

    def _fast(self, block, weights, x, x_mask, freqs_cis, adaln, tzi=None, dtype=None):
        """Our maths on ``block`` with ``weights`` (in ``dtype`` when given: a sticky block, weights cast at use)."""
        cos, sin = self._cos_sin(freqs_cis)
        shape = original_block_shape(block)
        out_dtype = x.dtype
        if dtype is not None and dtype != x.dtype:
            x = x.to(dtype)
            adaln = adaln.to(dtype) if adaln is not None else None
        clamp = x.dtype == torch.float16 and (self.policy == "clamp" or (self.policy == "off" and self.native_clamps))
        fp8 = self.fp8_matmul and dtype is None
        mask, select = additive_mask(x_mask, x.dtype), self._mod_select(tzi, x.shape[1], x.device)
        backend = self._call_attention
        # compiled code can't call ComfyUI (fetched weights, its attention) and is made for the plain call
        fetched = _has_fetched(weights)
        eager = callable(backend) or mask is not None or select is not None or fetched
        if self.compile and eager:
            self._note("compiled blocks need resident plain weights and plain calls: blocks with streamed or "
                       "quantized weights, masks, omni calls or another node's attention run eagerly (same maths)")
        if self.compile and not eager:
            weights = _detached(weights)
            for t in (x, cos, sin):
                torch._dynamo.mark_dynamic(t, 1)
        self.fast_runs += 1
        self.fetched_runs += fetched
        qkv = weights.qkv
        name = dtype_name(qkv.dtype if isinstance(qkv, Fetched) else qkv.weight.dtype)
        self.weight_dtypes[name] = self.weight_dtypes.get(name, 0) + 1
        out = self._block_fn(eager)(x, mask, cos, sin, adaln, weights, shape, fp8, backend, select, clamp)
        return out.to(out_dtype) if out.dtype != out_dtype else out

    # ------------------------------------------------------------------ one block
    def run_block(self, name: str, block: nn.Module, native, args: tuple, kwargs: dict):
        """What ``block.forward(*args, **kwargs)`` does under this accelerator; ``native`` is ComfyUI's forward."""
        x, x_mask, freqs_cis = args[0], args[1] if len(args) > 1 else kwargs.get("x_mask"), \
            args[2] if len(args) > 2 else kwargs.get("freqs_cis")
        adaln = args[3] if len(args) > 3 else kwargs.get("adaln_input")
        tzi = args[4] if len(args) > 4 and not isinstance(args[4], dict) else kwargs.get("timestep_zero_index")
        weights, reason = self.supported(name, block, x, x_mask)
        sticky = WeightOwner.of(self._model).sticky.get(name) if self._model is not None else None
        if weights is not None:
            out = self._fast(block, weights, x, x_mask, freqs_cis, adaln, tzi, sticky)
        else:
            self._note_fallback(name, reason)
            out = native(*args, **kwargs)
        if self._probing and not _finite(out):
            out = self._repair(name, block, x, x_mask, freqs_cis, adaln, tzi, sticky, reason if weights is None else None)
        return out

    def _repair(self, name, block, x, x_mask, freqs_cis, adaln, tzi, tried, native_reason):
        if self.policy == "detect":
            self.events.append(GuardEvent("transformer", name, self.calls, "detected", dtype_name(x.dtype)))
            raise PrecisionOverflow(
                f"fp16 overflow in the transformer at call {self.calls}, block {name}: its output is not finite. "
                "Set the precision guard to 'auto' to run just that block in higher precision, or load the model "
                "in bf16/fp32.")
        weights, why = self.supported(name, block, x, x_mask)
        if weights is None:
            raise ZImageError(
                f"transformer block {name} overflows fp16 and can't be run in higher precision here: {why}. "
                "Load the model in bf16 or fp32 (UNETLoader weight_dtype / --bf16-unet), or load it fully.")
        if tried is None:
            order = [self.fallback(x.device)] + ([torch.float32] if self.fallback(x.device) != torch.float32 else [])
        else:
            order = [torch.float32] if tried != torch.float32 else []
        for dtype in order:
            hp = self._fast(block, weights, x.to(dtype), x_mask, freqs_cis, adaln, tzi, dtype)  # finite in dtype?
            back = hp.to(x.dtype)
            if _finite(hp) and not _finite(back):
                raise ZImageError(
                    f"transformer block {name} produces values beyond fp16's range (65504) even in "
                    f"{dtype_name(dtype)}: fp16 can't hold this model's activations. Load the model in bf16 or fp32.")
            if _finite(back):
                WeightOwner.of(self._model).set_sticky(name, dtype)
                action = "fell back" if tried is None else "escalated"
                self.events.append(GuardEvent("transformer", name, self.calls, action, dtype_name(dtype)))
                log.info("Z-Image Accelerate precision guard: block %s %s to %s", name, action, dtype_name(dtype))
                return back
        raise ZImageError(f"transformer block {name} is not finite even in fp32: the input itself is broken "
                          "(check the weights file), not an fp16 overflow.")

    @staticmethod
    def fallback(device: torch.device) -> torch.dtype:
        return torch.bfloat16 if device_supports(torch.bfloat16, device)[0] else torch.float32

    # ------------------------------------------------------------------ one transformer call
    def start_warm_up(self, diffusion_model: nn.Module, device, dtype: torch.dtype):
        """Arm the weight-free warm-up of our kernels at this model's sizes (``fast_denoiser.start_kernel_warm_up``):
        it starts in a thread when the first transformer call returns (see ``call``). Nothing on the CPU."""
        from .fast_denoiser import kernel_warm_up_key, kernel_warm_up_thread, start_kernel_warm_up

        block = diffusion_model.layers[0]
        args = (device, dtype, block.attention_norm1.weight.shape[0], block.feed_forward.w1.out_features,
                block.attention.n_local_heads, self.fp8_matmul)
        key = kernel_warm_up_key(*args)
        if key is None:
            return
        self._warm_up = kernel_warm_up_thread(key)  # started before (another node): its calls follow it
        if self._warm_up is None:
            self._warm_up_start = lambda: start_kernel_warm_up(*args)

    def _begin_warm_up(self) -> None:
        if self._warm_up_start is not None:
            self._warm_up, self._warm_up_start = self._warm_up_start(), None

    def call(self, diffusion_model: nn.Module, run, transformer_options: dict | None = None):
        """``run()`` (one call of ComfyUI's ``NextDiT._forward``, e.g. the wrapper's executor, with these
        ``transformer_options``) with every block routed through ``run_block``, under this accelerator's attention
        backend and guard."""
        if self.policy == "off" and (self._warm_up_start is not None
                                     or (self._warm_up is not None and self._warm_up.is_alive())):
            # Never wait for our own start-up. The first call is ComfyUI's own: it loads or streams in the weights,
            # CPU work our warm-up would slow by contending for Python's lock (H100, first image: the first step
            # took 0.3-0.45 s longer with the warm-up running beside it). Started as a call returns, the warm-up
            # still slows the calls beside it (``warm_up_due``), while ComfyUI's blocks run them (a JIT running its
            # interpreter until the compiled code is ready). Not with a precision guard, whose checks the user asked
            # for on every call: it starts the warm-up and waits.
            self.warming_calls += 1
            try:
                out = run()
            except BaseException:  # an interrupted sampling leaves no armed warm-up behind
                self._begin_warm_up()
                raise
            if warm_up_due(transformer_options, self.warming_calls):
                self._begin_warm_up()
            return out
        if self._warm_up_start is not None or self._warm_up is not None:
            from .fast_denoiser import wait_warm_ups

            self._begin_warm_up()
            self._warm_up = None
            wait_warm_ups()  # one thread in Triton: the warm-up's compiles and ours never overlap
        self._model = diffusion_model
        self.calls += 1
        self._tables, self._select = None, {}
        heads = diffusion_model.layers[0].attention.n_local_heads
        function, self._call_reason = self.weights.attention(transformer_options or {}, heads)
        self._call_attention = function if function is not None else self.attention
        installed = []
        for name, block in native_blocks(diffusion_model).items():
            if "forward" in block.__dict__:  # another node replaced this block's forward: its code runs
                self._note_fallback(name, "another node replaced the block's forward")
                continue
            native = type(block).forward.__get__(block)

            def forward(*args, _name=name, _block=block, _native=native, **kwargs):
                return self.run_block(_name, _block, _native, args, kwargs)

            block.forward = forward
            installed.append(block)
        try:
            with backend_context(self.attention):
                out = run()
                if self.policy in ("detect", "auto") and not self._probing:
                    self.checks += 1
                    if not _finite(out):
                        self.probe_runs += 1
                        self._probing = True
                        try:
                            out = run()
                        finally:
                            self._probing = False
                        if not _finite(out):
                            raise ZImageError(
                                "the transformer output is not finite although every block is: the overflow is "
                                "outside the blocks (embedders or final layer). Load the model in bf16 or fp32.")
        finally:
            for block in installed:
                del block.forward
            self._tables, self._select, self._call_attention = None, {}, None
        return out

    _model: nn.Module | None = None
    _call_reason: str | None = None
    _warm_up = None  # the running warm-up thread
    _warm_up_start = None  # the armed warm-up, started by the first call

    # ------------------------------------------------------------------ report
    def report(self) -> dict:
        sticky = {}
        if self._model is not None:
            sticky = {n: dtype_name(d) for n, d in WeightOwner.of(self._model).sticky.items()}
        return {"policy": self.policy, "calls": self.calls, "checks": self.checks, "probe_runs": self.probe_runs,
                "fast_blocks": self.fast_runs, "native_blocks": self.native_runs, "fetched_blocks": self.fetched_runs,
                "warming_calls": self.warming_calls,
                "weight_dtypes": dict(self.weight_dtypes), "fallbacks": dict(self.fallbacks), "sticky": sticky,
                "events": [asdict(e) for e in self.events]}

    def summary(self, loaded: str) -> str:
        """One line for the log after a sampling run: what ran where, on which weights, held how (``loaded``)."""
        total = self.fast_runs + self.native_runs
        dtypes = ", ".join(f"{name} ({count})" for name, count in sorted(self.weight_dtypes.items())) or "none"
        line = (f"{self.fast_runs} of {total} block calls ran our maths on {dtypes} weights"
                f"{f' ({self.fetched_runs} fetched per op through ComfyUI)' if self.fetched_runs else ''}; "
                f"ComfyUI holds the model: {loaded}")
        if self.native_runs:
            reasons = "; ".join(sorted(set(self.fallbacks.values())))
            line += f"; {self.native_runs} ran ComfyUI's own forward ({reasons})"
        if self.warming_calls:
            line += (f"; the first {self.warming_calls} transformer call(s) ran ComfyUI's own blocks before our "
                     "kernels were ready")
        return line

    def reset_counts(self) -> None:
        """Start the counts of ``report`` over (per sampling run)."""
        self.fast_runs = self.native_runs = self.fetched_runs = self.warming_calls = 0
        self.fallbacks.clear()
        self.weight_dtypes.clear()


# ``warm_up_due``: started beside ComfyUI's blocks, our kernel warm-up (0.6 s) slows them by contending for Python's
# lock: on the H100 at 1024² (users_part6_h100.json, ``first``) the step beside it took 0.21-0.28 s, not 0.12, and
# the steps it overlapped cost 0.15-0.18 s more in all, while each later step of ours gains 0.012-0.02 s in a first
# image: the warm-up pays for itself only with about 15 steps still to run after it. A schedule with fewer left runs
# ComfyUI's blocks to its end, and the warm-up starts as the last call returns.
EARLY_WARM_UP_STEPS = 20


def warm_up_due(transformer_options: dict | None, calls: int) -> bool:
    """Whether the armed kernel warm-up should start as this call returns, the ``calls``-th of the first sampling:
    after the first call where the schedule (ComfyUI's ``sample_sigmas``, read by its shape: no GPU sync) has at
    least ``EARLY_WARM_UP_STEPS`` steps left, else after its last step's call (one call a step, cond and uncond
    batched; a sampler with two calls a step starts it half way), and after the first call where the schedule is
    unknown."""
    sigmas = (transformer_options or {}).get("sample_sigmas")
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1:
        return True
    left = sigmas.shape[0] - 1 - calls
    return left <= 0 or (calls == 1 and left >= EARLY_WARM_UP_STEPS)


def fp8_matmul_usable(weight_dtype: torch.dtype, device) -> tuple[bool, str]:
    """Whether low-precision matmuls can run on weights stored in ``weight_dtype``: e4m3 on fp8 tensor cores, int8
    on int8 tensor cores (``kernels.int8_matmul`` on CUDA 8.0+, ``torch._int_mm`` on the CPU)."""
    if weight_dtype == torch.int8:
        from .int8 import int8_mm_available

        return (True, "") if int8_mm_available(device) else (False, f"{device} has no int8 matrix multiply")
    if weight_dtype != torch.float8_e4m3fn:
        return False, f"the weights are {dtype_name(weight_dtype)}, not fp8_e4m3fn or int8"
    if not scaled_mm_available(device):
        return False, f"{device} has no fp8 matrix multiply"
    return True, ""


__all__ = ["NativeAccelerator", "ModuleWeights", "CastWeights", "native_blocks", "zimage_reason", "rope_tables", "weights_reason",
           "call_reason", "fp8_matmul_usable", "FP16_MAX"]
