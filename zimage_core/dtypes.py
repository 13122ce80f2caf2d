"""Dtype policy: the one place that decides storage and compute dtypes per component.

Storage dtype is what the weights occupy in memory (bf16, fp16, fp32, fp8 e4m3fn or int8); compute dtype is
what the arithmetic runs in (bf16, fp16 or fp32). Loaders, the sampler and the decoder read the
resolved ``DtypePolicy``; nothing else picks a dtype.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

import torch

from .errors import ZImageError

COMPONENTS = ("transformer", "text_encoder", "vae")

_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "int8": torch.int8,
}
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
QUANTIZED_STORAGE = (torch.float8_e4m3fn, torch.int8)  # row-scaled block linears (fp8.FP8Linear, int8.Int8Linear)
STORAGE_DTYPES = COMPUTE_DTYPES + QUANTIZED_STORAGE
SHORT_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8_e4m3fn",
               torch.int8: "int8"}


def dtype_name(dtype: torch.dtype) -> str:
    return SHORT_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def parse_dtype(value: str | torch.dtype, *, what: str = "dtype", allowed=STORAGE_DTYPES) -> torch.dtype:
    """Turn 'bf16' / 'float16' / torch.float32 into a torch dtype, or say which names are allowed."""
    dtype = value if isinstance(value, torch.dtype) else _NAMES.get(str(value).strip().lower())
    if dtype is None or dtype not in allowed:
        names = ", ".join(dtype_name(d) for d in allowed)
        raise ZImageError(f"{what} {value!r} is not supported: use auto or one of {names}.")
    return dtype


def device_supports(dtype: torch.dtype, device: torch.device | str) -> tuple[bool, str]:
    """Whether arithmetic in ``dtype`` runs on ``device``; the reason when it does not."""
    device = torch.device(device)
    if dtype == torch.float32 or device.type == "cpu":
        return True, ""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        if dtype == torch.bfloat16 and major < 8:
            return False, (
                f"{name} (compute capability {major}.{minor}) has no bf16 arithmetic; bf16 needs 8.0 or newer"
            )
        return True, ""
    if device.type == "mps":
        try:
            torch.ones(2, dtype=dtype, device=device).sum().item()
        except (RuntimeError, TypeError) as err:
            return False, f"MPS rejects {dtype_name(dtype)}: {err}"
        return True, ""
    return True, ""


def auto_compute_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 where the device has it, fp16 on CUDA cards without bf16, fp32 on CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.float32
    if device_supports(torch.bfloat16, device)[0]:
        return torch.bfloat16
    if device.type == "cuda":
        return torch.float16
    return torch.float32


@dataclass(frozen=True)
class ComponentDtype:
    storage: torch.dtype
    compute: torch.dtype

    def __str__(self) -> str:
        if self.storage == self.compute:
            return dtype_name(self.compute)
        return f"{dtype_name(self.storage)} storage, {dtype_name(self.compute)} compute"


@dataclass(frozen=True)
class DtypePolicy:
    transformer: ComponentDtype
    text_encoder: ComponentDtype
    vae: ComponentDtype

    def for_component(self, component: str) -> ComponentDtype:
        return getattr(self, component)

    def with_component(self, component: str, value: ComponentDtype) -> "DtypePolicy":
        return replace(self, **{component: value})

    def describe(self) -> str:
        return ", ".join(f"{c}: {self.for_component(c)}" for c in COMPONENTS)


def resolve_policy(
    device: torch.device | str,
    compute: str | torch.dtype = "auto",
    storage: str | torch.dtype | None = None,
    overrides: dict[str, tuple[str | torch.dtype | None, str | torch.dtype | None]] | None = None,
) -> DtypePolicy:
    """Resolve ``auto`` and per-component overrides into concrete dtypes, and check the device runs them.

    ``compute`` and ``storage`` apply to every component; ``overrides`` maps a component name to
    ``(storage, compute)`` where ``None`` or ``"auto"`` keeps the general choice. Storage defaults to the
    compute dtype. fp8 and int8 storage are for the transformer and the text encoder; the VAE is small and stays
    in a compute dtype.
    """
    device = torch.device(device)
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(COMPONENTS)
    if unknown:
        raise ZImageError(f"unknown component {sorted(unknown)}: use one of {', '.join(COMPONENTS)}.")

    def pick(value, default, what, allowed):
        if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
            return default
        return parse_dtype(value, what=what, allowed=allowed)

    general_compute = pick(compute, auto_compute_dtype(device), "compute dtype", COMPUTE_DTYPES)
    resolved = {}
    for component in COMPONENTS:
        c_storage, c_compute = overrides.get(component, (None, None))
        comp = pick(c_compute, general_compute, f"{component} compute dtype", COMPUTE_DTYPES)
        general_storage = pick(storage, comp, f"{component} storage dtype", STORAGE_DTYPES)
        allowed = STORAGE_DTYPES if component != "vae" else COMPUTE_DTYPES
        stor = pick(c_storage, general_storage if component != "vae" or general_storage in COMPUTE_DTYPES else comp,
                    f"{component} storage dtype", allowed)
        ok, why = device_supports(comp, device)
        if not ok:
            alt = "fp16 with the precision guard (auto) or fp32" if comp == torch.bfloat16 else "fp32"
            raise ZImageError(
                f"{component} compute dtype {dtype_name(comp)} cannot run on {device}: {why}. "
                f"Choose {alt}, or leave the dtype on auto."
            )
        resolved[component] = ComponentDtype(storage=stor, compute=comp)
    return DtypePolicy(**resolved)


def apply_storage_casting(model, cdtype: ComponentDtype, skip: tuple[str, ...] = ()) -> None:
    """Run a model whose weights are stored in ``cdtype.storage`` with arithmetic in ``cdtype.compute``.

    Linear and conv layers (nearly all the bytes) keep their storage dtype and are cast around each call
    (diffusers' layerwise casting hooks). Every other floating weight would reach the arithmetic in its storage
    dtype and break it ("expected m1 and m2 to have the same dtype"): the small ones (norms, the modules named in
    ``skip``, pad tokens) are stored in the compute dtype instead; an embedding table (Qwen3's is 389 M
    values) stays in storage and its looked-up rows are cast, which is exact.
    """
    import torch.nn as nn
    from diffusers.hooks import apply_layerwise_casting

    storage, compute = cdtype.storage, cdtype.compute
    apply_layerwise_casting(model, storage_dtype=storage, compute_dtype=compute, skip_modules_pattern=skip)

    def hooked(module) -> bool:
        registry = getattr(module, "_diffusers_hook", None)
        return registry is not None and registry.get_hook("layerwise_casting") is not None

    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.is_floating_point() and p.dtype == storage]
        if not own or hooked(module):
            continue
        if isinstance(module, nn.Embedding) and module.weight.dtype == storage:
            module.register_forward_hook(lambda _m, _args, out: out.to(compute))
            continue
        for param in own:
            param.data = param.data.to(compute)


# model -> the ComponentDtype it was loaded with (weakly: dies with the model; no attribute on the module)
_LOADED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def set_component_dtype(model, cdtype: ComponentDtype) -> None:
    _LOADED[model] = cdtype


def component_dtype(model) -> ComponentDtype | None:
    """The storage/compute dtypes a model was loaded with (None for a model built elsewhere)."""
    return _LOADED.get(model)
