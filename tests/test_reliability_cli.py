"""Issue 25, the CLI and the small ones: no output may be an input or another output, or an existing file that
isn't ours; over-long names, a file given as --model-dir, FIFOs/devices/folders given as files, numpy integers,
Ctrl-C while the imports run.

The guard's cases run through ``cli.main`` in this process with model loading forbidden (every check happens
before a model loads), and the issue's own reproductions run as a user runs them: ``python -m zimage_core`` in a
subprocess, checking the exit code, the one-line message and that the input file is untouched.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from zimage_core import ZImageError, check_output_paths, cli


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def run_cli(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "zimage_core", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_error_line(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture
def split_copy(tmp_path, tiny_split):
    """The split files copied (a guard that failed would overwrite them: never the session's own files)."""
    folder = tmp_path / "models"
    folder.mkdir()
    return {k: shutil.copy(v, folder / v.name) for k, v in tiny_split.items()}


@pytest.fixture
def no_load(monkeypatch):
    import zimage_core.pipeline as pipeline

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the output paths were checked")

    monkeypatch.setattr(pipeline.ZImage, "load", forbidden)


def cli_error(capsys, *argv) -> str:
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


# ------------------------------------------------------------------------------------------- the case
def test_latents_out_naming_the_transformer_is_refused_and_the_file_untouched(tmp_path, split_copy, tokenizer_dir):
    before = digest(split_copy["transformer"])
    line = one_error_line(run_cli(
        "generate", "--transformer", split_copy["transformer"], "--text-encoder", split_copy["text_encoder"],
        "--vae", split_copy["vae"], "--tokenizer", tokenizer_dir, "--steps", "1", "--width", "64", "--height", "64",
        "--device", "cpu", "--out", tmp_path / "a.png", "--latents-out", split_copy["transformer"]))
    assert re.search(r"--latents-out .*z_image_turbo_bf16.safetensors is the input file of --transformer: writing "
                     r"there would overwrite it\. Choose another --latents-out name", line), line
    assert digest(split_copy["transformer"]) == before
    assert not (tmp_path / "a.png").exists()


def test_hard_link_and_symlink_to_inputs_are_refused(tmp_path, split_copy, tokenizer_dir):
    """A hard link has another path but is the same file; so is a symlink; both are caught (device + inode)."""
    hard = tmp_path / "hard.safetensors"
    os.link(split_copy["vae"], hard)
    soft = tmp_path / "soft.safetensors"
    soft.symlink_to(split_copy["text_encoder"])
    before = {k: digest(v) for k, v in split_copy.items()}
    common = ["generate", "--transformer", split_copy["transformer"], "--text-encoder", split_copy["text_encoder"],
              "--vae", split_copy["vae"], "--tokenizer", tokenizer_dir, "--steps", "1", "--width", "64",
              "--height", "64", "--device", "cpu", "--out", tmp_path / "a.png"]
    line = one_error_line(run_cli(*common, "--latents-out", hard))
    assert "hard.safetensors is the input file of --vae" in line and "resolved or hard-linked" in line, line
    line = one_error_line(run_cli(*common, "--latents-out", soft))
    assert "soft.safetensors is the input file of --text-encoder" in line, line
    assert {k: digest(v) for k, v in split_copy.items()} == before


# ----------------------------------------------------------------------------------------- the guard, table
def test_every_input_option_is_guarded(tmp_path, tiny_dir, capsys, no_load):
    """--model (files below it), --lora, --init-image, a relative path with '..', a batch's numbered names."""
    model = tmp_path / "Z"
    shutil.copytree(tiny_dir, model)
    weights = next((model / "transformer").glob("*.safetensors"))
    lora = tmp_path / "style.safetensors"
    save_file({"diffusion_model.layers.0.attention.out.lora_up.weight": torch.zeros(64, 2),
               "diffusion_model.layers.0.attention.out.lora_down.weight": torch.zeros(2, 64)}, str(lora))
    init = tmp_path / "init.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(init)
    init2 = tmp_path / "shot_2.png"
    shutil.copy(init, init2)
    base = ["generate", "--model", model, "--width", "64", "--height", "64", "--device", "cpu"]
    cases = [
        (["--out", tmp_path / "o.png", "--latents-out", weights], "is the input file of --model"),
        (["--out", tmp_path / "o.png", "--latents-out", model / "vae" / ".." / "transformer" / weights.name],
         "is the input file of --model"),
        (["--out", tmp_path / "o.png", "--latents-out", lora, "--lora", lora], "is the input file of --lora"),
        (["--out", init, "--init-image", init, "--denoise", "0.5"], "--out .*init.png is the input file of --init-image"),
        (["--out", tmp_path / "shot.png", "--batch-size", "2", "--init-image", init2, "--denoise", "0.5"],
         "--out .*shot_2.png is the input file of --init-image"),
    ]
    before = {p: digest(p) for p in (weights, lora, init, init2)}
    for args, words in cases:
        line = cli_error(capsys, *base, *args)
        assert re.search(words, line), (args, line)
    assert {p: digest(p) for p in before} == before


def test_demo_model_dir_files_are_guarded(tmp_path, tiny_dir, capsys, no_load):
    weights = next((tiny_dir / "vae").glob("*.safetensors"))
    line = cli_error(capsys, "demo", "--model-dir", tiny_dir, "--out", tmp_path / "o.png", "--latents-out", weights)
    assert "is the input file of --model-dir" in line, line


def test_outputs_may_not_be_one_file(tmp_path, capsys, no_load):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    linked = tmp_path / "a.safetensors"
    os.link(image, linked)  # a hard link: writing the latents would destroy the image just written
    line = cli_error(capsys, "generate", "--model", tmp_path, "--out", image, "--latents-out", linked)
    assert re.search(r"--latents-out .*a.safetensors is the same file as --out .*a.png", line), line


def test_existing_files_that_are_not_ours_are_kept(tmp_path, capsys, no_load):
    notes = tmp_path / "notes.png"
    notes.write_text("my notes, not an image")
    line = cli_error(capsys, "generate", "--model", tmp_path / "Z", "--out", notes)
    assert re.search(r"--out .*notes.png exists and is not an image \(PNG, JPEG or WebP\), so writing would destroy "
                     r"it: remove it yourself if it is not needed, or choose another name", line), line
    assert notes.read_text() == "my notes, not an image"
    other = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(3)}, str(other))
    before = digest(other)
    line = cli_error(capsys, "generate", "--model", tmp_path / "Z", "--out", tmp_path / "o.png", "--latents-out", other)
    assert "exists and is not a latents file (a .safetensors holding only 'latents')" in line, line
    assert digest(other) == before


