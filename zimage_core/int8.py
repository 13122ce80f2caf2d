"""int8 weights with one scale per output row, multiplied in int8 with row-wise int8 activations (W8A8).

For GPUs without fp8 tensor cores (A100, RTX 30xx) and for Comfy-Org's ``*_int8_convrot`` checkpoints (issue 23).

- Weights: int8 codes ``q`` and fp32 scales ``s`` [out, 1] with ``weight ≈ q * s`` (``quantize_rowwise_int8``),
  optionally stored **rotated** as int8_convrot files store them: per group of ``g`` input columns the stored
  matrix is ``W @ H`` with ``H`` the normalised regular Hadamard matrix of size ``g`` (``quantized.hadamard``;
  symmetric, ``H @ H = I``), so ``quantized.dequantize`` gets ``W`` back as ``stored @ H.T``.
- Activations: per row (token) ``scale = max(amax, 1e-12) * fp32(1/127)``, codes ``round(x / scale)`` to nearest
  even, clamped to ±127 (``quantize_activation_rowwise_int8``; the Triton kernels of ``kernels.py`` write the same
  bits where they produce the activation). With a rotation the rows are rotated by the same ``H`` on their groups
  first: ``x @ W.T = sum_g (x_g @ H) @ (W_g @ H).T`` since ``H @ H.T = I``, so the product needs no unrotated
  weight. A non-finite row gets a NaN or inf scale (its NaN codes are stored as 0), so its output row is
  non-finite too, as with the fp8 path.
- Product: int8 x int8 -> exact int32 sums, then ``(acc * row scale) * column scale + bias`` in fp32, cast once to
  the compute dtype. On the GPU one Triton kernel does both (``kernels.int8_matmul``: the int32 sums never leave
  its registers); otherwise ``torch._int_mm`` and the torch epilogue ``_epilogue`` (the reference, bit for bit).

``torch._int_mm`` on CUDA wants more than 16 rows and K, N multiples of 8 (``aten/src/ATen/native/cuda/Blas.cpp``):
fewer rows are padded with zero rows (the padding's results are dropped); a K or N that is not a multiple of 8
falls back to dequantize-then-matmul (W8A16: the weight dequantized to the compute dtype, the activation not
quantized), as does a device without ``_int_mm`` (MPS; CUDA below compute capability 8.0, where it is unchecked
here) and ``matmul=False``. Speed (H100, ``benchmarks/results/lowp_int8mm_h100.json``): a 1024² step's int8 GEMMs
take 50.8 ms through ``kernels.int8_matmul`` against 70.5 ms through ``_int_mm`` and a separate epilogue pass
(cuBLAS fp8: 41.6 ms); 8 steps through ComfyUI on an int8_convrot file 0.691 s (native's own int8: 1.029 s).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels as _kernels

INT8_MAX = 127.0
INT8_RECIPROCAL = 1.0 / INT8_MAX  # rounded to fp32 where it multiplies an fp32 tensor (as fp8.E4M3_RECIPROCAL)
MIN_MM_ROWS = 17  # torch._int_mm on CUDA: self.size(0) > 16
MM_ROW_PAD = 32  # fewer rows are padded to this many


def check_rotation(group: int, columns: int) -> None:
    """A Hadamard group must be a power of 4 (the regular Hadamard matrices of ``quantized.hadamard``) dividing the
    row width."""
    if group < 4 or group & (group - 1) or (group.bit_length() - 1) % 2:
        raise ValueError(f"Hadamard group {group} is not a power of 4")
    if columns % group:
        raise ValueError(f"{columns} columns are not a whole number of Hadamard groups of {group}")


def hadamard_rows(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x`` (fp32) times the normalised regular Hadamard matrix of size ``group`` on each group of ``group``
    consecutive values of its last dim, i.e. ``x_g @ quantized.hadamard(group)`` (equal to 1e-6: other rounding).

    A fast transform: one radix-4 stage per base-4 digit of the column index, lowest digit first, each
    ``out_i = (s - 2 * x_(3 - i)) * 0.5`` with ``s = (x0 + x1) + (x2 + x3)``. ``kernels._hadamard`` makes the same
    fp32 operations in the same order, so the fused rotation and this one give the same bits."""
    check_rotation(group, x.shape[-1])
    shape = x.shape
    y = x.float().reshape(-1, group)
    stride = 1
    while stride < group:
        x0, x1, x2, x3 = y.reshape(-1, 4, stride).unbind(1)
        s = (x0 + x1) + (x2 + x3)
        y = torch.stack(((s - 2 * x3) * 0.5, (s - 2 * x2) * 0.5, (s - 2 * x1) * 0.5, (s - 2 * x0) * 0.5), dim=1)
        stride *= 4
    return y.reshape(shape)


