"""LoRA on our own model (``ZImage.load_lora``): the weight owner merges each patched weight from its original, in
every naming and weight form; the result equals a checkpoint merged beforehand (whose deltas equal ComfyUI's and
diffusers': tests/test_lora.py), strength 0 and removal restore the weights bit for bit, and fp8/int8 storage, offload
and the precision guard's sticky copies follow."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from test_lora import base_state, lora_dir, te_state  # noqa: F401  (fixtures)
from zimage_core import ZImage, ZImageError
from zimage_core.fp8 import quantize_rowwise
from zimage_core.int8 import quantize_rowwise_int8
from zimage_core.lora import apply_to_state_dict, load_lora
from zimage_core.weights import TransformerWeights

KW = dict(seed=5, width=64, height=64, steps=4, decode=False)


def merged_model(tiny_dir, tmp_path, base_state, te_state, stack, files_dir, **load):
    """A ZImage whose transformer (and text encoder) files have the stack merged beforehand."""
    state, te = dict(base_state), dict(te_state)
    for name, strength in stack:
        lora = load_lora(files_dir / name)
        state = apply_to_state_dict(state, lora, strength)
        if lora.text_encoder:
            te = apply_to_state_dict(te, lora, strength, component="text_encoder")
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in state.items()}, str(tmp_path / "t.safetensors"))
    save_file({f"model.{k}": v.contiguous() for k, v in te.items()}, str(tmp_path / "te.safetensors"))
    return ZImage.load(tiny_dir, transformer=tmp_path / "t.safetensors", text_encoder=tmp_path / "te.safetensors",
                       device="cpu", **load)


@pytest.mark.parametrize("name", ["native_dm", "native_kohya", "diffusers_dm", "lycoris_loha", "lycoris_lokr",
                                  "dora_rows", "peft", "bare", "musubi", "diff", "with_te", "stack_two",
                                  "stack_sliced_and_full"])
def test_lora_equals_a_checkpoint_merged_beforehand(tiny_dir, tmp_path, lora_dir, base_state, te_state, name):
    d, _, stacks = lora_dir
    expected = merged_model(tiny_dir, tmp_path, base_state, te_state, stacks[name], d, dtype="fp32")
    z = ZImage.load(tiny_dir, device="cpu", dtype="fp32")
    plain = z.generate("a lora", **KW).latents
    for file, strength in stacks[name]:
        z.load_lora(d / file, strength)
    got = z.generate("a lora", **KW).latents
    want = expected.generate("a lora", **KW).latents
    assert (got - want).abs().max() <= 1e-5
    assert (got - plain).abs().max() > 1e-3  # the LoRA changed the result


def test_strength_zero_and_removal_restore_weights_bit_for_bit(tiny_dir, lora_dir):
    d, files, _ = lora_dir
    z = ZImage.load(tiny_dir, device="cpu", dtype="bf16")
    owner = TransformerWeights.of(z.transformer)
    before = {n: p.detach().clone() for n, p in z.transformer.named_parameters()}
    te_before = {n: p.detach().clone() for n, p in z.text_encoder.named_parameters()}
    qkv_before = owner.fused("layers.0").qkv.weight.clone()

    def same():
        return (all(torch.equal(p, before[n]) for n, p in z.transformer.named_parameters())
                and all(torch.equal(p, te_before[n]) for n, p in z.text_encoder.named_parameters())
                and torch.equal(owner.fused("layers.0").qkv.weight, qkv_before))

    z.load_lora(files["native_dm"], 1.0)
    z.load_lora(files["with_te"], 0.5)
    assert not same()
    z.set_lora_strength("native_dm.safetensors", 0.0)
    z.set_lora_strength("with_te.safetensors", 0.0)
    assert same()
    z.set_lora_strength("native_dm.safetensors", -0.7)
    z.set_lora_strength("with_te.safetensors", 2.0)
    assert not same()
    z.remove_lora("native_dm.safetensors")
    z.remove_lora()
    assert same() and z.loras == {}
    with pytest.raises(ZImageError, match="no LoRA named 'nope'"):
        z.remove_lora("nope")
    with pytest.raises(ZImageError, match="LoRA strength"):
        z.load_lora(files["native_dm"], float("nan"))


def test_strength_change_between_runs_is_picked_up(tiny_dir, tmp_path, lora_dir, base_state, te_state):
    d, files, _ = lora_dir
    z = ZImage.load(tiny_dir, device="cpu", dtype="fp32")
    z.load_lora(files["diffusers_dm"], 1.0)
    z.generate("x", **KW)
    z.set_lora_strength("diffusers_dm.safetensors", 0.4)
    got = z.generate("x", **KW).latents
    want = merged_model(tiny_dir, tmp_path, base_state, te_state, [["diffusers_dm.safetensors", 0.4]], d,
                        dtype="fp32").generate("x", **KW).latents
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("storage", ["fp8", "int8"])
def test_quantized_storage_merges_then_requantizes(tiny_dir, tmp_path, lora_dir, base_state, te_state, storage):
    d, files, _ = lora_dir
    z = ZImage.load(tiny_dir, device="cpu", dtype="fp32", overrides={"transformer": (storage, None)})
    owner = TransformerWeights.of(z.transformer)
    qkv = owner.fused("layers.0").qkv
    w8_before, scale_before = qkv.weight.clone(), qkv.scale.clone()
    z.load_lora(files["native_dm"], 1.0)
    lora = load_lora(files["native_dm"])
    # the merge dequantizes the stored fp8/int8 weight, adds the delta in fp32 and requantizes with fresh row scales
    dequant = w8_before.float() * scale_before
    merged = dequant + lora.transformer["layers.0.attention.qkv.weight"][0].delta(dequant, 1.0)
    w8, scale = (quantize_rowwise if storage == "fp8" else quantize_rowwise_int8)(merged)
    assert qkv.weight.dtype == w8.dtype
    assert torch.equal(qkv.weight.view(torch.uint8), w8.view(torch.uint8)) and torch.equal(qkv.scale, scale)
    got = z.generate("fp8 lora", **KW).latents
    want = merged_model(tiny_dir, tmp_path, base_state, te_state, [["native_dm.safetensors", 1.0]], d,
                        dtype="fp32").generate("fp8 lora", **KW).latents
    assert (got - want).norm() / want.norm() < 0.05  # within fp8/int8 noise of the merged full-precision model
    z.remove_lora()
    assert torch.equal(qkv.weight.view(torch.uint8), w8_before.view(torch.uint8)) and torch.equal(qkv.scale, scale_before)


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_lora_under_offload(tiny_dir, lora_dir, mode):
    d, files, _ = lora_dir
    plain = ZImage.load(tiny_dir, device="cpu", dtype="fp32")
    plain.load_lora(files["native_dm"], 0.8)
    want = plain.generate("offload", **KW).latents
    z = ZImage.load(tiny_dir, device="cpu", dtype="fp32", offload=mode)
    z.generate("offload", **KW)
    z.load_lora(files["native_dm"], 0.8)
    for _ in range(2):  # the merge lives in the CPU masters: it survives the offload cycles
        assert torch.equal(z.generate("offload", **KW).latents, want)


def test_sticky_copies_follow_the_merge(tiny_dir, lora_dir):
    """The guard's high-precision copy of a block is made again from the merged weights."""
    d, files, _ = lora_dir
    z = ZImage.load(tiny_dir, device="cpu", dtype="fp16")
    z.set_precision_guard("auto")
    owner = TransformerWeights.of(z.transformer)
    owner.set_sticky("layers.0", torch.float32)  # as if it had overflowed
    copy_before = owner.high_precision_copy("layers.0", owner.blocks["layers.0"], torch.float32)
    z.load_lora(files["native_dm"], 1.0)
    copy_after = owner.high_precision_copy("layers.0", owner.blocks["layers.0"], torch.float32)
    assert copy_after is not copy_before
    assert torch.equal(copy_after.attention.to_q.weight, owner.blocks["layers.0"].attention.to_q.weight.float())


