"""fp8 (e4m3, per-row scales) weight storage."""

import torch

from zimage_core import ZImage
from zimage_core.fp8 import FP8Linear, quantize_rowwise


def test_rowwise_quantization_keeps_small_rows():
    w = torch.randn(64, 128) * torch.logspace(-4, 0, 64)[:, None]  # rows over four orders of magnitude
    w8, scale = quantize_rowwise(w)
    assert w8.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    rel = ((w8.float() * scale - w).norm(dim=1) / w.norm(dim=1)).max()
    plain = ((w.to(torch.float8_e4m3fn).float() - w).norm(dim=1) / w.norm(dim=1)).max()
    assert rel < 0.05 < plain  # plain casting loses the small rows to subnormals


def test_fp8_storage_loads_e4m3_linears_and_stays_close(tiny_dir, zimage):
    fp8 = ZImage.load(tiny_dir, device="cpu", dtype="fp32", storage="fp8")
    block = fp8.transformer.layers[0]
    assert isinstance(block.feed_forward.w1, FP8Linear) and block.feed_forward.w1.weight.dtype == torch.float8_e4m3fn
    assert isinstance(block.adaLN_modulation[0], torch.nn.Linear)  # sensitive layers stay in the compute dtype
    assert fp8.transformer.x_pad_token.dtype == torch.float32
    assert isinstance(fp8.text_encoder.layers[0].mlp.up_proj, FP8Linear)
    assert fp8.policy.vae.storage == torch.float32
    a = fp8.generate("fp8 weights", seed=4, width=64, height=64, decode=False).latents
    b = zimage.generate("fp8 weights", seed=4, width=64, height=64, decode=False).latents
    rel = ((a - b).norm() / b.norm()).item()
    assert 1e-4 < rel < 0.1  # really quantized, and close (measured about 3e-2 on random weights)


def test_fp8_sticky_copy_keeps_its_row_scale():
    """The precision guard's sticky copy of an fp8 layer (``weights.plain_copy(module, dtype)``) holds the e4m3 codes
    cast to a float dtype next to their row scales; the block maths multiply them back. Before, ``blocks._linear``
    ran ``F.linear`` on the bare codes (errors of thousands on this layer)."""
    import torch.nn.functional as F

    from zimage_core.blocks import _linear, linear_of
    from zimage_core.weights import plain_copy

    lin = torch.nn.Linear(64, 32)
    m = FP8Linear.like(lin, torch.float32)
    m.load_weight(lin.weight.data)
    m.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    copy = plain_copy(m, torch.float32)
    assert copy.weight.dtype == torch.float32 and copy.weight_scale is not None
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    want = F.linear(x, m.dequantized_weight(), m.bias)
    assert torch.allclose(_linear(x, linear_of(copy), False), want, atol=1e-5)


def test_fp8_matmul_takes_per_tensor_and_per_row_weight_scales():
    """The fp8 matmul (torch._scaled_mm, row-wise) with a per-tensor weight scale, as comfy_quant tensorwise files
    and fp8_e4m3fn_fast (no scale) give it, and with per-row scales: each equals the dequantized product within fp8
    activation rounding. A per-tensor scale broadcast with stride 0 was refused by _scaled_mm on the GPU."""
    from zimage_core.fp8 import fp8_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 64, generator=g).to(torch.bfloat16)
    weight = (torch.randn(48, 64, generator=g) * 0.1).to(torch.float8_e4m3fn)
    for scale in (None, torch.tensor(0.5), torch.tensor([0.5]), torch.rand(48, 1, generator=g) + 0.5):
        full = torch.ones(()) if scale is None else scale
        reference = x.float() @ (weight.float() * full.reshape(-1, 1).float()).t()
        out = fp8_linear(x, weight, scale, None, matmul=True)
        assert out.shape == (2, 8, 48) and out.dtype == torch.bfloat16
        err = ((out.float() - reference).norm() / reference.norm()).item()
        assert err < 0.06, (scale, err)  # e4m3 activations: a few percent


def test_dynamic_vram_fp8_weight_runs_the_fp8_matmul():
    """Under ComfyUI's dynamic VRAM a layer of an fp8 model holds the file's bf16 tensor and the model's dtype is a
    mark (the node's ``stored_dtype`` reads it: tests/test_native.py's ``dynamic_lazy_fp8`` on ComfyUI's own lazy
    layers). The provider asks its owner for the dtype of the layer, not of the tensor, and then fetches the weight in
    fp8 for our fp8 matmul (reading the tensor's dtype turned it off: fp8_e4m3fn_fast ran cast to bf16, H100)."""
    from torch import nn

    from zimage_core.native import CastWeights

    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    linear = nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    linear.weight_comfy_model_dtype = torch.float8_e4m3fn
    asked = []

    def stored_dtype(module):
        asked.append(module)
        return module.weight_comfy_model_dtype

    provider = CastWeights(lambda *a: None, lambda *a: None, fp8_matmul=True, stored_dtype=stored_dtype)
    mode, dtype, *_ = provider._mode(linear, x)
    assert (mode, dtype) == ("fp8", torch.float8_e4m3fn) and asked == [linear]
    assert CastWeights(lambda *a: None, lambda *a: None)._mode(linear, x)[:2] == ("float", torch.bfloat16)  # default
    provider.fp8_matmul = False
    provider._modes.clear()
    assert provider._mode(linear, x)[:2] == ("float", torch.bfloat16)
