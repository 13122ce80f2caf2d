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
    assert attn.shapes_bought() == 0
    assert rented_calls(q) == expected
    assert attn.shapes_bought() == 1
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
    assert attn.shapes_bought() == 1
    # another layout (strides) or dtype is another cuDNN plan
    assert attn.rent_plan(meta(JOINT).transpose(1, 2).contiguous().transpose(1, 2), big, big, None)
    assert attn.rent_plan(meta(JOINT, torch.float16), meta(JOINT, torch.float16), meta(JOINT, torch.float16), None)


def test_counts_are_per_thread_as_cudnn_plans_are():
    q = meta(JOINT)
    rented_calls(q)
    assert not attn.rent_plan(q, q, q, None)
    seen = []
    worker = threading.Thread(target=lambda: seen.append((attn.shapes_bought(), attn.rent_plan(q, q, q, None))))
    worker.start()
    worker.join()
    assert seen == [(0, True)] and attn.shapes_bought() == 1


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


class OnCuda(torch.Tensor):
    @property
    def is_cuda(self):
        return True


def on_cuda(shape):
    return torch.Tensor._make_subclass(OnCuda, torch.zeros(shape, dtype=torch.bfloat16))


@pytest.fixture
def dispatch(monkeypatch):
    """``attention``'s three ways out recorded: rented (no cuDNN), cuDNN first, plain SDPA."""
    calls = []
    monkeypatch.setattr(attn, "sdpa_without_cudnn", lambda q, k, v, m: calls.append("rented") or "rented")
    monkeypatch.setattr(attn, "sdpa_cudnn_first", lambda q, k, v, m: calls.append("cudnn") or "cudnn")
    monkeypatch.setattr(attn.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append("sdpa") or "sdpa")
    monkeypatch.setattr(attn, "cudnn_preferred", lambda device: True)
    return calls


def test_auto_on_cuda_rents_then_buys_cudnn_explicitly(dispatch):
    """The dispatch itself: ``auto`` on a CUDA tensor asks ``rent_plan``, runs the rented calls without cuDNN and
    the later ones with cuDNN put first (not PyTorch's pick of the moment: flash once ComfyUI's attention ran)."""
    q = on_cuda(JOINT)
    assert q.is_cuda
    n = calls_to_buy(JOINT)
    results = [attn.attention(q, q, q, None, "auto") for _ in range(n + 2)]
    assert results == ["rented"] * n + ["cudnn"] * 2
    dispatch.clear()
    fresh = on_cuda((1, 30, 4096, 128))
    assert attn.attention(fresh, fresh, fresh, None, "sdpa") == "cudnn" and dispatch == ["cudnn"]  # no renting
    dispatch.clear()
    assert attn.attention(fresh, fresh, fresh, None, "flash") == "sdpa"  # pinned backends: their context decides
    cpu = torch.zeros(1, 2, 16, 8)
    assert attn.attention(cpu, cpu, cpu, None, "auto") == "sdpa" and attn.attention(cpu, cpu, cpu, None, "sdpa")
    assert dispatch == ["sdpa"] * 3


def test_where_pytorch_does_not_prefer_cudnn_auto_is_its_pick_and_counts_nothing(dispatch, monkeypatch):
    monkeypatch.setattr(attn, "cudnn_preferred", lambda device: False)
    q = on_cuda(JOINT)
    assert [attn.attention(q, q, q, None, b) for b in ("auto", "sdpa", "auto")] == ["sdpa"] * 3
    assert attn._RENTED.__dict__ == {}


def test_compiled_code_and_warm_up_threads_never_switch_backends(dispatch, monkeypatch):
    q = on_cuda(JOINT)
    seen = []
    thread = threading.Thread(target=lambda: seen.extend(attn.attention(q, q, q, None, b) for b in ("auto", "sdpa")),
                              name=attn.WARM_UP_THREAD)
    thread.start()
    thread.join()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    seen += [attn.attention(q, q, q, None, b) for b in ("auto", "sdpa")]
    assert seen == ["sdpa"] * 4


def test_cudnn_first_orders_the_backends_for_the_call_and_restores_them(monkeypatch):
    """``sdpa_cudnn_first``: inside, cuDNN first and all four backends on; after (and after an error), the backends
    it found on, in the order it found them, and one the user had turned off stays off (PyTorch's context moves a
    disabled backend to the end of its order: no backend runs in another order for it)."""
    from torch.nn.attention import SDPBackend as B

    cuda = torch.backends.cuda
    enabled = {int(B.FLASH_ATTENTION): cuda.flash_sdp_enabled, int(B.CUDNN_ATTENTION): cuda.cudnn_sdp_enabled,
               int(B.EFFICIENT_ATTENTION): cuda.mem_efficient_sdp_enabled, int(B.MATH): cuda.math_sdp_enabled}

    def effective():  # the backends SDPA may run, in the order it tries them
        return [b for b in torch._C._get_sdp_priority_order() if b in enabled and enabled[b]()]

    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(attn.F, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append(effective()) or real(*a, **kw))
    q, k, v = (torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    was = cuda.mem_efficient_sdp_enabled()
    try:
        cuda.enable_mem_efficient_sdp(False)
        before = effective()
        assert int(B.EFFICIENT_ATTENTION) not in before
        out = attn.sdpa_cudnn_first(q, k, v, None)
        assert seen == [[int(b) for b in (B.CUDNN_ATTENTION, B.FLASH_ATTENTION, B.EFFICIENT_ATTENTION, B.MATH)]]
        assert torch.equal(out, real(q, k, v))
        assert effective() == before
        with pytest.raises(RuntimeError):
            attn.sdpa_cudnn_first(q, k[..., :4], v, None)
        assert effective() == before
    finally:
        cuda.enable_mem_efficient_sdp(was)


@pytest.mark.parametrize("capability, version, env, preferred", [
    ((9, 0), 91900, None, True),  # H100, H200, cuDNN 9.19 (the lent machine's)
    ((10, 0), 91501, None, True),  # B200
    ((10, 3), 91600, None, True),
    ((9, 0), 91500, None, False),  # before 9.15.1's fix for lengths not a multiple of 128
    ((9, 0), 91900, "1", False),  # PyTorch's own switch
    ((9, 0), 91900, "0", True),
    ((8, 9), 91900, None, False),  # RTX 40xx, L4: flash
    ((8, 0), 91900, None, False),  # A100
    ((12, 0), 91900, None, False),  # RTX 50xx
    ((9, 0), None, None, False),  # no cuDNN
])
def test_cudnn_preferred_follows_pytorchs_rule(monkeypatch, capability, version, env, preferred):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: version is not None)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: version)
    if env is None:
        monkeypatch.delenv("TORCH_CUDNN_SDPA_DEPRIORITIZED", raising=False)
    else:
        monkeypatch.setenv("TORCH_CUDNN_SDPA_DEPRIORITIZED", env)
    assert attn.cudnn_preferred.__wrapped__(torch.device("cuda", 0)) is preferred
