"""One attention dispatch for every transformer path (the reference denoiser, the fast one, ComfyUI's model).

A backend name picks a kernel: ``auto``/``sdpa`` let PyTorch's ``scaled_dot_product_attention`` choose, the
others pin one SDPA backend (``cudnn``, ``flash``, ``efficient``, ``math``). A kernel of our own (an fp8
attention, say) registers under a new name with ``register`` and is then called by the same block maths.

SDPA backends are chosen by a context around the whole transformer call (``backend_context``), not inside the
block function, so a compiled block stays one graph whatever the backend.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .errors import ZImageError
from .options import ATTENTION_BACKENDS

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
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
