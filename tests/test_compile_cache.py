"""Compiled code is reused by a second process (zimage_core/compile_cache.py), on the CPU with inductor.

Each process is this file run as a script: it points the caches at one folder, compiles the real block function
on a tiny transformer's weights (as ``fast_denoiser.compiled_block_forward`` does: sequence length dynamic), runs it,
saves the bundle and prints torch's cache counters. The first process misses the FX graph cache, the second hits
it and compiles nothing; a third, whose inductor folder was deleted, hits it through the bundle alone. Timings are
printed for the record, never asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _child(folder: str) -> dict:
    import torch

    from zimage_core import compile_cache

    start = time.perf_counter()
    chosen = compile_cache.enable(folder)
    enable_s = time.perf_counter() - start
    from zimage_core.blocks import block_forward
    from zimage_core.tiny import build_tiny_models
    from zimage_core.weights import TransformerWeights

    transformer = build_tiny_models(seed=0)[0]
    owner = TransformerWeights.of(transformer)
    dim = transformer.config.dim
    half = dim // transformer.config.n_heads // 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 24, dim, generator=g)
    ang = torch.rand(1, 24, 1, half, generator=g) * 6.28
    cos, sin = ang.cos(), ang.sin()
    for t in (x, cos, sin):
        torch._dynamo.mark_dynamic(t, 1)
    adaln = torch.randn(1, min(dim, 256), generator=g)
    fn = torch.compile(block_forward, fullgraph=True, dynamic=None)
    with torch.no_grad():
        start = time.perf_counter()
        out = fn(x, None, cos, sin, adaln, owner.block("layers.0"), owner.shape, False)
        first_call_s = time.perf_counter() - start
        eager = block_forward(x, None, cos, sin, adaln, owner.block("layers.0"), owner.shape, False)
    saved = compile_cache.save_once()
    return {"folder": str(chosen), "enable_s": enable_s, "first_call_s": first_call_s, "saved_bytes": saved,
            "max_abs_vs_eager": (out - eager).abs().max().item(), "out_sum": out.double().sum().item(),
            **compile_cache.status()}


def _run(folder: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TORCHINDUCTOR_", "TORCH_COMPILE", "ZIMAGE_COMPILE_CACHE", "TRITON_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, str(folder)], env=env, capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("compile") / "cache"
    first = _run(folder)
    second = _run(folder)
    shutil.rmtree(folder / "inductor")  # a wiped cache folder: only the bundle is left
    third = _run(folder)
    print(f"\nfirst compiled call: {first['first_call_s']:.1f} s; second process: {second['first_call_s']:.1f} s; "
          f"from the bundle alone: {third['first_call_s']:.1f} s")
    return {"first": first, "second": second, "third": third, "folder": folder}


def test_first_process_compiles_and_saves_the_bundle(runs):
    first, folder = runs["first"], runs["folder"]
    assert first["folder"] == str(folder) and first["inductor_dir"] == str(folder / "inductor")
    assert first["fxgraph_cache_miss"] >= 1 and first["fxgraph_cache_hit"] == 0, first
    assert first["max_abs_vs_eager"] <= 1e-5, first  # the compiled block is the block
    assert first["bundle_loaded_bytes"] is None  # nothing there yet
    assert first["saved_bytes"] and (folder / "artifacts.bin").stat().st_size == first["saved_bytes"]


def test_second_process_reuses_the_compiled_graph(runs):
    second = runs["second"]
    assert second["fxgraph_cache_hit"] >= 1 and second["fxgraph_cache_miss"] == 0, second
    assert second["out_sum"] == runs["first"]["out_sum"]


def test_bundle_alone_restores_a_wiped_cache(runs):
    third = runs["third"]
    assert third["bundle_loaded_bytes"] and third["bundle_loaded_bytes"] > 0, third
    assert third["fxgraph_cache_hit"] >= 1 and third["fxgraph_cache_miss"] == 0, third
    assert third["out_sum"] == runs["first"]["out_sum"]


def test_unwritable_folder_is_named(tmp_path):
    """A folder that can't be written is a ZImageError naming it and the fix, not an OSError from deep inside."""
    code = ("import sys; from zimage_core import compile_cache, ZImageError\n"
            "try:\n    compile_cache.enable(sys.argv[1])\nexcept ZImageError as e:\n    print(e)\n")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", code, str(blocker / "sub")], env=env, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(blocker / "sub") in proc.stdout and "ZIMAGE_COMPILE_CACHE" in proc.stdout, proc.stdout


def test_default_folder_follows_the_environment(monkeypatch, tmp_path):
    from zimage_core import compile_cache

    monkeypatch.setenv("ZIMAGE_COMPILE_CACHE", str(tmp_path / "mine"))
    assert compile_cache.default_folder() == tmp_path / "mine"
    monkeypatch.delenv("ZIMAGE_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.default_folder() == tmp_path / "xdg" / "zimage-turbo" / "compile"
    monkeypatch.setenv("ZIMAGE_COMPILE_CACHE", "0")
    assert compile_cache.disabled()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(_child(sys.argv[1])))
