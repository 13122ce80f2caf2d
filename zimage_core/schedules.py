"""Sigma schedules of Z-Image-Turbo: ComfyUI's (the official template's) and diffusers'.

``ksampler_sigmas`` is what ComfyUI's KSampler computes with the ``simple`` scheduler on a model patched by
ModelSamplingAuraFlow(shift) (Z-Image's own sampling settings are the same: shift 3, multiplier 1).
ComfyUI builds a table of 1000 sigmas, ``sigma(t)`` for ``t = 1/1000, 2/1000, ..., 1`` with
``sigma(t) = shift * t / (1 + (shift - 1) * t)`` in float32, and ``simple`` reads entry
``-(1 + int(x * 1000 / N))`` for step ``x`` of ``N``, then appends 0.

``flow_sigmas`` is diffusers' ``FlowMatchEulerDiscreteScheduler`` (shift 3, the Z-Image pipeline's
``linspace(1, 1/N, N)``): the same curve, sampled exactly instead of from the table.

When they agree: when ``1000 / N`` is a whole number (N = 1, 2, 4, 5, 8, 10, 20, 25, 40, 50, 100; the reference 8
steps among them) both take the same ``t`` values and the sigmas agree to float32 rounding (measured for 1..30:
equal, or 6e-8 apart at 10 and 25). Otherwise ``simple`` rounds each table index down, which rounds ``t`` up:
9 steps (the template's) take ``t`` = 1, 0.889, 0.778, ..., 0.112 instead of 1, 0.8889, 0.7778, ..., 0.1111, so
ComfyUI's sigmas are higher by up to one table entry after the shift (measured for 1..30: up to 2.5e-3; 1.8e-3 at
9 steps).

``denoise`` < 1 follows KSampler in both: a schedule of ``int(steps / denoise)`` steps, of which the last
``steps + 1`` sigmas are kept; ``denoise > 0.9999`` counts as 1. ComfyUI accepts any denoise > 0 and then loops
over all ``int(steps / denoise)`` steps; here only the kept tail is computed, and ``MAX_SCHEDULE_STEPS`` bounds the
stretched schedule (the denoise floor, ``steps / MAX_SCHEDULE_STEPS``). Above 1000 steps ComfyUI's table repeats
entries (steps of zero length) and ``ksampler_sigmas`` repeats them too.
"""

from __future__ import annotations

import functools
from numbers import Integral, Real

import torch

from .errors import ZImageError
from .options import MAX_STEPS, MIN_STEPS

COMFY_TIMESTEPS = 1000  # entries of ComfyUI's ModelSamplingDiscreteFlow sigma table
FULL_DENOISE = 0.9999  # KSampler runs the full schedule for denoise above this
MAX_SCHEDULE_STEPS = 10_000  # denoise floor: int(steps / denoise) may not exceed this (steps / 10000 at least)
MAX_SHIFT = 100.0  # ModelSamplingAuraFlow's own maximum


def _check_steps(steps) -> int:
    if not isinstance(steps, Integral) or isinstance(steps, bool) or not MIN_STEPS <= steps <= MAX_STEPS:
        shown = int(steps) if isinstance(steps, Integral) and not isinstance(steps, bool) else repr(steps)
        raise ZImageError(f"steps {shown} is out of range: use a whole number in {MIN_STEPS}..{MAX_STEPS} "
                          "(Z-Image-Turbo is made for 8; ComfyUI's template uses 9).")
    return int(steps)  # numpy integers too


def _check_shift(shift) -> float:
    if not isinstance(shift, Real) or isinstance(shift, bool) or not 0.0 < float(shift) <= MAX_SHIFT:
        raise ZImageError(f"shift {shift!r} is out of range: use a number in (0, {MAX_SHIFT:g}]; Z-Image-Turbo uses 3 "
                          "(ModelSamplingAuraFlow's shift).")
    return float(shift)


