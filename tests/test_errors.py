"""Bad input gets a clear error that names the input and the fix, never a traceback from inside torch."""

import re
import subprocess
import sys

import pytest
import torch

from zimage_core import ZImage, ZImageError
from zimage_core.dtypes import resolve_policy
from zimage_core.sampler import check_size, check_steps


@pytest.mark.parametrize("width,height,word", [(1000, 1024, "width 1000"), (1024, 8208, "height 8208"),
                                               (48, 64, "width 48"), (1024, 72, "height 72")])
def test_bad_sizes(width, height, word):
    with pytest.raises(ZImageError, match=word) as err:
        check_size(width, height)
    assert "multiple of 16 between 64 and 8192" in str(err.value)


def test_size_error_suggests_neighbours():
    with pytest.raises(ZImageError, match="nearest allowed are 992 and 1008"):
        check_size(1000, 1024)


@pytest.mark.parametrize("steps", [0, 101, -3, 2.5])
def test_bad_steps(steps):
    with pytest.raises(ZImageError, match=r"use 1\.\.100"):
        check_steps(steps)


def test_generate_checks_size_before_work(zimage):
    with pytest.raises(ZImageError, match="width 100"):
        zimage.generate("x", width=100, height=64)


def test_missing_file(tmp_path, tiny_split, tokenizer_dir):
    with pytest.raises(ZImageError, match="file not found: .*nope.safetensors"):
        ZImage.load(transformer=tmp_path / "nope.safetensors", text_encoder=tiny_split["text_encoder"],
                    vae=tiny_split["vae"], tokenizer=tokenizer_dir, device="cpu")


def test_truncated_file(tmp_path, tiny_split, tokenizer_dir):
    cut = tmp_path / "z_image_turbo_bf16.safetensors"
    data = tiny_split["transformer"].read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ZImageError, match="is truncated: .*1000 missing.*download the file again"):
        ZImage.load(transformer=cut, text_encoder=tiny_split["text_encoder"], vae=tiny_split["vae"],
                    tokenizer=tokenizer_dir, device="cpu")


def test_pickle_files_are_refused(tmp_path, tiny_split, tokenizer_dir):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not read")
    with pytest.raises(ZImageError, match="only .safetensors files are loaded"):
        ZImage.load(transformer=ckpt, text_encoder=tiny_split["text_encoder"], vae=tiny_split["vae"],
                    tokenizer=tokenizer_dir, device="cpu")


@pytest.mark.parametrize("slot,given,says", [
    ("transformer", "vae", "is a VAE, not a transformer"),
    ("vae", "text_encoder", "is a Qwen/Llama-style text encoder, not a VAE"),
    ("text_encoder", "transformer", "is a Z-Image transformer (original layout), not a text encoder"),
])
def test_wrong_component(tiny_split, tokenizer_dir, slot, given, says):
    files = dict(tiny_split)
    files[slot] = tiny_split[given]
    with pytest.raises(ZImageError, match=re.escape(says)) as err:
        ZImage.load(**files, tokenizer=tokenizer_dir, device="cpu")
    assert "belongs in models/" in str(err.value)


def test_no_tokenizer_found(monkeypatch, tiny_split):
    import zimage_core.tokenizer as tokenizer

    monkeypatch.setattr(tokenizer, "comfy_tokenizer_dirs", lambda: [])
    monkeypatch.delenv("ZIMAGE_TOKENIZER", raising=False)
    with pytest.raises(ZImageError, match="no Qwen tokenizer found.*--tokenizer DIR.*ZIMAGE_TOKENIZER"):
        ZImage.load(**tiny_split, device="cpu")


def test_dtype_the_device_cannot_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ZImageError, match="bf16 cannot run on cuda.*Tesla T4.*compute capability 7.5.*fp16"):
        resolve_policy("cuda", "bf16")
    policy = resolve_policy("cuda", "auto")  # auto picks fp16 on such a card
    assert policy.transformer.compute == torch.float16


def test_unknown_dtype_name():
    with pytest.raises(ZImageError, match="compute dtype 'fp4' is not supported: use auto or one of bf16, fp16, fp32"):
        resolve_policy("cpu", "fp4")
    with pytest.raises(ZImageError, match="vae storage dtype"):
        resolve_policy("cpu", "fp32", overrides={"vae": ("fp8", None)})


def test_latent_with_wrong_channels(zimage):
    bad = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ZImageError, match="4 channels; Z-Image needs 16"):
        zimage.sample(zimage.encode_prompt("x"), seed=0, width=64, height=64, denoise=0.5, init_latents=bad)
    with pytest.raises(ZImageError, match=r"the Flux VAE needs \[B, 16"):
        zimage.decode(bad)


def test_cli_reports_errors_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "zimage_core", "generate", "--transformer", str(tmp_path / "missing.safetensors"),
         "--text-encoder", "x.safetensors", "--vae", "y.safetensors", "--width", "1000"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr
