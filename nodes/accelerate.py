"""ZTurboAccelerate: our block maths, compile and precision guard on ComfyUI's own Z-Image MODEL.

Built like ComfyUI's ``TorchCompileModel``, without its cost: a clone of the ModelPatcher with one
``DIFFUSION_MODEL`` wrapper that runs the NextDiT call through ``zimage_core.native.NativeAccelerator``, which
routes each block's forward to our maths for the length of the call. The clone keeps the model as ComfyUI loaded
it: dynamic VRAM stays on (``TorchCompileModel`` turns it off, which un-does an fp8 ``weight_dtype`` and forces a
partial legacy load on small cards), the weights keep their dtype and scales, and each weight reaches our maths
through ComfyUI's own ``cast_bias_weight`` (``adapters.comfy_weights``). An ``OUTER_SAMPLE`` wrapper logs, per
sampling run, what ran: blocks on our maths and natively, the weights' dtype, and how ComfyUI held them.
"""

from __future__ import annotations

import logging
import sys

from zimage_core import (ATTENTION_BACKENDS, GUARD_POLICIES, NativeAccelerator, ZImageError, fp8_matmul_usable,
                         zimage_reason)

from .adapters import CATEGORY, comfy_weights, fp8_auto, loaded_summary, stored_dtype
from .api import io

log = logging.getLogger("zimage_core")
WRAPPER_KEY = "zturbo_accelerate"


def _wrappers_mp():
    import comfy.patcher_extension

    return comfy.patcher_extension.WrappersMP


def console_log_level() -> str:
    """ComfyUI's console log level as its ``main.py`` reads it from ``--verbose`` (0.33: a list of outputs; 0.3.75:
    one level)."""
    from comfy import cli_args

    verbose = getattr(cli_args.args, "verbose", "INFO")
    read = getattr(cli_args, "get_console_log_level", None)
    return read(verbose) if read is not None and isinstance(verbose, list) else str(verbose or "INFO")


def background_warm_up_safe(model) -> bool:
    """Whether our kernel warm-up may run in a thread beside ComfyUI's sampling. Not under dynamic VRAM with
    ComfyUI's console at DEBUG or DETAIL: ``main.py`` then turns comfy-aimdo's own logging up, and aimdo logs from
    inside its CUDA allocation hooks through a Python callback, which needs Python's lock while PyTorch's allocator
    holds its own, so a second thread allocating can deadlock against the sampling thread. (Suspected, from
    comfy-aimdo 0.4.13's code: a benchmark that left aimdo's level at ALL hung; not reproduced. At ComfyUI's
    default INFO those logs never reach Python.)"""
    dynamic = getattr(model, "is_dynamic", None)
    return not (callable(dynamic) and dynamic() and console_log_level() in ("DEBUG", "DETAIL"))


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
    # fp8 matmuls where the user asked, or where ComfyUI itself multiplies in fp8 (fp8_e4m3fn_fast, comfy_quant)
    wanted = fp8_matmul or fp8_auto(model, diffusion_model)
    if wanted:
        usable, why = fp8_matmul_usable(stored_dtype(diffusion_model.layers[0].attention.qkv),
                                        model.load_device)
        if not usable:
            log.info("Z-Image Accelerate: fp8 matmul is off: %s", why)
        fp8_matmul = usable
    # ComfyUI 0.33's own blocks clamp fp16 (clamp_fp16); with the guard off ours do the same there.
    native_clamps = hasattr(sys.modules.get(type(diffusion_model).__module__), "clamp_fp16")
    accel = NativeAccelerator(compile=compile, attention=attention, fp8_matmul=fp8_matmul, guard=precision_guard,
                              native_clamps=native_clamps, weights=comfy_weights(fp8_matmul))
    clone = model.clone()  # as loaded: dynamic VRAM, weight dtype and scales stay ComfyUI's
    compute = getattr(model.model, "manual_cast_dtype", None) or model.model_dtype()
    if background_warm_up_safe(model):
        accel.start_warm_up(diffusion_model, model.load_device, compute)  # our kernels: native.warm_up_due
    else:
        log.info("Z-Image Accelerate: no background warm-up under dynamic VRAM at %s verbosity; our kernels load on "
                 "the first call", console_log_level())

    def diffusion_wrapper(executor, *args, **kwargs):
        return accel.call(executor.class_obj, lambda: executor(*args, **kwargs), kwargs.get("transformer_options"))

    def sample_wrapper(executor, *args, **kwargs):
        accel.reset_counts()
        try:
            return executor(*args, **kwargs)
        finally:
            log.info("Z-Image Accelerate: %s", accel.summary(loaded_summary(clone)))

    wrappers = _wrappers_mp()
    for kind, wrapper in ((wrappers.DIFFUSION_MODEL, diffusion_wrapper), (wrappers.OUTER_SAMPLE, sample_wrapper)):
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
                        "compile, attention kernel choice, fp8 matmuls, and the fp16 precision guard. The model stays "
                        "as ComfyUI loaded it (dynamic VRAM, low VRAM, fp8 or quantized weights, LoRAs per op): each "
                        "weight reaches our blocks through ComfyUI's own weight movement, so memory and weight "
                        "precision are native's. The console says after each run what ran where and on which "
                        "weights.",
            inputs=[
                io.Model.Input("model", tooltip="ComfyUI's Z-Image MODEL (UNETLoader, after LoRAs and ModelSampling)."),
                io.Boolean.Input("compile", default=False,
                                 tooltip="torch.compile the block function (one graph for every block; new prompts "
                                         "and sizes don't recompile; cached across processes). Off by default: on an "
                                         "H200 the fused eager kernels are as fast (0.765 s both, 8 steps at 1024²) "
                                         "without the compile's first-call cost."),
                io.Combo.Input("attention", options=list(ATTENTION_BACKENDS), default="auto",
                               tooltip="Attention kernel. auto: cuDNN where PyTorch ranks it first (H100, H200, "
                                       "B200), else PyTorch's pick (flash); a new image size's first calls skip "
                                       "cuDNN until its one-off plan (~0.06 s on an H100) would have paid off, so "
                                       "their bits differ from later ones by rounding. sdpa: the same choice from "
                                       "the first call. A new process's first image (under 20 steps; a longer "
                                       "one's first steps) runs ComfyUI's own blocks whatever the choice."),
                io.Boolean.Input("cuda_graphs", default=False,
                                 tooltip="Not applied on ComfyUI's model (a graph would keep stale LoRA weights); "
                                         "accepted for saved workflows."),
                io.Combo.Input("precision_guard", options=list(GUARD_POLICIES), default="off",
                               tooltip="For fp16: off = as loaded; detect = stop naming the overflowing block; auto = "
                                       "run just the overflowing blocks in bf16/fp32 (remembered); clamp = ComfyUI's "
                                       "clipping to ±65504 (lossy)."),
                io.Boolean.Input("fp8_matmul", default=False,
                                 tooltip="fp8 weights on a GPU with fp8 tensor cores: multiply in fp8 (row-scaled "
                                         "activations). On by itself where ComfyUI multiplies in fp8 too (weight_dtype "
                                         "fp8_e4m3fn_fast, comfy_quant fp8 files); this forces it for fp8_e4m3fn."),
            ],
            outputs=[io.Model.Output(tooltip="The same model, accelerated (a clone: the input is unchanged).")],
        )

    @classmethod
    def execute(cls, model, compile=True, attention="auto", cuda_graphs=False, precision_guard="off",
                fp8_matmul=False) -> io.NodeOutput:
        return io.NodeOutput(accelerate(model, compile, attention, cuda_graphs, precision_guard, fp8_matmul)[0])