def test_unmatched_keys_are_logged_one_by_one(tiny_dir, tmp_path, lora_dir, caplog):
    d, files, _ = lora_dir
    from safetensors.torch import load_file

    sd = load_file(str(files["native_dm"]))
    sd["lora_unet_input_blocks_1_0_emb_layers_1.lora_up.weight"] = torch.zeros(4, 4)
    sd["diffusion_model.layers.0.attention.qkv.lora_up.weight"] = torch.zeros(7, 4)  # wrong size
    save_file(sd, str(tmp_path / "mixed.safetensors"))
    z = ZImage.load(tiny_dir, device="cpu", dtype="fp32")
    with caplog.at_level(logging.WARNING, logger="zimage_core"):
        lora = z.load_lora(tmp_path / "mixed.safetensors")
    lines = [r.getMessage() for r in caplog.records]
    assert any("lora_unet_input_blocks_1_0_emb_layers_1" in line and "SD" in line for line in lines), lines
    assert any("diffusion_model.layers.0.attention.qkv.lora_up.weight" in line for line in lines), lines
    assert len(lora.unmatched) >= 2


def test_set_loras_makes_the_merged_set_exactly_the_list(tiny_dir, lora_dir):
    """What the ComfyUI nodes call before each run: a chain of LoRA nodes, merged only when it changed."""
    d, files, _ = lora_dir
    a = ZImage.load(tiny_dir, device="cpu", dtype="fp32")
    a.load_lora(files["native_dm"], 0.7)
    a.load_lora(files["lycoris_lokr"], -0.5)
    want = a.generate("chain", **KW).latents
    z = ZImage.load(tiny_dir, device="cpu", dtype="fp32")
    plain = z.generate("chain", **KW).latents
    chain = [(files["native_dm"], 0.7), (files["lycoris_lokr"], -0.5)]
    z.set_loras(chain)
    owner = TransformerWeights.of(z.transformer)
    version = owner.version
    z.set_loras(chain)  # the same chain again: nothing is merged
    assert owner.version == version
    assert torch.equal(z.generate("chain", **KW).latents, want)
    z.set_loras([(files["native_dm"], 0.7), (files["native_dm"], 0.7)])  # one file twice stacks twice
    assert len(z.loras) == 2 and owner.version > version
    z.set_loras([])
    assert torch.equal(z.generate("chain", **KW).latents, plain)
