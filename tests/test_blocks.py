"""The block maths run on a weight view, not a module class: one tiny transformer in both weight layouts (diffusers'
``ZImageTransformer2DModel`` and the original checkpoint layout that ComfyUI's NextDiT keeps) gives identical
block outputs, with plain, fp8 and sticky high-precision weights; and they equal diffusers' own block forward."""

import types

import pytest
import torch
import torch.nn as nn

from helpers import transformer_to_original
from zimage_core.blocks import block_forward, original_block_shape, original_block_weights
from zimage_core.fp8 import FP8Linear, quantize_rowwise
from zimage_core.tiny import build_tiny_models
from zimage_core.weights import TransformerWeights, transformer_blocks


class Norm(nn.Module):
    def __init__(self, weight, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(weight.clone(), requires_grad=False), eps


def linear(weight, bias=None, fp8=False):
    if fp8:
        m = FP8Linear(weight.shape[1], weight.shape[0], bias is not None, torch.float32)
        m.load_weight(weight)
        if bias is not None:
            m.bias = nn.Parameter(bias.clone(), requires_grad=False)
        return m
    m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    m.weight = nn.Parameter(weight.clone(), requires_grad=False)
    if bias is not None:
        m.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return m


def original_block(state: dict, prefix: str, heads: int, eps: float, fp8: bool = False) -> nn.Module:
    """A block in the original layout (ComfyUI's attribute names), built from an original-layout state dict."""
    w = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    block = nn.Module()
    block.modulation = "adaLN_modulation.0.weight" in w
    block.attention = nn.Module()
    block.attention.qkv = linear(w["attention.qkv.weight"], fp8=fp8)
    block.attention.out = linear(w["attention.out.weight"], fp8=fp8)
    block.attention.q_norm = Norm(w["attention.q_norm.weight"], 1e-5)
    block.attention.k_norm = Norm(w["attention.k_norm.weight"], 1e-5)
    block.attention.n_local_heads = heads
    block.feed_forward = nn.Module()
    for name in ("w1", "w2", "w3"):
        setattr(block.feed_forward, name, linear(w[f"feed_forward.{name}.weight"], fp8=fp8))
    for name in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
        setattr(block, name, Norm(w[f"{name}.weight"], eps))
    if block.modulation:
        block.adaLN_modulation = nn.Sequential(linear(w["adaLN_modulation.0.weight"], w["adaLN_modulation.0.bias"]))
    return block


@pytest.fixture(scope="module")
def transformer():
    return build_tiny_models(seed=0)[0]


def inputs(transformer, seq=24, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    dim = transformer.config.dim
    head_dim = dim // transformer.config.n_heads
    x = torch.randn(batch, seq, dim, generator=g)
    angles = torch.rand(batch, seq, head_dim // 2, generator=g) * 6.28
    freqs = torch.polar(torch.ones_like(angles), angles)  # diffusers' complex RoPE table
    adaln = torch.randn(batch, min(dim, 256), generator=g)
    return x, freqs, adaln


def run(view, shape, x, freqs, adaln, fp8_matmul=False):
    cos, sin = freqs.real.unsqueeze(2).contiguous(), freqs.imag.unsqueeze(2).contiguous()
    return block_forward(x, None, cos, sin, adaln, view, shape, fp8_matmul)


@pytest.mark.parametrize("name", ["noise_refiner.0", "layers.1", "context_refiner.0"])
def test_both_layouts_give_identical_block_outputs(transformer, name):
    owner = TransformerWeights.of(transformer)
    original = transformer_to_original(transformer.state_dict(), prefix="")
    block = original_block(original, name + ".", transformer.config.n_heads, owner.shape.eps)
    assert original_block_shape(block) == owner.shape
    x, freqs, adaln = inputs(transformer)
    ours = run(owner.block(name), owner.shape, x, freqs, adaln)
    theirs = run(original_block_weights(block), original_block_shape(block), x, freqs, adaln)
    assert torch.equal(ours, theirs)
    # and both equal diffusers' own block forward (the reference numbers)
    module = transformer_blocks(transformer)[name]
    mask = torch.ones(x.shape[:2], dtype=torch.bool)
    reference = module(x, mask, freqs, adaln) if module.modulation else module(x, mask, freqs)
    assert (ours - reference).abs().max() <= 1e-5
    # one more check that the comparison can fail: a changed weight changes the output
    with torch.no_grad():
        block.feed_forward.w2.weight.mul_(1.01)
    assert not torch.equal(ours, run(original_block_weights(block), original_block_shape(block), x, freqs, adaln))


def test_fp8_storage_gives_identical_block_outputs_in_both_layouts():
    transformer = build_tiny_models(seed=1)[0]
    original = transformer_to_original(transformer.state_dict(), prefix="")
    block = transformer.layers[0]
    for name in ("to_q", "to_k", "to_v"):
        old = getattr(block.attention, name)
        new = FP8Linear.like(old, torch.float32)
        new.load_weight(old.weight)
        setattr(block.attention, name, new)
    old = block.attention.to_out[0]
    block.attention.to_out[0] = FP8Linear.like(old, torch.float32)
    block.attention.to_out[0].load_weight(old.weight)
    for name in ("w1", "w2", "w3"):
        old = getattr(block.feed_forward, name)
        new = FP8Linear.like(old, torch.float32)
        new.load_weight(old.weight)
        setattr(block.feed_forward, name, new)
    owner = TransformerWeights.of(transformer)
    native = original_block(original, "layers.0.", transformer.config.n_heads, owner.shape.eps, fp8=True)
    # one scale per row: the fused q/k/v rows get exactly the scales of the separate q, k and v rows
    assert torch.equal(owner.block("layers.0").qkv.scale, native.attention.qkv.weight_scale)
    x, freqs, adaln = inputs(transformer, seed=2)
    ours = run(owner.block("layers.0"), owner.shape, x, freqs, adaln)
    theirs = run(original_block_weights(native), original_block_shape(native), x, freqs, adaln)
    assert torch.equal(ours, theirs)
    w8, scale = quantize_rowwise(original["layers.0.attention.qkv.weight"])
    assert torch.equal(owner.block("layers.0").qkv.weight.view(torch.uint8), w8.view(torch.uint8))
    plain = run(TransformerWeights.of(build_tiny_models(seed=1)[0]).block("layers.0"), owner.shape, x, freqs, adaln)
    assert 0 < (ours - plain).norm() / plain.norm() < 0.05  # fp8 noise, not another model


def test_sticky_copy_gives_identical_block_outputs_in_both_layouts(transformer):
    owner = TransformerWeights.of(transformer)
    name = "layers.0"
    copy = owner.high_precision_copy(name, owner.blocks[name], torch.bfloat16)
    original = transformer_to_original(transformer.state_dict(), prefix="")
    native = original_block(original, name + ".", transformer.config.n_heads, owner.shape.eps).to(torch.bfloat16)
    x, freqs, adaln = inputs(transformer, seed=3)
    x, adaln = x.bfloat16(), adaln.bfloat16()
    ours = run(owner.block(name, module=copy), owner.shape, x, freqs, adaln)
    theirs = run(original_block_weights(native), original_block_shape(native), x, freqs, adaln)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs)


def test_weights_stored_in_another_dtype_are_cast_at_use(transformer):
    """bf16 storage under fp32 compute (the storage != compute crash of issue 15) runs, close to fp32."""
    owner = TransformerWeights.of(transformer)
    original = transformer_to_original(transformer.state_dict(), prefix="")
    native = original_block(original, "layers.1.", transformer.config.n_heads, owner.shape.eps).to(torch.bfloat16)
    x, freqs, adaln = inputs(transformer, seed=4)
    stored_bf16 = run(original_block_weights(native), original_block_shape(native), x, freqs, adaln)
    fp32 = run(owner.block("layers.1"), owner.shape, x, freqs, adaln)
    assert stored_bf16.dtype == torch.float32
    assert 0 < (stored_bf16 - fp32).norm() / fp32.norm() < 1e-2