def test_our_own_earlier_outputs_may_be_replaced(tmp_path):
    """A rerun with the same names is the normal case: images, our latents file and empty files are replaced."""
    for suffix, save in ((".png", "PNG"), (".jpg", "JPEG"), (".webp", "WEBP")):
        path = tmp_path / f"old{suffix}"
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, save)
        assert check_output_paths(path) == (path, None)
    latents = tmp_path / "lat.safetensors"
    save_file({"latents": torch.zeros(1, 16, 8, 8)}, str(latents))
    empty = tmp_path / "empty.png"
    empty.touch()
    assert check_output_paths(empty, latents) == (empty, latents)


def test_rerun_inside_the_model_folder(tmp_path, tiny_dir):
    """A rerun that writes its image and latents into the diffusers folder again replaces its own files there
    (only model_index.json and the subfolders are the model); the folder's weights stay guarded."""
    model = tmp_path / "Z"
    shutil.copytree(tiny_dir, model)
    image, latents = model / "zimage.png", model / "lat.safetensors"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    save_file({"latents": torch.zeros(1, 16, 8, 8)}, str(latents))
    assert check_output_paths(image, latents, inputs=[("--model", model)]) == (image, latents)
    with pytest.raises(ZImageError, match="is the input file of --model"):
        check_output_paths(image, next((model / "vae").glob("*.safetensors")), inputs=[("--model", model)])


