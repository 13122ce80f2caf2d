"""A model loaded without its text encoder and/or VAE (ComfyUI's own CLIP and VAE nodes do that work): the same
latents from the same embeddings, clear errors for what it can't do, offload and the guard still work."""

import pytest
import torch

from test_lora import base_state, lora_dir, te_state  # noqa: F401  (fixtures)

from zimage_core import ZImage, ZImageError

KW = dict(seed=2, width=64, height=64, steps=4)


@pytest.mark.parametrize("offload", ["none", "model", "sequential"])
def test_transformer_only_samples_the_same_latents(tiny_dir, zimage, offload):
    feats = zimage.encode_prompt(["a partial model"])
    want = zimage.sample(feats, **KW)
    z = ZImage.load(tiny_dir, device="cpu", dtype="fp32", skip=("text_encoder", "vae"), offload=offload)
    assert z.text_encoder is None and z.vae is None and set(z.models()) == {"transformer"}
    assert z.sources["load_stats"] and all("transformer" in s.source for s in z.sources["load_stats"])
    assert torch.equal(z.sample(feats, **KW), want)
    with pytest.raises(ZImageError, match="without its text encoder: encode the prompt with ComfyUI's CLIPLoader"):
        z.encode_prompt("x")
    with pytest.raises(ZImageError, match="without its vae: decode the LATENT with ComfyUI's VAELoader"):
        z.decode(want)
    with pytest.raises(ZImageError, match="without its text encoder"):
        z.generate("x", **KW)


def test_guard_and_lora_on_a_transformer_only_model(tiny_dir, lora_dir):
    _, files, _ = lora_dir
    full = ZImage.load(tiny_dir, device="cpu", dtype="fp32")
    full.set_loras([(files["native_dm"], 0.5)])
    feats = ZImage.load(tiny_dir, device="cpu", dtype="fp32").encode_prompt(["lora"])
    want = full.sample(feats, **KW)
    z = ZImage.load(tiny_dir, device="cpu", dtype="fp32", skip=("text_encoder", "vae"))
    z.set_precision_guard("detect")
    z.set_loras([(files["native_dm"], 0.5)])
    assert torch.equal(z.sample(feats, **KW), want)


def test_keeps_the_vae_when_only_the_text_encoder_is_skipped(tiny_dir, zimage):
    z = ZImage.load(tiny_dir, device="cpu", dtype="fp32", skip=("text_encoder",))
    feats = zimage.encode_prompt(["vae kept"])
    latents = z.sample(feats, **KW)
    assert torch.equal(z.decode(latents), zimage.decode(latents))
    with pytest.raises(ZImageError, match="skip \\['unet'\\] is not allowed"):
        ZImage.load(tiny_dir, device="cpu", skip=("unet",))
