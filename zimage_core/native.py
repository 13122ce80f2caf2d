"""Our block maths and precision guard on ComfyUI's own Z-Image model (its ``NextDiT``), with no ComfyUI import.

ComfyUI's ``NextDiT._forward`` runs the caption refiner, the noise refiner and the main layers as modules
(``JointTransformerBlock``) and applies the block patches of ``transformer_options["patches"]`` (the Fun
ControlNet's ``noise_refiner`` and ``double_block`` hooks) *between* blocks. ``NativeAccelerator.call`` runs one
call of that ``_forward`` with each block's ``forward`` routed to ``run_block`` for the length of the call (the
instance attribute is removed afterwards), so everything between the blocks stays ComfyUI's own code and the
block patches run unchanged.

``run_block`` reads the block's weights now, in ComfyUI's layout (``blocks.original_block_weights``): a LoRA
patched onto the weights by the ModelPatcher, at any strength, is what it multiplies by. A block runs natively
(ComfyUI's own forward, one log line per reason) whenever our maths could give another answer:

- its weights are not plain tensors on the compute device: partly loaded models (low VRAM: ComfyUI casts and
  moves them per op), dynamic VRAM (``_v``), per-call weight functions (a LoRA applied per op under low VRAM),
  quantized tensors (``QuantizedTensor``), legacy scaled fp8 layers;
- another pack replaced the block's ``forward`` (an object patch) or overrides attention
  (``optimized_attention_override``), or the call is an omni/edit call (``timestep_zero_index``), or an
  attention mask is given (ComfyUI's padded-batch masks);
- the model is not Z-Image's NextDiT (Lumina 2's SiLU-modulated blocks).

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
from .blocks import _attr, _linear, block_forward, original_block_shape, original_block_weights, rms, rope
from .dtypes import device_supports, dtype_name
from .errors import ZImageError
from .fp8 import is_fp8, scaled_mm_available
from .guard import FP16_MAX, GuardEvent, PrecisionOverflow, _finite, _nan_to_num
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


def call_reason(x_mask, timestep_zero_index, transformer_options) -> str | None:
    """None when this call of a block may run our maths; otherwise why it runs natively."""
    if x_mask is not None:
        return "an attention mask (padded caption batch)"
    if timestep_zero_index is not None:
        return "an omni/edit call (reference latents)"
    if transformer_options and transformer_options.get("optimized_attention_override") is not None:
        return "another node overrides attention"
    return None


def clamped_block_forward(x, attn_mask, cos, sin, adaln, weights, shape, fp8_matmul, backend="auto"):
    """``blocks.block_forward`` with ComfyUI's fp16 clamps (``nan_to_num`` to ±65504 on the attention output, the
    SwiGLU product and the FFN output): what the ``clamp`` policy runs, and what ``off`` runs in fp16 on a
    ComfyUI whose own blocks clamp (0.33), so turning the guard off never changes native's result."""
    modulation, norms, qkv_w, out_w, ffn_w, w2_w = weights
    heads, eps, qk_eps = shape
    n_attn1, n_attn2, n_ffn1, n_ffn2, n_q, n_k = norms
    if modulation is not None:
        scale_msa, gate_msa, scale_mlp, gate_mlp = _linear(adaln, modulation, False).unsqueeze(1).chunk(4, dim=2)
        h = rms(x, n_attn1, eps) * (1.0 + scale_msa)
    else:
        h = rms(x, n_attn1, eps)
    batch, seq, dim = x.shape
    q, k, v = _linear(h, qkv_w, fp8_matmul).view(batch, seq, 3, heads, dim // heads).unbind(2)
    q, k = rope(rms(q, n_q, qk_eps), cos, sin), rope(rms(k, n_k, qk_eps), cos, sin)
    o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask, backend)
    o = _nan_to_num(_linear(o.transpose(1, 2).reshape(batch, seq, dim), out_w, fp8_matmul))
    o = rms(o, n_attn2, eps)
    x = x + gate_msa.tanh() * o if modulation is not None else x + o
    h = rms(x, n_ffn1, eps)
    h = h * (1.0 + scale_mlp) if modulation is not None else h
    if isinstance(ffn_w, tuple):
        g1, g3 = _linear(h, ffn_w[0], fp8_matmul), _linear(h, ffn_w[1], fp8_matmul)
    else:
        g1, g3 = _linear(h, ffn_w, fp8_matmul).chunk(2, dim=-1)
    f = rms(_nan_to_num(_linear(_nan_to_num(F.silu(g1) * g3), w2_w, fp8_matmul)), n_ffn2, eps)
    return x + gate_mlp.tanh() * f if modulation is not None else x + f


