"""Weights stored in one dtype and computed in another, for every combination the loader offers.

Storage S under compute C must compute exactly what a model whose weights were first rounded to S computes
in C: the reference is a C/C load of a file holding the S-rounded weights, and the results must be equal
bit for bit (the casting hooks give the same weights to the same kernels). Before the fix every such
combination stopped with "expected m1 and m2 to have the same dtype".
"""

import copy
import itertools

import pytest
import torch

from zimage_core import ZImage

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PAIRS = [(s, c) for s, c in itertools.product(DTYPES, DTYPES) if s != c]
COMPONENTS = ("transformer", "text_encoder", "vae")
_LOADED: dict = {}


@pytest.fixture(scope="module")
def rounded_dirs(tmp_path_factory, tiny_models, tokenizer_dir):
    """A diffusers folder per storage dtype whose fp32 weights are exactly representable in that dtype."""
    from zimage_core.tiny import save_diffusers_folder

    dirs = {}
    for name, dtype in DTYPES.items():
        models = copy.deepcopy(tiny_models)
        with torch.no_grad():
            for model in models:
                for p in model.parameters():
                    p.copy_(p.to(dtype).float())
        dirs[name] = save_diffusers_folder(tmp_path_factory.mktemp(f"round_{name}") / "Z", models, tokenizer_dir)
    return dirs


def _load(folder, compute, overrides=None):
    key = (str(folder), compute, tuple(sorted((overrides or {}).items())))
    if key not in _LOADED:
        _LOADED.clear()  # keep one pair in memory: tiny, but 24 of them add up on a 2-core CI box
        _LOADED[key] = ZImage.load(folder, device="cpu", dtype=compute, overrides=overrides)
    return _LOADED[key]


def _run(zimage, component):
    torch.manual_seed(0)
    if component == "text_encoder":
        return zimage.encode_prompt(["a fox in the snow", "x"])
    if component == "vae":
        latents = torch.randn(1, 16, 8, 8) * 0.5
        image = torch.rand(1, 64, 64, 3)
        return [zimage.decode(latents), zimage.encode_image(image)]
    return [zimage.generate("a fox", seed=3, steps=2, width=64, height=64, decode=False).latents]


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("storage,compute", PAIRS)
def test_storage_differs_from_compute(rounded_dirs, component, storage, compute):
    folder = rounded_dirs[storage]
    reference = [t.clone() for t in _run(_load(folder, compute), component)]
    zimage = _load(folder, compute, {component: (storage, compute)})
    cdtype = zimage.policy.for_component(component)
    assert (cdtype.storage, cdtype.compute) == (DTYPES[storage], DTYPES[compute])
    model = getattr(zimage, component)
    layers = [m.weight for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
              and not any(k in n for k in ("norm", "t_embedder", "cap_embedder"))]
    assert layers and all(w.dtype == DTYPES[storage] for w in layers)  # the bytes stay in the storage dtype
    got = _run(zimage, component)
    for a, b in zip(got, reference):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.isfinite(a).all()
        assert torch.equal(a, b), f"{component} {storage}/{compute}: max diff {(a.float() - b.float()).abs().max()}"


@pytest.mark.parametrize("component", ("transformer", "text_encoder"))
@pytest.mark.parametrize("compute", list(DTYPES))
def test_fp8_storage(tiny_dir, component, compute):
    """fp8 e4m3 storage (transformer and text encoder): close to the same compute dtype without fp8."""
    reference = [t.clone() for t in _run(_load(tiny_dir, compute), component)]
    got = _run(_load(tiny_dir, compute, {component: ("fp8_e4m3fn", compute)}), component)
    for a, b in zip(got, reference):
        assert torch.isfinite(a).all()
        err = (a.float() - b.float()).norm() / b.float().norm()
        assert 0 < err < 0.15, f"{component} fp8/{compute}: relative error {err}"


def test_cli_storage_bf16_under_fp32_compute(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "x.png"
    result = subprocess.run([sys.executable, "-m", "zimage_core", "demo", "--width", "64", "--height", "64",
                             "--steps", "1", "--dtype", "fp32", "--storage", "bf16", "--out", str(out)],
                            capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "ZIMAGE_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file()
