"""fp8 (e4m3fn) weight storage with one scale per output row.

Plain casting to e4m3 loses the small weights of a checkpoint to the subnormal range (e4m3's smallest
normal is 2**-6); scaling each output row so that its largest weight maps to 448 keeps 3 mantissa bits
for every row. ``FP8Linear`` dequantizes to the compute dtype for the matrix multiply, or, where the GPU
has fp8 tensor cores (compute capability 8.9+), multiplies in fp8 through ``torch._scaled_mm`` with a
row-wise scale for the activations too (``fp8_linear``, the one fp8 matmul path of the package).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels as _kernels

E4M3_MAX = 448.0
E4M3_RECIPROCAL = 1.0 / E4M3_MAX  # rounded to fp32 where it multiplies an fp32 tensor


def quantize_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, fp32 scale of shape [out, 1]) with ``weight ≈ w8.float() * scale``."""
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def quantize_activation_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 rows, fp32 scale [rows, 1]) of a 2-D activation, for ``torch._scaled_mm``."""
    # The scale is amax times the fp32 reciprocal of 448, not amax / 448: torch divides by a Python number exactly
    # on the CPU but multiplies by its reciprocal on CUDA, and the scales must be the same bits on every device
    # (kernels.quantize_rows). The rows are multiplied by the IEEE reciprocal of their scale: one division per row
    # (a division per element made the Triton kernel compute-bound).
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) * E4M3_RECIPROCAL
    return (x.float() * torch.reciprocal(scale)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def scaled_mm_available(device: torch.device | str) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9) and hasattr(torch, "_scaled_mm")


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in FP8_DTYPES


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
               matmul: bool) -> torch.Tensor:
    """``x @ (weight * scale).T + bias`` for an fp8 weight with per-row fp32 ``scale`` [out, 1] (or a scalar).

    With ``matmul`` the product runs on fp8 tensor cores (``torch._scaled_mm``, e4m3 only) with a per-row scale
    for the activations too; otherwise the weight is dequantized to ``x``'s dtype. The one fp8 matmul path.
    """
    if scale is None:
        scale = torch.ones((), dtype=torch.float32, device=weight.device)
    quantized = isinstance(x, _kernels.QuantizedRows)  # made by the kernel that computed it (blocks.block_forward)
    if quantized and not (matmul and weight.dtype == torch.float8_e4m3fn and x.q.dtype == torch.float8_e4m3fn):
        raise ValueError("a quantized activation needs e4m3 codes, an e4m3 weight and the fp8 matmul")
    if matmul and weight.dtype == torch.float8_e4m3fn:
        if quantized:
            x8, x_scale, shape, dtype = x.q, x.scale, x.shape, x.dtype
        else:
            shape, dtype = x.shape, x.dtype
            x2 = x.reshape(-1, shape[-1])
            x8, x_scale = _kernels.quantize_rows(x2) if _kernels.active(x2) else quantize_activation_rowwise(x2)
        # row-wise scaling wants both scales contiguous: a per-tensor scale (comfy_quant tensorwise, fp8_e4m3fn_fast
        # without one) is written out per row, not broadcast (stride 0 is refused: measured on an H100)
        w_scale = (scale.float().reshape(1, 1).expand(weight.shape[0], 1) if scale.numel() == 1
                   else scale.float().reshape(-1, 1)).contiguous()
        out = torch._scaled_mm(x8, weight.t(), scale_a=x_scale, scale_b=w_scale.t(),
                               bias=bias.to(torch.bfloat16) if bias is not None else None, out_dtype=torch.bfloat16)
        return out.reshape(*shape[:-1], weight.shape[0]).to(dtype)
    w = (weight.float() * scale.float()).to(x.dtype)
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)


class FP8Linear(nn.Module):
    """A bias-optional linear layer whose weight is stored as e4m3 with per-row fp32 scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn, device=device), requires_grad=False
        )
        self.weight_scale = nn.Parameter(torch.empty(out_features, 1, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def like(cls, linear: nn.Linear, compute_dtype: torch.dtype) -> "FP8Linear":
        return cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype,
                   device=linear.weight.device)

    def load_weight(self, weight: torch.Tensor) -> None:
        w8, scale = quantize_rowwise(weight)
        self.weight = nn.Parameter(w8, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale).to(dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x.to(self.compute_dtype), self.weight, self.weight_scale, self.bias, matmul=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8 e4m3 rowwise"


def swap_linears(model: nn.Module, names: list[str], compute_dtype: torch.dtype, cls=FP8Linear) -> None:
    """Replace the named ``nn.Linear`` submodules with (empty) ``FP8Linear`` ones (or ``cls``, e.g.
    ``int8.Int8Linear``: anything with ``like(linear, compute_dtype)``) before loading."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, cls.like(getattr(parent, child), compute_dtype))
