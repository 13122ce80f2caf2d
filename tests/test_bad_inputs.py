"""A table of bad API and CLI inputs: each one is a ZImageError (the CLI: one line ``error: ...``, exit 2) that
names the input and the allowed values, raised before any work starts (the CLI: before any model loads)."""

import numpy as np
import pytest
import torch

from zimage_core import ZImage, ZImageError
from zimage_core import cli

IMG = torch.rand(1, 64, 64, 3)

# keyword overrides of a valid call, and the words the message must hold
API_CASES = [
    ({"seed": True}, "seed must be a whole number"),
    ({"seed": -1}, r"seed -1 is out of range: use 0\.\.18446744073709551615"),
    ({"seed": 2**64}, "seed .* is out of range"),
    ({"seed": 1.5}, "seed must be a whole number"),
    ({"batch_size": 2.5}, r"batch_size must be a whole number in 1\.\.64"),
    ({"batch_size": "2"}, r"batch_size must be a whole number in 1\.\.64, got '2' \(str\)"),
    ({"batch_size": None}, "batch_size must be a whole number"),
    ({"batch_size": 0}, r"batch_size 0 is out of range: use 1\.\.64"),
    ({"batch_size": 65}, r"batch_size 65 is out of range: use 1\.\.64"),
    ({"guidance": "1"}, r"guidance must be a number in \[0, 100\], got '1'"),
    ({"guidance": float("nan")}, r"guidance nan is not a finite number: use a value in \[0, 100\]"),
    ({"guidance": float("inf")}, "guidance inf is not a finite number"),
    ({"guidance": 1e30}, r"guidance 1e\+30 is out of range"),
    ({"guidance": -1.0}, "guidance -1 is out of range"),
    ({"denoise": "0.5"}, r"denoise must be a number in \(0, 1\]"),
    ({"denoise": 1e-9, "init_image": IMG}, r"denoise 1e-09 is too small for 2 steps: .* Use denoise >= 0.0002"),
    ({"denoise": 0.0}, "denoise 0 is out of range"),
    ({"denoise": float("nan")}, "denoise nan is not a finite number"),
    ({"denoise": 0.5}, "denoise 0.5 needs an init image"),
    ({"prompt": None}, "prompt must be text or a non-empty list of texts, got None"),
    ({"prompt": 5}, "prompt must be text or a non-empty list of texts, got 5"),
    ({"prompt": []}, "prompt must be text or a non-empty list"),
    ({"prompt": ["a", 3]}, r"prompt\[1\] must be text, got 3"),
    ({"prompt": "a \ud800 b"}, "prompt is not valid Unicode text: character 2 is a lone surrogate"),
    ({"guidance": 1.0, "negative_prompt": None}, "negative_prompt must be text with guidance > 0, got None"),
    ({"guidance": 1.0, "negative_prompt": 3}, "negative_prompt must be text"),
    ({"steps": 0}, r"steps 0 is out of range: use 1\.\.100"),
    ({"steps": True}, r"steps True is out of range"),
    ({"steps": 2.5}, r"steps 2.5 is out of range"),
    ({"width": 100}, "width 100 is not allowed"),
    ({"height": "64"}, "height must be a whole number"),
    ({"tile_size": 30}, "tile_size 30 is not allowed: use a multiple of 8, at least 64 and at most 4096"),
    ({"tile_size": 5000}, "tile_size 5000 is not allowed"),
    ({"tile_size": 100}, "tile_size 100 is not allowed: .*the nearest allowed are 96 and 104"),
    ({"tile_size": 512.0}, r"tile_size must be a whole number, got 512.0 \(float\)"),
    ({"tile_overlap": -1}, "tile_overlap -1 is out of range: use a whole number from 0 to 511"),
    ({"tile_size": 128, "tile_overlap": 128}, "tile_overlap 128 is out of range: use a whole number from 0 to 127"),
    ({"tiled_decode": "yes"}, "tiled_decode must be True, False or 'auto'"),
    ({"decode": "no"}, "decode must be True or False"),
    ({"init_image": IMG.numpy()}, r"init_image must be a torch.Tensor .* numpy array: pass torch.from_numpy"),
    ({"init_image": (IMG * 255).to(torch.uint8)}, r"init_image is uint8 .*image.float\(\) / 255"),
    ({"init_image": IMG * 255}, "init_image values reach .* looks like 0..255 pixels: divide by 255"),
    ({"init_image": IMG * 2 - 1}, r"init_image values go down to .* looks like -1..1: use \(image \+ 1\) / 2"),
    ({"init_image": IMG[0]}, r"add the batch dimension, image\[None\]"),
    ({"init_image": IMG.permute(0, 3, 1, 2)}, r"channels-first: use image.permute\(0, 2, 3, 1\)"),
    ({"init_image": torch.rand(1, 64, 64, 4)}, r"Drop the alpha channel"),
    ({"init_image": torch.rand(1, 64, 96, 3)}, "the init image is 96x64 but 64x64 was asked for"),
    ({"init_image": torch.rand(3, 64, 64, 3)}, "init_image holds 3 images; use 1 .shared. or 1"),
    ({"init_image": IMG.clone().fill_(float("nan"))}, "init_image holds NaN or Inf"),
]


