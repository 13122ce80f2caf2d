"""The command line, end to end in subprocesses, as a user runs it."""

import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from test_lora import base_state, lora_dir, te_state  # noqa: F401  (fixtures)



def run_cli(*args, env=None, timeout=300):
    result = subprocess.run([sys.executable, "-m", "zimage_core", *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_demo_builds_a_cached_tiny_model_and_writes_a_png(tmp_path):
    out = tmp_path / "demo.png"
    env = {"ZIMAGE_CACHE": str(tmp_path / "cache")}
    first = run_cli("demo", "--out", out, "--width", "128", "--height", "96", env=env)
    assert "wrote" in first.stdout
    image = np.asarray(Image.open(out))
    assert image.shape == (96, 128, 3) and image.std() > 1  # not a flat image
    assert (tmp_path / "cache" / "zimage_core" / "tiny-v1" / "model_index.json").is_file()
    run_cli("demo", "--out", tmp_path / "again.png", "--width", "128", "--height", "96", env=env)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), image)  # deterministic, cached


def test_generate_writes_png_and_latents_equal_to_the_api(tmp_path, tiny_dir, zimage):
    out, lat = tmp_path / "img.png", tmp_path / "lat.safetensors"
    run_cli("generate", "--model", tiny_dir, "--prompt", "a lighthouse", "--seed", "5", "--steps", "4",
            "--width", "96", "--height", "64", "--device", "cpu", "--out", out, "--latents-out", lat)
    saved = load_file(str(lat))
    assert list(saved) == ["latents"] and saved["latents"].dtype == torch.float32
    expected = zimage.generate("a lighthouse", seed=5, steps=4, width=96, height=64)
    assert torch.equal(saved["latents"], expected.latents)
    png = np.asarray(Image.open(out)).astype(np.float32) / 255
    assert png.shape == (64, 96, 3)
    assert np.abs(png - expected.images[0].numpy()).max() <= 0.5 / 255 + 1e-6


def test_split_files_on_the_command_line(tmp_path, tiny_split, tokenizer_dir, zimage):
    lat = tmp_path / "lat.safetensors"
    run_cli("generate", "--transformer", tiny_split["transformer"], "--text-encoder", tiny_split["text_encoder"],
            "--vae", tiny_split["vae"], "--tokenizer", tokenizer_dir, "--prompt", "p", "--seed", "1", "--steps", "2",
            "--width", "64", "--height", "64", "--device", "cpu", "--out", tmp_path / "a.png", "--latents-out", lat)
    expected = zimage.generate("p", seed=1, steps=2, width=64, height=64, decode=False)
    assert torch.equal(load_file(str(lat))["latents"], expected.latents)


def test_tiled_decode_png_equals_untiled(tmp_path, tiny_dir):
    common = ["generate", "--model", tiny_dir, "--prompt", "tiles", "--seed", "2", "--steps", "2",
              "--width", "192", "--height", "160", "--device", "cpu"]
    run_cli(*common, "--out", tmp_path / "plain.png")
    run_cli(*common, "--tiled-decode", "--tile-size", "64", "--tile-overlap", "16", "--out", tmp_path / "tiled.png")
    plain = np.asarray(Image.open(tmp_path / "plain.png")).astype(int)
    tiled = np.asarray(Image.open(tmp_path / "tiled.png")).astype(int)
    assert plain.shape == tiled.shape == (160, 192, 3)
    assert np.abs(plain - tiled).max() <= 2


def run_failing(*args, env=None):
    result = subprocess.run([sys.executable, "-m", "zimage_core", *map(str, args)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, **(env or {})})
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_errors_are_one_line_without_traceback(tmp_path, tiny_dir):
    no_gpu = {"CUDA_VISIBLE_DEVICES": ""}
    assert "no usable CUDA GPU" in run_failing("generate", "--model", tiny_dir, "--device", "cuda",
                                               "--out", tmp_path / "a.png", env=no_gpu)
    assert "has extension .txt" in run_failing("generate", "--model", tiny_dir, "--out", tmp_path / "a.txt")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"a": [0, 16]}  ')
    line = run_failing("generate", "--model", tiny_dir, "--transformer", bad, "--device", "cpu", "--width", "64",
                       "--height", "64", "--out", tmp_path / "b.png")
    assert "bad.safetensors is not a valid safetensors file: tensor 'a': the entry must be an object" in line
    assert not (tmp_path / "b.png").exists()


def test_init_image_png_round_trip_and_batch_names(tmp_path, tiny_dir):
    """An 8-bit PNG init image is read as 0..1 (not refused as 0..255); a batch writes name_1, name_2."""
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "init.png")
    run_cli("generate", "--model", tiny_dir, "--init-image", tmp_path / "init.png", "--denoise", "0.5",
            "--steps", "2", "--width", "64", "--height", "64", "--batch-size", "2", "--device", "cpu",
            "--out", tmp_path / "out.png")
    assert (tmp_path / "out_1.png").is_file() and (tmp_path / "out_2.png").is_file()


def test_lora_and_sampler_options_equal_the_api(tmp_path, tiny_dir, lora_dir):
    """--lora FILE[:STRENGTH] (repeatable) and --sampler give what ZImage.set_loras and generate(sampler=) give."""
    from zimage_core import ZImage

    _, files, _ = lora_dir
    lat = tmp_path / "lat.safetensors"
    run_cli("generate", "--model", tiny_dir, "--prompt", "a lighthouse", "--seed", "5", "--steps", "4",
            "--width", "64", "--height", "64", "--device", "cpu", "--out", tmp_path / "img.png", "--latents-out", lat,
            "--lora", f"{files['native_dm']}:0.6", "--lora", files["lycoris_loha"], "--sampler", "res_multistep")
    z = ZImage.load(tiny_dir, device="cpu")
    z.set_loras([(files["native_dm"], 0.6), (files["lycoris_loha"], 1.0)])
    expected = z.generate("a lighthouse", seed=5, steps=4, width=64, height=64, sampler="res_multistep")
    assert torch.equal(load_file(str(lat))["latents"], expected.latents)
    bad = subprocess.run([sys.executable, "-m", "zimage_core", "generate", "--model", str(tiny_dir), "--lora",
                          f"{files['native_dm']}:strong"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "strength after ':' must be a number" in bad.stderr
    assert "Traceback" not in bad.stderr
