"""Sigma schedules and step methods against ComfyUI's own code (KSampler + simple + ModelSamplingAuraFlow,
k-diffusion's sample_euler and sample_res_multistep).

ComfyUI runs in a subprocess (this file as a script), so its modules never enter the pytest process: it writes
its sigmas and its trajectories of a toy flow model to a folder, and the tests compare ours with them.

    python tests/test_schedules.py COMFY_ROOT OUT_DIR

COMFY_ROOT defaults (in the tests) to comfy_harness.comfy_source(): ComfyUI 0.3.75, or $COMFYUI_SOURCE.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STEP_COUNTS = list(range(1, 31))
SHIFTS = (3.0, 1.73, 6.0)  # Z-Image's 3, ModelSamplingAuraFlow's default 1.73 (shift - 1 not exact), Lumina2's 6
DENOISE_CASES = [  # (steps, denoise): odd ratios, KSampler's 0.9999 threshold, and totals past the 1000-entry table
    (8, 0.6), (9, 0.5), (8, 0.05), (20, 0.3), (3, 0.3), (6, 0.6), (7, 0.7), (4, 0.999), (8, 0.9999), (8, 0.99995),
    (9, 0.33), (8, 0.005), (5, 0.0012), (8, 0.0008), (100, 0.01),
]
TRAJECTORIES = [  # (steps, denoise); 8 and 9 steps from noise, img2img, and a schedule with zero-length steps
    (8, 1.0), (9, 1.0), (8, 0.6), (8, 0.005),
]
METHODS = ("euler", "res_multistep")
SHAPE = (2, 16, 6, 10)
SEED = 20251129


# ------------------------------------------------------------------------------------------ the toy flow model
def toy_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED)
    return {"w": torch.randn(16, 16, generator=g) / 4, "b": torch.randn(16, generator=g),
            "noise": torch.randn(SHAPE, generator=g), "init": torch.randn(SHAPE, generator=g) * 0.5}


def toy_output(weights: dict, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A stand-in for Z-Image's transformer: a fixed nonlinear map of (x, sigma) giving the negated velocity."""
    mixed = torch.einsum("oc,bchw->bohw", weights["w"], x) + sigma.reshape(-1, 1, 1, 1) * weights["b"].reshape(1, -1, 1, 1)
    return torch.tanh(mixed) - 0.3 * x


def start_latents(weights: dict, sigmas: torch.Tensor) -> torch.Tensor:
    # CONST.noise_scaling: sigma * noise + (1 - sigma) * latent
    return sigmas[0] * weights["noise"] + (1.0 - sigmas[0]) * weights["init"]


