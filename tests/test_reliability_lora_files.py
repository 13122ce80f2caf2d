"""Issue 25, defects 3, 6 and 8: a damaged LoRA is refused when it is parsed, before any weight changes, with a
``ZImageError`` naming the file, the key and the fix: factor shapes that don't fit together, 1-D and rank-0
factors, a bad ``dora_scale``/``alpha``, LoHa/LoKr shapes, integer/bool/complex tensors, NaN/Inf in any tensor,
and factors whose product overflows fp32. In the API (``load_lora``, ``ZImage.load_lora``) and on the command line.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from zimage_core import ZImage, ZImageError
from zimage_core.lora import load_lora

BASE = "diffusion_model.layers.0.attention.out"  # a [64, 64] weight of the tiny model
GEN = torch.Generator().manual_seed(25)
FIX = "The file is damaged or was written by a broken tool: export or download the LoRA again"


def rnd(*shape, scale=0.1):
    return torch.randn(*shape, generator=GEN) * scale


def good_pair(rank=4):
    return {f"{BASE}.lora_up.weight": rnd(64, rank), f"{BASE}.lora_down.weight": rnd(rank, 64)}


def loha(**override):
    sd = {f"{BASE}.hada_w1_a": rnd(64, 3), f"{BASE}.hada_w1_b": rnd(3, 64), f"{BASE}.hada_w2_a": rnd(64, 3),
          f"{BASE}.hada_w2_b": rnd(3, 64)}
    return {**sd, **{f"{BASE}.{k}": v for k, v in override.items()}}


def lokr(**override):
    sd = {f"{BASE}.lokr_w1": rnd(2, 2, scale=0.5), f"{BASE}.lokr_w2_a": rnd(32, 4), f"{BASE}.lokr_w2_b": rnd(4, 32)}
    return {**sd, **{f"{BASE}.{k}": v for k, v in override.items()}}


def with_nan(t, value=float("nan")):
    t = t.clone()
    t.view(-1)[3] = value
    return t


# name, state dict, key named in the message, words of the message
CASES = [
    ("up_down_rank", {f"{BASE}.lora_up.weight": rnd(64, 4), f"{BASE}.lora_down.weight": rnd(8, 64)},
     f"{BASE}.lora_up.weight", r"has shape \[64, 4\] but its partner .*lora_down.weight' has shape \[8, 64\]: the "
                               r"rank must be the same in both \(4 columns of the first, 8 rows of the second\)"),
    ("up_1d", {f"{BASE}.lora_up.weight": rnd(64), f"{BASE}.lora_down.weight": rnd(4, 64)},
     f"{BASE}.lora_up.weight", r"has shape \[64\]: a LoRA up factor \(up\) is a matrix"),
    ("down_1d", {f"{BASE}.lora_up.weight": rnd(64, 1), f"{BASE}.lora_down.weight": rnd(64)},
     f"{BASE}.lora_down.weight", r"has shape \[64\]: a LoRA down factor \(down\) is a matrix"),
    ("rank_0", {f"{BASE}.lora_up.weight": torch.zeros(64, 0), f"{BASE}.lora_down.weight": torch.zeros(0, 64),
                f"{BASE}.alpha": torch.tensor(4.0)},
     f"{BASE}.lora_up.weight", r"has shape \[64, 0\]: a LoRA up factor \(up\) of rank 0"),
    ("dora_7x1", {**good_pair(), f"{BASE}.dora_scale": torch.ones(7, 1)},
     f"{BASE}.dora_scale", r"has shape \[7, 1\]: DoRA's magnitude is \[64, 1\] \(one per output row\) or \[1, 64\]"),
    ("dora_1d", {**good_pair(), f"{BASE}.dora_scale": torch.ones(64)},
     f"{BASE}.dora_scale", r"has shape \[64\]: DoRA's magnitude is \[64, 1\]"),
    ("loha_w2a_rank", loha(hada_w2_a=rnd(64, 2)),
     f"{BASE}.hada_w2_a", r"has shape \[64, 2\] but its partner .*hada_w2_b' has shape \[3, 64\]"),
    ("loha_w2a_rows", loha(hada_w2_a=rnd(32, 3)),
     f"{BASE}.hada_w2_a", r"make a \[32, 64\] matrix but .* a \[64, 64\] one: LoHa's two products"),
    ("loha_3d", loha(hada_w1_b=rnd(3, 64, 1)),
     f"{BASE}.hada_w1_b", r"has shape \[3, 64, 1\]: a LoHa down factor \(w1b\) is a matrix \[rows, columns\]"),
    ("alpha_2", {**good_pair(), f"{BASE}.alpha": torch.tensor([4.0, 4.0])},
     f"{BASE}.alpha", r"has shape \[2\]: alpha is one number \(shape \[\] or \[1\]\)"),
    ("alpha_nan", {**good_pair(), f"{BASE}.alpha": torch.tensor(float("nan"))},
     f"{BASE}.alpha", "is nan: alpha must be a finite number"),
    ("alpha_inf", {**good_pair(), f"{BASE}.alpha": torch.tensor(float("inf"))},
     f"{BASE}.alpha", "is inf: alpha must be a finite number"),
    ("lokr_rank", lokr(lokr_w2_b=rnd(3, 32)),
     f"{BASE}.lokr_w2_a", r"has shape \[32, 4\] but its partner .*lokr_w2_b' has shape \[3, 32\]"),
    ("lokr_w1_1d", lokr(lokr_w1=rnd(4)),
     f"{BASE}.lokr_w1", r"has shape \[4\]: a LoKr factor \(w1\) is a matrix"),
    ("lokr_w1_empty", lokr(lokr_w1=torch.zeros(2, 0)),
     f"{BASE}.lokr_w1", r"has shape \[2, 0\]: a LoKr factor \(w1\) of rank 0"),
    ("up_int8", {f"{BASE}.lora_up.weight": torch.ones(64, 4, dtype=torch.int8), f"{BASE}.lora_down.weight": rnd(4, 64)},
     f"{BASE}.lora_up.weight", "is stored as int8, an integer type without the scales that would turn it into "
                               "weights .* Use the LoRA's fp16, bf16 or fp32 release"),
    ("down_int32", {f"{BASE}.lora_up.weight": rnd(64, 4), f"{BASE}.lora_down.weight": torch.ones(4, 64, dtype=torch.int32)},
     f"{BASE}.lora_down.weight", "is stored as int32, an integer type without the scales"),
    ("diff_uint8", {f"{BASE}.diff": torch.ones(64, 64, dtype=torch.uint8)},
     f"{BASE}.diff", "is stored as uint8, an integer type"),
    ("up_bool", {f"{BASE}.lora_up.weight": torch.ones(64, 4, dtype=torch.bool), f"{BASE}.lora_down.weight": rnd(4, 64)},
     f"{BASE}.lora_up.weight", "is stored as bool: LoRA tensors are real floating-point numbers"),
    ("alpha_bool", {**good_pair(), f"{BASE}.alpha": torch.tensor(True)},
     f"{BASE}.alpha", "is stored as bool"),
    ("up_nan", {f"{BASE}.lora_up.weight": with_nan(rnd(64, 4)), f"{BASE}.lora_down.weight": rnd(4, 64)},
     f"{BASE}.lora_up.weight", "holds NaN or Inf values: merged, it would turn every image black"),
    ("down_inf_bf16", {f"{BASE}.lora_up.weight": rnd(64, 4).bfloat16(),
                       f"{BASE}.lora_down.weight": with_nan(rnd(4, 64), float("-inf")).bfloat16()},
     f"{BASE}.lora_down.weight", "holds NaN or Inf values"),
    ("dora_nan", {**good_pair(), f"{BASE}.dora_scale": with_nan(torch.ones(64, 1))},
     f"{BASE}.dora_scale", "holds NaN or Inf values"),
    ("loha_nan", loha(hada_w2_b=with_nan(rnd(3, 64))), f"{BASE}.hada_w2_b", "holds NaN or Inf values"),
    ("lokr_inf", lokr(lokr_w1=with_nan(rnd(2, 2), float("inf"))), f"{BASE}.lokr_w1", "holds NaN or Inf values"),
    ("diff_nan", {f"{BASE}.diff": with_nan(rnd(64, 64))}, f"{BASE}.diff", "holds NaN or Inf values"),
    ("fp8_nan", {f"{BASE}.lora_up.weight": with_nan(rnd(64, 4)).to(torch.float8_e4m3fn),
                 f"{BASE}.lora_down.weight": rnd(4, 64).to(torch.float8_e4m3fn)},
     f"{BASE}.lora_up.weight", "holds NaN or Inf values"),
    ("product_overflow", {f"{BASE}.lora_up.weight": torch.full((64, 4), 1e20),
                          f"{BASE}.lora_down.weight": torch.full((4, 64), 1e20)},
     f"{BASE}.lora_up.weight", r"and its partner factors \('.*lora_down.weight'\) multiply to values that overflow "
                               r"fp32: merged at the strengths allowed \(up to 100\)"),
    ("product_too_big_at_100", {f"{BASE}.lora_up.weight": torch.full((64, 1), 1e18),
                                f"{BASE}.lora_down.weight": torch.full((1, 64), 1e19)},
     f"{BASE}.lora_up.weight", "multiply to values that reach 1e\\+37 at strength 1"),
    ("loha_overflow", loha(hada_w1_a=torch.full((64, 3), 1e10), hada_w1_b=torch.full((3, 64), 1e10),
                           hada_w2_a=torch.full((64, 3), 1e10), hada_w2_b=torch.full((3, 64), 1e10)),
     f"{BASE}.hada_w1_a", "multiply to values that overflow fp32"),
    ("lokr_overflow", lokr(lokr_w1=torch.full((2, 2), 1e30), lokr_w2_a=torch.full((32, 4), 1e5),
                           lokr_w2_b=torch.full((4, 32), 1e5)),
     f"{BASE}.lokr_w1", "multiply to values that"),
    ("diff_huge", {f"{BASE}.diff": torch.full((64, 64), 1e37)},
     f"{BASE}.diff", "holds values up to 1e\\+37: at strength 100 the merged weight would overflow fp32"),
    ("dora_norm_overflow", {f"{BASE}.lora_up.weight": torch.full((64, 1), 1e10),
                            f"{BASE}.lora_down.weight": torch.full((1, 64), 1e10), f"{BASE}.dora_scale": torch.ones(1, 64)},
     f"{BASE}.lora_up.weight", "multiply to values that reach 1e\\+20"),
]


@pytest.fixture(scope="module")
def shapes(tiny_models):
    from helpers import transformer_to_original

    return {k: tuple(v.shape) for k, v in transformer_to_original(tiny_models[0].state_dict(), prefix="").items()}


@pytest.mark.parametrize("name,state,key,words", CASES, ids=[c[0] for c in CASES])
def test_damaged_lora_refused_at_parse(tmp_path, shapes, name, state, key, words):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    for source in (path, state):  # a file and a state dict give the same refusal
        with pytest.raises(ZImageError) as err:
            load_lora(source, shapes=shapes)
        message = str(err.value)
        assert message.startswith(f"{path}: LoRA tensor {key!r}" if source is path else f"LoRA state dict: LoRA "
                                  f"tensor {key!r}"), message
        assert re.search(words, message), message
        if "integer type" not in message:
            assert message.endswith(FIX + "."), message


def test_complex_tensor_in_a_state_dict():
    with pytest.raises(ZImageError, match=r"'.*lora_up.weight' is stored as complex64: LoRA tensors are real"):
        load_lora({f"{BASE}.lora_up.weight": torch.ones(64, 4, dtype=torch.complex64),
                   f"{BASE}.lora_down.weight": rnd(4, 64)})


def test_valid_edge_forms_are_accepted(shapes):
    """What the checks must let through: an integer alpha (kohya's network_alpha is an int), alpha of shape [1],
    fp8 factors, DoRA per column, linear factors with a trailing 1x1, alpha 0, big-but-finite factors whose
    cancelling product fails the cheap bound and passes the exact check."""
    pair = good_pair()
    int_alpha = load_lora({**pair, f"{BASE}.alpha": torch.tensor(2, dtype=torch.int64)}, shapes)
    float_alpha = load_lora({**pair, f"{BASE}.alpha": torch.tensor([2.0])}, shapes)
    w = torch.zeros(64, 64)
    assert torch.equal(int_alpha.transformer["layers.0.attention.out.weight"][0].delta(w),
                       float_alpha.transformer["layers.0.attention.out.weight"][0].delta(w))
    load_lora({k: v.to(torch.float8_e4m3fn) for k, v in pair.items()}, shapes)
    load_lora({**pair, f"{BASE}.dora_scale": torch.ones(1, 64)}, shapes)
    load_lora({f"{BASE}.lora_up.weight": rnd(64, 4, 1, 1), f"{BASE}.lora_down.weight": rnd(4, 64, 1, 1)}, shapes)
    load_lora({**pair, f"{BASE}.alpha": torch.tensor(0.0)}, shapes)
    up = torch.full((64, 2), 1e19)
    down = torch.cat([torch.full((1, 64), 1e19), torch.full((1, 64), -1e19)])  # bound 2e38, product ~0
    lora = load_lora({f"{BASE}.lora_up.weight": up, f"{BASE}.lora_down.weight": down}, shapes)
    delta = lora.transformer["layers.0.attention.out.weight"][0].delta(w, 100.0)
    assert torch.isfinite(delta).all() and delta.abs().max() < 1e36  # cancels to rounding residue, far below the bound


def test_sources_that_are_not_files(tmp_path):
    folder = tmp_path / "style.safetensors"
    folder.mkdir()
    save_file(good_pair(), str(folder / "inner.safetensors"))  # a folder holding one file is still not a LoRA file
    with pytest.raises(ZImageError, match=r"LoRA .*style.safetensors is a folder, not a regular file: give the "
                                          r"LoRA's .safetensors file"):
        load_lora(folder)
    for bad in (None, 5, b"style.safetensors", ["style.safetensors"]):
        with pytest.raises(ZImageError, match="a LoRA must be a .safetensors file path .* or a state dict, got"):
            load_lora(bad)
    with pytest.raises(ZImageError, match="the LoRA state dict maps 'x' to a str"):
        load_lora({"x": "not a tensor"})
    with pytest.raises(ZImageError, match="the LoRA state dict is empty"):
        load_lora({})


def test_refused_before_anything_merges(tmp_path, tiny_dir):
    """ZImage.load_lora of a damaged file raises the parse error and leaves the model as it was: the next image
    equals a fresh model's, and a good LoRA still loads after it."""
    bad = tmp_path / "bad.safetensors"
    save_file({**good_pair(), f"{BASE}.alpha": torch.tensor([4.0, 4.0])}, str(bad))
    nan = tmp_path / "nan.safetensors"
    save_file({f"{BASE}.lora_up.weight": with_nan(rnd(64, 4)), f"{BASE}.lora_down.weight": rnd(4, 64)}, str(nan))
    good = tmp_path / "good.safetensors"
    save_file(good_pair(), str(good))
    z = ZImage.load(tiny_dir, device="cpu", dtype="fp32")
    reference = z.generate("lora", seed=1, steps=2, width=64, height=64, decode=False).latents
    before = {k: v.clone() for k, v in z.transformer.state_dict().items()}
    for path, words in ((bad, "alpha is one number"), (nan, "holds NaN or Inf")):
        with pytest.raises(ZImageError, match=f"{re.escape(str(path))}: LoRA tensor .*{words}"):
            z.load_lora(path)
        with pytest.raises(ZImageError, match=words):
            z.set_loras([(path, 1.0)])
        assert all(torch.equal(v, before[k]) for k, v in z.transformer.state_dict().items())
    assert torch.equal(z.generate("lora", seed=1, steps=2, width=64, height=64, decode=False).latents, reference)
    z.set_loras([(good, 1.0)])
    assert not torch.equal(z.generate("lora", seed=1, steps=2, width=64, height=64, decode=False).latents, reference)


@pytest.mark.parametrize("name", ["up_down_rank", "rank_0", "alpha_2", "up_int8", "up_nan", "product_overflow"])
def test_cli_names_the_file_and_key(tmp_path, tiny_dir, name):
    """On the command line: one line 'error: <file>: LoRA tensor <key> ...', exit 2, no 'internal error'."""
    _, state, key, words = next(c for c in CASES if c[0] == name)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    result = subprocess.run([sys.executable, "-m", "zimage_core", "generate", "--model", str(tiny_dir), "--lora",
                             f"{path}:0.7", "--steps", "1", "--width", "64", "--height", "64", "--device", "cpu",
                             "--out", str(tmp_path / "o.png")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: LoRA tensor {key!r}"), result.stderr
    assert re.search(words, lines[0]) and "internal error" not in lines[0], lines[0]
    assert not (tmp_path / "o.png").exists()
