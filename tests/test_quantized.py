"""Quantized checkpoints (legacy scaled fp8, comfy_quant tensors, the _quantization_metadata header, plain fp8
casts; e4m3, e5m2, int8, mxfp8, nvfp4): our loader's weights against the weights ComfyUI's own loader
dequantizes from the same file, tensor by tensor, and a generation close to the unquantized one.

The files are written here by small test quantizers (our own code). Only dequantization has to match: every
reference comes from ComfyUI loading the file (``comfy.sd.load_diffusion_model_state_dict``) and
``QuantizedTensor.dequantize()`` / the legacy layer's ``convert_weight``. ComfyUI 0.3.75 reads the legacy
layout, e4m3 through the header and plain casts; 0.33.0 reads them all.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from comfy_zimage import comfy_root, python_for, run_task
from helpers import transformer_to_original
from zimage_core import ZImage, ZImageError
from zimage_core.dtypes import ComponentDtype
from zimage_core.fp8 import FP8Linear
from zimage_core.loading import load_text_encoder, load_transformer
from zimage_core.quantized import describe, quant_layout, unswizzle

LINEARS = (".attention.qkv.weight", ".attention.out.weight", ".feed_forward.w1.weight", ".feed_forward.w2.weight",
           ".feed_forward.w3.weight", ".adaLN_modulation.0.weight")
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def targets(state, aligned=False):
    """Block linears (what ComfyUI's quantized files quantize); ``aligned``: only those whose sizes are multiples
    of 32 (nvfp4/mxfp8 pad other sizes)."""
    keys = [k for k in state if k.endswith(LINEARS)]
    return [k for k in keys if not aligned or all(d % 32 == 0 for d in state[k].shape)]


def comfy_quant_tensor(conf: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def swizzle(plain: torch.Tensor) -> torch.Tensor:
    """[rows, cols] block scales into cuBLAS's 128x4 tiles (the inverse of quantized.unswizzle), zero padded."""
    rows, cols = plain.shape
    rb, cb = -(-rows // 128), -(-cols // 4)
    padded = torch.zeros(rb * 128, cb * 4, dtype=plain.dtype)
    padded[:rows, :cols] = plain
    return padded.reshape(rb, 4, 32, cb, 4).permute(0, 3, 2, 1, 4).reshape(rb * 32, cb * 16).contiguous()


def q_fp8(w, dtype):
    scale = w.abs().amax() / torch.finfo(dtype).max
    return (w / scale).to(dtype), scale.float().reshape(())


def q_int8(w):
    scale = w.abs().amax() / 127
    return (w / scale).round().clamp(-127, 127).to(torch.int8), scale.float().reshape(())


def q_int8_convrot(w, group=16):
    from zimage_core.quantized import hadamard

    rows, cols = w.shape
    rotated = torch.matmul(w.reshape(rows, cols // group, group), hadamard(group).T).reshape(rows, cols)
    return q_int8(rotated)


def q_mxfp8(w):
    rows, cols = w.shape
    blocks = w.reshape(rows, cols // 32, 32)
    exp = torch.ceil(torch.log2(blocks.abs().amax(-1).clamp(min=2 ** -100) / 448.0)).clamp(-126, 127)
    data = (blocks / torch.exp2(exp).unsqueeze(-1)).reshape(rows, cols).to(torch.float8_e4m3fn)
    return data, swizzle((exp + 127).to(torch.uint8))


def q_nvfp4(w):
    rows, cols = w.shape
    blocks = w.reshape(rows, cols // 16, 16)
    second = w.abs().amax() / (448.0 * 6.0)
    block_scale = (blocks.abs().amax(-1) / 6.0 / second).to(torch.float8_e4m3fn)
    scaled = blocks / (second * block_scale.float()).clamp(min=1e-30).unsqueeze(-1)
    mag = (scaled.abs().unsqueeze(-1) - E2M1).abs().argmin(-1)
    codes = (mag + 8 * (scaled < 0)).to(torch.uint8).reshape(rows, cols)
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
    return packed.contiguous(), swizzle(block_scale), second.float().reshape(())


def write_layouts(state: dict, folder) -> dict[str, object]:
    """The tiny transformer in each layout: name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}

    def save(name, sd, metadata=None):
        path = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
        out[name] = path

    legacy = dict(state)
    for k in targets(state):
        w8, scale = q_fp8(state[k], torch.float8_e4m3fn)
        layer = k[: -len(".weight")]
        legacy[k], legacy[f"{layer}.scale_weight"], legacy[f"{layer}.scale_input"] = w8, scale, torch.tensor(1.0)
    legacy["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save("legacy_scaled_fp8", legacy)

    header, layers = dict(state), {}
    for k in targets(state):
        header[k], header[k[:-len(".weight")] + ".weight_scale"] = q_fp8(state[k], torch.float8_e4m3fn)
        layers[k[: -len(".weight")]] = {"format": "float8_e4m3fn"}
    save("header_e4m3", header, {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})})

    save("cast_e4m3", {k: (v.to(torch.float8_e4m3fn) if k in targets(state) else v) for k, v in state.items()})

    for fmt, quantize, aligned in (("float8_e4m3fn", lambda w: q_fp8(w, torch.float8_e4m3fn), False),
                                   ("float8_e5m2", lambda w: q_fp8(w, torch.float8_e5m2), False),
                                   ("int8_tensorwise", q_int8, False), ("int8_convrot", q_int8_convrot, True),
                                   ("mxfp8", q_mxfp8, True), ("nvfp4", q_nvfp4, True)):
        sd = dict(state)
        for k in targets(state, aligned):
            layer = k[: -len(".weight")]
            parts = quantize(state[k])
            sd[k], sd[f"{layer}.weight_scale"] = parts[0], parts[1]
            if fmt == "nvfp4":
                sd[f"{layer}.weight_scale_2"] = parts[2]
            conf = {"format": fmt}
            if fmt == "int8_convrot":  # Comfy-Org's *_int8_convrot files (group 256 there; the tiny model needs 16)
                conf = {"format": "int8_tensorwise", "params": {"convrot": True, "convrot_groupsize": 16}}
            sd[f"{layer}.comfy_quant"] = comfy_quant_tensor(conf)
        save(f"comfy_quant_{fmt}", sd)
    return out


AVAILABLE = {  # layouts each ComfyUI version loads
    "0.3.75": {"legacy_scaled_fp8", "header_e4m3", "cast_e4m3"},
    "0.33.0": {"legacy_scaled_fp8", "header_e4m3", "cast_e4m3", "comfy_quant_float8_e4m3fn",
               "comfy_quant_float8_e5m2", "comfy_quant_int8_tensorwise", "comfy_quant_int8_convrot", "comfy_quant_mxfp8",
               "comfy_quant_nvfp4"},
}


@pytest.fixture(scope="module")
def base_state(tiny_models):
    return transformer_to_original(tiny_models[0].state_dict(), prefix="")


@pytest.fixture(scope="module")
def layout_files(tmp_path_factory, base_state):
    root = tmp_path_factory.mktemp("quant")
    return root, write_layouts(base_state, root / "models")


CASES = [("0.3.75", "float32"), ("0.33.0", "float32"), ("0.33.0", "bfloat16")]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def comfy_quant(request, layout_files, tmp_path_factory):
    version, dtype = request.param
    if python_for(version) is None:
        pytest.skip(f"the ComfyUI {version} test venv is not installed (scripts/dev-install.sh makes it)")
    root, _ = layout_files
    inp = tmp_path_factory.mktemp(f"quant-in-{version}-{dtype}")
    (inp / "models").symlink_to(root / "models", target_is_directory=True)
    (inp / "dtype.txt").write_text(dtype)
    out = tmp_path_factory.mktemp(f"quant-out-{version}-{dtype}")
    results = run_task(version, "quant", comfy_root(version, tmp_path_factory.getbasetemp()), inp, out)
    assert results["comfyui_version"] == version
    return version, getattr(torch, dtype), results, out


def test_dequantized_weights_match_comfyui(comfy_quant, layout_files, base_state):
    from safetensors.torch import load_file

    version, dtype, results, out = comfy_quant
    _, files = layout_files
    for name in sorted(AVAILABLE[version]):
        info = results[name]
        assert "error" not in info, (version, name, info)
        quantized_kinds = [k for k in info["kinds"] if k.startswith(("QuantizedTensor", "scale_weight"))]
        assert quantized_kinds or name == "cast_e4m3", (name, info["kinds"])  # ComfyUI really saw the layout
        reference = load_file(str(out / f"{name}.safetensors"))
        reference.pop("norm_final.weight", None)  # ComfyUI 0.3.75's NextDiT has it, Z-Image files don't
        model = load_transformer(files[name], ComponentDtype(dtype, dtype), "cpu")
        ours = transformer_to_original(model.state_dict(), prefix="")
        assert set(ours) == set(reference), (name, set(ours) ^ set(reference))
        for key in targets(base_state, aligned=name.endswith(("mxfp8", "nvfp4", "convrot"))):
            assert info["dtypes"][key] == str(dtype) or name == "cast_e4m3", (name, key, info["dtypes"][key])
        rounded = []
        for key, ref in reference.items():
            got = ours[key].float()
            ref = ref.to(dtype).float()  # unquantized layers: ComfyUI keeps fp32 on the CPU, we load them in dtype
            if version == "0.3.75" and name == "legacy_scaled_fp8" and key not in targets(base_state) \
                    and torch.equal(ref, got.to(torch.float8_e4m3fn).float()):
                rounded.append(key)  # 0.3.75 built every Linear of such a file in fp8: it rounded the unscaled ones
                continue
            assert torch.equal(got, ref), (version, str(dtype), name, key, (got - ref).abs().max().item())
        if version == "0.3.75" and name == "legacy_scaled_fp8":
            assert "cap_embedder.1.weight" in rounded and "t_embedder.mlp.0.bias" in rounded, rounded
        changed = [k for k in targets(base_state) if not torch.equal(ours[k].float(), base_state[k].to(dtype).float())]
        assert changed, name  # the file really was quantized


def test_layouts_named(layout_files, base_state):
    from zimage_core.formats import identify
    from zimage_core.safetensors_io import Checkpoint

    _, files = layout_files
    names = {}
    for name, path in files.items():
        ckpt = Checkpoint.from_path(path)
        meta = ckpt.files[0].metadata
        dtypes = {k: ckpt.dtype(k) for k in ckpt.keys()}
        names[name] = (quant_layout(ckpt.keys(), meta, dtypes), describe(ckpt.keys(), meta, dtypes, ckpt.read))
        assert identify(ckpt.keys())[0] == "transformer"
    assert names["legacy_scaled_fp8"][0] == "scaled_fp8" and "legacy scaled fp8" in names["legacy_scaled_fp8"][1]
    assert names["header_e4m3"] == ("quantization_metadata",
                                    f"mixed precision (_quantization_metadata header): float8_e4m3fn x {len(targets(base_state))}")
    assert names["comfy_quant_nvfp4"] == ("comfy_quant", "mixed precision (per-layer .comfy_quant): nvfp4 x "
                                                         f"{len(targets(base_state, aligned=True))}")
    assert names["cast_e4m3"] == ("fp8_cast", "plain float8_e4m3fn cast (no scales)")
    assert "legacy scaled fp8" in identify(Checkpoint.from_path(files["legacy_scaled_fp8"]).keys())[1]


def test_unswizzle_is_cublas_tile_order():
    """Element (r, c) of a 128x4 tile sits at (r % 32) * 16 + (r // 32) * 4 + c (cuBLAS block-scaling layout)."""
    plain = torch.arange(256 * 8).reshape(256, 8)
    blocked = swizzle(plain).flatten()
    for r, c in ((0, 0), (1, 0), (32, 0), (33, 3), (127, 2), (128, 0), (5, 4), (200, 7)):
        tile = (r // 128) * 2 + c // 4
        rr, cc = r % 128, c % 4
        assert blocked[tile * 512 + (rr % 32) * 16 + (rr // 32) * 4 + cc] == plain[r, c]
    assert torch.equal(unswizzle(blocked, 256, 8), plain)


def test_refused_formats_named(tmp_path, base_state):
    sd = dict(base_state)
    k = targets(base_state)[0]
    sd[k], sd[k[:-7] + ".weight_scale"] = q_int8(base_state[k])
    sd[k[:-7] + ".comfy_quant"] = comfy_quant_tensor({"format": "convrot_w4a4"})
    save_file({a: b.contiguous() for a, b in sd.items()}, str(tmp_path / "w4a4.safetensors"))
    with pytest.raises(ZImageError, match="convrot_w4a4.*4-bit ConvRot.*bf16 file"):
        load_transformer(tmp_path / "w4a4.safetensors", ComponentDtype(torch.float32, torch.float32))
    sd[k[:-7] + ".comfy_quant"] = comfy_quant_tensor({"format": "svdquant_w4a4"})
    save_file({a: b.contiguous() for a, b in sd.items()}, str(tmp_path / "unknown.safetensors"))
    with pytest.raises(ZImageError, match="unknown quantization format 'svdquant_w4a4'"):
        load_transformer(tmp_path / "unknown.safetensors", ComponentDtype(torch.float32, torch.float32))


def test_fp8_storage_keeps_the_files_bits(layout_files):
    """An e4m3 file with a per-tensor scale loads into our fp8 storage as its own bits and row scales."""
    from safetensors.torch import load_file

    _, files = layout_files
    raw = load_file(str(files["header_e4m3"]))
    model = load_transformer(files["header_e4m3"], ComponentDtype(torch.float8_e4m3fn, torch.float32), "cpu")
    lin = model.layers[1].attention.to_k
    assert isinstance(lin, FP8Linear)
    rows = raw["layers.1.attention.qkv.weight"].shape[0] // 3
    assert torch.equal(lin.weight.view(torch.uint8), raw["layers.1.attention.qkv.weight"][rows:2 * rows].view(torch.uint8))
    assert torch.equal(lin.weight_scale, raw["layers.1.attention.qkv.weight_scale"].expand(rows, 1))
    w2 = model.layers[0].feed_forward.w2
    assert torch.equal(w2.weight.view(torch.uint8), raw["layers.0.feed_forward.w2.weight"].view(torch.uint8))


def test_quantized_text_encoder(tmp_path, tiny_models, tiny_split):
    """A comfy_quant e4m3 Qwen3 (like qwen_3_4b_fp8_mixed) loads to w8 * scale, the rest untouched."""
    from helpers import text_encoder_to_comfy

    sd = text_encoder_to_comfy(tiny_models[1].state_dict())
    plain = dict(sd)
    quantized = [k for k in sd if k.endswith(("q_proj.weight", "mlp.up_proj.weight"))]
    for k in quantized:
        sd[k], sd[k[:-7] + ".weight_scale"] = q_fp8(sd[k], torch.float8_e4m3fn)
        sd[k[:-7] + ".comfy_quant"] = comfy_quant_tensor({"format": "float8_e4m3fn"})
    save_file({a: b.contiguous() for a, b in sd.items()}, str(tmp_path / "qwen_fp8_mixed.safetensors"))
    model = load_text_encoder(tmp_path / "qwen_fp8_mixed.safetensors", ComponentDtype(torch.float32, torch.float32))
    state = model.state_dict()
    for k in quantized:
        name = k[len("model."):]
        if name in state:
            assert torch.equal(state[name], sd[k].float() * sd[k[:-7] + ".weight_scale"])
    assert torch.equal(state["layers.0.self_attn.k_proj.weight"], plain["model.layers.0.self_attn.k_proj.weight"])


def test_fp8_file_generates_close_to_bf16(layout_files, tiny_split, tokenizer_dir):
    _, files = layout_files

    def latents(transformer):
        z = ZImage.load(transformer=transformer, text_encoder=tiny_split["text_encoder"], vae=tiny_split["vae"],
                        tokenizer=tokenizer_dir, device="cpu", dtype="fp32")
        return z.generate("a quantized fox", seed=3, width=64, height=64, decode=False).latents

    ref = latents(tiny_split["transformer"])
    for name in ("legacy_scaled_fp8", "comfy_quant_float8_e4m3fn", "comfy_quant_nvfp4", "comfy_quant_int8_convrot"):
        rel = ((latents(files[name]) - ref).norm() / ref.norm()).item()
        assert 1e-5 < rel < 0.1, (name, rel)  # quantized, within fp8/fp4 noise (measured 0.018, 0.018, 0.051, 0.0055)
