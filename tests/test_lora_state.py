"""LoRA state belongs to the weights' owner (issue 25, defect 1): several ZImages loaded with ``reuse=True`` (every
loader node of the same files) share one model; each states the LoRA list it wants and gets exactly that, in any
order, never another's. A merge that fails leaves the weights and the list as they were. Also the LoRA API's
argument checks (defect 7)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_lora import base_state, lora_dir, te_state  # noqa: F401  (fixtures)
from zimage_core import ZImage, ZImageError
from zimage_core.weights import TransformerWeights, WeightOwner

KW = dict(seed=3, width=64, height=64, steps=2, decode=False)


def _load(tiny_dir, **kw):
    return ZImage.load(tiny_dir, device="cpu", dtype="fp32", reuse=True, **kw)


def _weights(z) -> dict[str, torch.Tensor]:
    return {f"t.{n}": p.detach().clone() for n, p in z.transformer.named_parameters()} | {
        f"te.{n}": p.detach().clone() for n, p in z.text_encoder.named_parameters()}


@pytest.fixture(scope="module")
def references(tiny_dir, lora_dir):
    """Latents of a fresh (not shared) model without LoRA, with native_dm x1 and with with_te x0.5."""
    _, files, _ = lora_dir
    fresh = ZImage.load(tiny_dir, device="cpu", dtype="fp32")
    plain = fresh.generate("shared", **KW).latents
    fresh.load_lora(files["native_dm"], 1.0)
    lora = fresh.generate("shared", **KW).latents
    fresh.set_loras([(files["with_te"], 0.5)])
    te = fresh.generate("shared", **KW).latents
    assert (lora - plain).abs().max() > 1e-3 and (te - plain).abs().max() > 1e-3
    return {"plain": plain, "lora": lora, "te": te}


def test_a_lora_never_leaks_into_another_loader_of_the_same_files(tiny_dir, lora_dir, references):
    """The issue's reproduction: z2 asks for no LoRA after z1 merged one, and gets the original weights."""
    _, files, _ = lora_dir
    z1, z2 = _load(tiny_dir), _load(tiny_dir)
    assert z1.transformer is z2.transformer  # one model, two users
    z1.set_loras([(files["native_dm"], 1.0)])
    z2.set_loras([])
    assert torch.equal(z2.generate("shared", **KW).latents, references["plain"])
    assert torch.equal(z1.generate("shared", **KW).latents, references["lora"])
    assert torch.equal(z2.generate("shared", **KW).latents, references["plain"])
    z1.set_loras([])


@pytest.mark.parametrize("order", ["lora_first", "plain_first"])
def test_alternating_users_each_get_their_own_image(tiny_dir, lora_dir, references, order):
    """Two loaders, one with a transformer LoRA, one with a text-encoder LoRA, one with none, used alternately."""
    _, files, _ = lora_dir
    plain, lora, te = _load(tiny_dir), _load(tiny_dir), _load(tiny_dir)
    lora.set_loras([(files["native_dm"], 1.0)])
    te.set_loras([(files["with_te"], 0.5)])
    sequence = [(plain, "plain"), (lora, "lora"), (te, "te")]
    if order == "plain_first":
        sequence.reverse()
    for _ in range(2):
        for z, key in sequence:
            assert torch.equal(z.generate("shared", **KW).latents, references[key]), key
    for z, _ in sequence:
        z.set_loras([])


def test_the_empty_list_restores_the_original_weights_bit_for_bit(tiny_dir, lora_dir):
    _, files, _ = lora_dir
    z1, z2 = _load(tiny_dir), _load(tiny_dir)
    z1.set_loras([])
    before = _weights(z1)
    z1.set_loras([(files["native_dm"], 0.7), (files["with_te"], 1.0)])
    assert any(not torch.equal(v, before[k]) for k, v in _weights(z1).items())
    z2.encode_prompt("a prompt")  # the text encoder alone, through the other loader
    z2.set_loras([])
    after = _weights(z2)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert TransformerWeights.of(z2.transformer).applied == () and WeightOwner.of(z2.text_encoder).applied == ()


def test_text_encoder_lora_never_leaks_into_the_other_loaders_embeddings(tiny_dir, lora_dir):
    _, files, _ = lora_dir
    z1, z2 = _load(tiny_dir), _load(tiny_dir)
    z2.set_loras([])
    plain = z2.encode_prompt("words")[0].clone()
    z1.set_loras([(files["with_te"], 1.0)])
    with_lora = z1.encode_prompt("words")[0]
    assert not torch.equal(with_lora, plain)
    z2.prompt_encoder.clear_cache()  # no cached answer: the weights themselves must be the original ones
    assert torch.equal(z2.encode_prompt("words")[0], plain)
    z1.set_loras([])


def _nan_lora(path, files):
    """native_dm with a NaN in the factors of one layer after others (the merge of earlier layers has started)."""
    sd = load_file(str(files["native_dm"]))
    keys = sorted(k for k in sd if k.endswith("lora_up.weight"))
    sd[keys[-1]] = sd[keys[-1]].clone()
    sd[keys[-1]][0, 0] = float("nan")
    save_file(sd, str(path))
    return path