def schedule_length(steps: int, denoise: float = 1.0) -> int:
    """The number of steps of the whole schedule whose tail a run takes: KSampler's ``int(steps / denoise)``.

    Raises ``ZImageError`` for steps out of range, denoise outside (0, 1], and a denoise below the floor
    ``steps / MAX_SCHEDULE_STEPS``.
    """
    _check_steps(steps)
    if not isinstance(denoise, Real) or isinstance(denoise, bool) or not 0.0 < float(denoise) <= 1.0:
        raise ZImageError(f"denoise {denoise!r} is out of range: use a number in (0, 1]; 1 starts from pure noise, "
                          "lower values keep more of the input latent (0 returns it unchanged and runs no step).")
    denoise = float(denoise)
    if denoise > FULL_DENOISE:
        return steps
    total = int(steps / denoise)  # KSampler.set_steps
    if total > MAX_SCHEDULE_STEPS:
        floor = steps / MAX_SCHEDULE_STEPS
        raise ZImageError(
            f"denoise {denoise!r} is too small for {steps} steps: the schedule would stretch to int(steps / denoise) = "
            f"{total} steps, more than {MAX_SCHEDULE_STEPS}. Use denoise >= {floor:.6g} (or fewer steps); such small "
            "values change the image by less than one step of the schedule anyway."
        )
    return total


def _shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
    """ComfyUI's ``time_snr_shift`` (= diffusers' static shift), float32, with the Python-float ``shift - 1``."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


@functools.lru_cache(maxsize=16)
def _comfy_table(shift: float) -> torch.Tensor:
    # ModelSamplingDiscreteFlow.set_parameters(shift, multiplier=1.0): t * 1.0 / 1.0 is exactly t.
    t = torch.arange(1, COMFY_TIMESTEPS + 1, 1) / COMFY_TIMESTEPS
    return _shifted(t, shift)


def ksampler_sigmas(steps: int, shift: float = 3.0, denoise: float = 1.0) -> torch.Tensor:
    """The ``steps + 1`` sigmas (float32, CPU, ending in 0) of ComfyUI's KSampler with the ``simple`` scheduler on a
    ModelSamplingAuraFlow(``shift``) model and this ``denoise``: the official Z-Image template's schedule."""
    shift = _check_shift(shift)
    total = schedule_length(steps, denoise)
    table = _comfy_table(shift)
    stride = len(table) / total  # a Python float, as in ComfyUI
    picked = [float(table[-(1 + int(x * stride))]) for x in range(total - steps, total)]
    return torch.tensor(picked + [0.0], dtype=torch.float32)


def flow_sigmas(steps: int, shift: float = 3.0, denoise: float = 1.0) -> torch.Tensor:
    """The ``steps + 1`` sigmas (float32, CPU, ending in 0) of diffusers' ``FlowMatchEulerDiscreteScheduler``
    (static shift) for the Z-Image pipeline's ``linspace(1, 1/N, N)``, with KSampler's denoise rule on top."""
    shift = _check_shift(shift)
    total = schedule_length(steps, denoise)
    s = _shifted(torch.linspace(1.0, 1.0 / total, total, dtype=torch.float32), shift)
    return torch.cat([s, torch.zeros(1)])[-(steps + 1):]


SCHEDULES = {"ksampler": ksampler_sigmas, "diffusers": flow_sigmas}


def sigmas_for(schedule: str, steps: int, shift: float = 3.0, denoise: float = 1.0) -> torch.Tensor:
    """``ksampler_sigmas`` or ``flow_sigmas`` by name (``SCHEDULES``)."""
    if schedule not in SCHEDULES:
        raise ZImageError(f"schedule {schedule!r} is unknown: use one of {', '.join(SCHEDULES)} (ksampler: ComfyUI's "
                          "KSampler + simple, as the template; diffusers: the diffusers pipeline's).")
    return SCHEDULES[schedule](steps, shift, denoise)


def min_denoise(steps: int) -> float:
    """The smallest denoise ``schedule_length`` accepts for ``steps`` (the floor, for input validation)."""
    _check_steps(steps)
    return steps / MAX_SCHEDULE_STEPS


__all__ = ["COMFY_TIMESTEPS", "FULL_DENOISE", "MAX_SCHEDULE_STEPS", "MAX_SHIFT", "SCHEDULES", "flow_sigmas",
           "ksampler_sigmas", "min_denoise", "schedule_length", "sigmas_for"]