# ------------------------------------------------------------------------------------------ ComfyUI's side
def comfy_reference(root: Path, out: Path) -> None:
    os.chdir(root)
    sys.path.insert(0, str(root))
    sys.argv = ["main.py", "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import utils.install_util  # noqa: F401  (before nodes, as main.py does)
    import comfy.k_diffusion.sampling as kd
    import comfy.model_sampling
    import comfy.samplers
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow
    from safetensors.torch import save_file
    from types import SimpleNamespace

    class Patchable:  # the parts of a ModelPatcher that ModelSamplingAuraFlow and KSampler use
        def __init__(self, patches=None):
            self.model = SimpleNamespace(model_config=None)
            self.patches = dict(patches or {})

        def clone(self):
            return Patchable(self.patches)

        def add_object_patch(self, name, obj):
            self.patches[name] = obj

        def get_model_object(self, name):
            return self.patches.get(name, SimpleNamespace())  # 0.33 reads the current model_sampling first

    def ksampler(steps, shift=3.0, denoise=1.0):
        patched = ModelSamplingAuraFlow().patch_aura(Patchable(), shift)[0]
        return comfy.samplers.KSampler(patched, steps, "cpu", sampler="res_multistep", scheduler="simple",
                                       denoise=denoise).sigmas

    results = {"version": __import__("comfyui_version").__version__,
               "sigmas": {f"{shift}/{steps}": ksampler(steps, shift).tolist() for shift in SHIFTS for steps in STEP_COUNTS},
               "denoise": {f"{steps}/{denoise}": ksampler(steps, 3.0, denoise).tolist() for steps, denoise in DENOISE_CASES}}

    weights = toy_weights()
    const = comfy.model_sampling.CONST()

    class Model:  # k-diffusion's view of a model: model(x, sigma * s_in) -> denoised
        inner_model = SimpleNamespace(model_patcher=Patchable())  # 0.33's res_multistep reads model_sampling here

        def __call__(self, x, sigma, **kwargs):
            v = -toy_output(weights, x, sigma)  # ComfyUI's Z-Image model returns the negated transformer output
            return const.calculate_denoised(sigma, v, x)

    tensors = dict(weights)
    for steps, denoise in TRAJECTORIES:
        sigmas = ksampler(steps, 3.0, denoise)
        for method, fn in (("euler", kd.sample_euler), ("res_multistep", kd.sample_res_multistep)):
            seen = []
            x = fn(Model(), start_latents(weights, sigmas), sigmas, disable=True,
                   callback=lambda info: seen.append((info["x"], info["denoised"])))
            key = f"{method}/{steps}/{denoise}"
            tensors[key + "/x"] = torch.stack([s[0] for s in seen] + [x])
            tensors[key + "/denoised"] = torch.stack([s[1] for s in seen])
            tensors[key + "/sigmas"] = sigmas.clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "tensors.safetensors"))
    (out / "results.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from comfy_harness import comfy_source
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("schedules_ref")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # leave the installed ComfyUI tree as it is
    proc = subprocess.run([sys.executable, __file__, str(comfy_source()), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"ComfyUI reference failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((out / "results.json").read_text()), load_file(str(out / "tensors.safetensors"))


# ------------------------------------------------------------------------------------------ sigmas
def test_ksampler_sigmas_equal_comfyui_at_every_step_count(reference):
    from zimage_core.schedules import ksampler_sigmas

    results, _ = reference
    for shift in SHIFTS:
        for steps in STEP_COUNTS:
            ours = ksampler_sigmas(steps, shift)
            assert ours.dtype == torch.float32 and ours.shape == (steps + 1,) and ours[-1] == 0
            assert ours.tolist() == results["sigmas"][f"{shift}/{steps}"], (shift, steps)


def test_ksampler_sigmas_follow_comfyui_denoise_rule(reference):
    from zimage_core.schedules import ksampler_sigmas

    results, _ = reference
    for steps, denoise in DENOISE_CASES:
        comfy = results["denoise"][f"{steps}/{denoise}"]
        assert len(comfy) == steps + 1
        assert ksampler_sigmas(steps, 3.0, denoise).tolist() == comfy, (steps, denoise)
    repeated = results["denoise"]["8/0.005"]  # 1600 steps read off 1000 entries: ComfyUI repeats sigmas
    assert len(set(repeated)) < len(repeated)


def test_template_nine_steps_differ_from_diffusers_and_eight_agree(reference):
    from zimage_core.schedules import flow_sigmas, ksampler_sigmas

    for steps in STEP_COUNTS:
        gap = (ksampler_sigmas(steps) - flow_sigmas(steps)).abs().max().item()
        if 1000 % steps == 0:
            assert gap <= 6e-8, steps  # the same t values: float32 rounding only
        else:
            assert 1e-4 < gap <= 3e-3, (steps, gap)  # one table entry at most, times d sigma / dt <= 3
    comfy9 = torch.tensor(reference[0]["sigmas"]["3.0/9"])
    assert (comfy9 - flow_sigmas(9)).abs().max() > 1e-3  # what the template runs is not diffusers' 9 steps


def test_flow_sigmas_equal_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from zimage_core.schedules import flow_sigmas

    for steps in (1, 4, 8, 9, 30):
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        sched.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).tolist())
        assert torch.equal(flow_sigmas(steps), sched.sigmas)
    assert torch.equal(flow_sigmas(8, denoise=0.6), flow_sigmas(13)[-9:])  # int(8 / 0.6) = 13


def test_bad_schedule_inputs_name_the_fix():
    from zimage_core import ZImageError
    from zimage_core.schedules import MAX_SCHEDULE_STEPS, ksampler_sigmas, min_denoise, sigmas_for

    for denoise in (0.0, -0.5, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ZImageError, match=r"denoise .* out of range: use a number in \(0, 1\]"):
            ksampler_sigmas(8, 3.0, denoise)
    for steps in (0, 101, 8.0, True):
        with pytest.raises(ZImageError, match=r"steps .* out of range: use a whole number in 1\.\.100"):
            ksampler_sigmas(steps)
    for shift in (0.0, -3.0, 101.0, float("inf")):
        with pytest.raises(ZImageError, match=r"shift .* out of range"):
            ksampler_sigmas(8, shift)
    assert MAX_SCHEDULE_STEPS == 10_000 and min_denoise(8) == 0.0008
    assert ksampler_sigmas(8, 3.0, 0.0008).shape == (9,)  # the floor itself is allowed
    with pytest.raises(ZImageError, match=r"denoise 0\.0007 is too small for 8 steps.*11428 steps.*denoise >= 0\.0008"):
        ksampler_sigmas(8, 3.0, 0.0007)
    with pytest.raises(ZImageError, match=r"schedule 'karras' is unknown: use one of ksampler, diffusers"):
        sigmas_for("karras", 8)
    assert torch.equal(sigmas_for("ksampler", 9), ksampler_sigmas(9))


# ------------------------------------------------------------------------------------------ step methods
def run_ours(method: str, weights: dict, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A minimal loop over sigmas, as the sampler runs one: model output -> denoised -> the method's step."""
    from zimage_core.samplers import denoised_from_output, new

    stepper = new(method)
    x = start_latents(weights, sigmas)
    xs, x0s = [x], []
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = denoised_from_output(x, toy_output(weights, x, sigma.expand(x.shape[0])), sigma)
        x = stepper.step(x, denoised, sigma, sigmas[i + 1])
        xs.append(x)
        x0s.append(denoised)
    return torch.stack(xs), torch.stack(x0s)


@pytest.mark.parametrize("method", METHODS)
def test_trajectories_equal_comfyui(reference, method):
    from zimage_core.schedules import ksampler_sigmas

    _, tensors = reference
    for steps, denoise in TRAJECTORIES:
        key = f"{method}/{steps}/{denoise}"
        sigmas = tensors[key + "/sigmas"]
        assert torch.equal(sigmas, ksampler_sigmas(steps, 3.0, denoise))
        xs, x0s = run_ours(method, tensors, sigmas)
        comfy_xs, comfy_x0s = tensors[key + "/x"], tensors[key + "/denoised"]
        assert xs.shape == comfy_xs.shape == (steps + 1, *SHAPE)
        assert torch.isfinite(xs).all() and xs[-1].std() > 0.1
        if (method, steps, denoise) == ("res_multistep", 8, 0.005):
            continue  # ComfyUI's result is NaN here: test_res_multistep_after_a_zero_length_step
        assert (x0s - comfy_x0s).abs().max() <= 1e-5, key
        assert (xs - comfy_xs).abs().max() <= 1e-5, key  # measured: 0 (the same float32 operations)


def test_res_multistep_after_a_zero_length_step(reference):
    """8 steps at denoise 0.005 read 1600 steps off ComfyUI's 1000-entry table: sigmas repeat. ComfyUI's
    res_multistep then divides by zero (NaN latents); ours takes the step after a zero-length step as Euler."""
    _, tensors = reference
    sigmas = tensors["res_multistep/8/0.005/sigmas"]
    assert sigmas[0] == sigmas[1] and sigmas[2] == sigmas[3] and sigmas[4] != sigmas[5]
    comfy = tensors["res_multistep/8/0.005/x"]
    assert not torch.isfinite(comfy[-1]).all()  # ComfyUI 0.3.75's own result
    ours, _ = run_ours("res_multistep", tensors, sigmas)
    euler = tensors["euler/8/0.005/x"]
    assert torch.isfinite(ours).all()
    assert torch.equal(ours[1], ours[0]) and torch.equal(ours[1], comfy[1])  # a zero-length step changes nothing
    assert torch.equal(ours[2], euler[2]) and torch.equal(ours[4], euler[4])  # after one: an Euler step
    assert not torch.equal(ours[5], euler[5])  # sigma 4 -> 5 follows a real step: the multistep update
    assert ((ours[-1] - euler[-1]).norm() / euler[-1].norm()).item() < 1e-3


def test_res_multistep_is_not_euler_but_starts_and_ends_like_it(reference):
    _, tensors = reference
    euler = tensors["euler/8/1.0/x"]
    res = tensors["res_multistep/8/1.0/x"]
    assert torch.equal(res[1], euler[1])  # the first step is Euler
    gap = ((res[-1] - euler[-1]).norm() / euler[-1].norm()).item()
    assert gap > 1e-3  # a second-order method, not Euler under another name
    ours_x, _ = run_ours("res_multistep", tensors, tensors["res_multistep/8/1.0/sigmas"])
    assert torch.equal(ours_x[1], euler[1])


def test_euler_step_is_x_plus_dt_times_velocity():
    from zimage_core.samplers import Euler, denoised_from_output

    g = torch.Generator().manual_seed(3)
    x, out = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    sigma, sigma_next = torch.tensor(0.75), torch.tensor(0.6429)
    step = Euler().step(x, denoised_from_output(x, out, sigma), sigma, sigma_next)
    assert torch.allclose(step, x + (sigma_next - sigma) * (-out), atol=1e-6)
    assert torch.equal(Euler().step(x, denoised_from_output(x, out, 0.75), 0.75, float(sigma_next)), step)


def test_res_multistep_state_copies_rewind(reference):
    from zimage_core.samplers import ResMultistep, denoised_from_output

    _, tensors = reference
    sigmas = tensors["res_multistep/8/1.0/sigmas"]
    stepper = ResMultistep()
    x = start_latents(tensors, sigmas)
    for i in range(3):
        x = stepper.step(x, denoised_from_output(x, toy_output(tensors, x, sigmas[i:i + 1]), sigmas[i]), sigmas[i],
                         sigmas[i + 1])
    saved, saved_x = copy.copy(stepper), x

    def advance(method, x):
        d = denoised_from_output(x, toy_output(tensors, x, sigmas[3:4]), sigmas[3])
        return method.step(x, d, sigmas[3], sigmas[4])

    first = advance(stepper, x)
    again = advance(copy.copy(saved), saved_x)  # a rewound step from the snapshot gives the same latents
    assert torch.equal(first, again)
    assert torch.equal(first, tensors["res_multistep/8/1.0/x"][4])
    stepper.reset()
    assert stepper.previous_denoised is None


def test_unknown_sampler_lists_the_choices():
    from zimage_core import ZImageError
    from zimage_core.samplers import SAMPLERS, Euler, ResMultistep, new

    assert SAMPLERS == ("euler", "res_multistep")
    assert isinstance(new("euler"), Euler) and isinstance(new("res_multistep"), ResMultistep)
    assert new("res_multistep") is not new("res_multistep")
    with pytest.raises(ZImageError, match=r"sampler 'dpmpp_2m' is unknown: use one of euler, res_multistep"):
        new("dpmpp_2m")


if __name__ == "__main__":
    comfy_reference(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
