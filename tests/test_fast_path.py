"""The fast transformer path computes the reference's numbers: fused weights, real RoPE, compile."""


from zimage_core import SpeedOptions, ZImage
from zimage_core.fast_denoiser import FastDenoiser

from test_parity import TOL, reference_latents


def test_reference_loop_matches_diffusers_too(tiny_dir, reference_pipe):
    slow = ZImage.load(tiny_dir, device="cpu", dtype="fp32", speed=SpeedOptions(fast=False))
    assert type(slow.denoiser).__name__ == "Denoiser"
    ours = slow.generate(["a cat", "two cats on a long road at dusk"], seed=8, width=80, height=64, decode=False)
    ref = reference_latents(reference_pipe, ["a cat", "two cats on a long road at dusk"], seed=8, width=80, height=64)
    assert (ours.latents - ref).abs().max().item() <= TOL


def test_default_path_is_the_fast_one(zimage):
    assert isinstance(zimage.denoiser, FastDenoiser)


def test_fused_weights_are_views_so_memory_does_not_grow(tiny_dir):
    zimage = ZImage.load(tiny_dir, device="cpu", dtype="fp32", speed=SpeedOptions(fast=False))

    def storage_bytes(model):
        return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}.values())

    before = storage_bytes(zimage.transformer)
    zimage.set_speed(SpeedOptions())
    assert storage_bytes(zimage.transformer) == before
    attn = zimage.transformer.layers[0].attention
    assert attn.to_k.weight.untyped_storage().data_ptr() == attn.to_q.weight.untyped_storage().data_ptr()


def test_compiled_blocks_match_eager_and_do_not_recompile_for_new_prompts_or_seeds(tiny_dir):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = ZImage.load(tiny_dir, device="cpu", dtype="fp32")
    compiled = ZImage.load(tiny_dir, device="cpu", dtype="fp32", speed=SpeedOptions(compile=True))
    a = compiled.generate("short", seed=1, width=64, height=64, steps=2, decode=False)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    b = compiled.generate("a much longer prompt that changes the caption length bucket entirely, with many "
                          "more tokens than the first one had", seed=2, width=64, height=64, steps=2, decode=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a new prompt or seed recompiled"
    ref_a = eager.generate("short", seed=1, width=64, height=64, steps=2, decode=False)
    assert (a.latents - ref_a.latents).abs().max() <= 1e-5
    assert (b.latents - a.latents).abs().max() > 1e-3