_COMPILED_CLAMPED = None


def compiled_clamped_block_forward():
    global _COMPILED_CLAMPED
    if _COMPILED_CLAMPED is None:
        _COMPILED_CLAMPED = torch.compile(clamped_block_forward, fullgraph=True, dynamic=None)
    return _COMPILED_CLAMPED


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
    fp16 blocks then clamp the same way.
    """

    def __init__(self, *, compile: bool = False, attention: str = "auto", fp8_matmul: bool = False,
                 guard: str = "off", native_clamps: bool = False):
        if guard not in GUARD_POLICIES:
            raise ZImageError(f"precision guard {guard!r} is unknown: use one of {', '.join(GUARD_POLICIES)}.")
        self.compile = bool(compile)
        self.attention = check_backend(attention)
        self.fp8_matmul = bool(fp8_matmul)
        self.policy = guard
        self.native_clamps = bool(native_clamps)
        self.events: list[GuardEvent] = []
        self.fallbacks: dict[str, str] = {}  # block name -> why it ran natively (last call that did)
        self.native_runs = 0  # blocks run by ComfyUI's forward, over all calls
        self.fast_runs = 0  # blocks run by our maths
        self.calls = 0
        self.probe_runs = 0
        self.checks = 0
        self._logged: set[str] = set()
        self._probing = False
        self._tables: tuple | None = None  # (freqs_cis, cos, sin) of the last table built

    # ------------------------------------------------------------------ what may run fast
    def supported(self, block: nn.Module, x: torch.Tensor, x_mask=None, timestep_zero_index=None,
                  transformer_options=None) -> tuple[bool, str]:
        """(whether ``block`` runs our maths on this call, the reason when not)."""
        reason = call_reason(x_mask, timestep_zero_index, transformer_options) or weights_reason(block, x.device)
        return reason is None, reason or ""

    def _note_fallback(self, name: str, reason: str) -> None:
        self.native_runs += 1
        self.fallbacks[name] = reason
        if reason not in self._logged:
            self._logged.add(reason)
            log.info("Z-Image Accelerate: block %s (and any other with the same reason) runs ComfyUI's own forward: %s",
                     name, reason)

    def _cos_sin(self, freqs_cis: torch.Tensor):
        cached = self._tables
        if cached is None or cached[0] is not freqs_cis:  # one table per call and stream (same tensor object)
            cached = self._tables = (freqs_cis, *rope_tables(freqs_cis))
        return cached[1], cached[2]

    def _block_fn(self, clamp: bool):
        if self.compile:
            from .fast_denoiser import compiled_block_forward
            return compiled_clamped_block_forward() if clamp else compiled_block_forward()
        return clamped_block_forward if clamp else block_forward

    def _fast(self, block, x, freqs_cis, adaln, dtype=None):
        """Our maths on ``block`` (in ``dtype`` when given: a sticky block, weights cast at use)."""
        cos, sin = self._cos_sin(freqs_cis)
        weights, shape = original_block_weights(block), original_block_shape(block)
        if self.compile:
            weights = _detached(weights)
        out_dtype = x.dtype
        if dtype is not None and dtype != x.dtype:
            x = x.to(dtype)
            adaln = adaln.to(dtype) if adaln is not None else None
        clamp = x.dtype == torch.float16 and (self.policy == "clamp" or (self.policy == "off" and self.native_clamps))
        fp8 = self.fp8_matmul and dtype is None
        if self.compile:
            for t in (x, cos, sin):
                torch._dynamo.mark_dynamic(t, 1)
        self.fast_runs += 1
        out = self._block_fn(clamp)(x, None, cos, sin, adaln, weights, shape, fp8, self.attention)
        return out.to(out_dtype) if out.dtype != out_dtype else out

    # ------------------------------------------------------------------ one block
    def run_block(self, name: str, block: nn.Module, native, args: tuple, kwargs: dict):
        """What ``block.forward(*args, **kwargs)`` does under this accelerator; ``native`` is ComfyUI's forward."""
        x, x_mask, freqs_cis = args[0], args[1] if len(args) > 1 else kwargs.get("x_mask"), \
            args[2] if len(args) > 2 else kwargs.get("freqs_cis")
        adaln = args[3] if len(args) > 3 else kwargs.get("adaln_input")
        tzi = args[4] if len(args) > 4 and not isinstance(args[4], dict) else kwargs.get("timestep_zero_index")
        options = kwargs.get("transformer_options")
        ok, reason = self.supported(block, x, x_mask, tzi, options)
        sticky = WeightOwner.of(self._model).sticky.get(name) if self._model is not None else None
        if ok:
            out = self._fast(block, x, freqs_cis, adaln, sticky)
        else:
            self._note_fallback(name, reason)
            out = native(*args, **kwargs)
        if self._probing and not _finite(out):
            out = self._repair(name, block, x, freqs_cis, adaln, sticky, reason if not ok else None)
        return out

    def _repair(self, name, block, x, freqs_cis, adaln, tried, native_reason):
        if self.policy == "detect":
            self.events.append(GuardEvent("transformer", name, self.calls, "detected", dtype_name(x.dtype)))
            raise PrecisionOverflow(
                f"fp16 overflow in the transformer at call {self.calls}, block {name}: its output is not finite. "
                "Set the precision guard to 'auto' to run just that block in higher precision, or load the model "
                "in bf16/fp32.")
        if native_reason is not None and weights_reason(block, x.device) is not None:
            raise ZImageError(
                f"transformer block {name} overflows fp16 and can't be run in higher precision here: {native_reason}. "
                "Load the model in bf16 or fp32 (UNETLoader weight_dtype / --bf16-unet), or load it fully.")
        if tried is None:
            order = [self.fallback(x.device)] + ([torch.float32] if self.fallback(x.device) != torch.float32 else [])
        else:
            order = [torch.float32] if tried != torch.float32 else []
        for dtype in order:
            hp = self._fast(block, x.to(dtype), freqs_cis, adaln, dtype)  # finite in dtype?
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
    def call(self, diffusion_model: nn.Module, run):
        """``run()`` (one call of ComfyUI's ``NextDiT._forward``, e.g. the wrapper's executor) with every block
        routed through ``run_block``, under this accelerator's attention backend and guard."""
        self._model = diffusion_model
        self.calls += 1
        self._tables = None
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
            self._tables = None
        return out

    _model: nn.Module | None = None

    # ------------------------------------------------------------------ report
    def report(self) -> dict:
        sticky = {}
        if self._model is not None:
            sticky = {n: dtype_name(d) for n, d in WeightOwner.of(self._model).sticky.items()}
        return {"policy": self.policy, "calls": self.calls, "checks": self.checks, "probe_runs": self.probe_runs,
                "fast_blocks": self.fast_runs, "native_blocks": self.native_runs, "fallbacks": dict(self.fallbacks),
                "sticky": sticky, "events": [asdict(e) for e in self.events]}


def fp8_matmul_usable(diffusion_model: nn.Module, device) -> tuple[bool, str]:
    """Whether fp8 matmuls can run: e4m3 weights in the blocks and fp8 tensor cores on ``device``."""
    block = diffusion_model.layers[0]
    if block.attention.qkv.weight.dtype != torch.float8_e4m3fn:
        return False, f"the weights are {dtype_name(block.attention.qkv.weight.dtype)}, not fp8_e4m3fn"
    if not scaled_mm_available(device):
        return False, f"{device} has no fp8 matrix multiply"
    return True, ""


__all__ = ["NativeAccelerator", "native_blocks", "zimage_reason", "rope_tables", "weights_reason", "call_reason",
           "clamped_block_forward", "fp8_matmul_usable", "FP16_MAX"]
