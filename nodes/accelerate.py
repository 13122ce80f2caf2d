"""ZTurboAccelerate: our block maths, compile and precision guard on ComfyUI's own Z-Image MODEL.

Built like ComfyUI's ``TorchCompileModel``: a clone of the ModelPatcher (``disable_dynamic=True`` where the
ComfyUI has dynamic VRAM, so weights are resident tensors) with one ``DIFFUSION_MODEL`` wrapper. The wrapper
runs the NextDiT call through ``zimage_core.native.NativeAccelerator``, which routes each block's forward to our
maths for the length of the call. Nothing of ComfyUI is replaced or patched outside that call.
"""

from __future__ import annotations

import inspect
import logging
import sys

from zimage_core import (ATTENTION_BACKENDS, GUARD_POLICIES, NativeAccelerator, ZImageError, fp8_matmul_usable,
                         zimage_reason)

from .adapters import CATEGORY
from .api import io

log = logging.getLogger("zimage_core")
WRAPPER_KEY = "zturbo_accelerate"


def _wrappers_mp():
    import comfy.patcher_extension

    return comfy.patcher_extension.WrappersMP


def _clone(model):
    """A clone with resident weights: ComfyUI 0.33's dynamic VRAM streams weights per op (its own compile node
    clones the same way); older ComfyUIs have no such argument."""
    if "disable_dynamic" in inspect.signature(model.clone).parameters:
        return model.clone(disable_dynamic=True)
    return model.clone()


def accelerate(model, compile: bool = False, attention: str = "auto", cuda_graphs: bool = False,
               precision_guard: str = "off", fp8_matmul: bool = False):
    """(the accelerated MODEL clone, its NativeAccelerator). Raises ZImageError for a model that is not Z-Image."""
    diffusion_model = model.get_model_object("diffusion_model")
    reason = zimage_reason(diffusion_model)
    if reason is not None:
        raise ZImageError(f"Z-Image Turbo Accelerate works on ComfyUI's Z-Image model only, and this MODEL is not "
                          f"one: {reason}. Connect the MODEL of a UNETLoader that loaded a Z-Image checkpoint "
                          "(z_image_turbo_*.safetensors), or remove this node.")
    if cuda_graphs:
        log.warning("Z-Image Accelerate: cuda_graphs is not applied to ComfyUI's model: a captured graph would "
                    "keep the weights of capture time and silently skip a LoRA or strength change made later; "
                    "compile gives the speed instead.")
    if fp8_matmul:
        usable, why = fp8_matmul_usable(diffusion_model, model.load_device)
        if not usable:
            log.info("Z-Image Accelerate: fp8 matmul is off: %s", why)
            fp8_matmul = False
    # ComfyUI 0.33's own blocks clamp fp16 (clamp_fp16); with the guard off ours do the same there.
    native_clamps = hasattr(sys.modules.get(type(diffusion_model).__module__), "clamp_fp16")
    accel = NativeAccelerator(compile=compile, attention=attention, fp8_matmul=fp8_matmul, guard=precision_guard,
                              native_clamps=native_clamps)
    clone = _clone(model)

    def wrapper(executor, *args, **kwargs):
        return accel.call(executor.class_obj, lambda: executor(*args, **kwargs))

    kind = _wrappers_mp().DIFFUSION_MODEL
    clone.remove_wrappers_with_key(kind, WRAPPER_KEY)  # a second Accelerate node replaces the first one's options
    clone.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
    return clone, accel


class ZTurboAccelerate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ZTurboAccelerate",
            display_name="Z-Image Turbo Accelerate",
            category=CATEGORY,
            description="Runs ComfyUI's own Z-Image model (UNETLoader) with this pack's transformer blocks: optional "
                        "compile (seconds, once per process), attention kernel choice, fp8 matmuls for fp8 weights, "
                        "and the fp16 precision guard. LoRAs, ControlNet patches, samplers and low VRAM keep working: "
                        "a block our maths can't run exactly runs ComfyUI's own code (logged once).",
            inputs=[
                io.Model.Input("model", tooltip="ComfyUI's Z-Image MODEL (UNETLoader, after LoRAs and ModelSampling)."),
                io.Boolean.Input("compile", default=False,
                                 tooltip="torch.compile the block function (one graph for every block; new prompts "
                                         "and sizes don't recompile; cached across processes). Off by default: on an "
                                         "H200 the fused eager kernels are as fast (0.765 s both, 8 steps at 1024²) "
                                         "without the compile's first-call cost."),
                io.Combo.Input("attention", options=list(ATTENTION_BACKENDS), default="auto",
                               tooltip="The attention kernel: auto lets PyTorch choose."),
                io.Boolean.Input("cuda_graphs", default=False,
                                 tooltip="Not applied on ComfyUI's model (a graph would keep stale LoRA weights); "
                                         "accepted for saved workflows."),
                io.Combo.Input("precision_guard", options=list(GUARD_POLICIES), default="off",
                               tooltip="For fp16: off = as loaded; detect = stop naming the overflowing block; auto = "
                                       "run just the overflowing blocks in bf16/fp32 (remembered); clamp = ComfyUI's "
                                       "clipping to ±65504 (lossy)."),
                io.Boolean.Input("fp8_matmul", default=False,
                                 tooltip="With fp8_e4m3fn weights on a GPU with fp8 tensor cores: multiply in fp8."),
            ],
            outputs=[io.Model.Output(tooltip="The same model, accelerated (a clone: the input is unchanged).")],
        )

    @classmethod
    def execute(cls, model, compile=True, attention="auto", cuda_graphs=False, precision_guard="off",
                fp8_matmul=False) -> io.NodeOutput:
        return io.NodeOutput(accelerate(model, compile, attention, cuda_graphs, precision_guard, fp8_matmul)[0])
