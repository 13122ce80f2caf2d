"""Precision guard with planted fp16 overflows. Real fp16 arithmetic on the CPU (torch runs fp16
matmul, conv and norms there), not an emulation."""

import pytest
import torch

from zimage_core import ZImage, ZImageError
from zimage_core.guard import PrecisionGuard, PrecisionOverflow
from zimage_core.weights import WeightOwner

KW = dict(seed=3, width=64, height=64, steps=4)
# weight -> scale. Each plant pushes an intermediate (SwiGLU product, conv output) past 65504 in fp16 while
# the block output stays in range: the transformer's FFN and the VAE's conv are followed by a norm, and the
# text encoder's down projection is scaled back down (Qwen3 adds the MLP output to the residual stream).
PLANTS = {
    "transformer": {"noise_refiner.0.feed_forward.w1": 400.0, "noise_refiner.0.feed_forward.w3": 400.0,
                    "layers.1.feed_forward.w1": 400.0, "layers.1.feed_forward.w3": 400.0},
    "text_encoder": {"layers.0.mlp.gate_proj": 400.0, "layers.0.mlp.up_proj": 400.0,
                     "layers.0.mlp.down_proj": 1 / 400.0},
    "vae": {"decoder.up_blocks.1.resnets.0.conv1": 50000.0},
}
PLANTED_BLOCKS = {
    "transformer": {"noise_refiner.0", "layers.1"},
    "text_encoder": {"layers.0"},
    "vae": {"decoder.up_blocks.1.resnets.0"},
}


def planted(tiny_dir, dtype, components=("transformer", "text_encoder", "vae")):
    """The tiny model with weights scaled so the planted blocks pass 65504 in fp16 (and not in fp32)."""
    zimage = ZImage.load(tiny_dir, device="cpu", dtype=dtype)
    with torch.no_grad():
        for component in components:
            model = getattr(zimage, component)
            for name, scale in PLANTS[component].items():
                model.get_submodule(name).weight.mul_(scale)
    return zimage


def rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def fp32_result(tiny_dir):
    return planted(tiny_dir, "fp32").generate("a planted overflow", **KW)


def test_planted_overflow_breaks_plain_fp16(tiny_dir, fp32_result):
    """Without the guard the overflow is an error naming where it began, never a black image."""
    assert torch.isfinite(fp32_result.latents).all() and torch.isfinite(fp32_result.images).all()
    with pytest.raises(ZImageError, match="text encoder gave NaN or Inf"):
        planted(tiny_dir, "fp16").generate("a planted overflow", **KW)
    with pytest.raises(ZImageError, match=r"latents became NaN/inf at step 1 of 4 \(transformer\).*precision guard"):
        planted(tiny_dir, "fp16", components=("transformer",)).generate("a planted overflow", **KW)


@pytest.mark.parametrize("component,where", [
    ("transformer", "transformer at step 1, block noise_refiner.0"),
    ("text_encoder", "text encoder, block layers.0"),
    ("vae", "vae, block decoder.up_blocks.1.resnets.0"),
])
def test_detect_names_component_step_and_block(tiny_dir, component, where):
    zimage = planted(tiny_dir, "fp16", components=(component,))
    zimage.set_precision_guard("detect")
    with pytest.raises(PrecisionOverflow, match=f"fp16 overflow in the {where}.*'auto'"):
        zimage.generate("a planted overflow", **KW)


def test_auto_repairs_just_the_planted_blocks_and_matches_fp32(tiny_dir, fp32_result):
    zimage = planted(tiny_dir, "fp16")
    guard = zimage.set_precision_guard("auto")
    first = zimage.generate("a planted overflow", **KW)
    assert torch.isfinite(first.latents).all() and torch.isfinite(first.images).all()
    assert rel_l2(first.latents, fp32_result.latents) <= 1e-2
    assert (first.images - fp32_result.images).abs().max() <= 2 / 255 * 4
    sticky = first.report["sticky"]
    assert {c: set(b) for c, b in sticky.items()} == PLANTED_BLOCKS
    assert all(d == "bf16" for blocks in sticky.values() for d in blocks.values())  # the CPU has bf16
    assert {e["action"] for e in first.report["events"]} == {"fell back"}
    probes = guard.probe_runs
    assert probes >= 3  # one re-run per component at least

    zimage.prompt_encoder.clear_cache()
    second = zimage.generate("a planted overflow", **KW)
    assert guard.probe_runs == probes, "the second run must do no detection work for sticky blocks"
    assert second.report["events"] == []
    assert torch.equal(second.latents, first.latents)


