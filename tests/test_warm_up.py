"""The warm-up at load (fast_denoiser.py): start-up work done in a thread before the first image, which waits for it
and is computed exactly as without it; a failed warm-up costs nothing but its log line; under compile the block is
traced in the warm-up and the first image traces nothing more."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from zimage_core import SpeedOptions, ZImage, fast_denoiser

KW = dict(seed=3, width=64, height=64, steps=2, decode=False)


@pytest.fixture
def fresh(monkeypatch):
    """No warm-up of this process is taken as done; the warm-up runs on the CPU too."""
    monkeypatch.setattr(fast_denoiser, "_WARM_UPS", {})
    monkeypatch.setattr(fast_denoiser, "_PROCESS_WARM_UPS", {})
    monkeypatch.setenv(fast_denoiser.WARM_UP_ENV, "1")


def _reference(tiny_dir, monkeypatch, speed=None):
    monkeypatch.setenv(fast_denoiser.WARM_UP_ENV, "0")
    z = ZImage.load(tiny_dir, device="cpu", dtype="fp32", speed=speed)
    assert not fast_denoiser._WARM_UPS and not fast_denoiser._PROCESS_WARM_UPS
    out = z.generate("a red fox", **KW).latents
    monkeypatch.setenv(fast_denoiser.WARM_UP_ENV, "1")
    return out


def test_not_on_the_cpu_by_default_nor_when_turned_off(tiny_dir, monkeypatch):
    monkeypatch.setattr(fast_denoiser, "_WARM_UPS", {})
    monkeypatch.setattr(fast_denoiser, "_PROCESS_WARM_UPS", {})
    monkeypatch.delenv(fast_denoiser.WARM_UP_ENV, raising=False)
    z = ZImage.load(tiny_dir, device="cpu", dtype="fp32")
    assert z.denoiser.start_warm_up() is None
    assert fast_denoiser.start_process_warm_up("cpu", torch.float32) is None
    monkeypatch.setenv(fast_denoiser.WARM_UP_ENV, "0")
    assert z.denoiser.start_warm_up() is None and not fast_denoiser._WARM_UPS
    assert not fast_denoiser._PROCESS_WARM_UPS


def test_not_with_a_backend_that_switches_sdpa_for_the_whole_process(tiny_dir, fresh):
    """``sdpa_kernel`` sets process-wide flags: in the warm-up's thread it would switch the backends of the text
    encoder or the VAE running meanwhile (flash alone refuses their masks)."""
    z = ZImage.load(tiny_dir, device="cpu", dtype="fp32", speed=SpeedOptions(attention="math"))
    assert z.denoiser.start_warm_up() is None and not fast_denoiser._WARM_UPS
    auto = ZImage.load(tiny_dir, device="cpu", dtype="fp32")
    assert auto.denoiser.start_warm_up() is not None
    auto.denoiser.wait_warm_up()  # done before the next test looks at its log


@pytest.mark.parametrize("compile", [False, True])
def test_load_starts_the_weight_free_part_first_and_the_model_part_waits_for_it(tiny_dir, fresh, monkeypatch, caplog,
                                                                                compile):
    order: list[str] = []
    process_part = fast_denoiser._process_warm_up
    model_part = fast_denoiser.FastDenoiser._warm_up
    from zimage_core import loading

    read = loading.load_component

    def reading(*args, **kwargs):
        order.append("read " + args[0])
        return read(*args, **kwargs)

    def process(*args):
        order.append("process start")
        process_part(*args)
        order.append("process done")

    def model(self, *args):
        model_part(self, *args)
        order.append("model done")

    monkeypatch.setattr(loading, "load_component", reading)
    monkeypatch.setattr(fast_denoiser, "_process_warm_up", process)
    monkeypatch.setattr(fast_denoiser.FastDenoiser, "_warm_up", model)
    with caplog.at_level(logging.INFO, logger="zimage_core.fast_denoiser"):
        z = ZImage.load(tiny_dir, device="cpu", dtype="fp32", speed=SpeedOptions(compile=compile))
        z.denoiser.wait_warm_up()
    ours = [r for r in caplog.records if r.name == "zimage_core.fast_denoiser"]
    assert [r.getMessage() for r in ours if r.levelno >= logging.WARNING] == []
    assert sum("warm-up" in r.getMessage() and "done" in r.getMessage() for r in ours) == 2
    assert "process start" in order and order.index("process start") < order.index("read transformer")
    assert order.index("process done") < order.index("model done"), order
    assert len(fast_denoiser._PROCESS_WARM_UPS) == 1 and len(fast_denoiser._WARM_UPS) == 1


def test_first_image_waits_for_the_warm_up_and_is_computed_as_without_it(tiny_dir, fresh, monkeypatch):
    reference = _reference(tiny_dir, monkeypatch)
    monkeypatch.setenv(fast_denoiser.WARM_UP_ENV, "0")
    z = ZImage.load(tiny_dir, device="cpu", dtype="fp32")  # loaded without; its warm-up started by hand below
    monkeypatch.setenv(fast_denoiser.WARM_UP_ENV, "1")
    calls: list[str] = []
    main_waits = threading.Event()
    block = z.denoiser._block

    def recording_block(*args):
        if threading.current_thread().name == "zimage-warm-up":
            main_waits.wait()  # the warm-up goes on only once the first call is waiting for it
        calls.append(threading.current_thread().name)
        return block(*args)

    z.denoiser._block = recording_block
    wait = z.denoiser.wait_warm_up

    def signalling_wait():
        main_waits.set()
        wait()

    z.denoiser.wait_warm_up = signalling_wait
    thread = z.denoiser.start_warm_up()
    assert thread is not None and thread.is_alive()
    try:
        out = z.generate("a red fox", **KW).latents
    finally:
        main_waits.set()
        thread.join()
    warm = calls.count("zimage-warm-up")
    assert warm == len(z.denoiser.names) and calls[:warm] == ["zimage-warm-up"] * warm, calls[:warm + 1]
    assert torch.equal(out, reference)
    assert z.denoiser.start_warm_up() is thread, "a second warm-up of the same kind in one process"


def test_a_failed_warm_up_is_one_log_line_and_changes_nothing(tiny_dir, fresh, monkeypatch, caplog):
    reference = _reference(tiny_dir, monkeypatch)

    def broken(self, *args):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(fast_denoiser.TransformerWeights, "block", broken)  # only the warm-up asks before sampling
    with caplog.at_level(logging.WARNING, logger="zimage_core.fast_denoiser"):
        z = ZImage.load(tiny_dir, device="cpu", dtype="fp32")
        z.denoiser.wait_warm_up()
    monkeypatch.undo()
    monkeypatch.setenv(fast_denoiser.WARM_UP_ENV, "0")
    failed = [r for r in caplog.records if "warm-up failed" in r.getMessage()]
    assert len(failed) == 1 and "out of memory" in failed[0].getMessage()
    assert torch.equal(z.generate("a red fox", **KW).latents, reference)


def test_compiled_block_is_traced_by_the_warm_up_and_not_again(tiny_dir, fresh, monkeypatch):
    import torch._dynamo

    reference = _reference(tiny_dir, monkeypatch)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    z = ZImage.load(tiny_dir, device="cpu", dtype="fp32", speed=SpeedOptions(compile=True))
    z.denoiser.wait_warm_up()
    traced = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert traced == 1, "the warm-up did not compile the block"
    out = z.generate("a red fox", **KW).latents
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == traced, "the first image traced again"
    assert (out - reference).abs().max().item() <= 1e-5


def test_what_moves_or_changes_the_weights_waits_for_running_warm_ups_first(tiny_dir, fresh, monkeypatch):
    """A warm-up reading a block while its weights move could fuse them again in the wrong place: loading (which may
    take a model over), offload, LoRA merges and release wait for running warm-ups before they touch the weights."""
    from zimage_core import pipeline

    events: list[str] = []
    real = fast_denoiser.wait_warm_ups
    monkeypatch.setattr(pipeline, "wait_warm_ups", lambda: (events.append("wait"), real()))
    z = ZImage.load(tiny_dir, device="cpu", dtype="fp32")
    assert events == ["wait"]
    offloader = z.offloader
    for method in ("apply", "finish", "detach"):
        original = getattr(offloader, method)
        monkeypatch.setattr(offloader, method, lambda *a, _m=method, _o=original: (events.append(_m), _o(*a)))
    z.set_offload("model")
    out_features, in_features = z.transformer.layers[0].attention.to_out[0].weight.shape
    z.load_lora({"diffusion_model.layers.0.attention.out.lora_up.weight": torch.full((out_features, 2), 0.01),
                 "diffusion_model.layers.0.attention.out.lora_down.weight": torch.full((2, in_features), 0.01)})
    z.release()
    assert events == ["wait", "wait", "apply", "wait", "finish", "wait", "detach"], events


class _Stop(Exception):
    pass


class _NoModel:
    """A diffusion model our path may not reach: touching its blocks ends the call (the test's probe)."""

    @property
    def layers(self):
        raise _Stop


def test_accelerate_starts_its_warm_up_after_comfyuis_first_call_and_never_waits_for_it(monkeypatch):
    from zimage_core import native

    waited = []
    monkeypatch.setattr(fast_denoiser, "wait_warm_ups", lambda: waited.append(True))
    release = threading.Event()
    loading = threading.Thread(target=release.wait)
    order = []

    def start():  # the armed warm-up (start_kernel_warm_up on CUDA)
        order.append("warm-up started")
        loading.start()
        return loading

    try:
        accel = native.NativeAccelerator()
        accel._warm_up_start = start
        # the first call is ComfyUI's own (it loads the weights); the warm-up starts as it returns
        assert accel.call(_NoModel(), lambda: order.append("comfyui") or "latents") == "latents"
        assert order == ["comfyui", "warm-up started"]
        # while the warm-up runs: ComfyUI's blocks again, no wait, counted and said in the log
        assert accel.call(_NoModel(), lambda: order.append("comfyui") or "latents") == "latents"
        assert order[2:] == ["comfyui"] and not waited
        assert accel.report()["warming_calls"] == 2 and accel.report()["fast_blocks"] == 0
        line = accel.summary("")
        assert "the first 2 transformer call(s) ran ComfyUI's own blocks before our kernels were ready" in line
        # a precision guard's checks were asked for on every call: it starts the warm-up and waits for it
        guarded = native.NativeAccelerator(guard="detect")
        started = []
        guarded._warm_up_start = lambda: started.append(True)
        with pytest.raises(_Stop):
            guarded.call(_NoModel(), lambda: order.append("comfyui"))
        assert started == [True] and waited == [True] and guarded.warming_calls == 0 and len(order) == 3
    finally:
        release.set()
        loading.join()
    # once loaded, the next call goes to our blocks
    with pytest.raises(_Stop):
        accel.call(_NoModel(), lambda: order.append("comfyui"))
    assert len(order) == 3 and accel._warm_up is None
    accel.reset_counts()
    assert accel.report()["warming_calls"] == 0


def test_accelerate_arms_no_warm_up_where_none_would_run(monkeypatch):
    """On the CPU (no Triton kernels there) the first call is ours, as every later one."""
    from zimage_core import native

    monkeypatch.delenv(fast_denoiser.WARM_UP_ENV, raising=False)
    block = native_block_stub()
    accel = native.NativeAccelerator()
    accel.start_warm_up(block, "cpu", torch.float32)
    assert accel._warm_up_start is None and accel._warm_up is None


def native_block_stub():
    """What ``start_warm_up`` reads of a diffusion model: the first block's sizes."""
    block = torch.nn.Module()
    block.attention_norm1 = torch.nn.LayerNorm(64)
    block.feed_forward = torch.nn.Module()
    block.feed_forward.w1 = torch.nn.Linear(64, 176, bias=False)
    block.attention = torch.nn.Module()
    block.attention.n_local_heads = 2
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([block])
    return model


def test_a_first_call_that_fails_still_starts_the_warm_up_and_raises(monkeypatch):
    """An interrupted first sampling (ComfyUI's cancel raises inside the call) leaves no armed warm-up behind."""
    from zimage_core import native

    started = []
    accel = native.NativeAccelerator()
    accel._warm_up_start = lambda: started.append(True)  # returns None: as a warm-up that is done at once

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        accel.call(_NoModel(), interrupted)
    assert started == [True] and accel._warm_up_start is None and accel.warming_calls == 1
    with pytest.raises(_Stop):  # the next call is ours
        accel.call(_NoModel(), interrupted)


def test_warm_up_due_after_a_short_schedules_last_call_or_a_long_ones_first():
    """``warm_up_due`` reads the schedule's length from ComfyUI's ``sample_sigmas`` (steps + 1 sigmas)."""
    from zimage_core.native import EARLY_WARM_UP_STEPS, warm_up_due

    def options(steps):
        return {"sample_sigmas": torch.linspace(1, 0, steps + 1)}

    assert [warm_up_due(options(8), call) for call in range(1, 9)] == [False] * 7 + [True]
    assert warm_up_due(options(9), 9) and warm_up_due(options(8), 12)  # two calls a step: from half way
    long = EARLY_WARM_UP_STEPS + 1
    assert warm_up_due(options(long), 1) and not warm_up_due(options(long - 1), 1)
    for unknown in (None, {}, {"sample_sigmas": None}, {"sample_sigmas": [1.0, 0.0]}):
        assert warm_up_due(unknown, 1)  # no schedule: after the first call, as before