def test_api_guard_takes_inputs_and_folders(tmp_path):
    folder = tmp_path / "m" / "sub"
    folder.mkdir(parents=True)
    target = folder / "x.safetensors"
    save_file({"latents": torch.zeros(1)}, str(target))  # even a latents-looking input is never overwritten
    with pytest.raises(ZImageError, match=r"--latents-out .*x.safetensors is the input file of --model"):
        check_output_paths(tmp_path / "o.png", target, inputs=[("--model", tmp_path / "m")])
    assert check_output_paths(tmp_path / "o.png", tmp_path / "new.safetensors",
                              inputs=[("--model", tmp_path / "m"), ("--init-image", None)])[1].name == "new.safetensors"


# ------------------------------------------------------------------------------------------ small ones
def test_over_long_output_name(tmp_path, capsys, no_load):
    line = one_error_line(run_cli("demo", "--out", tmp_path / ("a" * 300 + ".png")))
    assert re.search(r"--out 'a+\.\.\.a+\.png': the name is 304 bytes long; file names can be at most 255 bytes here\. "
                     "Choose a shorter name", line), line
    stem = "b" * 250  # b...b.png fits (254 bytes); a batch's b...b_1.png (256) does not
    line = cli_error(capsys, "generate", "--model", tmp_path, "--out", tmp_path / f"{stem}.png", "--batch-size", "2")
    assert "the name is 256 bytes long" in line, line
    with pytest.raises(ZImageError, match="--latents-out .* the name is 305 bytes"):
        check_output_paths(tmp_path / "o.png", tmp_path / ("c" * 293 + ".safetensors"))


