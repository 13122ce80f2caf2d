"""Token ids of the prompt template, with the real Qwen tokenizer files that ComfyUI bundles."""

import pytest
from transformers import AutoTokenizer

from zimage_core.tokenizer import MAX_TOKENS, PromptTokenizer

PROMPTS = [
    "a red fox in fresh snow, morning light",
    "一只在雪地里的红狐狸，清晨的阳光",
    "neon sign 🦊✨ that says «Z-Image» — café",
    "  leading and trailing spaces  \n new line",
]
IM_START, IM_END = 151644, 151645


def expected_ids(tok, prompt):
    """Built piece by piece: the special tokens must be single ids, not spelled out."""
    ids = [IM_START] + tok.encode("user\n" + prompt, add_special_tokens=False) + [IM_END]
    ids += tok.encode("\n", add_special_tokens=False) + [IM_START] + tok.encode("assistant\n", add_special_tokens=False)
    return ids[:MAX_TOKENS]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_equal_template_tokenization(tokenizer_dir, prompt):
    ours = PromptTokenizer(tokenizer_dir)(prompt)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert ours == expected_ids(tok, prompt)
    assert ours[0] == IM_START and ours.count(IM_END) == 1


def test_overlong_prompt_is_cut_at_512_from_the_end(tokenizer_dir):
    prompt = " ".join(f"word{i}" for i in range(2000))
    ours = PromptTokenizer(tokenizer_dir)(prompt)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    full = expected_ids(tok, prompt[:50000])
    assert len(ours) == MAX_TOKENS
    assert ours == full[:MAX_TOKENS]  # the start (template head and prompt start) is kept


def test_bundled_chat_template_is_not_used(tokenizer_dir):
    """ComfyUI's bundled tokenizer carries Qwen2.5's template, which adds a system prompt."""
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    with_template = tok.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False,
                                            add_generation_prompt=True)
    assert "system" in with_template
    ours = PromptTokenizer(tokenizer_dir)("a cat")
    assert ours != tok(with_template)["input_ids"]
    # what we use instead: the Z-Image template string, user turn only, no system prompt
    assert ours == tok("<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n")["input_ids"]


@pytest.mark.parametrize("prompt", PROMPTS + ["x " * 700])
def test_ids_equal_qwen3_chat_template_of_a_diffusers_folder(tiny_dir, prompt):
    tok = AutoTokenizer.from_pretrained(str(tiny_dir / "tokenizer"))
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True,
                                  enable_thinking=True, truncation=True, max_length=MAX_TOKENS)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert PromptTokenizer(tiny_dir / "tokenizer")(prompt) == list(ids)
