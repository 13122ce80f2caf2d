"""Malformed files, generated on the fly: each is refused with a message naming the file, the tensor and the rule.

The header table is checked against the safetensors library too: every file we refuse, the library refuses,
and the valid file both accept, so our streaming reader is exactly as strict as the library on these rules.
"""

import json
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zimage_core import ZImage, ZImageError
from zimage_core.dtypes import ComponentDtype
from zimage_core.loading import load_component
from zimage_core.safetensors_io import SafetensorsFile


def _write(path, header, data: bytes, raw_header: bytes | None = None):
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _f32(*shape_offsets):
    return {"dtype": "F32", "shape": shape_offsets[0], "data_offsets": shape_offsets[1]}


GOOD = {"a": _f32([2, 2], [0, 16]), "b": _f32([2], [16, 24])}
DATA = bytes(24)

# name, header, data, (words the message must hold)
CASES = [
    ("overlap", {"a": _f32([2, 2], [0, 16]), "b": _f32([4], [8, 24])}, DATA, ("'b'", "overlap")),
    ("reversed_offsets", {"a": _f32([2, 2], [16, 0]), "b": _f32([2], [16, 24])}, DATA, ("'a'", "reversed")),
    ("shape_vs_span", {"a": _f32([3, 2], [0, 16]), "b": _f32([2], [16, 24])}, DATA, ("'a'", "needs 24 bytes", "span 16")),
    ("negative_dim", {"a": _f32([-2, 2], [0, 16]), "b": _f32([2], [16, 24])}, DATA, ("'a'", "non-negative integers")),
    ("string_shape", {"a": _f32("2x2", [0, 16]), "b": _f32([2], [16, 24])}, DATA, ("'a'", "non-negative integers")),
    ("float_dim", {"a": _f32([2.0, 2], [0, 16]), "b": _f32([2], [16, 24])}, DATA, ("'a'", "non-negative integers")),
    ("entry_not_object", {"a": [0, 16], "b": _f32([2], [16, 24])}, DATA, ("'a'", "must be an object")),
    ("no_data_offsets", {"a": {"dtype": "F32", "shape": [2, 2]}, "b": _f32([2], [16, 24])}, DATA,
     ("'a'", "no data_offsets")),
    ("no_dtype", {"a": {"shape": [2, 2], "data_offsets": [0, 16]}, "b": _f32([2], [16, 24])}, DATA, ("'a'", "no dtype")),
    ("unknown_dtype", {"a": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}, "b": _f32([2], [16, 24])}, DATA,
     ("'a'", "unknown dtype 'Q4'")),
    ("three_offsets", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8, 16]}, "b": _f32([2], [16, 24])},
     DATA, ("'a'", "two non-negative integers")),
    ("gap", {"a": _f32([2, 2], [8, 24]), "b": _f32([2], [24, 32])}, bytes(32), ("'a'", "gap of 8")),
    ("trailing_bytes", GOOD, bytes(40), ("header", "trailing")),
    ("metadata_not_strings", {"__metadata__": {"format": 1}, **GOOD}, DATA, ("__metadata__", "strings")),
    ("header_is_a_list", [1, 2], DATA, ("header", "JSON object")),
    ("truncated", GOOD, bytes(20), ("truncated", "4 missing")),
]


@pytest.mark.parametrize("name,header,data,words", CASES, ids=[c[0] for c in CASES])
def test_bad_header_refused_like_the_library(tmp_path, name, header, data, words):
    path = _write(tmp_path / f"{name}.safetensors", header, data)
    with pytest.raises(ZImageError) as err:
        SafetensorsFile(path)
    message = str(err.value)
    assert str(path) in message
    for word in words:
        assert word in message, message
    with pytest.raises(Exception):  # the library refuses the same file
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                f.get_tensor(key)


def test_valid_file_accepted_like_the_library(tmp_path):
    path = _write(tmp_path / "good.safetensors", {"__metadata__": {"format": "pt"}, **GOOD}, DATA)
    f = SafetensorsFile(path)
    assert f.keys() == ["a", "b"] and f.shape("a") == (2, 2) and f.metadata == {"format": "pt"}
    with safe_open(str(path), "pt") as lib:
        assert torch.equal(lib.get_tensor("a"), f.read("a"))


@pytest.mark.parametrize("raw,words", [(b"{not json", "corrupt safetensors header"),
                                       (b"\xff\xfe{}", "corrupt safetensors header")])
def test_corrupt_header_text(tmp_path, raw, words):
    path = _write(tmp_path / "bad.safetensors", None, b"", raw_header=raw)
    with pytest.raises(ZImageError, match=words):
        SafetensorsFile(path)


def test_bad_header_length(tmp_path):
    path = tmp_path / "len.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ZImageError, match="bad header length"):
        SafetensorsFile(path)


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    import zimage_core.safetensors_io as io

    path = _write(tmp_path / "locked.safetensors", GOOD, DATA)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io, "open", denied, raising=False)  # root ignores chmod: deny at the call instead
    with pytest.raises(ZImageError, match="locked.safetensors cannot be read .permission denied."):
        SafetensorsFile(path)