def test_demo_model_dir_that_is_a_file(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("x")
    for given in (target, target / "sub"):
        line = one_error_line(run_cli("demo", "--model-dir", given, "--out", tmp_path / "o.png"))
        assert "--model-dir" in line and "not a folder: give a folder (it is made if missing)" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # no notes.txt.partial/ left behind
    assert target.read_text() == "x"
    from zimage_core.tiny import tiny_model_dir

    with pytest.raises(ZImageError, match="model_dir .*notes.txt is a file, not a folder"):
        tiny_model_dir(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    with pytest.raises(ZImageError, match="model_dir .* is a folder with other files and no model"):
        tiny_model_dir(tmp_path)  # would have ended in 'Directory not empty' after building
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_failed_tiny_build_leaves_nothing(tmp_path, monkeypatch):
    import zimage_core.tiny as tiny

    def broken(folder, *args, **kwargs):  # half written, then the disk is full
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model_index.json").write_text("{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tiny, "build_tiny_models", lambda: None)
    monkeypatch.setattr(tiny, "save_diffusers_folder", broken)
    with pytest.raises(OSError, match="No space left"):
        tiny.tiny_model_dir(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_special_files_are_not_regular_files(tmp_path, tiny_split, tokenizer_dir, kind):
    """A FIFO would block the reader forever and /dev/zero never ends: refused before anything opens them."""
    from zimage_core import ZImage
    from zimage_core.lora import load_lora
    from zimage_core.safetensors_io import Checkpoint, SafetensorsFile

    path = tmp_path / "thing.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
        what = "a FIFO (named pipe), not a regular file"
    elif kind == "device":
        path.symlink_to("/dev/zero")
        what = "a character device, not a regular file"
    else:
        path.mkdir()
        what = "a folder, not a regular file"
    for call in (lambda: SafetensorsFile(path), lambda: Checkpoint.from_path(path), lambda: load_lora(path),
                 lambda: ZImage.load(transformer=path, text_encoder=tiny_split["text_encoder"], vae=tiny_split["vae"],
                                     tokenizer=tokenizer_dir, device="cpu")):
        with pytest.raises(ZImageError, match=re.escape(what)):
            call()
    common = ["generate", "--text-encoder", tiny_split["text_encoder"], "--vae", tiny_split["vae"], "--tokenizer",
              tokenizer_dir, "--device", "cpu", "--width", "64", "--height", "64", "--out", tmp_path / "o.png"]
    line = one_error_line(run_cli(*common, "--transformer", path, timeout=120))
    assert "thing.safetensors is " + what in line, line
    line = one_error_line(run_cli(*common, "--transformer", tiny_split["transformer"], "--lora", path, timeout=120))
    assert "--lora" in line and what in line, line
    if kind != "folder":
        line = one_error_line(run_cli(*common[:-2], "--transformer", tiny_split["transformer"], "--init-image", path,
                                      "--denoise", "0.5", "--out", tmp_path / "o.png", timeout=120))
        assert "--init-image" in line and what in line, line


def test_dev_zero_itself(tmp_path):
    from zimage_core.safetensors_io import Checkpoint

    with pytest.raises(ZImageError, match="/dev/zero is a character device, not a regular file"):
        Checkpoint.from_path("/dev/zero")


def test_numpy_integers_are_whole_numbers(zimage):
    """np.int64 & co. are accepted wherever a Python int is, with the same result."""
    from zimage_core import check_batch_size, check_seed, check_size, check_steps, check_tile_args

    check_size(np.int64(64), np.uint16(80))
    check_steps(np.int32(8))
    assert check_seed(np.uint64(2**64 - 1)) == 2**64 - 1 and check_batch_size(np.int8(3)) == 3
    assert check_tile_args(np.int64(512), np.int16(64)) == (512, 64)
    plain = zimage.generate("numpy", seed=5, steps=2, width=64, height=64, batch_size=2)
    numpy = zimage.generate("numpy", seed=np.int64(5), steps=np.int64(2), width=np.int64(64), height=np.uint32(64),
                            batch_size=np.int32(2), guidance=np.float32(0.0), denoise=np.float64(1.0),
                            tile_size=np.int64(512), tile_overlap=np.int64(64))
    assert torch.equal(plain.latents, numpy.latents) and torch.equal(plain.images, numpy.images)
    with pytest.raises(ZImageError, match="steps 0 is out of range"):
        check_steps(np.int64(0))
    with pytest.raises(ZImageError, match="width 100 is not allowed"):
        check_size(np.int64(100), 64)
    with pytest.raises(ZImageError, match="seed 18446744073709551616 is out of range"):
        zimage.generate("numpy", seed=2**64, steps=np.int64(1), width=64, height=64)
    with pytest.raises(ZImageError, match="width must be a whole number"):
        check_size(np.float64(64.0), 64)


def test_ctrl_c_during_the_imports_is_one_line(tmp_path):
    """SIGINT while `python -m zimage_core` is still importing torch/diffusers: exit 130, one line, no traceback."""
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "zimage_core", "demo", "--out",
                             tmp_path / "o.png"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "ZIMAGE_CACHE": str(tmp_path / "cache")})
    # -X importtime writes a line per import to stderr: wait for torch's to start, then interrupt
    seen = ""
    deadline = time.monotonic() + 120
    while "zimage_core.errors" not in seen and time.monotonic() < deadline:
        seen += proc.stderr.readline()
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    err_lines = [line for line in (seen + err).splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 130, (proc.returncode, err[-2000:])
    assert err_lines == ["cancelled: interrupted while starting"], err_lines
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "cache").exists()


def test_import_in_a_program_keeps_python_s_ctrl_c():
    """Only the CLI's start-up changes the SIGINT handler: a program that imports zimage_core keeps its own."""
    code = ("import signal, zimage_core; "
            "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
