"""Reference parity: our loop against diffusers' ZImagePipeline on the same tiny weights, fp32 on CPU."""

import pytest
import torch

from zimage_core import ZImage

TOL = 1e-5


def reference_latents(pipe, prompt, *, seed, steps=8, width=128, height=96, guidance=0.0, negative=None):
    with torch.no_grad():
        return pipe(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                    negative_prompt=negative, generator=torch.Generator().manual_seed(seed),
                    output_type="latent").images


@pytest.mark.parametrize("steps", [8, 4])
def test_latents_match_reference(zimage, reference_pipe, steps):
    ours = zimage.generate("a red fox in fresh snow", seed=7, steps=steps, width=128, height=96, decode=False)
    ref = reference_latents(reference_pipe, "a red fox in fresh snow", seed=7, steps=steps)
    assert ours.latents.dtype == torch.float32
    assert ours.latents.shape == ref.shape == (1, 16, 12, 16)
    assert (ours.latents - ref).abs().max().item() <= TOL
    assert ref.abs().mean() > 0.1  # a real signal, not zeros


def test_batch_of_prompts_of_different_lengths(zimage, reference_pipe):
    prompts = ["a cat", "a very long and detailed description of a lighthouse at dusk, waves, gulls, 35mm film"]
    lengths = [len(e) for e in zimage.encode_prompt(prompts)]
    assert lengths[0] != lengths[1]
    ours = zimage.generate(prompts, seed=3, width=128, height=96, decode=False)
    ref = reference_latents(reference_pipe, prompts, seed=3)
    assert ours.latents.shape[0] == 2
    assert (ours.latents - ref).abs().max().item() <= TOL
    assert (ours.latents[0] - ours.latents[1]).abs().max() > 1e-3  # per-image prompts really differ


def test_non_square(zimage, reference_pipe):
    ours = zimage.generate("tall portrait", seed=11, width=64, height=160, decode=False)
    ref = reference_latents(reference_pipe, "tall portrait", seed=11, width=64, height=160)
    assert ours.latents.shape == (1, 16, 20, 8)
    assert (ours.latents - ref).abs().max().item() <= TOL


def test_guidance_with_negative_prompt(zimage, reference_pipe):
    ours = zimage.generate("a bowl of fruit", seed=5, guidance=2.5, negative_prompt="blurry, low quality",
                           width=128, height=96, decode=False)
    ref = reference_latents(reference_pipe, "a bowl of fruit", seed=5, guidance=2.5, negative="blurry, low quality")
    plain = zimage.generate("a bowl of fruit", seed=5, width=128, height=96, decode=False)
    assert (ours.latents - ref).abs().max().item() <= TOL
    assert (ours.latents - plain.latents).abs().max() > 1e-2  # guidance changed the result


def test_decoded_image_matches_reference(zimage, reference_pipe):
    ours = zimage.generate("a lighthouse", seed=1, width=128, height=96)
    with torch.no_grad():
        ref = reference_pipe("a lighthouse", height=96, width=128, num_inference_steps=8, guidance_scale=0.0,
                             generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert ours.images.shape == (1, 96, 128, 3) and ours.images.dtype == torch.float32
    assert 0.0 <= ours.images.min() and ours.images.max() <= 1.0
    assert (ours.images - ref.permute(0, 2, 3, 1)).abs().max().item() <= TOL


def test_split_files_give_identical_weights_and_latents(zimage, tiny_split, tokenizer_dir):
    split = ZImage.load(transformer=tiny_split["transformer"], text_encoder=tiny_split["text_encoder"],
                        vae=tiny_split["vae"], tokenizer=tokenizer_dir, device="cpu", dtype="fp32")
    for name in ("transformer", "text_encoder", "vae"):
        ours, theirs = getattr(zimage, name).state_dict(), getattr(split, name).state_dict()
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}.{key} differs"
    a = zimage.generate("split files", seed=9, width=96, height=64)
    b = split.generate("split files", seed=9, width=96, height=64)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.images, b.images)


def test_split_transformer_matches_diffusers_single_file_loader(tiny_split, tiny_dir):
    """Our streaming conversion equals diffusers' own from_single_file on the same file."""
    from diffusers import ZImageTransformer2DModel

    from zimage_core.dtypes import ComponentDtype
    from zimage_core.loading import load_transformer

    theirs = ZImageTransformer2DModel.from_single_file(
        str(tiny_split["transformer"]), config=str(tiny_dir), subfolder="transformer", dtype=torch.float32)
    ours = load_transformer(tiny_split["transformer"], ComponentDtype(torch.float32, torch.float32))
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
