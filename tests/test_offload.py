"""Offload modes move the weights as specified: checked on the CPU, where "the device" is a second copy."""

from pathlib import Path

import pytest
import torch

from zimage_core.weights import TransformerWeights

from zimage_core import ZImage, ZImageError


@pytest.fixture()
def offloadable(tiny_dir):
    return ZImage.load(tiny_dir, device="cpu", dtype="fp32")


def loaded(zimage):
    return {name: hook.storage.loaded for name, hook in zimage.offloader.hooks.items()}


def test_model_offload_keeps_one_model_in_at_a_time(offloadable, zimage):
    z = offloadable
    z.set_offload("model")
    assert loaded(z) == {"text_encoder": False, "transformer": False, "vae": False}
    seen = {}

    def record(stage):
        def hook(*_):
            seen.setdefault(stage, loaded(z))  # returns None: the hook leaves the output alone
        return hook

    z.text_encoder.layers[0].register_forward_hook(record("encode"))
    z.transformer.layers[0].register_forward_pre_hook(record("sample"))
    z.vae.decoder.conv_in.register_forward_hook(record("decode"))
    z.set_speed(type(z.speed)(fast=False))  # module forwards, so the test's hooks see each block
    result = z.generate("offload", seed=2, width=64, height=64)
    assert seen["encode"] == {"text_encoder": True, "transformer": False, "vae": False}
    assert seen["sample"] == {"text_encoder": False, "transformer": True, "vae": False}
    assert seen["decode"] == {"text_encoder": False, "transformer": False, "vae": True}
    assert loaded(z) == {"text_encoder": False, "transformer": False, "vae": False}
    expected = zimage.generate("offload", seed=2, width=64, height=64)  # fast path: same numbers to fp32 rounding
    assert (result.images - expected.images).abs().max() <= 1e-5


def test_offload_keeps_cpu_masters_and_fused_views(offloadable):
    z = offloadable
    z.set_offload("model")
    hook = z.offloader.hooks["transformer"]
    attn = z.transformer.layers[0].attention
    master_ptrs = {m.data_ptr() for m in hook.storage.masters.values()}
    assert attn.to_q.weight.untyped_storage().data_ptr() in master_ptrs  # dropped = pointing at the master
    z.offloader.before("transformer")
    ptr = attn.to_q.weight.untyped_storage().data_ptr()
    assert ptr not in master_ptrs
    assert attn.to_k.weight.untyped_storage().data_ptr() == ptr  # q/k/v still views of one fused weight
    assert TransformerWeights.of(z.transformer).fused("layers.0").qkv.weight.untyped_storage().data_ptr() == ptr
    z.offloader.finish()
    assert attn.to_q.weight.untyped_storage().data_ptr() in master_ptrs


def test_sequential_streams_one_block_ahead(offloadable, zimage):
    z = offloadable
    z.set_offload("sequential")
    streamer = z.denoiser.streamer
    te_streamer = z.offloader.streamers[1]
    states = []
    real_before = streamer.before

    def spy(name):
        real_before(name)
        states.append((name, {n for n, s in streamer.sets.items() if s.loaded}))

    streamer.before = spy
    te_states = []

    def record_te(*_):
        te_states.append(sorted(n for n, s in te_streamer.sets.items() if s.loaded))

    z.text_encoder.layers[1].register_forward_pre_hook(record_te)
    z.prompt_encoder.clear_cache()
    result = z.generate("stream", seed=5, width=64, height=64, steps=2)
    steps = [s for s in states if not s[0].startswith("context")]
    assert steps[0] == ("noise_refiner.0", {"noise_refiner.0", "layers.0"})
    assert ("layers.0", {"layers.0", "layers.1"}) in steps
    assert ("layers.1", {"layers.1", "noise_refiner.0"}) in steps  # prefetch wraps to the next step's first block
    assert all(len(loaded) <= 2 for _, loaded in states)
    assert te_states == [["layers.1"]]  # the last text-encoder layer has nothing to prefetch
    assert not any(s.loaded for s in streamer.sets.values())  # all dropped after the run
    expected = zimage.generate("stream", seed=5, width=64, height=64, steps=2)
    assert torch.equal(result.latents, expected.latents) and torch.equal(result.images, expected.images)


def test_switching_modes_reloads_nothing(offloadable):
    z = offloadable
    before = {n: p for n, p in z.transformer.named_parameters()}
    for mode in ("model", "sequential", "none"):
        z.set_offload(mode)
    assert {n: p for n, p in z.transformer.named_parameters()}.keys() == before.keys()
    assert all(p is before[n] for n, p in z.transformer.named_parameters())  # same tensor objects
    with pytest.raises(ZImageError, match="offload 'disk' is unknown: use one of none, model, sequential"):
        z.set_offload("disk")


def test_loading_again_reuses_what_did_not_change(tiny_dir):
    from zimage_core.loading import clear_cache

    def files_read(z):
        return sorted(Path(s.source).name for s in z.sources["load_stats"])

    clear_cache()
    a = ZImage.load(tiny_dir, device="cpu", dtype="fp32", reuse=True)
    assert files_read(a) == ["text_encoder", "transformer", "vae"]
    b = ZImage.load(tiny_dir, device="cpu", dtype="fp32", offload="model", reuse=True)  # nothing re-read
    assert files_read(b) == []
    assert b.transformer is a.transformer and b.text_encoder is a.text_encoder and b.vae is a.vae
    assert a.offloader.hooks == {} and b.offloader.mode == "model"  # the old owner let go of its hooks
    c = ZImage.load(tiny_dir, device="cpu", dtype="fp32", overrides={"transformer": ("fp8", None)}, reuse=True)
    assert files_read(c) == ["transformer"]  # only the part whose dtype changed is read again
    assert c.transformer is not b.transformer and c.text_encoder is b.text_encoder and c.vae is b.vae
    assert c.offloader.mode == "none" and not hasattr(c.text_encoder, "_hf_hook")
    expected = ZImage.load(tiny_dir, device="cpu", dtype="fp32", reuse=False)
    assert files_read(expected) == ["text_encoder", "transformer", "vae"]  # reuse=False reads everything
    got = c.generate("reuse", seed=1, width=64, height=64, decode=False).latents
    ref = ZImage.load(tiny_dir, device="cpu", dtype="fp32", storage=None, overrides={"transformer": ("fp8", None)},
                      reuse=False).generate("reuse", seed=1, width=64, height=64, decode=False).latents
    assert torch.equal(got, ref)
    clear_cache()


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_changing_speed_options_under_offload(tiny_dir, zimage, mode):
    from zimage_core import SpeedOptions

    z = ZImage.load(tiny_dir, device="cpu", dtype="fp32", offload=mode, speed=SpeedOptions(fast=False))
    z.set_speed(SpeedOptions())  # fusing now makes new tensors: they must be offloaded with the rest
    assert z.offloader.mode == mode
    fused = TransformerWeights.of(z.transformer).fused("layers.0").qkv.weight
    moved = (z.offloader.hooks["transformer"].storage.tensors if mode == "model"
             else z.denoiser.streamer.sets["layers.0"].tensors)
    assert any(t is fused for t in moved)
    result = z.generate("speed", seed=3, width=64, height=64)
    expected = zimage.generate("speed", seed=3, width=64, height=64)
    assert (result.images - expected.images).abs().max() <= 1e-5
