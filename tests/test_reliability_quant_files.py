"""Issue 25, defects 4 and 5: a quantized file whose declarations and tensors disagree is refused when it is opened,
naming the file, the tensor, what was expected and the fix: configs that are not JSON objects or name layers the
file lacks, scales no config claims, a declared format whose data has another dtype, scales of the wrong shape or
dtype, missing, zero or not finite. Nothing loads silently wrong, nothing ends in an internal error.

The files are the tiny transformer (and text encoder) quantized by test_quantized's quantizers, then damaged.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from helpers import text_encoder_to_comfy, transformer_to_original
from test_quantized import comfy_quant_tensor, q_fp8, q_int8, q_mxfp8, q_nvfp4, targets
from zimage_core import ZImageError
from zimage_core.dtypes import ComponentDtype
from zimage_core.loading import load_text_encoder, load_transformer

FP32 = ComponentDtype(torch.float32, torch.float32)
L = "noise_refiner.0.attention.qkv"  # [192, 64]: a multiple of 32 both ways (mxfp8/nvfp4 need it)
W2 = "noise_refiner.0.feed_forward.w2"  # [64, 170]
DAMAGED = "The file is damaged or was written by a broken tool: download or convert it again"
QUANTIZERS = {"float8_e4m3fn": lambda w: q_fp8(w, torch.float8_e4m3fn), "float8_e5m2": lambda w: q_fp8(w, torch.float8_e5m2),
              "int8_tensorwise": q_int8, "mxfp8": q_mxfp8, "nvfp4": q_nvfp4}


@pytest.fixture(scope="module")
def state(tiny_models):
    return transformer_to_original(tiny_models[0].state_dict(), prefix="")


def comfy_quant(state, fmt, layers=(L,)) -> dict:
    sd = dict(state)
    for layer in layers:
        parts = QUANTIZERS[fmt](state[f"{layer}.weight"])
        sd[f"{layer}.weight"], sd[f"{layer}.weight_scale"] = parts[0], parts[1]
        if fmt == "nvfp4":
            sd[f"{layer}.weight_scale_2"] = parts[2]
        sd[f"{layer}.comfy_quant"] = comfy_quant_tensor({"format": fmt})
    return sd


def legacy(state, layers=(L, W2)) -> dict:
    sd = dict(state)
    for layer in layers:
        sd[f"{layer}.weight"], sd[f"{layer}.scale_weight"] = q_fp8(state[f"{layer}.weight"], torch.float8_e4m3fn)
        sd[f"{layer}.scale_input"] = torch.tensor(1.0)
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return sd


def header(state, layers=(L, W2), names=None) -> tuple[dict, dict]:
    sd = dict(state)
    for layer in layers:
        sd[f"{layer}.weight"], sd[f"{layer}.weight_scale"] = q_fp8(state[f"{layer}.weight"], torch.float8_e4m3fn)
    names = layers if names is None else names
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0",
                                                   "layers": {n: {"format": "float8_e4m3fn"} for n in names}})}
    return sd, meta


def edit(sd, **changes) -> dict:
    """A copy of ``sd`` with tensors replaced (``name=tensor``, dots as '__') or removed (``name=None``)."""
    out = dict(sd)
    for name, value in changes.items():
        key = name.replace("__", ".")
        if value is None:
            out.pop(key)
        else:
            out[key] = value
    return out


def cq_conf(conf) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)


def nan_e4m3(t):
    t = t.clone().view(torch.uint8)
    t.view(-1)[0] = 0x7F  # e4m3fn NaN
    return t.view(torch.float8_e4m3fn)


def cases(s):
    """name -> (state dict, metadata, tensor named, words): built from the tiny state ``s``."""
    e4m3 = comfy_quant(s, "float8_e4m3fn")
    mx = comfy_quant(s, "mxfp8")
    nv = comfy_quant(s, "nvfp4")
    i8 = comfy_quant(s, "int8_tensorwise")
    old = legacy(s)
    head, meta = header(s)
    prefixed = header(s, names=[f"model.diffusion_model.{n}" for n in (L, W2)])
    extra_layer = header(s, names=[L, W2, "layers.9.attention.out"])
    undeclared = header(s, names=[L])
    undeclared = (edit(undeclared[0], **{f"{W2}__weight_scale": None}), undeclared[1])
    list_layers = {"_quantization_metadata": json.dumps({"layers": [{"name": L, "format": "float8_e4m3fn"}]})}
    w = f"{L}.weight"
    return {
        # defect 4: internal errors before
        "legacy_scale_shape": (edit(old, **{f"{L}__scale_weight": torch.ones(3)}), None, f"{L}.scale_weight",
                               r"has shape \[3\]; a scale here is one number \(shape \[\] or \[1\]\) or one per output "
                               r"row \(\[192, 1\]\)"),
        "comfy_quant_scale_shape": (edit(e4m3, **{f"{L}__weight_scale": torch.ones(2, 2)}), None, f"{L}.weight_scale",
                                    r"has shape \[2, 2\]; a scale here is one number"),
        "comfy_quant_json_list": (edit(e4m3, **{f"{L}__comfy_quant": cq_conf(["float8_e4m3fn"])}), None,
                                  f"{L}.comfy_quant", r"is a JSON list, not an object like \{\"format\": \"float8_e4m3fn\"\}"),
        "comfy_quant_not_json": (edit(e4m3, **{f"{L}__comfy_quant": torch.tensor([0xFF, 0x7B], dtype=torch.uint8)}),
                                 None, f"{L}.comfy_quant", "is not valid comfy_quant JSON text"),
        "comfy_quant_int32": (edit(e4m3, **{f"{L}__comfy_quant": cq_conf({"format": "float8_e4m3fn"}).int()}), None,
                              f"{L}.comfy_quant", r"is int32 of shape \[\d+\]; a .comfy_quant tensor is 1-D uint8"),
        "comfy_quant_no_format": (edit(e4m3, **{f"{L}__comfy_quant": cq_conf({"fmt": "float8_e4m3fn"})}), None,
                                  f"{L}.comfy_quant", "has no \"format\" string \\(got None\\); expected one of float8_e4m3fn"),
        "mxfp8_on_e4m3_data": (edit(e4m3, **{f"{L}__comfy_quant": cq_conf({"format": "mxfp8"})}), None,
                               f"{L}.weight_scale", "is float32; mxfp8 block scales are float8_e8m0fnu or uint8"),
        "metadata_layers_list": (head, list_layers, None,
                                 r"the _quantization_metadata header must be an object whose \"layers\" maps each layer "
                                 r"name to its format .*got \"layers\" as a list"),
        "metadata_not_object": (head, {"_quantization_metadata": "[1, 2]"}, None,
                                "the _quantization_metadata header must be an object .*got list"),
        "mxfp8_scale_shape": (edit(mx, **{f"{L}__weight_scale": mx[f"{L}.weight_scale"].flatten()[:-16].contiguous()}),
                              None, f"{L}.weight_scale",
                              r"the mxfp8 block scales of a \[192, 64\] weight are 1024 entries \(\[256, 4\]: one per 32 "
                              "columns, padded to 128 x 4 tiles\\)"),
        "mxfp8_scale_dtype": (edit(mx, **{f"{L}__weight_scale": mx[f"{L}.weight_scale"].float()}), None,
                              f"{L}.weight_scale", "is float32; mxfp8 block scales are float8_e8m0fnu or uint8"),
        "nvfp4_scale_shape": (edit(nv, **{f"{L}__weight_scale": nv[f"{L}.weight_scale"][:32].contiguous()}), None,
                              f"{L}.weight_scale", r"the nvfp4 block scales of a \[192, 64\] weight are 1024 entries"),
        "nvfp4_scale_dtype": (edit(nv, **{f"{L}__weight_scale": nv[f"{L}.weight_scale"].float()}), None,
                              f"{L}.weight_scale", "is float32; nvfp4 block scales are float8_e4m3fn or uint8"),
        "nvfp4_weight_f32": (edit(nv, **{w: s[w]}), None, w,
                             "is stored as float32 but its layer is declared nvfp4, whose data is uint8"),
        "nvfp4_scale_2_shape": (edit(nv, **{f"{L}__weight_scale_2": torch.ones(3)}), None, f"{L}.weight_scale_2",
                                r"has shape \[3\]; a scale here is one number \(shape \[\] or \[1\]\)\."),
        "nvfp4_no_scale_2": (edit(nv, **{f"{L}__weight_scale_2": None}), None, f"{L}.weight_scale_2",
                             "is missing: an nvfp4 layer needs its per-tensor scale"),
        # defect 5: silently wrong before
        "metadata_prefixed_names": (prefixed[0], prefixed[1], f"{L}.weight_scale",
                                    f"is a weight scale of layer '{L}', but the file's quantization config \\(the "
                                    "_quantization_metadata header\\) does not name that layer: the scale would be "
                                    "dropped"),
        "metadata_extra_layer": (extra_layer[0], extra_layer[1], None,
                                 "its quantization config names layer 'layers.9.attention.out', but the file has no "
                                 "tensor 'layers.9.attention.out.weight' \\(its quantized weights are named like "),
        "int8_tag_on_e4m3": (edit(e4m3, **{f"{L}__comfy_quant": cq_conf({"format": "int8_tensorwise"})}), None, w,
                             "is stored as float8_e4m3fn but its layer is declared int8_tensorwise, whose data is int8"),
        "e4m3_tag_on_int8": (edit(i8, **{f"{L}__comfy_quant": cq_conf({"format": "float8_e4m3fn"})}), None, w,
                             "is stored as int8 but its layer is declared float8_e4m3fn, whose data is "
                             "float8_e4m3fn or uint8"),
        "fp8_without_scale": (edit(e4m3, **{f"{L}__weight_scale": None}), None, f"{L}.weight_scale",
                              r"is missing: a float8_e4m3fn layer of this file's layout \(comfy_quant\) is stored with "
                              "its weight scale; without it the weights would load unscaled and wrong"),
        "legacy_fp8_without_scale": (edit(old, **{f"{W2}__scale_weight": None, f"{W2}__scale_input": None}), None,
                                     f"{W2}.weight", r"is stored as float8_e4m3fn with no scale, but this file's layout "
                                                     r"\(scaled_fp8\) stores its fp8 layers with their scales"),
        "header_fp8_undeclared": (undeclared[0], undeclared[1], f"{W2}.weight", "is stored as float8_e4m3fn with no scale"),
        "zero_scale": (edit(e4m3, **{f"{L}__weight_scale": torch.tensor(0.0)}), None, f"{L}.weight_scale",
                       "is zero: the layer's weights would all be zero"),
        "zero_legacy_scale": (edit(old, **{f"{W2}__scale_weight": torch.tensor(0.0)}), None, f"{W2}.scale_weight",
                              "is zero"),
        "zero_row_scale": (edit(e4m3, **{f"{L}__weight_scale": torch.cat([torch.ones(191, 1), torch.zeros(1, 1)])}), None,
                           f"{L}.weight_scale", "is zero"),
        "zero_int8_scale": (edit(i8, **{f"{L}__weight_scale": torch.tensor(0.0)}), None, f"{L}.weight_scale", "is zero"),
        "zero_nvfp4_scale_2": (edit(nv, **{f"{L}__weight_scale_2": torch.tensor(0.0)}), None, f"{L}.weight_scale_2",
                               "is zero"),
        "nan_scale": (edit(e4m3, **{f"{L}__weight_scale": torch.tensor(float("nan"))}), None, f"{L}.weight_scale",
                      "holds NaN or Inf: the layer's weights would all be NaN"),
        "inf_input_scale": (edit(e4m3, **{f"{L}__input_scale": torch.tensor(float("inf"))}), None, f"{L}.input_scale",
                            "holds NaN or Inf"),
        "input_scale_shape": (edit(old, **{f"{L}__scale_input": torch.ones(2)}), None, f"{L}.scale_input",
                              r"has shape \[2\]; a scale here is one number"),
        "int_scale": (edit(e4m3, **{f"{L}__weight_scale": torch.tensor(3, dtype=torch.int32)}), None,
                      f"{L}.weight_scale", "is int32; a scale is float32, float16 or bfloat16"),
        "mxfp8_nan_block": (edit(mx, **{f"{L}__weight_scale": mx[f"{L}.weight_scale"].clone().fill_(255)}), None,
                            f"{L}.weight_scale", "holds the E8M0 NaN code 255"),
        "nvfp4_nan_block": (edit(nv, **{f"{L}__weight_scale": nan_e4m3(nv[f"{L}.weight_scale"])}), None,
                            f"{L}.weight_scale", "holds NaN block scales"),
        # scales and tags without a partner
        "scale_without_any_config": (edit(s, **{f"{L}__weight_scale": torch.tensor(2.0)}), None, f"{L}.weight_scale",
                                     "but the file declares no quantization \\(no .comfy_quant tensors, "
                                     "_quantization_metadata header or scaled_fp8 marker\\)"),
        "cast_with_scale": (edit(s, **{w: s[w].to(torch.float8_e4m3fn), f"{L}__weight_scale": torch.tensor(2.0)}), None,
                            f"{L}.weight_scale", "but the file declares no quantization"),
        "scale_2_on_fp8": (edit(e4m3, **{f"{L}__weight_scale_2": torch.tensor(1.0)}), None, f"{L}.weight_scale_2",
                           f"belongs to nvfp4 layers, but '{L}' is declared float8_e4m3fn"),
        "pre_quant_scale": (edit(nv, **{f"{L}__pre_quant_scale": torch.ones(64)}), None, f"{L}.pre_quant_scale",
                            "is an AWQ input smoothing scale \\(ModelOpt\\), which this loader does not apply"),
        "both_scale_names": (edit(old, **{f"{L}__weight_scale": torch.tensor(1.0)}), None, f"{L}.scale_weight",
                             "and .weight_scale both exist"),
        "mxfp8_unaligned": (edit(s, **{f"{W2}__weight": s[f"{W2}.weight"].to(torch.float8_e4m3fn),
                                       f"{W2}__weight_scale": torch.zeros(128, 8, dtype=torch.uint8),
                                       f"{W2}__comfy_quant": cq_conf({"format": "mxfp8"})}), None, f"{W2}.weight",
                            "has 170 input columns, not a multiple of mxfp8's block of 32"),
        "convrot_group": (edit(i8, **{f"{L}__comfy_quant": cq_conf({"format": "int8_tensorwise",
                                                                    "params": {"convrot": True, "convrot_groupsize": 256}})}),
                          None, w, "is declared int8 ConvRot with group 256; the group must be a power of 4 .* dividing "
                                   "its 64 input columns"),
        "weight_3d": (edit(e4m3, **{w: e4m3[w].reshape(192, 8, 8)}), None, w,
                      r"has shape \[192, 8, 8\]; a quantized weight is a matrix"),
    }


@pytest.fixture(scope="module")
def built(state):
    return cases(state)


def test_damaged_quantized_files_refused_when_opened(tmp_path, built):
    """Every case: a ZImageError starting with the file and the tensor, holding the expectation and the fix."""
    assert len(built) == 42  # a repeated name in the dict literal would hide a case
    failures = []
    for name, (sd, meta, tensor, words) in built.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
        try:
            load_transformer(path, FP32)
            failures.append((name, "loaded"))
            continue
        except ZImageError as err:
            message = str(err)
        except Exception as err:  # noqa: BLE001 - the defect: anything but our error
            failures.append((name, f"{type(err).__name__}: {err}"))
            continue
        fix = "Use a file without it: use the bf16 file" if name == "pre_quant_scale" else DAMAGED
        if not (message.startswith(f"{path}: " + (f"tensor {tensor!r} " if tensor else "")) and re.search(words, message)
                and fix in message):
            failures.append((name, message))
    assert not failures, "\n".join(f"{n}: {m}" for n, m in failures)


def test_good_files_still_load(tmp_path, state):
    """The checks let through every layout the quantizers write, scales stored as E8M0 (comfy-kitchen's dtype)
    included: those load to the same weights as uint8 ones."""
    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    for name, sd, meta in (("legacy", legacy(state), None), ("header",) + header(state),
                           ("e5m2", comfy_quant(state, "float8_e5m2", (L, W2)), None),
                           ("int8", comfy_quant(state, "int8_tensorwise", (L, W2)), None),
                           ("mxfp8", comfy_quant(state, "mxfp8"), None), ("nvfp4", comfy_quant(state, "nvfp4"), None)):
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
        load_transformer(path, FP32)
    if e8m0 is not None:
        mx = comfy_quant(state, "mxfp8")
        as_e8m0 = edit(mx, **{f"{L}__weight_scale": mx[f"{L}.weight_scale"].view(e8m0)})
        save_file({k: v.contiguous() for k, v in as_e8m0.items()}, str(tmp_path / "e8m0.safetensors"))
        a = load_transformer(tmp_path / "mxfp8.safetensors", FP32).state_dict()
        b = load_transformer(tmp_path / "e8m0.safetensors", FP32).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_quantized_text_encoder_checked_too(tmp_path, tiny_models):
    sd = text_encoder_to_comfy(tiny_models[1].state_dict())
    k = "model.layers.0.self_attn.q_proj"
    sd[f"{k}.weight"], sd[f"{k}.weight_scale"] = q_fp8(sd[f"{k}.weight"], torch.float8_e4m3fn)
    sd[f"{k}.comfy_quant"] = cq_conf({"format": "int8_tensorwise"})
    path = tmp_path / "qwen_bad.safetensors"
    save_file({a: b.contiguous() for a, b in sd.items()}, str(path))
    with pytest.raises(ZImageError, match=re.escape(f"{path}: tensor '{k}.weight' is stored as float8_e4m3fn but its "
                                                    "layer is declared int8_tensorwise")):
        load_text_encoder(path, FP32)


@pytest.mark.parametrize("name", ["comfy_quant_json_list", "metadata_layers_list", "nvfp4_weight_f32",
                                  "nvfp4_scale_2_shape", "metadata_prefixed_names"])
def test_cli_one_line(tmp_path, built, tiny_split, tokenizer_dir, name):
    """The CLI: exit 2 with the loader's one-line message (the file and tensor), not 'internal error'."""
    sd, meta, tensor, words = built[name]
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    result = subprocess.run([sys.executable, "-m", "zimage_core", "generate", "--transformer", str(path),
                             "--text-encoder", str(tiny_split["text_encoder"]), "--vae", str(tiny_split["vae"]),
                             "--tokenizer", str(tokenizer_dir), "--steps", "1", "--width", "64", "--height", "64",
                             "--device", "cpu", "--out", str(tmp_path / "o.png")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: " + (f"tensor {tensor!r} " if tensor else "")), \
        result.stderr
    assert re.search(words, lines[0]), lines[0]
    assert "internal error" not in lines[0] and DAMAGED in lines[0], lines[0]
    assert not (tmp_path / "o.png").exists()


@pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"), reason="this torch has no E8M0 dtype")
def test_e8m0_weight_outside_mxfp8_scales_is_refused(tmp_path, state):
    """E8M0 holds only powers of two: as a weight (not an mxfp8 block scale) it is refused, not cast."""
    sd = dict(state)
    sd[f"{L}.weight"] = torch.ones(192, 64).to(torch.float8_e8m0fnu)
    path = tmp_path / "e8m0_weight.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(ZImageError, match="e8m0_weight.safetensors: tensor 'noise_refiner.0.attention.to_q.weight' is "
                                          "stored as float8_e8m0fnu, but the model needs floating-point weights"):
        load_transformer(path, FP32)
