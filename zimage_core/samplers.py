"""Step methods of the sampling loop: ``euler`` (the diffusers reference) and ``res_multistep`` (ComfyUI's Z-Image
template), each equal to ComfyUI's ``sample_euler`` / ``sample_res_multistep`` (comfy/k_diffusion/sampling.py, the
same in ComfyUI 0.3.75 and 0.33.0 for these two methods) for a flow-matching model.

Z-Image's transformer output ``out`` is the negated flow velocity: ``v = -out``. The loop turns it into the
prediction of the clean latents with ``denoised_from_output`` (ComfyUI's ``CONST.calculate_denoised``:
``x0 = x - sigma * v``) and hands ``x``, ``x0`` and the two sigmas to a method's ``step``; the methods work on ``x0``
exactly as k-diffusion does, in the same float32 operations: on the CPU their trajectories are bitwise ComfyUI's
(tests/test_schedules.py).

- ``Euler``: ``d = (x - x0) / sigma``, ``x_next = x + d * (sigma_next - sigma)`` (= ``x + (sigma_next - sigma) * v``).
- ``ResMultistep``: the second-order exponential multistep method of arXiv 2308.02157 with ``eta = 0`` (no noise:
  ComfyUI's ``res_multistep``, not ``_ancestral``). Its first step, and any step to sigma 0 (the last), is Euler.
  Other steps, in ``t = -log(sigma)``: ``h = t_next - t``, ``c2 = (t_prev - t_old) / h`` with ``t_prev`` the previous
  step's sigma and ``t_old`` the previous step's target sigma, ``phi1(z) = expm1(z) / z``,
  ``phi2(z) = (phi1(z) - 1) / z`` at ``z = -h``, ``b1 = phi1 - phi2 / c2``, ``b2 = phi2 / c2`` (NaN -> 0, as
  ComfyUI, which makes a zero-length step a no-op), ``x_next = exp(-h) * x + h * (b1 * x0 + b2 * x0_previous)``.
  It keeps the previous step's ``x0`` and sigmas. ComfyUI 0.3.75 adds ``noise * 0`` after each step (0.33.0 skips
  it): adding zero changes nothing, so neither do we.

Sigmas may be Python floats or 0-dim tensors; the step coefficients are computed on the CPU in float32 (as
ComfyUI computes them, on its sigmas' device) and applied to the latents on their device as scalars, so a step
never waits for the GPU when given floats or entries of the CPU schedule (a CUDA sigma costs a sync to read).

One departure, where ComfyUI has no usable result: a schedule that repeats a sigma (KSampler's ``simple`` with
``int(steps / denoise)`` above 1000, i.e. denoise below steps / 1000) has steps of zero length, after which
ComfyUI's ``res_multistep`` divides by ``c2 = 0`` and returns NaN latents (measured on 0.3.75, e.g. 8 steps at
denoise 0.005). Here the step after a zero-length step is taken as a first step (Euler) instead; every other step
is ComfyUI's.

Each method's state lives in attributes that ``step`` only ever reassigns (never changes in place), so
``copy.copy(method)`` is a snapshot a rewound step can go back to.
"""

from __future__ import annotations

import torch

from .errors import ZImageError

SAMPLERS = ("euler", "res_multistep")


def _scalar(value) -> torch.Tensor:
    """A sigma as a 0-dim float32 CPU tensor: what the coefficients are computed from."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device="cpu", dtype=torch.float32).reshape(())
    return torch.tensor(float(value), dtype=torch.float32)


def denoised_from_output(x: torch.Tensor, out: torch.Tensor, sigma) -> torch.Tensor:
    """The clean-latent prediction ``x0 = x - sigma * v`` of a Z-Image transformer output ``out`` (``v = -out``),
    float32, rounded as ComfyUI's ``CONST.calculate_denoised`` rounds it (``x - v * sigma``)."""
    v = -out.float()
    return x - v * _scalar(sigma)


def _euler(x: torch.Tensor, denoised: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    slope = (x - denoised) / sigma  # k-diffusion's to_d
    return x + slope * (sigma_next - sigma)


class Euler:
    """ComfyUI's ``sample_euler`` (no churn), one step at a time. Stateless."""

    name = "euler"

    def reset(self) -> None:
        pass

    def step(self, x: torch.Tensor, denoised: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
        return _euler(x, denoised, _scalar(sigma), _scalar(sigma_next))


class ResMultistep:
    """ComfyUI's ``sample_res_multistep`` (eta 0, no CFG++), one step at a time; keeps the previous step."""

    name = "res_multistep"

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the previous step: the next step is a first (Euler) step."""
        self.previous_denoised: torch.Tensor | None = None
        self.previous_sigma: torch.Tensor | None = None  # sigmas[i - 1]
        self.previous_target: torch.Tensor | None = None  # the previous step's sigma_next (= this step's sigma)

    def step(self, x: torch.Tensor, denoised: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
        sigma, sigma_next = _scalar(sigma), _scalar(sigma_next)
        first = self.previous_denoised is None or float(self.previous_sigma) == float(self.previous_target)
        if first or float(sigma_next) == 0.0:  # ComfyUI: the first and the last step are Euler
            x_next = _euler(x, denoised, sigma, sigma_next)
        else:
            t, t_old = _log_time(sigma), _log_time(self.previous_target)
            t_next, t_prev = _log_time(sigma_next), _log_time(self.previous_sigma)
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1, phi2 = _phi1(-h), _phi2(-h)
            b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
            b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
            x_next = h.neg().exp() * x + h * (b1 * denoised + b2 * self.previous_denoised)
        self.previous_denoised, self.previous_sigma, self.previous_target = denoised, sigma, sigma_next
        return x_next


def _log_time(sigma: torch.Tensor) -> torch.Tensor:
    return sigma.log().neg()


def _phi1(z: torch.Tensor) -> torch.Tensor:
    return torch.expm1(z) / z


def _phi2(z: torch.Tensor) -> torch.Tensor:
    return (_phi1(z) - 1.0) / z


_METHODS = {"euler": Euler, "res_multistep": ResMultistep}
assert tuple(_METHODS) == SAMPLERS


def new(name: str) -> Euler | ResMultistep:
    """A fresh step method by name (one of ``SAMPLERS``)."""
    if name not in _METHODS:
        raise ZImageError(f"sampler {name!r} is unknown: use one of {', '.join(SAMPLERS)} (euler: the diffusers "
                          "reference; res_multistep: what ComfyUI's Z-Image template uses).")
    return _METHODS[name]()


__all__ = ["SAMPLERS", "Euler", "ResMultistep", "denoised_from_output", "new"]
