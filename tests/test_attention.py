"""``auto`` attention's rent-or-buy of cuDNN's per-shape plan (zimage_core/attention.py), on the CPU: the decision
is shapes and counts only (meta tensors), the switch is SDPA's process-wide cuDNN flag."""

import math
import threading

import pytest
import torch
import torch.nn.functional as F

from zimage_core import attention as attn

JOINT = (1, 30, 4096 + 128, 128)  # a 1024² image and a 128-token prompt: the 30 main blocks' attention


def meta(shape, dtype=torch.bfloat16):
    return torch.empty(shape, device="meta", dtype=dtype)


@pytest.fixture(autouse=True)
def fresh_counts():
    attn._RENTED.__dict__.clear()
    yield
    attn._RENTED.__dict__.clear()


def calls_to_buy(shape) -> int:
    """How many calls of a [B, heads, S, head_dim] self-attention shape rent, from the module's constants."""
    flops = 4.0 * math.prod(shape) * shape[2]
    return math.ceil(attn.PLAN_COST_S / (flops * attn.LOST_S_PER_FLOP))


def rented_calls(q, k=None, v=None, mask=None, limit=100_000) -> int:
    k, v = q if k is None else k, q if v is None else v
    for n in range(limit):
        if not attn.rent_plan(q, k, v, mask):
            return n
    raise AssertionError(f"still renting after {limit} calls")


def test_a_shape_rents_until_its_lost_time_reaches_one_plan():
    q = meta(JOINT)
    expected = calls_to_buy(JOINT)
    assert rented_calls(q) == expected
    # within the first 8-step image (30 blocks a step at the joint length), after a few steps (the design)
    assert 3 * 30 < expected < 8 * 30
    assert not attn.rent_plan(q, q, q, None)  # bought: stays bought


def test_small_shapes_rent_far_longer_and_each_shape_counts_alone():
    big, small = meta(JOINT), meta((1, 30, 128, 128))
    for _ in range(10):
        assert attn.rent_plan(small, small, small, None)
    n_big = rented_calls(big)
    for _ in range(2 * n_big):  # the big shape's purchase says nothing about this one: it still rents
        assert attn.rent_plan(small, small, small, None)
    # another layout (strides) or dtype is another cuDNN plan
    assert attn.rent_plan(meta(JOINT).transpose(1, 2).contiguous().transpose(1, 2), big, big, None)
    assert attn.rent_plan(meta(JOINT, torch.float16), meta(JOINT, torch.float16), meta(JOINT, torch.float16), None)


def test_counts_are_per_thread_as_cudnn_plans_are():
    q = meta(JOINT)
    rented_calls(q)
    assert not attn.rent_plan(q, q, q, None)
    seen = []
    worker = threading.Thread(target=lambda: seen.append(attn.rent_plan(q, q, q, None)))
    worker.start()
    worker.join()
    assert seen == [True]


def test_compiled_code_and_warm_up_threads_never_rent(monkeypatch):
    q = meta(JOINT)
    seen = []
    warm_up = threading.Thread(target=lambda: seen.append(attn.rent_plan(q, q, q, None)), name=attn.WARM_UP_THREAD)
    warm_up.start()
    warm_up.join()
    assert seen == [False]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not attn.rent_plan(q, q, q, None)


def test_a_rented_call_runs_sdpa_without_cudnn_and_restores_the_flag(monkeypatch):
    states = []
    real = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        states.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(attn.F, "scaled_dot_product_attention", recording)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    mask = torch.rand(1, 1, 1, 16, generator=torch.Generator().manual_seed(3)) > 0.3
    was = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        out = attn.sdpa_without_cudnn(q, k, v, mask)
        assert states == [False] and torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.equal(out, real(q, k, v, attn_mask=mask))
        # a user who turned cuDNN off keeps it off
        torch.backends.cuda.enable_cudnn_sdp(False)
        attn.sdpa_without_cudnn(q, k, v, None)
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        # restored when the call raises, too
        torch.backends.cuda.enable_cudnn_sdp(True)
        with pytest.raises(RuntimeError):
            attn.sdpa_without_cudnn(q, k[..., :4], v, None)
        assert torch.backends.cuda.cudnn_sdp_enabled()
        # CPU tensors never switch (no cuDNN attention there): auto is plain SDPA
        states.clear()
        attn.attention(q, k, v, None, "auto")
        assert states == [True] and attn._RENTED.__dict__ == {}
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


def test_work_captured_into_a_cuda_graph_buys_the_plans_at_once(monkeypatch):
    """A graph keeps the kernel of capture time for every replay: ``_capture``'s warm-up and capture rent nothing."""
    import contextlib

    from zimage_core import cuda_graphs

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", lambda g, pool=None: contextlib.nullcontext())
    q = meta(JOINT)
    seen = []
    cuda_graphs._capture(lambda x: seen.append(attn.rent_plan(x, x, x, None)), q)
    assert seen == [False, False]  # the warm-up pass (builds the plan) and the captured pass
    assert not attn.rent_plan(q, q, q, None)  # outside the capture, that shape's plan is bought
    other = meta((1, 30, 4096, 128))
    assert attn.rent_plan(other, other, other, None)  # another shape rents
    with attn.plans_bought():
        with attn.plans_bought():
            pass
        assert not attn.rent_plan(other, other, other, None)  # nested: the outer one still buys
    assert not attn.rent_plan(other, other, other, None)


def test_auto_on_cuda_runs_a_rented_call_without_cudnn(monkeypatch):
    """The dispatch itself: ``auto`` on a CUDA tensor asks ``rent_plan`` and runs the rented call without cuDNN;
    other backends and bought shapes go straight to SDPA."""

    class OnCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True

    calls = []
    monkeypatch.setattr(attn, "sdpa_without_cudnn", lambda q, k, v, m: calls.append("rented") or "rented")
    monkeypatch.setattr(attn.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append("sdpa") or "sdpa")
    q = torch.Tensor._make_subclass(OnCuda, torch.zeros(JOINT, dtype=torch.bfloat16))
    assert q.is_cuda
    n = calls_to_buy(JOINT)
    results = [attn.attention(q, q, q, None, "auto") for _ in range(n + 2)]
    assert results == ["rented"] * n + ["sdpa"] * 2
    calls.clear()
    fresh = torch.Tensor._make_subclass(OnCuda, torch.zeros(1, 30, 4096, 128, dtype=torch.bfloat16))
    assert attn.attention(fresh, fresh, fresh, None, "sdpa") == "sdpa" and calls == ["sdpa"]