def quantize_activation_rowwise_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, fp32 scale [rows, 1]) of a 2-D activation (already rotated where the weight is), for
    ``torch._int_mm``: the reference of ``kernels.quantize_rows(x, "int8")``. The same scale rule as
    ``fp8.quantize_activation_rowwise`` with 127 for 448 (amax times the fp32 reciprocal, rows times the IEEE
    reciprocal of their scale, the same on every device); ``torch.round`` rounds half to even."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) * INT8_RECIPROCAL
    codes = torch.round((x.float() * torch.reciprocal(scale)).clamp(-INT8_MAX, INT8_MAX))
    return torch.nan_to_num(codes, nan=0.0).to(torch.int8), scale  # no NaN code; the row's scale says it


def quantize_rowwise_int8(weight: torch.Tensor, rotation: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, fp32 scale [out, 1]) with ``weight ≈ q.float() * scale``; with ``rotation``, of the weight
    rotated as int8_convrot files store it (``weight @ H`` per group of ``rotation`` input columns:
    ``dequantize_int8`` and ``quantized.dequantize`` rotate it back)."""
    w = weight.float()
    if rotation:
        w = hadamard_rows(w, rotation)
    return quantize_activation_rowwise_int8(w)


def dequantize_int8(weight: torch.Tensor, scale: torch.Tensor | None, rotation: int | None,
                    dtype: torch.dtype) -> torch.Tensor:
    """The float weight ``q * scale`` (rotated back per group when ``rotation``) in ``dtype``."""
    w = weight.float() if scale is None else weight.float() * scale.float()
    if rotation:
        w = hadamard_rows(w, rotation)  # (W @ H) @ H = W: H is symmetric and its own inverse
    return w.to(dtype)


def int8_mm_available(device: torch.device | str) -> bool:
    """Whether ``torch._int_mm`` runs on ``device``: the CPU, and CUDA GPUs of compute capability 8.0+ (A100, RTX
    30xx and newer: the cards issue 23 names; Turing's int8 tensor cores are unchecked here, so it dequantizes)."""
    device = torch.device(device)
    key = (device.type, device.index)
    if key not in _INT_MM_RUNS:  # asked per block call: cached (a plain dict, which torch.compile traces through)
        if not hasattr(torch, "_int_mm"):
            _INT_MM_RUNS[key] = False
        elif device.type == "cuda":
            _INT_MM_RUNS[key] = torch.cuda.get_device_capability(device) >= (8, 0)
        else:
            _INT_MM_RUNS[key] = device.type == "cpu"
    return _INT_MM_RUNS[key]


_INT_MM_RUNS: dict[tuple, bool] = {}


def int8_matmul_usable(weight: torch.Tensor, device: torch.device | str) -> bool:
    """Whether ``int8_linear`` multiplies ``weight`` [out, in] in int8 on ``device`` (else it dequantizes)."""
    return (weight.dtype == torch.int8 and weight.shape[0] % 8 == 0 and weight.shape[1] % 8 == 0
            and int8_mm_available(device))


def int8_mm(x8: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x8 @ weight.T`` (int8 [m, k] by int8 [n, k]) as exact int32 sums; fewer than 17 rows are padded with zero
    rows for ``torch._int_mm`` and cut off again."""
    m = x8.shape[0]
    if m < MIN_MM_ROWS:
        x8 = torch.cat([x8, x8.new_zeros((MM_ROW_PAD - m, x8.shape[1]))])
    acc = torch._int_mm(x8, weight.t())
    return acc[:m] if m < MIN_MM_ROWS else acc


def _epilogue(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
              dtype: torch.dtype) -> torch.Tensor:
    """The reference epilogue (``kernels.int8_matmul`` and ``kernels.int8_epilogue`` make the same fp32 operations)."""
    out = acc.float() * x_scale
    out = out * w_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


def int8_linear(x, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, *,
                rotation_groupsize: int | None = None, matmul: bool = True) -> torch.Tensor:
    """``x @ dequantize_int8(weight, scale, rotation_groupsize).T + bias`` for an int8 weight [out, in] with per-row
    fp32 ``scale`` [out, 1] (or a scalar), stored rotated per group of ``rotation_groupsize`` input columns when
    given (Comfy-Org's int8_convrot).

    With ``matmul`` (and ``int8_matmul_usable``) the activation rows are rotated and quantized to int8 (one Triton
    kernel on the GPU, ``kernels.quantize_rows``; torch on the CPU), multiplied and scaled in fp32 (one kernel on
    the GPU, ``kernels.int8_matmul``; ``torch._int_mm`` and torch elsewhere). ``x`` may be
    ``kernels.QuantizedRows`` with int8 codes made by the kernel that computed the activation
    (``blocks.block_forward``), rotated by the same group. Otherwise the weight is dequantized to ``x``'s dtype.
    """
    rotation = rotation_groupsize or None
    n_out, k = weight.shape
    quantized = isinstance(x, _kernels.QuantizedRows)
    device = x.q.device if quantized else x.device
    use_mm = matmul and int8_matmul_usable(weight, device)
    if quantized and not (use_mm and x.q.dtype == torch.int8 and (x.rotation or None) == rotation):
        raise ValueError("a quantized activation needs int8 codes rotated like the weight and the int8 matmul")
    if not use_mm:
        w = dequantize_int8(weight, scale, rotation, x.dtype)
        return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)
    if quantized:
        x8, x_scale, shape, dtype = x.q, x.scale, x.shape, x.dtype
        fused = _kernels.active(x_scale)
    else:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, k)
        fused = _kernels.active(x2)
        if fused:
            x8, x_scale = _kernels.quantize_rows(x2, "int8", rotation)
        else:
            x8, x_scale = quantize_activation_rowwise_int8(hadamard_rows(x2, rotation) if rotation else x2)
    w_scale = torch.ones((), device=device) if scale is None else scale.float()
    w_scale = (w_scale.reshape(1).expand(n_out) if w_scale.numel() == 1 else w_scale.reshape(n_out)).contiguous()
    if fused:  # one Triton kernel: the int32 sums stay in registers (kernels.int8_matmul)
        out = _kernels.int8_matmul(x8, x_scale, weight, w_scale, bias, dtype)
    else:
        out = _epilogue(int8_mm(x8, weight), x_scale, w_scale, bias, dtype)
    return out.reshape(*shape[:-1], n_out)


class Int8Linear(nn.Module):
    """A bias-optional linear layer whose weight is stored as int8 with per-row fp32 scales (``weight_scale``, the
    name ``FP8Linear`` uses, so the weight owner, LoRA merges and offload see both alike), optionally rotated per
    group of ``rotation`` input columns. Its forward dequantizes (as ``FP8Linear``'s); the fast path's
    ``blocks.block_forward`` multiplies in int8 where asked (``int8_linear``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype, device=None,
                 rotation: int | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        if rotation:
            check_rotation(rotation, in_features)
        self.rotation = rotation or None
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, 1, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def like(cls, linear: nn.Linear, compute_dtype: torch.dtype, rotation: int | None = None) -> "Int8Linear":
        return cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype,
                   device=linear.weight.device, rotation=rotation)

    def load_weight(self, weight: torch.Tensor) -> None:
        q, scale = quantize_rowwise_int8(weight, self.rotation)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_int8(self.weight, self.weight_scale, self.rotation, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x.to(self.compute_dtype), self.weight, self.weight_scale, self.bias,
                           rotation_groupsize=self.rotation, matmul=False)

    def extra_repr(self) -> str:
        rot = f", Hadamard groups of {self.rotation}" if self.rotation else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 rowwise{rot}")
