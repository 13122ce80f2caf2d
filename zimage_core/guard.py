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
run on an H100: ``benchmarks/results/guard_h100.json``). When a step comes out non-finite, the guard's step runner
(``run_steps``, which every sampler loop goes through) runs it again, block by block with a check after each block, and each overflowing block is
recomputed from its (finite) input in the higher precision: never a full fp32 model.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from diffusers.hooks import HookRegistry, ModelHook

from .dtypes import device_supports, dtype_name
from .errors import ZImageError
from .weights import WeightOwner, transformer_blocks

log = logging.getLogger("zimage_core")
from .options import GUARD_POLICIES as POLICIES
from .blocks import FP16_MAX, clamp_fp16 as _nan_to_num  # noqa: E402


class PrecisionOverflow(ZImageError):
    """fp16 overflowed and the policy is ``detect``."""


class StepOverflow(Exception):
    """Control flow, not an error: sampling step ``step`` came out non-finite, so the guard's step runner
    (``PrecisionGuard.run_steps``) runs it again from its input state, probing block by block."""

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


_HOOK = "zimage_precision_guard"


class _BlockHook(ModelHook):
    """diffusers hook on one guarded block: the guard decides how the block runs (plain, sticky copy, repaired)."""

    def __init__(self, guard: "PrecisionGuard", component: str, name: str):
        super().__init__()
        self.guard, self.component, self.name = guard, component, name

    def new_forward(self, module, *args, **kwargs):
        return self.guard._run(self.component, self.name, module, self.fn_ref.original_forward, args, kwargs)


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
    def attach(self, models: dict[str, nn.Module]) -> "PrecisionGuard":
        """Hook the blocks of the models (component name -> model); the pipeline hands the guard to the denoiser,
        the prompt encoder and the decoder itself."""
        for component, model in models.items():
            self._models[component] = model
            if self.policy in ("detect", "auto"):
                for name, module in guarded_blocks(component, model).items():
                    registry = HookRegistry.check_if_exists_or_initialize(module)
                    registry.register_hook(_BlockHook(self, component, name), _HOOK)
            elif self.policy == "clamp":
                self._install_clamps(component, model)
        return self

    def detach(self) -> None:
        """Remove the hooks. Sticky choices stay with the models' weight owners for the next guard."""
        for component, model in self._models.items():
            if self.policy in ("detect", "auto"):
                for module in guarded_blocks(component, model).values():
                    HookRegistry.check_if_exists_or_initialize(module).remove_hook(_HOOK, recurse=False)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

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

    def _owner(self, component: str) -> WeightOwner:
        return WeightOwner.of(self._models[component])

    def wants_module_forward(self, component: str, name: str) -> bool:
        """Whether a fast path must call this block's module forward (where the guard acts) this time."""
        return self.policy == "clamp" or self.probing or name in self._owner(component).sticky

    def sticky_copy(self, component: str, name: str) -> nn.Module | None:
        """The higher-precision copy a fast path may run itself for a sticky block outside a probe (no check is
        needed there: an overflow on the way back shows in the step's check and starts a probe)."""
        owner = self._owner(component)
        dtype = owner.sticky.get(name)
        if dtype is None or self.probing or self.policy == "clamp":
            return None
        return owner.high_precision_copy(name, guarded_blocks(component, owner.model)[name], dtype)

    # ------------------------------------------------------------------ the block hook
    def _run(self, component, name, module, original, args, kwargs):
        hp_dtype = self._owner(component).sticky.get(name)
        if hp_dtype is not None:
            out = self._run_high_precision(component, name, module, hp_dtype, args, kwargs)
        else:
            out = original(*args, **kwargs)
        if self.probing and self.policy in ("detect", "auto") and not _finite(out):
            out = self._repair(component, name, module, args, kwargs, tried=hp_dtype)
        return out

    def _run_high_precision(self, component, name, module, dtype, args, kwargs):
        first = _first_tensor(args[0] if args else next(iter(kwargs.values())))
        out_dtype = first.dtype if first is not None else dtype
        clone = self._owner(component).high_precision_copy(name, module, dtype)
        out = clone(*_cast(args, dtype), **_cast(kwargs, dtype))
        back = _cast(out, out_dtype)
        # Checked only while probing: outside, a check here would be a host sync per block (and would break
        # CUDA-graph capture); an overflow on the way back shows in the step's output and starts a probe.
        if self.probing and _finite(out) and not _finite(back):
            raise ZImageError(
                f"{self.component or 'model'} block {name} produces values beyond fp16's range "
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
            out = self._run_high_precision(component, name, module, dtype, args, kwargs)
            if _finite(out):
                self._owner(component).set_sticky(name, dtype)
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

    # ------------------------------------------------------------------ the step runner
    def run_steps(self, steps: int, one_step, state):
        """Run ``state = one_step(i, state)`` for i in 0..steps-1. Each transformer call goes through ``call``,
        which reads the previous step's check once this step is queued; a step found non-finite is run again
        from the state it started from, probing block by block (``_probe``). Any sampler written as
        ``one_step`` gets this without knowing about it."""
        self._pending, self._probe_next = None, False
        starts: dict = {}  # the states the last two steps started from
        i = 0
        while i < steps:
            starts = {k: v for k, v in starts.items() if k == i - 1}
            starts[i] = state
            self.step = i
            try:
                new_state = one_step(i, state)
                if i == steps - 1 and self._pending is not None:
                    pending, self._pending = self._pending, None
                    self._settle(pending)  # the last step's check, read after the loop's last call
            except StepOverflow as redo:
                i, state = redo.step, starts[redo.step]
                continue
            state = new_state
            i += 1
        self.step = None
        return state

    def call(self, fn, *args):
        """The transformer call of the current step, ``fn(*args)``: its finiteness flag stays on the device and is
        read one call later (behind a CUDA event, so the GPU never waits for the host)."""
        self.component = "transformer"
        if self.policy not in ("detect", "auto"):
            return fn(*args)
        if self._probe_next:
            self._probe_next = False
            return self._probe("transformer", fn, args)
        out = fn(*args)
        previous, self._pending = self._pending, (self.step, *_flag_to_host(torch.isfinite(out).all()))
        if previous is not None:
            self._settle(previous)
        return out

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
        """Blocks that run in higher precision, per component: kept by the models' weight owners across runs."""
        out = {}
        for component in self._models:
            blocks = {name: dtype_name(d) for name, d in self._owner(component).sticky.items()}
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
