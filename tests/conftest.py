import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The real Qwen tokenizer that ComfyUI bundles (installed with the test dependencies)."""
    from zimage_core.tokenizer import comfy_tokenizer_dirs

    found = comfy_tokenizer_dirs()
    assert found, "ComfyUI's bundled Qwen tokenizer is missing: install the test requirements (requirements-dev.txt)"
    return found[0]


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
