"""The flow-matching Euler sampler of Z-Image-Turbo.

Sigmas: ``s = linspace(1, 1/N, N)``, shifted ``3s / (1 + 2s)``, then 0, in float32 exactly as diffusers'
``FlowMatchEulerDiscreteScheduler`` computes them. Each step calls the transformer at timestep
``1 - sigma``, negates its output and takes an Euler step ``x += (sigma_next - sigma) * (-out)``; the
latents stay float32 between steps. Noise and ``denoise`` mean what they mean in ComfyUI's KSampler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .denoiser import Denoiser
from .errors import GenerationCancelled, ZImageError
from .guard import StepOverflow

LATENT_CHANNELS = 16
MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE = 64, 8192, 16  # 8192 px = 512 patches of 16 px: the RoPE table's length
MIN_STEPS, MAX_STEPS = 1, 100


def check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ZImageError(f"{name} must be a whole number of pixels, got {value!r}.")
        if value % SIZE_MULTIPLE or not MIN_SIZE <= value <= MAX_SIZE:
            lower = max(MIN_SIZE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)
            hint = f"; the nearest allowed are {lower} and {lower + SIZE_MULTIPLE}" if MIN_SIZE <= value <= MAX_SIZE else ""
            raise ZImageError(
                f"{name} {value} is not allowed: it must be a multiple of {SIZE_MULTIPLE} between {MIN_SIZE} "
                f"and {MAX_SIZE}{hint}."
            )


def check_steps(steps: int) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or not MIN_STEPS <= steps <= MAX_STEPS:
        raise ZImageError(f"steps {steps!r} is out of range: use {MIN_STEPS}..{MAX_STEPS} (Z-Image-Turbo is made for 8).")


def flow_sigmas(steps: int, shift: float = 3.0, denoise: float = 1.0) -> torch.Tensor:
    """The ``steps + 1`` sigmas of a run, float32, ending in 0.

    With ``denoise < 1`` the schedule is that of ``int(steps / denoise)`` steps, of which the last
    ``steps`` are run (ComfyUI's KSampler rule), so img2img starts part-way down the same curve.
    """
    check_steps(steps)
    if not 0.0 < denoise <= 1.0:
        raise ZImageError(f"denoise {denoise!r} is out of range: use a value in (0, 1]; 1 starts from pure noise.")
    total = steps if denoise >= 0.9999 else int(steps / denoise)
    s = torch.linspace(1.0, 1.0 / total, total, dtype=torch.float32)
    s = shift * s / (1 + (shift - 1) * s)
    sigmas = torch.cat([s, torch.zeros(1)])
    return sigmas[-(steps + 1):]


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """ComfyUI's KSampler noise: ``torch.manual_seed(seed); torch.randn(shape)``, float32 on the CPU."""
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ZImageError(f"seed {seed!r} is out of range: use a whole number in 0..{2**64 - 1}.")
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


@dataclass
class StepInfo:
    step: int  # 0-based index of the step just finished
    total: int
    sigma: float
    latents: torch.Tensor


StepCallback = Callable[[StepInfo], "bool | None"]


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    cap_feats: list[torch.Tensor],
    *,
    seed: int,
    width: int,
    height: int,
    steps: int = 8,
    guidance: float = 0.0,
    negative_feats: list[torch.Tensor] | None = None,
    denoise: float = 1.0,
    init_latents: torch.Tensor | None = None,
    shift: float = 3.0,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Final latents in model space (before the VAE un-scaling), float32 ``[B, 16, H/8, W/8]`` on the CPU.

    ``cap_feats`` has one embedding per image. ``guidance`` uses diffusers' convention
    ``pred = pos + g * (pos - neg)`` (ComfyUI's cfg is ``g + 1``); 0 turns it off, as Turbo wants.
    ``init_latents`` (model space) with ``denoise < 1`` is img2img. ``callback`` runs after every step;
    returning ``False`` cancels with ``GenerationCancelled``. Under the precision guard a step that comes
    out non-finite is found one step later and run again, so the callback then sees that step once more.
    """
    check_size(width, height)
    batch = len(cap_feats)
    if batch < 1:
        raise ZImageError("no prompt embeddings given: the batch needs at least one.")
    if guidance < 0:
        raise ZImageError(f"guidance {guidance} is negative: use 0 (off, for Turbo) or a positive value.")
    shape = (batch, LATENT_CHANNELS, height // 8, width // 8)
    sigmas = flow_sigmas(steps, shift, denoise)
    noise = initial_noise(seed, shape)
    if init_latents is not None:
        init_latents = init_latents.float().cpu()
        if init_latents.shape[1] != LATENT_CHANNELS:
            raise ZImageError(
                f"the input latent has {init_latents.shape[1]} channels; Z-Image needs {LATENT_CHANNELS} "
                "(a Flux-VAE latent). Encode the image with the Flux VAE (ae.safetensors)."
            )
        if tuple(init_latents.shape[2:]) != shape[2:]:
            raise ZImageError(f"the input latent is {tuple(init_latents.shape[2:])} but {shape[2:]} was asked for.")
        if init_latents.shape[0] not in (1, batch):
            raise ZImageError(f"the input latent batch is {init_latents.shape[0]}; use 1 or {batch}.")
        latents = sigmas[0] * noise + (1.0 - sigmas[0]) * init_latents
    else:
        latents = noise
    use_cfg = guidance > 0
    if use_cfg:
        if negative_feats is None or len(negative_feats) != batch:
            raise ZImageError("guidance > 0 needs one negative embedding per image (an empty prompt is usual).")
        ctx = denoiser.prepare(list(cap_feats) + list(negative_feats))
    else:
        ctx = denoiser.prepare(list(cap_feats))

    device = denoiser.device
    latents = latents.to(device)
    sigmas_dev = sigmas.to(device)
    denoiser.begin_steps()
    starts: dict[int, torch.Tensor] = {}  # the latents each of the last two steps started from
    i = 0
    while i < steps:
        starts = {k: v for k, v in starts.items() if k == i - 1}
        starts[i] = latents
        sigma, sigma_next = sigmas_dev[i], sigmas_dev[i + 1]
        t = sigma * 1000.0  # the scheduler's timestep, then the pipeline's (1000 - t) / 1000
        timestep = (1000.0 - t.expand(batch)) / 1000.0
        denoiser.step_index = i
        try:
            if use_cfg:
                out = denoiser(ctx, latents.repeat(2, 1, 1, 1), timestep.repeat(2)).float()
                pos, neg = out[:batch], out[batch:]
                pred = pos + guidance * (pos - neg)
            else:
                pred = denoiser(ctx, latents, timestep).float()
            if i == steps - 1:
                denoiser.finish_steps()
        except StepOverflow as redo:  # the precision guard found step redo.step non-finite: run it again
            i, latents = redo.step, starts[redo.step]
            continue
        latents = latents + (sigma_next - sigma) * (-pred)
        if callback is not None and callback(StepInfo(i, steps, float(sigmas[i]), latents)) is False:
            raise GenerationCancelled(f"cancelled after step {i + 1} of {steps}")
        i += 1
    denoiser.step_index = None
    return latents.cpu()
