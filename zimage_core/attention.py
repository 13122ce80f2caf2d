"""One attention dispatch for every transformer path (the reference denoiser, the fast one, ComfyUI's model).

A backend name picks a kernel: ``sdpa`` is PyTorch's ``scaled_dot_product_attention`` with the backend order PyTorch
gives the GPU (below), ``auto`` too except for a new shape's first calls (below), the others pin one SDPA backend
(``cudnn``, ``flash``, ``efficient``, ``math``). A kernel of our own (an fp8 attention, say) registers under a new
name with ``register`` and is then called by the same block maths.

SDPA backends are chosen by a context around the whole transformer call (``backend_context``), not inside the
block function, so a compiled block stays one graph whatever the backend.

``auto``'s first calls: on Hopper and newer PyTorch puts cuDNN's attention first, the fastest here (H100, 4224
tokens: 495 us a call against flash's 866, ``benchmarks/results/lowp_h100.json``), but cuDNN builds an execution
plan on the first call of each shape and keeps it per thread (PyTorch's ``MHA.cpp``: a ``thread_local`` cache;
measured: a plan built in another thread does not serve the sampler's, so a warm-up thread cannot build it): 50-62 ms
a shape on the H100 (``users_part4_h100.json``, warm-up costs), ~250 ms on the H200 with an older PyTorch
(``raw/first_image_diag_h200.json``), for three shapes an image (caption, image and joint lengths). So in eager
mode ``auto`` rents before it buys: a shape's calls run without cuDNN (flash, or what PyTorch picks next) until
the time they lost against cuDNN, estimated from their FLOPs at the H100's measured rates, reaches one plan's
cost; from then on cuDNN runs (plan built once). Where the plan costs what the constant says (the H100's), a
shape's first calls cost at most about twice the best choice made in hindsight. The price: a shape's first image
and later ones differ by bf16 rounding (another kernel); ``sdpa`` or a pinned backend gives bit-identical reruns
from the first image on. Work captured into a CUDA graph (our sampler's steps from a shape's second image) buys at
once (``plans_bought``): a graph keeps its kernels for every replay.

Buying asks for cuDNN explicitly (``sdpa_cudnn_first``) rather than trusting PyTorch's pick of the moment. Recent
PyTorch moves cuDNN first on the first SDPA call of a process, once (``priority_order_init_`` in its
``sdp_utils.cpp``), and a ``sdpa_kernel(..., set_priority=True)`` context entered before that call restores, on
leaving, the order it found: flash first, for the rest of the process. ComfyUI 0.33's own attention is such a
context and runs first (the text encoder; with Accelerate, the first transformer call too). Measured on the H100
beside ComfyUI 0.33.0 (``users_part5_h100.json``): ``auto``, ``sdpa`` and ``flash`` gave bit-identical latents at
one speed, and native ComfyUI with cuDNN put first ran 1.115x its own default. So ``sdpa`` too puts cuDNN first
where PyTorch's own rule would (``cudnn_preferred``): PyTorch's choice for the GPU, not what ComfyUI left behind.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .errors import ZImageError
from .options import ATTENTION_BACKENDS

# ``auto``'s rent-or-buy: a cuDNN plan's cost (s, H100 as measured) over what a call loses per FLOP without cuDNN
# (flash at 316 TFLOP/s against cuDNN's 554, H100, 1 x 30 x 4224 x 128): ~160 calls at the joint length, the
# first image's first five steps.
PLAN_COST_S = 0.06
LOST_S_PER_FLOP = 1 / 316e12 - 1 / 554e12
_RENTED = threading.local()  # per thread, as cuDNN's plans: shape key -> FLOPs run without cuDNN
# SDPA's backend flags and order are process-wide: two threads of ours must not interleave a switch and its
# restore (``sdpa_without_cudnn``, ``sdpa_cudnn_first``). Other writers of the flags (``sdpa_kernel`` contexts,
# ComfyUI's own attention) are not ordered by it: harmless in ComfyUI, whose one worker thread runs the sampler, and
# at worst another kernel for one call.
_SWITCH = threading.RLock()
WARM_UP_THREAD = "zimage-warm-up"  # the warm-up threads' name: they never switch the flags (``_may_switch``)

# name -> fn(q, k, v, mask) with q/k/v [B, heads, S, head_dim] and mask None or bool [B, 1, 1, S]
_KERNELS: dict[str, Callable] = {}


def register(name: str, kernel: Callable) -> None:
    """Add a kernel of our own under ``name``; the block maths call it in place of SDPA."""
    _KERNELS[name] = kernel


def backends() -> tuple[str, ...]:
    return ATTENTION_BACKENDS + tuple(n for n in _KERNELS if n not in ATTENTION_BACKENDS)


def check_backend(name: str) -> str:
    if name not in backends():
        raise ZImageError(f"attention {name!r} is unknown: use one of {', '.join(backends())}.")
    return name


def sets_global_state(name: str) -> bool:
    """Whether backend ``name``'s context switches SDPA's backends for the whole process (``sdpa_kernel`` does: a
    call in another thread, e.g. the warm-up's, would change the backends of whatever runs meanwhile)."""
    return not (name in ("auto", "sdpa") or name in _KERNELS)


def backend_context(name: str):
    """The context a transformer call runs in for backend ``name`` (SDPA's backend choice)."""
    if not sets_global_state(name):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[check_backend(name)]
    return sdpa_kernel([backend])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              backend: str | Callable = "auto") -> torch.Tensor:
    """Attention of ``[B, heads, S, head_dim]`` tensors; ``mask`` True where a key may be attended (or an additive
    float mask). ``backend`` is a name, or a function ``(q, k, v, mask) -> [B, heads, S, head_dim]`` given by the
    caller (ComfyUI's own attention dispatch, when another node chose an attention there)."""
    if callable(backend):
        return backend(q, k, v, mask)
    kernel = _KERNELS.get(backend)
    if kernel is not None:
        return kernel(q, k, v, mask)
    if backend in ("auto", "sdpa") and q.is_cuda and cudnn_preferred(q.device) and _may_switch():
        if backend == "auto" and rent_plan(q, k, v, mask):
            return sdpa_without_cudnn(q, k, v, mask)
        return sdpa_cudnn_first(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _may_switch() -> bool:
    """Whether this call may switch SDPA's process-wide backend state: not while compiling (a compiled block stays
    one graph; Inductor picks its kernel), nor in a warm-up thread (its small calls gain nothing, and a switch would
    reach whatever the workflow runs meanwhile in the sampling thread)."""
    return not torch.compiler.is_compiling() and threading.current_thread().name != WARM_UP_THREAD


@functools.cache
def cudnn_preferred(device: torch.device) -> bool:
    """Whether PyTorch itself puts cuDNN's attention first on ``device`` (PyTorch 2.14's
    ``check_prefer_cudnn_attention``: compute capability 9.0, 10.0 or 10.3, the datacenter Hopper and Blackwell
    GPUs, with a cuDNN newer than 9.15.0, whose 9.15.1 fixed lengths that are not a multiple of 128, unless
    ``TORCH_CUDNN_SDPA_DEPRIORITIZED=1``), and this PyTorch can order SDPA's backends. Elsewhere ``auto`` and
    ``sdpa`` are PyTorch's pick as it stands (flash on the RTX cards)."""
    from torch.nn.attention import sdpa_kernel

    if os.environ.get("TORCH_CUDNN_SDPA_DEPRIORITIZED", "0") not in ("", "0"):
        return False
    if "set_priority" not in inspect.signature(sdpa_kernel).parameters:
        return False
    version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    major, minor = torch.cuda.get_device_capability(device)
    return bool(version and version > 91500 and major in (9, 10) and minor in (0, 3))


def rent_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether this call of ``auto`` should still run without cuDNN (see the module's docstring): True until this
    thread's calls of the same shapes, strides and dtype have lost one plan's cost; never where no switch may be
    made (``_may_switch``: compiling, a warm-up thread)."""
    if not _may_switch():
        return False
    seen = getattr(_RENTED, "flops", None)
    if seen is None:
        seen = _RENTED.flops = {}
    key = (q.shape, q.stride(), k.shape, k.stride(), v.stride(), q.dtype, q.device,
           None if mask is None else (mask.shape, mask.dtype))
    if getattr(_RENTED, "buying", False):  # ``plans_bought``: this call builds the plan, later ones use it
        seen[key] = float("inf")
        return False
    done = seen.get(key, 0.0)
    if _paid(done):
        return False
    seen[key] = done + 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
    return True


def _paid(flops: float) -> bool:
    """Whether calls of one shape that ran ``flops`` without cuDNN have lost one plan's cost (then it is bought)."""
    return flops * LOST_S_PER_FLOP >= PLAN_COST_S


def shapes_bought() -> int:
    """How many shapes this thread's ``auto`` calls have bought cuDNN's plan for (benchmarks: was a slow image one
    that bought a plan?)."""
    return sum(map(_paid, getattr(_RENTED, "flops", {}).values()))


@contextlib.contextmanager
def plans_bought():
    """``auto`` rents nothing inside: cuDNN (where preferred; its plan built at once) runs from the first call. For
    work captured into a CUDA graph, which keeps the kernel of capture time for every replay."""
    was = getattr(_RENTED, "buying", False)
    _RENTED.buying = True
    try:
        yield
    finally:
        _RENTED.buying = was


def sdpa_cudnn_first(q, k, v, mask):
    """SDPA with cuDNN's attention first, then flash, memory-efficient and math (PyTorch's order where it prefers
    cuDNN), for this call; the backends and the order it found are restored on leaving."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with _SWITCH, sdpa_kernel(order, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_without_cudnn(q, k, v, mask):
    """SDPA with cuDNN's backend off for this call (PyTorch's next pick: flash, else memory-efficient or math)."""
    cuda = torch.backends.cuda
    with _SWITCH:
        was = cuda.cudnn_sdp_enabled()
        cuda.enable_cudnn_sdp(False)
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        finally:
            cuda.enable_cudnn_sdp(was)
