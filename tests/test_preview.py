"""Latent previews of the sampler (nodes/preview.py) inside ComfyUI, against ComfyUI's own KSampler callback.

ComfyUI runs in subprocesses (this file as a script), one per ``--preview-method`` given on its command line, so
its modules never enter the pytest process. Each feeds the same step infos to our callback and the same x0 to
ComfyUI's ``latent_preview.prepare_callback``, and records what ComfyUI's progress hook received.

    python tests/test_preview.py COMFY_ROOT OUT_DIR PREVIEW_METHOD
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
LATENT = (2, 16, 6, 10)  # batch 2, a 48x80-pixel image: previews show the first image only


class Untouchable:
    """A stand-in for a tensor that fails on any use: proves that no preview work was done."""

    def __getattr__(self, name):
        raise AssertionError(f"preview work with previews off: .{name}")


def comfy_run(root: Path, out: Path, method: str) -> None:
    os.chdir(root)
    sys.path.insert(0, str(root))
    sys.argv = ["main.py", "--cpu", "--preview-method", method]
    import comfy.options

    comfy.options.enable_args_parsing()
    import utils.install_util  # noqa: F401  (before nodes, as main.py does)
    import comfy.latent_formats
    import comfy.model_management
    import comfy.utils
    import folder_paths
    import latent_preview
    import numpy as np
    import torch
    from comfy.cli_args import LatentPreviewMethod, args
    from comfy.taesd.taesd import TAESD
    from safetensors.torch import save_file

    for name in ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT"):  # ComfyUI 0.33 throttles
        if hasattr(comfy.utils, name):
            setattr(comfy.utils, name, 0)
    # a TAESD decoder for the Flux latent format (random weights) where ComfyUI looks for taef1_decoder
    approx = out / "vae_approx"
    approx.mkdir()
    torch.manual_seed(0)
    save_file(TAESD(latent_channels=16).taesd_decoder.state_dict(), str(approx / "taef1_decoder.safetensors"))
    folder_paths.add_model_folder_path("vae_approx", str(approx))

    spec = importlib.util.spec_from_file_location("zturbo_nodes_preview", REPO / "nodes" / "preview.py")
    preview = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preview)

    events = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, image, node_id=None: events.append((value, total, image)))
    g = torch.Generator().manual_seed(5)
    latents = [torch.randn(LATENT, generator=g) for _ in range(STEPS)]
    x0s = [torch.randn(LATENT, generator=g) * 0.8 for _ in range(STEPS)]

    def describe(event):
        value, total, image = event
        if image is None:
            return {"value": value, "total": total, "preview": None}
        fmt, pil, size = image
        return {"value": value, "total": total, "preview": [fmt, list(pil.size), pil.mode, size]}

    def run(device, untouchable=False):
        events.clear()
        callback = preview.make_step_callback(STEPS, device)
        for i in range(STEPS):
            x, x0 = (Untouchable(), Untouchable()) if untouchable else (latents[i], x0s[i])
            callback(SimpleNamespace(step=i, total=STEPS, sigma=1.0 - i / STEPS, latents=x, denoised=x0))
        ours = list(events)
        events.clear()
        model = SimpleNamespace(load_device=torch.device("cpu"), model=SimpleNamespace(latent_format=comfy.latent_formats.Flux()))
        native = latent_preview.prepare_callback(model, STEPS)
        for i in range(STEPS):
            native(i, x0s[i], latents[i], STEPS)
        theirs = list(events)
        same = [(a[2] is None and b[2] is None) or (a[2] is not None and b[2] is not None and a[2][0] == b[2][0]
                and a[2][2] == b[2][2] and np.array_equal(np.asarray(a[2][1]), np.asarray(b[2][1])))
                for a, b in zip(ours, theirs)]
        return {"method": args.preview_method.value, "ours": [describe(e) for e in ours],
                "comfy": [describe(e) for e in theirs], "same_as_comfy": same}

    results = {"version": __import__("comfyui_version").__version__, "cli": run(None, untouchable=(method == "none"))}
    if method != "none":
        # ComfyUI 0.33's per-run preview setting rewrites args.preview_method (latent_preview.set_preview_method)
        for override in (LatentPreviewMethod.TAESD, LatentPreviewMethod.Auto):
            args.preview_method = override
            results[override.value] = run(torch.device("cpu"))

    # cancel: the callback raises ComfyUI's interrupt before touching the bar; the flag is then cleared
    events.clear()
    callback = preview.make_step_callback(STEPS, torch.device("cpu"))
    comfy.model_management.interrupt_current_processing(True)
    try:
        callback(SimpleNamespace(step=0, total=STEPS, sigma=1.0, latents=latents[0], denoised=x0s[0]))
        results["interrupt"] = None
    except BaseException as err:  # noqa: BLE001 - 0.33's InterruptProcessingException is a BaseException
        results["interrupt"] = type(err).__name__
    results["interrupt_events"] = len(events)
    callback(SimpleNamespace(step=0, total=STEPS, sigma=1.0, latents=latents[0], denoised=x0s[0]))
    results["after_interrupt_events"] = [describe(e) for e in events]
    (out / "results.json").write_text(json.dumps(results))


def run_comfy(out: Path, method: str) -> dict:
    from comfy_harness import comfy_source

    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # leave the installed ComfyUI tree as it is
    proc = subprocess.run([sys.executable, __file__, str(comfy_source()), str(out), method], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"ComfyUI run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def with_latent2rgb(tmp_path_factory):
    return run_comfy(tmp_path_factory.mktemp("preview_latent2rgb"), "latent2rgb")


@pytest.fixture(scope="module")
def with_none(tmp_path_factory):
    return run_comfy(tmp_path_factory.mktemp("preview_none"), "none")


def steps_of(events):
    return [(e["value"], e["total"]) for e in events]


def test_latent2rgb_sends_a_preview_of_the_latent_size_each_step(with_latent2rgb):
    run = with_latent2rgb["cli"]
    assert run["method"] == "latent2rgb"
    assert steps_of(run["ours"]) == [(1, STEPS), (2, STEPS), (3, STEPS)]
    for event in run["ours"]:
        assert event["preview"] == ["JPEG", [LATENT[3], LATENT[2]], "RGB", 512]  # width x height of the latent
    assert steps_of(run["comfy"]) == steps_of(run["ours"])
    assert run["same_as_comfy"] == [True] * STEPS  # the very image ComfyUI's KSampler would show


def test_taesd_and_auto_follow_the_setting(with_latent2rgb):
    taesd = with_latent2rgb["taesd"]
    for event in taesd["ours"]:
        assert event["preview"] == ["JPEG", [LATENT[3] * 8, LATENT[2] * 8], "RGB", 512]  # taef1 decodes to pixels
    assert taesd["same_as_comfy"] == [True] * STEPS
    auto = with_latent2rgb["auto"]
    assert [e["preview"] for e in auto["ours"]] == [["JPEG", [LATENT[3], LATENT[2]], "RGB", 512]] * STEPS
    assert auto["same_as_comfy"] == [True] * STEPS


def test_no_preview_work_with_previews_off(with_none):
    run = with_none["cli"]
    assert run["method"] == "none"
    # the step infos' tensors fail on any use, so the progress bar ran without touching them
    assert run["ours"] == [{"value": i + 1, "total": STEPS, "preview": None} for i in range(STEPS)]
    assert run["comfy"] == run["ours"]


@pytest.mark.parametrize("which", ["with_latent2rgb", "with_none"])
def test_cancel_raises_comfyui_interrupt(which, request):
    results = request.getfixturevalue(which)
    assert results["interrupt"] == "InterruptProcessingException"
    assert results["interrupt_events"] == 0  # raised before the bar moved
    assert [e["value"] for e in results["after_interrupt_events"]] == [1]  # the flag was consumed


if __name__ == "__main__":
    comfy_run(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve(), sys.argv[3])