# ------------------------------------------------------------------------------------------- model files
@pytest.fixture
def vae_folder(tmp_path, tiny_dir):
    folder = tmp_path / "vae"
    shutil.copytree(tiny_dir / "vae", folder)
    return folder


def _edit_vae(folder, edit):
    from safetensors.torch import load_file

    [path] = folder.glob("*.safetensors")
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))
    return path


FP32 = ComponentDtype(torch.float32, torch.float32)


def test_int_tensor_where_float_expected(vae_folder):
    _edit_vae(vae_folder, lambda s: s.update({"decoder.conv_out.bias": s["decoder.conv_out.bias"].to(torch.int8)}))
    with pytest.raises(ZImageError, match="'decoder.conv_out.bias' is stored as int8.*floating-point"):
        load_component("vae", vae_folder, FP32, "cpu")


def test_wrong_shape_names_tensor_expected_and_cause(vae_folder):
    _edit_vae(vae_folder, lambda s: s.update({"decoder.conv_out.bias": torch.zeros(5)}))
    with pytest.raises(ZImageError, match=r"'decoder.conv_out.bias' has shape \[5\] but the model built from its "
                                          r"config expects \[3\]. Likely cause"):
        load_component("vae", vae_folder, FP32, "cpu")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_reported_at_load(vae_folder, value):
    def poison(state):
        state["decoder.up_blocks.0.resnets.0.conv1.weight"].view(-1)[3] = value

    _edit_vae(vae_folder, poison)
    for storage in (torch.float32, torch.bfloat16):
        with pytest.raises(ZImageError, match="'decoder.up_blocks.0.resnets.0.conv1.weight' holds NaN or Inf"):
            load_component("vae", vae_folder, ComponentDtype(storage, torch.float32), "cpu")


def test_corrupt_config_json_is_named(vae_folder):
    (vae_folder / "config.json").write_text('{"latent_channels": 16,')
    with pytest.raises(ZImageError, match=r"vae/config.json is not valid JSON"):
        load_component("vae", vae_folder, FP32, "cpu")


def test_corrupt_scheduler_config_is_named(tmp_path, tiny_dir):
    model = tmp_path / "Z"
    shutil.copytree(tiny_dir, model)
    (model / "scheduler" / "scheduler_config.json").write_text("{")
    with pytest.raises(ZImageError, match="scheduler_config.json is not valid JSON"):
        ZImage.load(model, device="cpu")


@pytest.mark.parametrize("how", ["model_folder", "explicit", "env"])
@pytest.mark.parametrize("file", ["vocab.json", "tokenizer_config.json"])
def test_corrupt_tokenizer_files_are_named(tmp_path, tiny_dir, monkeypatch, how, file):
    import zimage_core.tokenizer as tokenizer

    model = tmp_path / "Z"
    shutil.copytree(tiny_dir, model)
    (model / "tokenizer" / file).write_text('{"a": ')
    monkeypatch.setattr(tokenizer, "comfy_tokenizer_dirs", lambda: [])
    kwargs = {}
    if how == "explicit":
        kwargs["tokenizer"] = model / "tokenizer"
    if how == "env":
        env_dir = tmp_path / "tok"
        shutil.move(str(model / "tokenizer"), env_dir)
        monkeypatch.setenv("ZIMAGE_TOKENIZER", str(env_dir))
    with pytest.raises(ZImageError, match=f"{file} is not valid JSON"):
        ZImage.load(model, device="cpu", **kwargs)


def test_split_file_with_model_folder_takes_the_folder_config(tmp_path, tokenizer_dir):
    """A non-standard transformer whose shapes do not tell its RoPE split: the folder's config.json decides."""
    from zimage_core.tiny import build_tiny_models, save_diffusers_folder, tiny_configs, TINY_TRANSFORMER

    configs = tiny_configs(transformer={**TINY_TRANSFORMER, "axes_dims": [4, 14, 14]})
    models = build_tiny_models(seed=1, configs=configs)
    folder = save_diffusers_folder(tmp_path / "Z", models, tokenizer_dir)
    single = tmp_path / "transformer_diffusers_layout.safetensors"
    save_file({k: v.contiguous() for k, v in models[0].state_dict().items()}, str(single))
    zimage = ZImage.load(folder, transformer=single, device="cpu", dtype="fp32")
    assert list(zimage.transformer.config.axes_dims) == [4, 14, 14]
    from_folder = ZImage.load(folder, device="cpu", dtype="fp32")
    a = zimage.generate("p", seed=0, steps=1, width=64, height=64, decode=False).latents
    b = from_folder.generate("p", seed=0, steps=1, width=64, height=64, decode=False).latents
    assert torch.equal(a, b)
