"""The sampling loop of Z-Image-Turbo: a plain loop over sigmas.

Sigmas: ComfyUI's KSampler + ``simple`` + ModelSamplingAuraFlow(3) by default (``schedules.py``; equal to
diffusers' at 8 steps). Each step calls the transformer at timestep
``1 - sigma`` and negates its output (the flow velocity); a step method of ``samplers.py`` turns it into the next
latents (Euler: ``x += (sigma_next - sigma) * v``), which stay float32 between steps. Noise and ``denoise``
mean what they mean in ComfyUI's KSampler. A step runner runs the steps: ``PlainSteps`` here, or the precision
guard, which runs an overflowing step again; the loop itself knows nothing of either.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .denoiser import Denoiser
from .errors import GenerationCancelled, ZImageError
from .inputs import is_int
from . import samplers, schedules

from .options import LATENT_CHANNELS, MAX_SIZE, MAX_STEPS, MIN_SIZE, MIN_STEPS, SIZE_MULTIPLE


def check_size(width: int, height: int) -> None:
    for name, value in (("width", width), ("height", height)):
        if not is_int(value):  # numpy integers too
            raise ZImageError(f"{name} must be a whole number of pixels, got {value!r}.")
        if value % SIZE_MULTIPLE or not MIN_SIZE <= value <= MAX_SIZE:
            lower = max(MIN_SIZE, value // SIZE_MULTIPLE * SIZE_MULTIPLE)
            hint = f"; the nearest allowed are {lower} and {lower + SIZE_MULTIPLE}" if MIN_SIZE <= value <= MAX_SIZE else ""
            raise ZImageError(
                f"{name} {value} is not allowed: it must be a multiple of {SIZE_MULTIPLE} between {MIN_SIZE} "
                f"and {MAX_SIZE}{hint}."
            )


def check_steps(steps: int) -> None:
    if not is_int(steps) or not MIN_STEPS <= steps <= MAX_STEPS:
        raise ZImageError(f"steps {int(steps) if is_int(steps) else repr(steps)} is out of range: use {MIN_STEPS}..{MAX_STEPS} (Z-Image-Turbo is made for 8).")


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """ComfyUI's KSampler noise: ``torch.manual_seed(seed); torch.randn(shape)``, float32 on the CPU."""
    if not is_int(seed) or not 0 <= seed < 2**64:
        raise ZImageError(f"seed {int(seed) if is_int(seed) else repr(seed)} is out of range: use a whole number in 0..{2**64 - 1}.")
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


@dataclass
class StepInfo:
    step: int  # 0-based index of the step just finished
    total: int
    sigma: float
    latents: torch.Tensor  # the latents after this step (model space, float32)
    denoised: torch.Tensor | None = None  # this step's prediction of the clean latents (for previews)


StepCallback = Callable[[StepInfo], "bool | None"]


class _Method:
    """A step method of ``samplers.py`` as the loop uses it: a state that a rewound step can go back to."""

    def __init__(self, name: str):
        self.prototype = samplers.new(name)

    def initial_state(self):
        return copy.deepcopy(self.prototype)

    def step(self, x, denoised, sigma, sigma_next, state):
        state = copy.copy(state)  # never change a state the runner may rewind to
        return state.step(x, denoised, sigma, sigma_next), state


class PlainSteps:
    """The step runner without a precision guard: each step once, each transformer call as it is."""

    def run_steps(self, steps: int, one_step, state):
        for i in range(steps):
            state = one_step(i, state)
        return state

    def call(self, fn, *args):
        return fn(*args)


def _velocity(out: torch.Tensor) -> torch.Tensor:
    """The flow velocity of a transformer output: Z-Image predicts its negative."""
    return -out.float()


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
    sampler: str = "euler",
    schedule: str = "ksampler",
    runner=None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Final latents in model space (before the VAE un-scaling), float32 ``[B, 16, H/8, W/8]`` on the CPU.

    ``cap_feats`` has one embedding per image. ``guidance`` uses diffusers' convention
    ``pred = pos + g * (pos - neg)`` (ComfyUI's cfg is ``g + 1``); 0 turns it off, as Turbo wants.
    ``init_latents`` (model space) with ``denoise < 1`` is img2img. ``sampler`` is a step method of
    ``samplers.SAMPLERS``; ``schedule`` one of ``schedules.SCHEDULES`` (ComfyUI's KSampler + simple + shift by
    default, equal to diffusers' at 8 steps). ``runner`` runs the steps (``PlainSteps``, or the precision guard, which runs an
    overflowing step again; the callback then sees that step once more). ``callback`` runs after every step;
    returning ``False`` cancels with ``GenerationCancelled``.
    """
    check_size(width, height)
    batch = len(cap_feats)
    if batch < 1:
        raise ZImageError("no prompt embeddings given: the batch needs at least one.")
    if guidance < 0:
        raise ZImageError(f"guidance {guidance} is negative: use 0 (off, for Turbo) or a positive value.")
    method = _Method(sampler)
    shape = (batch, LATENT_CHANNELS, height // 8, width // 8)
    sigmas = schedules.sigmas_for(schedule, steps, shift, denoise)
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
    sigmas_dev = sigmas.to(device)
    runner = runner or PlainSteps()

    def velocity(x: torch.Tensor, i: int) -> torch.Tensor:
        t = sigmas_dev[i] * 1000.0  # the scheduler's timestep, then the pipeline's (1000 - t) / 1000
        timestep = (1000.0 - t.expand(batch)) / 1000.0
        if not use_cfg:
            return _velocity(runner.call(denoiser, ctx, x, timestep))
        out = _velocity(runner.call(denoiser, ctx, x.repeat(2, 1, 1, 1), timestep.repeat(2)))
        pos, neg = out[:batch], out[batch:]
        return pos + guidance * (pos - neg)

    finite: dict[int, torch.Tensor] = {}  # step -> flag on the device: no host sync until the end

    def one_step(i: int, state):
        x, method_state = state
        sigma, sigma_next = sigmas[i], sigmas[i + 1]  # CPU scalars: no host sync per step
        v = velocity(x, i)
        denoised = x - v * sigma  # ComfyUI's CONST.calculate_denoised, rounded as it rounds
        x_next, method_state = method.step(x, denoised, sigma, sigma_next, method_state)
        finite[i] = torch.isfinite(x_next).all()
        if callback is not None and callback(StepInfo(i, steps, float(sigmas[i]), x_next, denoised)) is False:
            raise GenerationCancelled(f"cancelled after step {i + 1} of {steps}")
        return x_next, method_state

    latents, _ = runner.run_steps(steps, one_step, (latents.to(device), method.initial_state()))
    flags = torch.stack([finite[i] for i in range(steps)]).cpu()
    if not bool(flags.all()):
        first = int((~flags).nonzero()[0])
        raise ZImageError(
            f"the latents became NaN/inf at step {first + 1} of {steps} (transformer): the result would be a black "
            "image. Causes: fp16 overflow (set the precision guard to auto or detect, or use bf16/fp32), NaN weights "
            "in the checkpoint, or an extreme guidance value."
        )
    return latents.cpu()
