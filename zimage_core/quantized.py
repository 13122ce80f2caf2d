"""Quantized checkpoint layouts (fp8, nvfp4, mxfp8, int8) read as ComfyUI reads them, dequantized exactly.

Layouts (ComfyUI 0.33 ``comfy/quant_ops.py``, ``comfy/ops.py``, ``comfy/utils.py::convert_old_quants``):

* **legacy scaled fp8**: a ``scaled_fp8`` marker tensor; per layer ``<layer>.weight`` in fp8 with a scalar
  ``<layer>.scale_weight`` (and ``<layer>.scale_input``). ComfyUI 0.33 renames these to the layout below.
* **comfy_quant**: per layer a ``<layer>.comfy_quant`` uint8 tensor holding JSON ``{"format": ...}`` plus
  ``<layer>.weight_scale`` (and ``weight_scale_2``, ``input_scale``); or the same per-layer JSON in the
  safetensors header ``_quantization_metadata`` (``{"layers": {name: {...}}}``).
* **plain fp8 casts**: fp8 weights without any scale (scale 1).

Dequantization, in the compute dtype ``dt`` (ComfyUI's ``orig_dtype``; comfy-kitchen's formulas):

================  ==========================================================================================
float8_e4m3fn/    ``w.to(dt) * scale.to(dt)``
float8_e5m2
int8_tensorwise   ``(q.float() * scale).to(dt)``; with ``convrot`` (Comfy-Org's ``*_int8_convrot`` files) the
                  fp32 product is rotated back per group of ``convrot_groupsize`` input columns by the normalised
                  regular Hadamard matrix H (Kronecker powers of a symmetric 4x4, H @ H = I): ``W @ H.T``
mxfp8             fp8 data * 2**(e8m0 - 127) per block of 32 columns, block scales in cuBLAS's swizzled
                  128x4 tile layout; fp32, then ``.to(dt)``; padded storage cut to the layer's shape
nvfp4             two e2m1 codes per byte (high nibble first) * (``weight_scale_2``.to(dt) * fp8 block
                  scale.to(dt)) per block of 16 columns, swizzled like mxfp8; padded storage cut
================  ==========================================================================================

``convrot_w4a4`` (4-bit ConvRot) and ``asym_w4a8_int8`` are refused with a
message naming the format. ComfyUI 0.3.75 knew only legacy scaled fp8 and e4m3 through the header, and
computed fp8 as ``w.to(dt).mul_(scale)`` (one rounding instead of two in bf16; identical in fp32).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import torch

from .errors import ZImageError

COMPANION_SUFFIXES = (".comfy_quant", ".weight_scale", ".weight_scale_2", ".input_scale", ".scale_weight",
                      ".scale_input", ".pre_quant_scale")
SUPPORTED = ("float8_e4m3fn", "float8_e5m2", "int8_tensorwise", "int8_convrot", "mxfp8", "nvfp4")
REFUSED = {
    "convrot_w4a4": "4-bit ConvRot (Hadamard-rotated) weights",
    "asym_w4a8_int8": "asymmetric 4-bit weights with int8 activations",
}
INSTEAD = ("use the bf16 file (z_image_turbo_bf16.safetensors / qwen_3_4b.safetensors) with our fp8 storage option "
           "(transformer_storage / text_encoder_storage = fp8_e4m3fn), or an fp8 (float8_e4m3fn) file")
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def is_companion(key: str) -> bool:
    return key.endswith(COMPANION_SUFFIXES) or key == "scaled_fp8" or key.endswith(".scaled_fp8")


def _marker(keys) -> str | None:
    return next((k for k in keys if k == "scaled_fp8" or k.endswith(".scaled_fp8")), None)


def quant_layout(checkpoint_keys, metadata: dict | None = None, dtypes: dict | None = None) -> str:
    """The file's layout: ``plain``, ``fp8_cast`` (fp8 weights, no scales: needs ``dtypes``), ``scaled_fp8``
    (legacy marker + .scale_weight), ``comfy_quant`` (per-layer JSON tensors) or ``quantization_metadata``
    (the JSON in the safetensors header)."""
    keys = list(checkpoint_keys)
    if metadata and "_quantization_metadata" in metadata:
        return "quantization_metadata"
    if any(k.endswith(".comfy_quant") for k in keys):
        return "comfy_quant"
    if _marker(keys) or any(k.endswith(".scale_weight") for k in keys):
        return "scaled_fp8"
    if dtypes and any(d in (torch.float8_e4m3fn, torch.float8_e5m2) for d in dtypes.values()):
        return "fp8_cast"
    return "plain"


def describe(checkpoint_keys, metadata: dict | None = None, dtypes: dict | None = None,
             read=None, source: str = "the file") -> str:
    """One line naming the layout and its formats, e.g. 'comfy_quant mixed precision: float8_e4m3fn x 200'."""
    layout = quant_layout(checkpoint_keys, metadata, dtypes)
    if layout == "plain":
        return "unquantized"
    if layout == "fp8_cast":
        names = sorted({str(d).replace("torch.", "") for d in dtypes.values() if d.is_floating_point and d.itemsize == 1})
        return f"plain {'/'.join(names)} cast (no scales)"
    if layout == "scaled_fp8":
        return "legacy scaled fp8 (scaled_fp8 marker + .scale_weight)"
    if read is None:
        return {"comfy_quant": "comfy_quant mixed precision (per-layer .comfy_quant)",
                "quantization_metadata": "mixed precision (_quantization_metadata header)"}[layout]
    layers = layer_configs(checkpoint_keys, metadata, read, source)
    counts: dict[str, int] = {}
    for conf in layers.values():
        counts[_format_of(conf)] = counts.get(_format_of(conf), 0) + 1
    where = "per-layer .comfy_quant" if layout == "comfy_quant" else "_quantization_metadata header"
    return f"mixed precision ({where}): " + ", ".join(f"{f} x {n}" for f, n in sorted(counts.items()))


def _format_of(conf: dict) -> str:
    fmt = conf.get("format")
    params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
    if fmt == "int8_tensorwise" and (conf.get("convrot") or params.get("convrot")):
        return "int8_convrot"
    return fmt


DAMAGED = ("The file is damaged or was written by a broken tool: download or convert it again, or use the bf16 "
           "file (with fp8 storage if memory is short)")


def _conf(source: str, where: str, conf) -> dict:
    """One layer's quantization JSON: an object with a ``format`` string (``params`` an object if given)."""
    if not isinstance(conf, dict):
        raise ZImageError(f"{source}: {where} is a JSON {type(conf).__name__}, not an object like "
                          f'{{"format": "float8_e4m3fn"}}. {DAMAGED}.')
    if not isinstance(conf.get("format"), str):
        raise ZImageError(f"{source}: {where} has no \"format\" string (got {conf.get('format')!r}); expected one of "
                          f"{', '.join(SUPPORTED)}. {DAMAGED}.")
    if "params" in conf and not isinstance(conf["params"], dict):
        raise ZImageError(f"{source}: {where} has \"params\" {conf['params']!r}, not an object. {DAMAGED}.")
    return dict(conf)