def test_sticky_blocks_survive_a_new_guard(tiny_dir):
    zimage = planted(tiny_dir, "fp16", components=("transformer",))
    zimage.set_precision_guard("auto")
    zimage.generate("x", **KW)
    guard = zimage.set_precision_guard("auto")  # e.g. the node re-applies the policy
    result = zimage.generate("x", **KW)
    assert guard.probe_runs == 0 and set(result.report["sticky"]["transformer"]) == PLANTED_BLOCKS["transformer"]


def test_escalates_to_fp32_when_bf16_overflows_too(tiny_dir, monkeypatch):
    zimage = planted(tiny_dir, "fp16", components=("transformer",))
    guard = zimage.set_precision_guard("auto")
    zimage.generate("x", **KW)
    real_copy = WeightOwner.high_precision_copy

    def copy_that_overflows_in_bf16(self, name, module, dtype):
        clone = real_copy(self, name, module, dtype)
        if dtype == torch.bfloat16 and name == "layers.1":
            with torch.no_grad():  # the bf16 copy's FFN now overflows, in the fast path and in the module's forward
                clone.feed_forward.w2.weight.fill_(float("inf"))
        return clone

    monkeypatch.setattr(WeightOwner, "high_precision_copy", copy_that_overflows_in_bf16)
    WeightOwner.of(zimage.transformer).drop_copies()  # the bf16 copy made by the first run is made again
    result = zimage.generate("x", **KW)
    assert torch.isfinite(result.latents).all()
    assert result.report["sticky"]["transformer"] == {"noise_refiner.0": "bf16", "layers.1": "fp32"}
    assert [e["action"] for e in result.report["events"]] == ["escalated"]
    assert guard.fallback == torch.bfloat16


def test_clamp_is_finite_but_lossy(tiny_dir, fp32_result):
    zimage = planted(tiny_dir, "fp16")
    zimage.set_precision_guard("clamp")
    clamped = zimage.generate("a planted overflow", **KW)
    auto = planted(tiny_dir, "fp16")
    auto.set_precision_guard("auto")
    repaired = auto.generate("a planted overflow", **KW)
    assert torch.isfinite(clamped.latents).all()
    clamp_err, auto_err = rel_l2(clamped.latents, fp32_result.latents), rel_l2(repaired.latents, fp32_result.latents)
    # Measured on these plants: clamp 0.15 relative L2 from fp32, auto 3.5e-3 (bf16 blocks).
    assert clamp_err > 0.05 and clamp_err > 10 * auto_err
    assert "lossy" in clamped.report["summary"]


def test_no_overflow_costs_one_check_per_step(tiny_dir):
    zimage = ZImage.load(tiny_dir, device="cpu", dtype="fp16")
    guard = zimage.set_precision_guard("auto")
    result = zimage.generate("clean", **KW)
    # prompt encode + caption refine + 4 steps + decode, one finiteness check each; no re-runs.
    assert guard.checks == 1 + 1 + KW["steps"] + 1 and guard.probe_runs == 0
    assert result.report["summary"] == "auto: no overflow"


def test_step_checks_are_read_one_step_late(tiny_dir, monkeypatch):
    """The host reads step i's finiteness only once step i+1 is queued, so the GPU never waits for it."""
    zimage = ZImage.load(tiny_dir, device="cpu", dtype="fp16")
    guard = zimage.set_precision_guard("auto")
    order = []
    forward, settle = zimage.denoiser.forward, guard._settle
    monkeypatch.setattr(zimage.denoiser, "forward", lambda *a: order.append("run") or forward(*a))
    monkeypatch.setattr(guard, "_settle", lambda pending: order.append(f"check {pending[0]}") or settle(pending))
    zimage.generate("clean", **KW)
    assert order == ["run", "run", "check 0", "run", "check 1", "run", "check 2", "check 3"]


def test_non_finite_step_is_run_again_from_its_input(tiny_dir):
    """Found one step late, the overflowing step is run again from the latents it started from; the callback
    sees it twice, and the result is the repaired one."""
    zimage = planted(tiny_dir, "fp16", components=("transformer",))
    guard = zimage.set_precision_guard("auto")
    seen = []
    result = zimage.generate("a planted overflow", callback=lambda info: seen.append(info.step), **KW)
    assert seen == [0, 0, 1, 2, 3]
    assert guard.probe_runs == 1 and set(guard.sticky()["transformer"]) == PLANTED_BLOCKS["transformer"]
    fp32 = planted(tiny_dir, "fp32", components=("transformer",)).generate("a planted overflow", **KW)
    assert torch.isfinite(result.latents).all() and rel_l2(result.latents, fp32.latents) <= 1e-2


