"""Precision guard: fp16 that gives the right image.

Z-Image's activations pass fp16's limit of 65504 in some blocks, and the overflow turns the latents into
NaN. The guard watches the transformer's blocks, the text encoder's layers and the VAE decoder's blocks:

- ``off``: plain fp16.
- ``detect``: stop at the first non-finite value with an error naming component, step and block.
- ``auto``: run only the blocks that overflow in a higher precision (bf16 where the device has it, else
  fp32; fp32 if bf16 still overflows), and remember them on the model ("sticky") so the cost is paid once.
- ``clamp``: ComfyUI's ``nan_to_num(±65504)`` at the SwiGLU product, the attention output and the FFN
  output. Lossy: it hides the overflow instead of fixing it.

Cost when nothing overflows: one ``isfinite`` reduction and one host sync per step (and one per prompt
encode and per decode); the blocks run unchanged. A step's check is read one step late, behind a CUDA event,
once the next step is queued, so the GPU never waits for the host (a check read at once cost about 1% of the
run on an H100: ``benchmarks/results/guard_h100.json``). When a step comes out non-finite, the sampler runs it
again (``StepOverflow``), block by block with a check after each block, and each overflowing block is
recomputed from its (finite) input in the higher precision: never a full fp32 model.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .dtypes import device_supports, dtype_name
from .denoiser import transformer_blocks
from .errors import ZImageError

log = logging.getLogger("zimage_core")
POLICIES = ("off", "detect", "auto", "clamp")
FP16_MAX = 65504.0


class PrecisionOverflow(ZImageError):
    """fp16 overflowed and the policy is ``detect``."""


class StepOverflow(Exception):
    """Control flow, not an error: sampling step ``step`` came out non-finite, so the sampler runs it again
    from its input latents, and the guard probes that run block by block."""

    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


@dataclass
class GuardEvent:
    component: str
    block: str
    step: int | None
    action: str  # "detected", "fell back", "escalated", "clamped"
    dtype: str


def _cast(value, dtype):
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def _first_tensor(value):
    if torch.is_tensor(value):
        return value
    if isinstance(value, (tuple, list)) and value:
        return _first_tensor(value[0])
    return getattr(value, "sample", None)


def _finite(value) -> bool:
    t = _first_tensor(value)
    return t is None or bool(torch.isfinite(t).all())


def _flag_to_host(flag: torch.Tensor) -> tuple[torch.Tensor, object]:
    """(host copy of a device flag, an event marking when it is there). ``flag.item()`` would wait for all the
    work queued on the stream so far; waiting on the event waits only for the work before the flag."""
    if flag.device.type != "cuda":
        return flag, None
    host = torch.empty((), dtype=torch.bool, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def _nan_to_num(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float16:
        return x
    return torch.nan_to_num(x, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)


def guarded_blocks(component: str, model: nn.Module) -> dict[str, nn.Module]:
    """The modules the guard watches, by name: one transformer block, encoder layer or decoder block each."""
    if component == "transformer":
        return transformer_blocks(model)
    if component == "text_encoder":
        names = [f"layers.{i}" for i in range(len(model.layers))]
    else:
        dec = model.decoder
        names = ["decoder.conv_in"]
        names += [f"decoder.mid_block.resnets.{i}" for i in range(len(dec.mid_block.resnets))]
        names += [f"decoder.mid_block.attentions.{i}" for i in range(len(dec.mid_block.attentions))
                  if dec.mid_block.attentions[i] is not None]
        for b, block in enumerate(dec.up_blocks):
            names += [f"decoder.up_blocks.{b}.resnets.{i}" for i in range(len(block.resnets))]
            if block.upsamplers:
                names.append(f"decoder.up_blocks.{b}.upsamplers.0")
        names += ["decoder.conv_norm_out", "decoder.conv_out"]
    return {n: model.get_submodule(n) for n in names}


class PrecisionGuard:
    """One policy applied to the three models of a ``ZImage``; see the module docstring."""

    def __init__(self, policy: str, device: torch.device):
        if policy not in POLICIES:
            raise ZImageError(f"precision guard {policy!r} is unknown: use one of {', '.join(POLICIES)}.")
        self.policy = policy
        self.device = torch.device(device)
        self.fallback = torch.bfloat16 if device_supports(torch.bfloat16, self.device)[0] else torch.float32
        self.probing = False
        self.component = None
        self.step: int | None = None
        self.events: list[GuardEvent] = []
        self.probe_runs = 0
        self.checks = 0
        self._pending: tuple | None = None  # (step, its isfinite flag, the event after which the host has it)
        self._probe_next = False  # the next step is a re-run of a non-finite one
        self._models: dict[str, nn.Module] = {}
        self._handles: list = []

    # ------------------------------------------------------------------ wiring
    def attach(self, zimage) -> "PrecisionGuard":
        """Wrap the blocks of the three models and hook the guard into the pipeline."""
        for component, model in (("transformer", zimage.transformer), ("text_encoder", zimage.text_encoder),
                                 ("vae", zimage.vae)):
            self._models[component] = model
            if self.policy in ("detect", "auto"):
                for name, module in guarded_blocks(component, model).items():
                    self._wrap(component, name, module)
            elif self.policy == "clamp":
                self._install_clamps(component, model)
        zimage.denoiser.guard = self
        zimage.prompt_encoder.guard = self
        zimage.guard = self
        return self

    def detach(self) -> None:
        """Unwrap the blocks. Sticky choices stay on the models for the next guard that attaches."""
        for model in self._models.values():
            for module in model.modules():
                if "_zimage_guard" in module.__dict__:
                    del module.__dict__["forward"], module.__dict__["_zimage_guard"]
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _wrap(self, component: str, name: str, module: nn.Module) -> None:
        original = type(module).forward.__get__(module)
        guard = self

        def forward(*args, **kwargs):
            return guard._run(component, name, module, original, args, kwargs)

        module.forward = forward
        module._zimage_guard = (component, name)

    def _install_clamps(self, component: str, model: nn.Module) -> None:
        def clamp_output(_module, _args, output):
            if torch.is_tensor(output):
                return _nan_to_num(output)
            if isinstance(output, tuple) and output and torch.is_tensor(output[0]):
                return (_nan_to_num(output[0]),) + output[1:]
            return output

        def clamp_input(_module, args):
            return (_nan_to_num(args[0]),) + tuple(args[1:])

        vae_blocks = guarded_blocks("vae", model) if component == "vae" else {}
        for name, module in model.named_modules():
            if component == "transformer" and name.endswith((".attention", ".feed_forward")):
                self._handles.append(module.register_forward_hook(clamp_output))
            elif component == "transformer" and name.endswith(".feed_forward.w2"):
                self._handles.append(module.register_forward_pre_hook(clamp_input))  # the SwiGLU product
            elif component == "text_encoder" and name.endswith((".self_attn", ".mlp")):
                self._handles.append(module.register_forward_hook(clamp_output))
            elif component == "text_encoder" and name.endswith(".mlp.down_proj"):
                self._handles.append(module.register_forward_pre_hook(clamp_input))
            elif name in vae_blocks:
                self._handles.append(module.register_forward_hook(clamp_output))

    def wants_module_forward(self, block: nn.Module) -> bool:
        """Whether a fast path must call this block's module forward (where the guard acts) this time."""
        return self.policy == "clamp" or self.probing or "_zimage_hp_dtype" in block.__dict__

    def sticky_copy(self, block: nn.Module) -> nn.Module | None:
        """The higher-precision copy a fast path may run itself for a sticky block outside a probe (no check is
        needed there: an overflow on the way back shows in the step's check and starts a probe)."""
        dtype = block.__dict__.get("_zimage_hp_dtype")
        if dtype is None or self.probing or self.policy == "clamp":
            return None
        return self._high_precision_copy(block, dtype)

    # ------------------------------------------------------------------ the block wrapper
    def _run(self, component, name, module, original, args, kwargs):
        hp_dtype = module.__dict__.get("_zimage_hp_dtype")
        if hp_dtype is not None:
            out = self._run_high_precision(module, hp_dtype, args, kwargs)
        else:
            out = original(*args, **kwargs)
        if self.probing and self.policy in ("detect", "auto") and not _finite(out):
            out = self._repair(component, name, module, args, kwargs, tried=hp_dtype)
        return out

    def _high_precision_copy(self, module: nn.Module, dtype: torch.dtype) -> nn.Module:
        copies = module.__dict__.setdefault("_zimage_hp_copies", {})
        if dtype not in copies:
            clone = copy.deepcopy(module)
            for sub in clone.modules():  # the copy runs its class's forward, not the guard's wrapper
                for attr in ("forward", "_zimage_guard", "_zimage_hp_dtype", "_zimage_hp_copies", "_zimage_fused"):
                    sub.__dict__.pop(attr, None)
            clone.to(dtype)
            for sub in clone.modules():
                if hasattr(sub, "compute_dtype"):
                    sub.compute_dtype = dtype
            copies[dtype] = clone
        return copies[dtype]

    def _run_high_precision(self, module, dtype, args, kwargs):
        first = _first_tensor(args[0] if args else next(iter(kwargs.values())))
        out_dtype = first.dtype if first is not None else dtype
        clone = self._high_precision_copy(module, dtype)
        out = clone(*_cast(args, dtype), **_cast(kwargs, dtype))
        back = _cast(out, out_dtype)
        # Checked only while probing: outside, a check here would be a host sync per block (and would break
        # CUDA-graph capture); an overflow on the way back shows in the step's output and starts a probe.
        if self.probing and _finite(out) and not _finite(back):
            raise ZImageError(
                f"{self.component or 'model'} block {module._zimage_guard[1]} produces values beyond fp16's range "
                f"(65504) even in {dtype_name(dtype)}: fp16 can't hold this model's activations here. "
                "Use bf16 or fp32 compute for this component."
            )
        return back

    def _repair(self, component, name, module, args, kwargs, tried):
        step = self.step if component == "transformer" else None
        if self.policy == "detect":
            self.events.append(GuardEvent(component, name, step, "detected", "fp16"))
            where = f" at step {step + 1}" if step is not None else ""
            raise PrecisionOverflow(
                f"fp16 overflow in the {component.replace('_', ' ')}{where}, block {name}: its output is not finite. "
                "Set the precision guard to 'auto' to run just that block in higher precision, or use bf16/fp32."
            )
        if tried is None:
            order = [self.fallback] + ([torch.float32] if self.fallback != torch.float32 else [])
        else:
            order = [torch.float32] if tried != torch.float32 else []
        for dtype in order:
            out = self._run_high_precision(module, dtype, args, kwargs)
            if _finite(out):
                module._zimage_hp_dtype = dtype
                action = "fell back" if tried is None else "escalated"
                self.events.append(GuardEvent(component, name, step, action, dtype_name(dtype)))
                log.info("precision guard: %s %s %s to %s", component, name, action, dtype_name(dtype))
                return out
        raise ZImageError(
            f"{component} block {name} is not finite even in fp32: the input itself is broken (check the "
            "weights file), not an fp16 overflow."
        )

    # ------------------------------------------------------------------ per-call checks
    def guarded_call(self, component: str, fn, *args, check=None):
        """Run ``fn``; if its result is not finite, run it again in probing mode (block checks on)."""
        self.component = component
        out = fn(*args)
        if self.policy not in ("detect", "auto") or self.probing:
            return out
        self.checks += 1
        if _finite(check(out) if check else out):
            return out
        return self._probe(component, fn, args, check)

    def _probe(self, component: str, fn, args, check=None):
        """Run ``fn`` again with a check after every guarded block (``_run`` repairs what overflows)."""
        self.probe_runs += 1
        self.probing = True
        try:
            out = fn(*args)
        finally:
            self.probing = False
        if not _finite(check(out) if check else out):
            raise ZImageError(
                f"the {component.replace('_', ' ')} output is not finite although every guarded block is: the "
                "overflow is outside the blocks (embedders or final layer). Use bf16 or fp32 compute."
            )
        return out

    # ------------------------------------------------------------------ sampling steps, checked one step late
    def begin_steps(self) -> None:
        self._pending, self._probe_next = None, False

    def run_step(self, denoiser, ctx, latents, timestep):
        """The transformer call of one step. Its finiteness flag stays on the device; the previous step's flag
        is read now that this step is queued, and raises ``StepOverflow`` if that step was not finite."""
        self.step = denoiser.step_index
        self.component = "transformer"
        if self.policy not in ("detect", "auto"):
            return denoiser.forward(ctx, latents, timestep)
        if self._probe_next:
            self._probe_next = False
            return self._probe("transformer", denoiser.forward, (ctx, latents, timestep))
        out = denoiser.forward(ctx, latents, timestep)
        previous, self._pending = self._pending, (self.step, *_flag_to_host(torch.isfinite(out).all()))
        if previous is not None:
            self._settle(previous)
        return out

    def finish_steps(self) -> None:
        """Read the last step's flag (the sampler calls this after its last step)."""
        if self._pending is not None:
            self._settle(self._pending)

    def _settle(self, pending) -> None:
        step, flag, ready = pending
        self.checks += 1
        if ready is not None:
            ready.synchronize()  # waits for that step only, not for the one queued after it
        if not bool(flag):
            self._pending, self._probe_next = None, True
            raise StepOverflow(step)

    # ------------------------------------------------------------------ report
    def begin_run(self) -> None:
        self.events = []

    def sticky(self) -> dict[str, dict[str, str]]:
        """Blocks that run in higher precision, per component: persists on the model across runs."""
        out = {}
        for component, model in self._models.items():
            blocks = {name: dtype_name(m.__dict__["_zimage_hp_dtype"])
                      for name, m in guarded_blocks(component, model).items() if "_zimage_hp_dtype" in m.__dict__}
            if blocks:
                out[component] = blocks
        return out

    def report(self) -> dict:
        sticky = self.sticky()
        if self.policy == "clamp":
            summary = "clamp: fp16 activations clipped to ±65504 (lossy)"
        elif not sticky and not self.events:
            summary = f"{self.policy}: no overflow"
        else:
            parts = [f"{c}: " + ", ".join(f"{b} → {d}" for b, d in blocks.items()) for c, blocks in sticky.items()]
            summary = f"{self.policy}: higher precision for " + "; ".join(parts)
        return {"policy": self.policy, "summary": summary, "events": [asdict(e) for e in self.events],
                "sticky": sticky, "probe_runs": self.probe_runs, "checks": self.checks}