def layer_configs(checkpoint_keys, metadata: dict | None, read, source: str = "the file") -> dict[str, dict]:
    """Layer name (as in the file, with its prefix) -> quantization JSON, for any of the layouts.
    ``read(key)`` returns a tensor of the file. A header or ``.comfy_quant`` tensor that is not the JSON object
    the layout needs is refused naming the file and the tensor."""
    keys = list(checkpoint_keys)
    if metadata and "_quantization_metadata" in metadata:
        try:
            header = json.loads(metadata["_quantization_metadata"])
        except ValueError as err:
            raise ZImageError(f"{source}: the _quantization_metadata header is not valid JSON ({err}). {DAMAGED}.") \
                from None
        layers = header.get("layers") if isinstance(header, dict) else None
        if not isinstance(layers, dict):
            got = type(header).__name__ if not isinstance(header, dict) else f'"layers" as a {type(layers).__name__}'
            raise ZImageError(f"{source}: the _quantization_metadata header must be an object whose \"layers\" maps "
                              f'each layer name to its format ({{"layers": {{"<layer>": {{"format": ...}}}}}}), got '
                              f"{got}. {DAMAGED}.")
        return {k: _conf(source, f"_quantization_metadata layer {k!r}", v) for k, v in layers.items()}
    if any(k.endswith(".comfy_quant") for k in keys):
        out = {}
        for k in keys:
            if k.endswith(".comfy_quant"):
                raw = read(k)
                if raw.dtype != torch.uint8 or raw.dim() != 1:
                    raise ZImageError(f"{source}: tensor {k!r} is {str(raw.dtype).replace('torch.', '')} of shape "
                                      f"{list(raw.shape)}; a .comfy_quant tensor is 1-D uint8 (JSON text). {DAMAGED}.")
                try:
                    conf = json.loads(raw.numpy().tobytes())
                except ValueError:
                    raise ZImageError(f"{source}: tensor {k!r} is not valid comfy_quant JSON text. {DAMAGED}.") from None
                out[k[: -len(".comfy_quant")]] = _conf(source, f"tensor {k!r}", conf)
        return out
    if _marker(keys) or any(k.endswith(".scale_weight") for k in keys):
        return {k[: -len(".scale_weight")]: {"format": "float8_e4m3fn", "legacy": True}
                for k in keys if k.endswith(".scale_weight")}
    return {}