@pytest.fixture
def no_work(zimage, monkeypatch):
    """Fail the test if a bad input gets as far as encoding a prompt."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the inputs were checked")

    monkeypatch.setattr(zimage.prompt_encoder, "encode", forbidden)
    return zimage


@pytest.mark.parametrize("override,words", API_CASES, ids=[str(i) for i in range(len(API_CASES))])
def test_bad_api_input(no_work, override, words):
    kwargs = dict(prompt="a fox", seed=0, steps=2, width=64, height=64) | override
    prompt = kwargs.pop("prompt")
    with pytest.raises(ZImageError, match=words):
        no_work.generate(prompt, **kwargs)


def test_denoise_with_init_image_runs(zimage):
    """The refusals above are not over-eager: img2img at the floor and a float image in 0..1 pass."""
    result = zimage.generate("a fox", steps=1, width=64, height=64, denoise=1e-4, init_image=IMG)
    assert result.images.shape == (1, 64, 64, 3) and torch.isfinite(result.images).all()


def test_denoise_floor_is_the_samplers():
    from zimage_core.inputs import check_denoise

    assert check_denoise(1e-4, steps=1) == 1e-4  # int(1 / 1e-4) = 10,000 sigmas: the most allowed
    with pytest.raises(ZImageError, match="too small for 8 steps"):
        check_denoise(1e-4, steps=8)


# ------------------------------------------------------------------------------------------ non-finite
@pytest.fixture
def fresh(tiny_dir):
    return ZImage.load(tiny_dir, device="cpu", dtype="fp32")


@pytest.mark.parametrize("component,param,words", [
    ("text_encoder", "embed_tokens.weight", "the text encoder gave NaN or Inf embeddings"),
    ("transformer", "all_final_layer.2-1.linear.bias", r"NaN.*\(transformer\)|transformer gave NaN"),
    ("vae", "decoder.conv_out.bias", "the VAE decode gave NaN or Inf values"),
])
def test_non_finite_result_names_the_component(fresh, component, param, words):
    with torch.no_grad():
        getattr(fresh, component).get_parameter(param).fill_(float("nan"))
    fresh.prompt_encoder.clear_cache()
    with pytest.raises(ZImageError, match=words):
        fresh.generate("a fox", steps=1, width=64, height=64)


def test_decode_of_nan_latents_is_refused(zimage):
    with pytest.raises(ZImageError, match="the latents hold NaN or Inf values"):
        zimage.decode(torch.full((1, 16, 8, 8), float("nan")))


# ------------------------------------------------------------------------------------------------ CLI
def _cli_cases(tmp_path):
    png = tmp_path / "ok.png"
    text = tmp_path / "not_an_image.png"
    text.write_text("hello")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    return [
        (["--width", "1000"], "width 1000 is not allowed"),
        (["--steps", "0"], r"steps 0 is out of range"),
        (["--seed", "-1"], "seed -1 is out of range"),
        (["--batch-size", "10000"], r"batch_size 10000 is out of range: use 1\.\.64"),
        (["--batch-size", "2.5"], "argument --batch-size: invalid int value: '2.5'"),
        (["--guidance", "inf"], "guidance inf is not a finite number"),
        (["--guidance", "nan"], "guidance nan is not a finite number"),
        (["--guidance", "x"], "argument --guidance: invalid float value"),
        (["--denoise", "1e-9", "--init-image", str(png)], r"denoise 1e-09 is too small for 8 steps"),
        (["--denoise", "0.5"], "denoise 0.5 needs an init image"),
        (["--tile-size", "30"], "tile_size 30 is not allowed"),
        (["--tile-overlap", "600"], "tile_overlap 600 is out of range"),
        (["--out", str(tmp_path)], "is a folder: give a file name"),
        (["--out", str(tmp_path / "x")], "has no extension: use .png"),
        (["--out", str(tmp_path / "x.txt")], "has extension .txt"),
        (["--out", str(text / "sub" / "x.png")], "is a file, so the folder"),
        (["--out", str(png), "--latents-out", str(png)], "--latents-out .* has extension .png: use .safetensors"),
        (["--latents-out", str(tmp_path)], "--latents-out .* is a folder"),
        (["--init-image", str(text)], "is not an image PIL can read"),
        (["--init-image", str(empty)], "is an empty file"),
        (["--init-image", str(tmp_path / "missing.png")], "--init-image .* not found"),
        (["--prompt", "a \udc80 b"], "--prompt is not valid Unicode text"),
        (["--precision-guard", "maybe"], "argument --precision-guard: invalid choice"),
        (["--device", "tpu"], "device 'tpu' is not"),
    ]


def test_bad_cli_inputs_fail_before_loading(tmp_path, monkeypatch, capsys):
    import zimage_core.pipeline as pipeline

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(pipeline.ZImage, "load", forbidden)
    monkeypatch.chdir(tmp_path)
    failures = []
    for args, words in _cli_cases(tmp_path):
        argv = ["generate", "--model", str(tmp_path), "--out", str(tmp_path / "o.png"), *args]
        try:
            code = cli.main(argv)
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        import re

        if code != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or not re.search(words, lines[0]):
            failures.append((args, code, err))
    assert not failures, failures


def test_cli_cuda_without_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = cli.main(["generate", "--model", str(tmp_path), "--device", "cuda", "--out", str(tmp_path / "o.png")])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: device 'cuda' asked for, but this machine has no usable CUDA")


def test_cli_read_only_folder(tmp_path, monkeypatch, capsys):
    import tempfile

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)  # root ignores chmod: deny the write itself
    code = cli.main(["generate", "--model", str(tmp_path), "--out", str(tmp_path / "o.png")])
    assert code == 2
    assert "is not writable (Permission denied)" in capsys.readouterr().err


def test_cli_numpy_free_of_tracebacks_for_corrupt_model(tmp_path, tiny_dir, capsys):
    import shutil

    model = tmp_path / "Z"
    shutil.copytree(tiny_dir, model)
    (model / "vae" / "config.json").write_text("{")
    code = cli.main(["generate", "--model", str(model), "--device", "cpu", "--steps", "1", "--width", "64",
                     "--height", "64", "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "vae/config.json is not valid JSON" in err
    assert not (tmp_path / "o.png").exists()


def test_out_of_memory_gives_the_estimate_and_the_fix(zimage, monkeypatch):
    def too_big(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")

    monkeypatch.setattr(zimage, "sample", too_big)
    with pytest.raises(ZImageError, match=r"4 image\(s\) of 64x64 do not fit in cpu memory: one more allocation of "
                                          r"20.00 GiB failed.*smaller batch \(e.g. 2\), offload"):
        zimage.generate("a fox", steps=1, width=64, height=64, batch_size=4)