def test_a_failed_merge_leaves_weights_and_list_as_they_were(tiny_dir, lora_dir, tmp_path, references):
    _, files, _ = lora_dir
    z1, z2 = _load(tiny_dir), _load(tiny_dir)
    z1.set_loras([(files["native_dm"], 1.0)])
    before, loras_before = _weights(z1), dict(z1.loras)
    bad = _nan_lora(tmp_path / "nan_lora.safetensors", files)
    with pytest.raises(ZImageError, match="nan_lora.safetensors"):
        z1.load_lora(bad, 1.0)
    assert z1.loras == loras_before
    assert all(torch.equal(v, before[k]) for k, v in _weights(z1).items())
    for _ in range(3):  # every later prompt through both loaders works (the issue saw seven failures in a row)
        assert torch.equal(z2.generate("shared", **KW).latents, references["plain"])
        assert torch.equal(z1.generate("shared", **KW).latents, references["lora"])
    z1.set_loras([])


def test_a_weight_pushed_beyond_the_storage_dtype_is_refused(tiny_dir, lora_dir):
    """A product finite in fp32 but beyond fp16's range is named and refused, and nothing stays merged."""
    _, files, _ = lora_dir
    z = ZImage.load(tiny_dir, device="cpu", dtype="fp16")
    before = _weights(z)
    out_features, in_features = z.transformer.layers[0].attention.to_out[0].weight.shape
    huge = {"diffusion_model.layers.0.attention.out.lora_up.weight": torch.full((out_features, 1), 1e3),
            "diffusion_model.layers.0.attention.out.lora_down.weight": torch.full((1, in_features), 1e3)}
    with pytest.raises(ZImageError, match="layers.0.attention.out.*float16's range"):
        z.load_lora(huge, 1.0)
    assert z.loras == {} and all(torch.equal(v, before[k]) for k, v in _weights(z).items())


def test_guard_and_offload_follow_the_loader_that_runs(tiny_dir, lora_dir, references):
    """Each loader keeps its own offload mode and guard: using one takes the model back with its settings."""
    _, files, _ = lora_dir
    offloaded = _load(tiny_dir, offload="model")
    resident = _load(tiny_dir)  # takes the model over: the other's hooks go
    resident.set_loras([(files["native_dm"], 1.0)])
    for _ in range(2):
        assert torch.equal(offloaded.generate("shared", **KW).latents, references["plain"])
        assert offloaded.offloader.mode == "model" and resident.offloader.mode == "none"
        assert torch.equal(resident.generate("shared", **KW).latents, references["lora"])
        assert offloaded.offloader.mode == "none"  # released: its hooks are gone until it runs again
    resident.set_loras([])


def test_lora_names_are_unique_and_the_same_file_twice_stacks(tiny_dir, lora_dir, tmp_path):
    d, files, _ = lora_dir
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(files["native_dm"], tmp_path / "a" / "style.safetensors")
    shutil.copy(files["diffusers_dm"], tmp_path / "b" / "style.safetensors")
    z = ZImage.load(tiny_dir, device="cpu", dtype="fp32")
    z.load_lora(tmp_path / "a" / "style.safetensors", 0.5)
    z.load_lora(tmp_path / "b" / "style.safetensors", 0.5)  # same base name, another file: both kept
    assert z.lora_names() == ["style.safetensors", "style.safetensors #2"]
    both = z.generate("names", **KW).latents
    z.remove_lora("style.safetensors #2")
    one = z.generate("names", **KW).latents
    assert not torch.equal(both, one)
    z.remove_lora()
    z.load_lora(files["native_dm"], 0.5)
    z.load_lora(files["native_dm"], 0.5)  # the same file twice stacks, as the CLI's --lora twice does
    twice = z.generate("names", **KW).latents
    z.remove_lora()
    z.load_lora(files["native_dm"], 1.0)
    once_double = z.generate("names", **KW).latents
    assert (twice - once_double).abs().max() < 1e-4  # two merges at 0.5 = one at 1.0 for a plain LoRA


@pytest.mark.parametrize("call, match", [
    (lambda z, f: z.load_lora(None), "must be a path"),
    (lambda z, f: z.load_lora(5), "must be a path"),
    (lambda z, f: z.load_lora(b"style.safetensors"), "must be a path"),
    (lambda z, f: z.load_lora(f.parent), "is a folder"),
    (lambda z, f: z.load_lora(f, "1"), "LoRA strength"),
    (lambda z, f: z.set_loras(None), "list of \\(file, strength\\) pairs"),
    (lambda z, f: z.set_loras(str(f)), "list of \\(file, strength\\) pairs"),
    (lambda z, f: z.set_loras([str(f)]), "not a \\(file, strength\\) pair"),
    (lambda z, f: z.set_lora_strength(3, 1.0), "no LoRA named 3"),
    (lambda z, f: z.generate("x", callback=5, **KW), "callback must be a function"),
    (lambda z, f: z.decode(torch.zeros(0, 16, 8, 8)), "empty batch"),
    (lambda z, f: z.encode_image(torch.zeros(0, 64, 64, 3)), "empty batch"),
])
def test_bad_lora_api_arguments_are_named(tiny_dir, lora_dir, call, match):
    _, files, _ = lora_dir
    z = ZImage.load(tiny_dir, device="cpu", dtype="fp32")
    with pytest.raises(ZImageError, match=match):
        call(z, files["native_dm"])
    assert z.loras == {}


def test_numpy_strengths_are_numbers_too(tiny_dir, lora_dir):
    """A strength from numpy (a slider's value in a script) is a number, as numpy seeds and sizes are."""
    import numpy as np

    _, files, _ = lora_dir
    z = ZImage.load(tiny_dir, device="cpu", dtype="fp32")
    z.load_lora(files["native_dm"], np.float32(0.5))
    z.set_lora_strength("native_dm.safetensors", np.float64(0.25))
    assert z.loras["native_dm.safetensors"][1] == 0.25
    with pytest.raises(ZImageError, match="-100..100"):
        z.set_lora_strength("native_dm.safetensors", np.float32(101))