# --------------------------------------------------------------------------------------- dequantizers
def unswizzle(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Block scales from cuBLAS's tiled layout (tiles of 128 rows x 4 columns, each stored as 32 x (4 x 4):
    row r of a tile at (r % 32) * 16 + (r // 32) * 4) back to ``[rows, cols]``."""
    rb, cb = -(-rows // 128), -(-cols // 4)
    tiles = blocked.reshape(rb, cb, 32, 4, 4)  # [row tile, col tile, r % 32, r // 32, col]
    plain = tiles.permute(0, 3, 2, 1, 4).reshape(rb * 128, cb * 4)
    return plain[:rows, :cols]


def hadamard(size: int) -> torch.Tensor:
    """The normalised regular Hadamard matrix of ``size`` (a power of 4): Kronecker powers of
    [[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]], divided by sqrt(size)."""
    if size < 4 or size & (size - 1) or (size.bit_length() - 1) % 2:
        raise ZImageError(f"ConvRot group size {size} is not a power of 4; the file is damaged.")
    h4 = torch.tensor([[1.0, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]])
    h = h4
    while h.shape[0] < size:
        h = torch.kron(h, h4)
    return h / size ** 0.5


def e8m0_to_float(x: torch.Tensor) -> torch.Tensor:
    """Power-of-two scales 2**(e - 127) stored as one byte; 0 encodes 0 (comfy-kitchen's convention)."""
    e = x.view(torch.uint8).to(torch.int32)
    out = (e << 23).view(torch.float32)
    return torch.where(e == 0, torch.zeros_like(out), out)


def dequantize(name: str, tensor: torch.Tensor, companions: dict[str, torch.Tensor], conf: dict,
               dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The weight ``name`` (``<layer>.weight``) in ``dtype``, from its stored ``tensor``, its layer's
    ``companions`` (suffix without the layer, e.g. ``weight_scale``) and quantization ``conf``.
    ``shape``: the layer's real shape where the storage is padded (nvfp4, mxfp8)."""
    fmt = _format_of(conf)
    if fmt in REFUSED:
        raise ZImageError(f"{name} is stored as {fmt} ({REFUSED[fmt]}), which this loader cannot dequantize "
                          f"exactly as ComfyUI does; {INSTEAD}.")
    if fmt not in SUPPORTED:
        raise ZImageError(f"{name}: unknown quantization format {fmt!r} (known: {', '.join(SUPPORTED)}); {INSTEAD}.")
    scale = companions.get("weight_scale", companions.get("scale_weight"))
    if fmt in ("float8_e4m3fn", "float8_e5m2"):
        w = tensor if tensor.dtype.itemsize == 1 and tensor.is_floating_point() else tensor.view(
            torch.float8_e4m3fn if fmt == "float8_e4m3fn" else torch.float8_e5m2)
        if scale is None:
            return w.to(dtype)
        return w.to(dtype) * scale.to(dtype)
    if scale is None:
        raise ZImageError(f"{name} ({fmt}) has no weight_scale in the file; the file is incomplete.")
    if fmt == "int8_tensorwise":
        return (tensor.view(torch.int8).float() * scale).to(dtype)
    if fmt == "int8_convrot":
        params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
        group = int(conf.get("convrot_groupsize", params.get("convrot_groupsize", 256)))
        w = tensor.view(torch.int8).float() * scale
        rows, cols = w.shape
        if cols % group:
            raise ZImageError(f"{name}: {cols} input columns are not a multiple of its ConvRot group {group}; "
                              "the file is damaged.")
        h = hadamard(group)
        return torch.matmul(w.reshape(rows, cols // group, group), h.T).reshape(rows, cols).to(dtype)
    if fmt == "mxfp8":
        rows, cols = tensor.shape
        blocks = cols // 32
        scales = e8m0_to_float(unswizzle(scale.view(torch.uint8), rows, blocks))
        data = tensor.view(torch.float8_e4m3fn).float().reshape(rows, blocks, 32) * scales.unsqueeze(-1)
        return _cut(data.reshape(rows, cols).to(dtype), shape)
    # nvfp4
    second = companions.get("weight_scale_2")
    if second is None:
        raise ZImageError(f"{name} (nvfp4) has no weight_scale_2 in the file; the file is incomplete.")
    packed = tensor.view(torch.uint8)
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(packed.shape[0], -1)
    values = E2M1.to(dtype)[codes.long()]
    rows, cols = values.shape
    blocks = unswizzle(scale.view(torch.float8_e4m3fn), rows, cols // 16)
    total = second.to(dtype) * blocks.to(dtype)
    out = (values.reshape(rows, cols // 16, 16) * total.unsqueeze(-1)).reshape(rows, cols).to(dtype)
    return _cut(out, shape)


def _cut(t: torch.Tensor, shape) -> torch.Tensor:
    if shape is None or tuple(t.shape) == tuple(shape):
        return t
    return t[tuple(slice(0, s) for s in shape)].contiguous()


def logical_shape(conf: dict, stored: tuple[int, ...]) -> tuple[int, ...]:
    """The weight shape a quantized tensor stands for (nvfp4 packs two values per byte)."""
    if _format_of(conf) == "nvfp4":
        return (stored[0], stored[1] * 2)
    return tuple(stored)


def fp8_rows(tensor: torch.Tensor, companions: dict[str, torch.Tensor], conf: dict) -> tuple | None:
    """``(e4m3 weight, fp32 scale [out, 1])`` with ``weight = w8.float() * scale`` exactly, for a layer stored
    as float8_e4m3fn with a per-tensor or per-row scale; None for any other format (requantize those)."""
    if _format_of(conf) != "float8_e4m3fn" or tensor.dim() != 2:
        return None
    w8 = tensor if tensor.dtype == torch.float8_e4m3fn else tensor.view(torch.float8_e4m3fn)
    scale = companions.get("weight_scale", companions.get("scale_weight"))
    scale = torch.ones((), dtype=torch.float32) if scale is None else scale.float()
    if scale.numel() == 1:
        return w8, scale.reshape(1, 1).expand(w8.shape[0], 1).contiguous()
    if scale.numel() == w8.shape[0]:
        return w8, scale.reshape(-1, 1).contiguous()
    return None


# ----------------------------------------------------------------------------------------------- checks
# Every layer's layout is checked when the file is opened, before anything is dequantized or loaded: what the
# config declares against the file's own tensors. Cost: the header's dtypes and shapes (free) and one pass over
# the scale tensors, which the reader holds anyway (per-tensor scales: bytes; block scales: 1/8 (nvfp4) or 1/32
# (mxfp8) of the quantized data).
E8M0 = getattr(torch, "float8_e8m0fnu", None)
_DATA_DTYPES = {  # the stored dtypes each declared format's data may have (uint8: fp8 bytes written as U8)
    "float8_e4m3fn": (torch.float8_e4m3fn, torch.uint8),
    "float8_e5m2": (torch.float8_e5m2, torch.uint8),
    "int8_tensorwise": (torch.int8,),
    "int8_convrot": (torch.int8,),
    "mxfp8": (torch.float8_e4m3fn, torch.uint8),
    "nvfp4": (torch.uint8,),
}
_LEGACY_DATA = (torch.float8_e4m3fn, torch.float8_e5m2, torch.uint8)  # a scaled_fp8 file's marker names e4m3 or e5m2
_WEIGHT_SCALES = ("weight_scale", "scale_weight", "weight_scale_2")
_BLOCK = {"mxfp8": 32, "nvfp4": 16}  # values per block scale


def _dtype(d) -> str:
    return str(d).replace("torch.", "")


def _names(dtypes) -> str:
    return " or ".join(_dtype(d) for d in dtypes)


def _padded_blocks(rows: int, blocks: int) -> int:
    """Entries of a block-scale tensor in cuBLAS's tiled layout: rows padded to 128, blocks to 4."""
    return -(-rows // 128) * 128 * (-(-blocks // 4) * 4)


def check_layout(source: str, layout: str, layers: dict[str, dict], dtypes: dict, shapes: dict,
                 companions: dict[str, dict[str, torch.Tensor]]) -> None:
    """Refuse a quantized file whose declarations and tensors disagree, naming the file, the tensor, what was
    expected and the fix: a config naming a layer the file lacks; a scale no config claims; fp8 data without its
    scale where the layout has scales; a declared format whose data has another dtype or shape; scales of the
    wrong shape or dtype, missing, zero or not finite."""
    def bad(key, problem):
        raise ZImageError(f"{source}: tensor {key!r} {problem}. {DAMAGED}.")

    scaled = layout in ("scaled_fp8", "comfy_quant", "quantization_metadata")
    declared_by = {"scaled_fp8": "its .scale_weight tensors", "comfy_quant": "its .comfy_quant tensors",
                   "quantization_metadata": "the _quantization_metadata header"}.get(layout, "")
    for layer, extra in companions.items():
        for suffix in extra:
            if suffix in _WEIGHT_SCALES and (layer not in layers or not scaled):
                raise ZImageError(
                    f"{source}: tensor {layer + '.' + suffix!r} is a weight scale of layer {layer!r}, but "
                    + (f"the file's quantization config ({declared_by}) does not name that layer" if scaled else
                       "the file declares no quantization (no .comfy_quant tensors, _quantization_metadata header or "
                       "scaled_fp8 marker)")
                    + ": the scale would be dropped and the weights load wrong"
                    + (" (a config whose layer names differ from the tensors', e.g. by a prefix, does this)" if scaled
                       else "") + f". {DAMAGED}.")
    for layer, conf in layers.items():
        key = f"{layer}.weight"
        if key not in dtypes:
            example = next((k for k in dtypes if k.endswith(".weight") and dtypes[k].itemsize == 1), None)
            raise ZImageError(
                f"{source}: its quantization config names layer {layer!r}, but the file has no tensor {key!r}"
                + (f" (its quantized weights are named like {example!r})" if example else "")
                + f": the config does not describe this file. {DAMAGED}.")
        fmt, stored, shape = _format_of(conf), dtypes[key], tuple(shapes[key])
        allowed = _LEGACY_DATA if conf.get("legacy") else _DATA_DTYPES[fmt]
        if stored not in allowed:
            bad(key, f"is stored as {_dtype(stored)} but its layer is declared {fmt}, whose data is {_names(allowed)}")
        if len(shape) != 2:
            bad(key, f"has shape {list(shape)}; a quantized weight is a matrix [out, in]")
        rows, cols = shape[0], shape[1] * (2 if fmt == "nvfp4" else 1)  # nvfp4: two values per byte
        extra = companions.get(layer, {})
        for suffix in extra:
            if suffix == "pre_quant_scale":
                raise ZImageError(f"{source}: tensor {layer + '.pre_quant_scale'!r} is an AWQ input smoothing scale "
                                  "(ModelOpt), which this loader does not apply: loading without it would silently "
                                  f"change the layer. Use a file without it: {INSTEAD}.")
            if suffix == "weight_scale_2" and fmt != "nvfp4":
                bad(f"{layer}.weight_scale_2", f"belongs to nvfp4 layers, but {layer!r} is declared {fmt}")
        if "weight_scale" in extra and "scale_weight" in extra:
            bad(f"{layer}.scale_weight", "and .weight_scale both exist: one layer has one weight scale")
        scale_key = f"{layer}.weight_scale" if "weight_scale" in extra else f"{layer}.scale_weight"
        scale = extra.get("weight_scale", extra.get("scale_weight"))
        if scale is None and (scaled or fmt not in ("float8_e4m3fn", "float8_e5m2")):
            bad(f"{layer}.weight_scale", f"is missing: a {fmt} layer of this file's layout ({layout}) is stored with its "
                                         "weight scale; without it the weights would load unscaled and wrong")
        if fmt in _BLOCK:
            block = _BLOCK[fmt]
            if cols % block:
                bad(key, f"has {cols} input columns, not a multiple of {fmt}'s block of {block}")
            kinds = (E8M0, torch.uint8) if fmt == "mxfp8" else (torch.float8_e4m3fn, torch.uint8)
            kinds = tuple(k for k in kinds if k is not None)
            need = _padded_blocks(rows, cols // block)
            if scale.dtype not in kinds:
                bad(scale_key, f"is {_dtype(scale.dtype)}; {fmt} block scales are {_names(kinds)}")
            if scale.numel() != need or scale.dim() > 2:
                bad(scale_key, f"has shape {list(scale.shape)}; the {fmt} block scales of a [{rows}, {cols}] weight are "
                               f"{need} entries ([{-(-rows // 128) * 128}, {-(-(cols // block) // 4) * 4}]: one per "
                               f"{block} columns, padded to 128 x 4 tiles)")
            if fmt == "mxfp8":
                if bool((scale.view(torch.uint8) == 255).any()):
                    bad(scale_key, "holds the E8M0 NaN code 255 (a block scale that is not a number)")
            elif not bool(torch.isfinite(scale.view(torch.float8_e4m3fn).float()).all()):
                bad(scale_key, "holds NaN block scales")
            if fmt == "nvfp4":
                second = extra.get("weight_scale_2")
                if second is None:
                    bad(f"{layer}.weight_scale_2", "is missing: an nvfp4 layer needs its per-tensor scale "
                                                   "weight_scale_2 besides the block scales")
                _check_tensor_scale(bad, f"{layer}.weight_scale_2", second, rows, per_row=False)
        elif scale is not None:
            _check_tensor_scale(bad, scale_key, scale, rows, per_row=True)
        if fmt == "int8_convrot":
            params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
            group = conf.get("convrot_groupsize", params.get("convrot_groupsize", 256))
            if not isinstance(group, int) or isinstance(group, bool) or group < 4 or group & (group - 1) \
                    or (group.bit_length() - 1) % 2 or cols % group:
                bad(key, f"is declared int8 ConvRot with group {group!r}; the group must be a power of 4 (16, 64, 256, "
                         f"...) dividing its {cols} input columns")
        for suffix in ("input_scale", "scale_input"):
            if suffix in extra:
                _check_tensor_scale(bad, f"{layer}.{suffix}", extra[suffix], rows, per_row=False)
    if scaled:
        for key, stored in dtypes.items():
            if stored in (torch.float8_e4m3fn, torch.float8_e5m2) and not is_companion(key) \
                    and not (key.endswith(".weight") and key[: -len(".weight")] in layers):
                bad(key, f"is stored as {_dtype(stored)} with no scale, but this file's layout ({layout}) stores its fp8 "
                         f"layers with their scales (declared by {declared_by}): it would load unscaled and wrong")


def _check_tensor_scale(bad, key: str, scale: torch.Tensor, rows: int, per_row: bool) -> None:
    """A per-tensor scale (one number; ``per_row``: or one per output row, [rows, 1]) in a float type of 16 or
    32 bits, finite and non-zero."""
    shapes = "one number (shape [] or [1])" + (f" or one per output row ([{rows}, 1])" if per_row else "")
    if not scale.is_floating_point() or scale.dtype.itemsize < 2:
        bad(key, f"is {_dtype(scale.dtype)}; a scale is float32, float16 or bfloat16")
    if not (scale.numel() == 1 or (per_row and tuple(scale.shape) == (rows, 1))):
        bad(key, f"has shape {list(scale.shape)}; a scale here is {shapes}")
    values = scale.float()
    if not bool(torch.isfinite(values).all()):
        bad(key, "holds NaN or Inf: the layer's weights would all be NaN")
    if bool((values == 0).any()):
        bad(key, "is zero: the layer's weights would all be zero")


class QuantizedReader:
    """A checkpoint seen through its quantization: ``iter_tensors`` yields ``(key, tensor)`` with every quantized
    weight dequantized to ``dtype`` and the companion tensors (scales, JSON, marker) consumed."""

    def __init__(self, ckpt, metadata: dict | None = None):
        self.ckpt = ckpt
        files = getattr(ckpt, "files", [])
        self.source = str(files[0].path) if len(files) == 1 else getattr(ckpt, "name", "the checkpoint")
        keys = ckpt.keys()
        self.metadata = metadata if metadata is not None else _metadata(ckpt)
        dtypes = {k: ckpt.dtype(k) for k in keys}
        self.layout = quant_layout(keys, self.metadata, dtypes)
        self.layers = layer_configs(keys, self.metadata, ckpt.read, self.source) if self.layout != "plain" else {}
        if self.layout == "fp8_cast":
            self.layers = {k[: -len(".weight")]: {"format": "float8_e4m3fn" if d == torch.float8_e4m3fn else "float8_e5m2"}
                           for k, d in dtypes.items() if k.endswith(".weight") and d in (torch.float8_e4m3fn, torch.float8_e5m2)}
        for layer, conf in self.layers.items():
            fmt = _format_of(conf)
            if fmt in REFUSED or fmt not in SUPPORTED:
                dequantize(f"{layer}.weight", torch.empty(0), {}, conf, torch.float32)  # raises the message
        self.companions: dict[str, dict[str, torch.Tensor]] = {}
        for k in keys:
            if k.endswith(COMPANION_SUFFIXES) and not k.endswith(".comfy_quant"):
                layer, _, suffix = k.rpartition(".")
                self.companions.setdefault(layer, {})[suffix] = ckpt.read(k)
        check_layout(self.source, self.layout, self.layers, dtypes, {k: ckpt.shape(k) for k in keys}, self.companions)
        self.description = describe(keys, self.metadata, dtypes, ckpt.read, self.source)

    @property
    def quantized(self) -> bool:
        return bool(self.layers)

    def weight_keys(self) -> list[str]:
        return [k for k in self.ckpt.keys() if not is_companion(k)]

    def shape(self, key: str) -> tuple[int, ...]:
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        stored = self.ckpt.shape(key)
        return logical_shape(self.layers[layer], stored) if layer in self.layers else stored

    def conf(self, key: str) -> dict | None:
        return self.layers.get(key[: -len(".weight")]) if key.endswith(".weight") else None

    def fp8_rows(self, key: str, tensor: torch.Tensor) -> tuple | None:
        conf = self.conf(key)
        return None if conf is None else fp8_rows(tensor, self.companions.get(key[: -len(".weight")], {}), conf)

    def convert(self, key: str, tensor: torch.Tensor, dtype: torch.dtype, shape=None) -> torch.Tensor:
        conf = self.conf(key)
        if conf is None:
            return tensor
        return dequantize(key, tensor, self.companions.get(key[: -len(".weight")], {}), conf, dtype, shape)

    def iter_raw(self, keys=None, staging=None) -> Iterator[tuple[str, torch.Tensor]]:
        """Stored tensors (companions left out), file by file in file order; staging only when nothing is
        quantized (a quantized weight's fp8 data may be kept, so it gets its own buffer)."""
        wanted = set(self.weight_keys() if keys is None else keys)
        for f in self.ckpt.files:
            yield from f.iter_tensors([k for k in f.keys() if k in wanted], None if self.quantized else staging)

    def iter_tensors(self, dtype: torch.dtype, staging=None, keys=None,
                     fp8_exact: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, tensor)`` with quantized weights dequantized to ``dtype``. With ``fp8_exact``, a weight whose
        file form is e4m3 with a per-tensor or per-row scale carries ``zimage_fp8_rows = (w8, row scale)``:
        the loader keeps those bits for fp8 storage instead of requantizing (see ``split_fp8_rows``)."""
        for key, raw in self.iter_raw(keys, staging):
            tensor = self.convert(key, raw, dtype)
            if fp8_exact:
                pair = self.fp8_rows(key, raw)
                if pair is not None:
                    tensor.zimage_fp8_rows = pair
            yield key, tensor


def split_fp8_rows(key: str, tensor: torch.Tensor, converted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Carry ``zimage_fp8_rows`` through diffusers' key conversion: one renamed tensor keeps the pair; the fused
    ``qkv`` split into to_q/to_k/to_v gets each its rows (offsets 0, dim, 2*dim)."""
    pair = getattr(tensor, "zimage_fp8_rows", None)
    if pair is None:
        return converted
    if len(converted) == 1:
        for value in converted.values():
            value.zimage_fp8_rows = pair
        return converted
    rows = pair[0].shape[0] // len(converted)
    for name, value in converted.items():
        index = "qkv".index(name.rsplit(".to_", 1)[1][0])
        value.zimage_fp8_rows = (pair[0][index * rows:(index + 1) * rows], pair[1][index * rows:(index + 1) * rows])
    return converted


def _metadata(ckpt) -> dict:
    out = {}
    for f in getattr(ckpt, "files", []):
        out.update(getattr(f, "metadata", {}) or {})
    return out
