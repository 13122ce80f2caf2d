"""The weight-owner refactor costs no speed: 8 bf16 steps at 1024² with the code before it and after it, in one
process, on the same real-size random weights, variants interleaved round-robin.

``--before REV`` names the commit before the refactor; its ``zimage_core`` is unpacked from git next to the
results as ``zimage_core_before`` (pass ``--before-dir`` where git is not available, e.g. on the GPU machine).

    python benchmarks/bench_refactor.py --before-dir .gpu/zimage_core_before --out benchmarks/results/refactor_h200.json
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Results, build_models, profile_eager_step, rel_l2, sync  # noqa: E402


def old_package(rev: str | None, folder: str | None):
    if folder is None:
        tmp = Path(tempfile.mkdtemp())
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "zimage_core"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        (tmp / "zimage_core").rename(tmp / "zimage_core_before")
        folder = tmp / "zimage_core_before"
    sys.path.insert(0, str(Path(folder).parent))
    return importlib.import_module(Path(folder).name)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--before", default="0426b33")
    p.add_argument("--before-dir", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "refactor.json"))
    args = p.parse_args()
    device = torch.device(args.device)
    res = Results(Path(args.out), {"setting": f"{args.size}x{args.size}, batch 1, 8 steps, bf16, 128 caption tokens, "
                                              f"random weights; before = {args.before}"})
    before = old_package(args.before, args.before_dir)
    from zimage_core import sampler as new_sampler
    from zimage_core.fast_denoiser import FastDenoiser as NewDenoiser

    old_fast = importlib.import_module(before.__name__ + ".fast_denoiser")
    old_sampler = importlib.import_module(before.__name__ + ".sampler")
    transformer, _, _, _ = build_models(device, torch.bfloat16, tiny=args.tiny)
    feats = [torch.randn(128, transformer.config.cap_feat_dim, device=device, dtype=torch.bfloat16)]
    kw = dict(seed=42, width=args.size, height=args.size, steps=8)
    variants = {}
    for compile_ in (False, True):
        tag = "compiled" if compile_ else "default"
        # old first: the new owner fuses last, so the modules' weights are its views during the timing
        old = old_fast.FastDenoiser(transformer, device, compile=compile_, cuda_graph=device.type == "cuda",
                                    fuse_ffn=False)
        variants[f"before_{tag}"] = lambda d=old: old_sampler.sample(d, feats, **kw)
        new = NewDenoiser(transformer, device, dtype=torch.bfloat16, compile=compile_,
                          cuda_graph=device.type == "cuda", fuse_ffn=False)
        variants[f"after_{tag}"] = lambda d=new: new_sampler.sample(d, feats, **kw)
    outs = {}
    for name, fn in variants.items():  # warm-up: compile, graph capture
        start = time.perf_counter()
        fn()
        sync()
        res[f"{name}_first_call_s"] = time.perf_counter() - start
        outs[name] = fn()
    times = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            start = time.perf_counter()
            variants[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        res[f"{name}_steps8_bf16_s"] = statistics.median(ts)
    for tag in ("default", "compiled"):
        res[f"refactor_{tag}_after_over_before"] = (res.data["metrics"][f"after_{tag}_steps8_bf16_s"]
                                                    / res.data["metrics"][f"before_{tag}_steps8_bf16_s"])
        res[f"refactor_{tag}_latents_rel_l2"] = rel_l2(outs[f"after_{tag}"], outs[f"before_{tag}"])
    res.note("spread", {k: [round(min(v), 4), round(max(v), 4)] for k, v in times.items()})
    if device.type == "cuda":
        d = NewDenoiser(transformer, device, dtype=torch.bfloat16, cuda_graph=False, fuse_ffn=False)
        res["eager_step_cuda_ms"] = profile_eager_step(d, feats, args.size,
                                                       Path(args.out).with_suffix(".eager_step_profile.txt"))
    print({k: v for k, v in res.data["metrics"].items() if "over" in k or "rel_l2" in k})
    return 0


if __name__ == "__main__":
    sys.exit(main())
