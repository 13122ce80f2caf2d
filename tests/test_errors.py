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


def test_import_leaves_hf_hub_offline_alone():
    """Importing the pack must not switch the hub off for the whole process (other packs, subprocesses)."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    code = ("import os, zimage_core, zimage_core.loading, zimage_core.tokenizer, zimage_core.pipeline;"
            "print(os.environ.get('HF_HUB_OFFLINE'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "None"


def test_tokenizer_loads_offline_without_the_env(monkeypatch, tokenizer_dir):
    """Our hub calls are offline by argument: with HF_HUB_OFFLINE unset nothing is fetched."""
    from zimage_core.tokenizer import PromptTokenizer

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert len(PromptTokenizer(tokenizer_dir)("a fox")) > 5


@pytest.mark.parametrize("tiled", [False, True])
def test_decode_cancel_hook_between_tiles_and_blocks(zimage, tiled):
    from zimage_core import GenerationCancelled

    latents = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    clean = zimage.decode(latents, tiled=tiled, tile_size=64, overlap=0)
    calls = []
    zimage.decode(latents, tiled=tiled, tile_size=64, overlap=0, on_progress=lambda: calls.append(1))
    blocks = len(zimage.vae.decoder.up_blocks)
    assert len(calls) > blocks + (8 if tiled else 0)  # 128 px in 64 px tiles: several tiles per segment

    def cancel_third():
        calls.append(1)
        if len(calls) == 3:
            raise GenerationCancelled("cancelled in the VAE")

    calls.clear()
    with pytest.raises(GenerationCancelled):
        zimage.decode(latents, tiled=tiled, tile_size=64, overlap=0, on_progress=cancel_third)
    assert len(calls) == 3
    assert torch.equal(zimage.decode(latents, tiled=tiled, tile_size=64, overlap=0), clean)  # a rerun is clean


def test_batch_decoded_in_chunks_equals_whole(zimage, monkeypatch):
    import zimage_core.vae as vae

    latents = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    whole = zimage.decode(latents, tiled=False)
    sizes = []
    monkeypatch.setattr(vae, "_chunk_size", lambda *a: sizes.append(1) or 1)
    chunked = zimage.decode(latents, tiled=False)
    assert sizes and chunked.shape == (3, 64, 64, 3)
    assert (chunked - whole).abs().max() < 1e-5  # batched and single-image fp32 convs round differently


def test_chunk_size_follows_free_memory(zimage, monkeypatch):
    import zimage_core.vae as vae

    per_image = vae.estimate_decode_bytes(zimage.vae, (1, 16, 128, 128), torch.float32)
    monkeypatch.setattr(vae, "host_free_memory", lambda: int(per_image * 3.5 / 0.8))
    assert vae._chunk_size(zimage.vae, (64, 16, 128, 128), torch.float32, torch.device("cpu"), False) == 3
    monkeypatch.setattr(vae, "host_free_memory", lambda: 10)
    assert vae._chunk_size(zimage.vae, (64, 16, 128, 128), torch.float32, torch.device("cpu"), False) == 1
