"""Sigmas, noise, callbacks, cancel and img2img of the sampler."""

import pytest
import torch

from zimage_core import GenerationCancelled, ZImageError, flow_sigmas, initial_noise, ksampler_sigmas


def test_eight_step_sigmas_are_the_reference_ones():
    expected = torch.tensor([1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0.0])
    sigmas = flow_sigmas(8)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (9,)
    assert torch.allclose(sigmas, expected, atol=5e-5)


def test_sigmas_bitwise_equal_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for steps in (1, 4, 8, 30):
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        sched.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).tolist())
        assert torch.equal(flow_sigmas(steps), sched.sigmas)


def test_denoise_runs_the_tail_of_a_longer_schedule():
    full = flow_sigmas(13)  # int(8 / 0.6) = 13, ComfyUI KSampler's rule
    part = flow_sigmas(8, denoise=0.6)
    assert part.shape == (9,)
    assert torch.equal(part, full[-9:])
    with pytest.raises(ZImageError, match="denoise"):
        flow_sigmas(8, denoise=0.0)


def test_noise_is_comfyui_ksampler_noise():
    shape = (2, 16, 8, 12)
    torch.manual_seed(1234)
    expected = torch.randn(shape, dtype=torch.float32, device="cpu")
    assert torch.equal(initial_noise(1234, shape), expected)
    with pytest.raises(ZImageError, match="seed"):
        initial_noise(-1, shape)


def test_callback_reports_every_step_with_float32_latents(zimage):
    seen = []
    zimage.generate("x", seed=0, steps=4, width=64, height=64, decode=False,
                    callback=lambda info: seen.append((info.step, info.total, info.latents.dtype)))
    assert seen == [(i, 4, torch.float32) for i in range(4)]


def test_callback_can_cancel(zimage):
    calls = []

    def stop_after_two(info):
        calls.append(info.step)
        return info.step < 1

    with pytest.raises(GenerationCancelled, match="after step 2 of 8"):
        zimage.generate("x", seed=0, width=64, height=64, decode=False, callback=stop_after_two)
    assert calls == [0, 1]


def test_img2img_starts_from_noised_input(zimage):
    feats = zimage.encode_prompt("x")
    init = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))
    first = {}

    def grab(info):
        first.setdefault("latents", info.latents.clone())
        return False

    sigmas = ksampler_sigmas(8, denoise=0.5)  # the sampler's default schedule: ComfyUI's KSampler + simple
    with pytest.raises(GenerationCancelled):
        zimage.sample(feats, seed=4, width=64, height=64, denoise=0.5, init_latents=init, callback=grab)
    # Recompute the first step by hand from the ComfyUI noising rule.
    x0 = sigmas[0] * initial_noise(4, (1, 16, 8, 8)) + (1 - sigmas[0]) * init
    ctx = zimage.denoiser.prepare(feats)
    out = zimage.denoiser(ctx, x0, (1000.0 - (sigmas[0] * 1000.0).expand(1)) / 1000.0).float()
    assert torch.allclose(first["latents"], x0 + (sigmas[1] - sigmas[0]) * (-out), atol=1e-6)
    # More denoise keeps less of the input.
    low = zimage.sample(feats, seed=4, width=64, height=64, denoise=0.3, init_latents=init)
    high = zimage.sample(feats, seed=4, width=64, height=64, denoise=0.9, init_latents=init)
    assert (low - init).norm() < (high - init).norm()


def test_denoise_one_ignores_the_input_latent(zimage):
    feats = zimage.encode_prompt("x")
    a = zimage.sample(feats, seed=2, width=64, height=64)
    b = zimage.sample(feats, seed=2, width=64, height=64, init_latents=torch.randn(1, 16, 8, 8))
    assert torch.equal(a, b)


def test_image_encode_decode_round_trip(zimage):
    latents = zimage.generate("x", seed=1, width=64, height=64, decode=False).latents
    image = zimage.decode(latents)
    again = zimage.encode_image(image)
    assert again.shape == latents.shape and again.dtype == torch.float32
    with pytest.raises(ZImageError, match="multiple of 16"):
        zimage.encode_image(torch.rand(1, 60, 64, 3))