def test_overflow_in_the_last_step_is_caught_after_the_loop(tiny_dir):
    """With one step there is no next step to read the check under: it is read after the loop."""
    kw = dict(KW, steps=1)
    zimage = planted(tiny_dir, "fp16", components=("transformer",))
    guard = zimage.set_precision_guard("auto")
    result = zimage.generate("a planted overflow", **kw)
    fp32 = planted(tiny_dir, "fp32", components=("transformer",)).generate("a planted overflow", **kw)
    assert guard.probe_runs == 1 and torch.isfinite(result.latents).all()
    assert rel_l2(result.latents, fp32.latents) <= 1e-2


def test_sticky_blocks_run_in_the_fast_block_function(tiny_dir, monkeypatch):
    """Outside a probe, a sticky block runs the fast (compilable) block function on its bf16 copy's weights,
    not diffusers' block forward, and gives the same latents as the probe's module forward did."""
    zimage = planted(tiny_dir, "fp16", components=("transformer",))
    zimage.set_precision_guard("auto")
    first = zimage.generate("x", **KW)
    fast_calls = []
    block = zimage.denoiser._block
    monkeypatch.setattr(zimage.denoiser, "_block", lambda *a: fast_calls.append(a[0].dtype) or block(*a))
    second = zimage.generate("x", **KW)
    t = zimage.transformer
    assert len(fast_calls) == KW["steps"] * (len(t.noise_refiner) + len(t.layers))
    assert fast_calls.count(torch.bfloat16) == KW["steps"] * len(PLANTED_BLOCKS["transformer"])
    assert rel_l2(second.latents, first.latents) <= 1e-3


def test_step_graph_key_follows_a_sticky_block_escalated_to_fp32(tiny_dir):
    """A captured step graph replays the copy it captured, so escalating a sticky block from bf16 to fp32 must
    select another graph."""
    from zimage_core.cuda_graphs import StepGraphs

    zimage = ZImage.load(tiny_dir, device="cpu", dtype="fp16")
    graphs = StepGraphs(zimage.denoiser)
    ctx = zimage.denoiser.prepare(zimage.encode_prompt("x"))
    latents = torch.zeros(1, 16, 8, 8)
    owner = WeightOwner.of(zimage.transformer)
    plain = graphs._key(ctx, latents)
    owner.set_sticky("layers.1", torch.bfloat16)
    in_bf16 = graphs._key(ctx, latents)
    owner.set_sticky("layers.1", torch.float32)
    in_fp32 = graphs._key(ctx, latents)
    assert len({plain, in_bf16, in_fp32}) == 3


def test_step_graphs_capture_from_the_second_generation_of_a_key(tiny_dir, monkeypatch):
    """A key's first generation runs eagerly throughout (the first image pays no extra warm-up step and no
    recording); the next generation with the same key captures at its first step."""
    from zimage_core import cuda_graphs

    zimage = ZImage.load(tiny_dir, device="cpu", dtype="fp32")
    denoiser = zimage.denoiser
    graphs = denoiser.graphs = cuda_graphs.StepGraphs(denoiser)  # as on CUDA (the CPU builds none)
    captures = []

    def fake_capture(fn, *inputs, pool=None):  # a "graph" that recomputes into its static output, as replay does
        captures.append(len(inputs))
        out = fn(*inputs)
        return _Replay(fn, inputs, out), out

    class _Replay:
        def __init__(self, fn, inputs, out):
            self.fn, self.inputs, self.out = fn, inputs, out

        def replay(self):
            self.out.copy_(self.fn(*self.inputs))

    monkeypatch.setattr(cuda_graphs, "_capture", fake_capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    feats = zimage.encode_prompt("x")
    latents, t = torch.randn(1, 16, 8, 8), torch.full((1,), 0.5)
    first = denoiser.prepare(feats)
    eager = [denoiser(first, latents, t) for _ in range(3)]
    assert captures == []  # the whole first generation ran eagerly
    second = denoiser.prepare(feats)
    replayed = denoiser(second, latents, t)
    assert captures == [2] and not graphs.failed
    other = torch.randn(1, 16, 8, 8)
    again = denoiser(second, other, t)  # new values through the static inputs
    assert captures == [2]  # captured once, replayed after
    assert torch.equal(replayed, eager[0])
    assert torch.allclose(again, zimage.denoiser._forward(second, other, t), atol=1e-6)
