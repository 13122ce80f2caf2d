"""Why fp16 runs slower than bf16 on an H100, and what the precision guard costs: every comparison side by
side and interleaved (round-robin with a rotating start, so clock and temperature drift fall on all
variants alike), with the SM clock and power read by ``nvidia-smi`` during each variant's runs.

Sections:
- ``gemm``: the block's four matrix-multiply shapes (4224 tokens = 4096 image + 128 caption) in bf16, fp16,
  fp16 with bf16-valued weights (what a bf16 checkpoint cast to fp16 gives) and fp16 with bf16-valued
  weights and activations (same kernel as fp16, as few mantissa bits as bf16).
- ``attention``: SDPA over 4224 tokens, 30 heads of 128, cuDNN and flash, the same three value kinds.
- ``steps``: 8 steps at 1024x1024 of the real-size model (random weights): bf16, fp16 plain, fp16 with the
  guard (auto, nothing overflows) and fp16 with the guard and two planted overflowing blocks.
- ``autotune``: inductor's max-autotune on the two largest fp16 shapes against cuBLAS (its log lists
  every candidate's time).
- ``chain``: the same multiplies and attention with inputs another kernel has just written (partly in L2),
  and the multiply with its operands swapped.
- ``diagnose``: one step cold (after 1.5 s idle), hot (back to back, at the power limit) and GPU-only (every
  kernel queued behind a sleep kernel), kernel time by kind, and the multiplies on the model's own operands.
- ``block``: one compiled block, inductor's default against its coordinate-descent tuning.

    python benchmarks/bench_fp16_gap.py --sections gemm,attention,steps,autotune --out benchmarks/results/fp16_gap_h100.json
    python benchmarks/bench_fp16_gap.py --sections steps --rounds 11 --cuda-graph --out benchmarks/results/guard_steps_h100.json
    python benchmarks/bench_fp16_gap.py --sections steps --device cpu --tiny --rounds 2   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import (
    Results,
    build_models,
    out_dir,
    prompt_of_tokens,
    rel_l2,
    section,
    sync,
)

from zimage_core import SpeedOptions, ZImage
from zimage_core.dtypes import resolve_policy
from zimage_core.fast_denoiser import FastDenoiser
from zimage_core.sampler import sample
from zimage_core.tokenizer import PromptTokenizer, find_tokenizer
from zimage_core.weights import plain_copy

TOKENS = 4224
SHAPES = {"qkv": (3840, 11520), "out": (3840, 3840), "w1": (3840, 10240), "w2": (10240, 3840)}  # (K, N)


class ClockLog:
    """``nvidia-smi`` sampling SM clock, power and temperature every 20 ms; windows are labelled afterwards."""

    def __init__(self, path: Path):
        self.path, self.windows, self.proc = path, [], None
        try:
            self.file = open(path, "w")  # noqa: SIM115 (open while nvidia-smi writes; closed by stop())
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu",
                 "--format=csv,noheader,nounits", "-lms", "20"], stdout=self.file, stderr=subprocess.DEVNULL)
        except (OSError, FileNotFoundError):
            self.proc = None

    def window(self, label: str, start: datetime.datetime, end: datetime.datetime) -> None:
        self.windows.append((label, start, end))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.file.close()

    def summary(self) -> dict:
        """Mean clock, power and temperature over each label's windows (so far)."""
        if self.proc is None:
            return {}
        self.file.flush()
        samples = []
        for line in self.path.read_text().splitlines():
            parts = [p.strip() for p in line.split(",")]
            try:
                stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f")
                samples.append((stamp, float(parts[1]), float(parts[2]), float(parts[3])))
            except (ValueError, IndexError):
                continue
        out = {}
        for label in dict.fromkeys(w[0] for w in self.windows):
            inside = [s for s in samples for w in self.windows if w[0] == label and w[1] <= s[0] <= w[2]]
            if inside:
                out[label] = {"sm_mhz": round(statistics.mean(s[1] for s in inside)),
                              "power_w": round(statistics.mean(s[2] for s in inside), 1),
                              "temp_c": round(statistics.mean(s[3] for s in inside), 1), "samples": len(inside)}
        return out


def interleaved(variants: dict, rounds: int, clocks: ClockLog, prefix: str = "",
                blas_reset=None) -> dict[str, list[float]]:
    """Seconds per call of each variant: ``rounds`` round-robin passes, each pass starting one variant later.
    A variant is a callable, or a (setup, run) pair whose setup stays out of the timing."""
    names = list(variants)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            setup, run = variants[n] if isinstance(variants[n], tuple) else (None, variants[n])
            if blas_reset is not None:
                blas_reset()
            if setup is not None:
                setup()
            sync()
            wall, start = datetime.datetime.now(), time.perf_counter()
            run()
            sync()
            times[n].append(time.perf_counter() - start)
            clocks.window(prefix + n, wall, datetime.datetime.now())
    return times


def kernel_names(fn) -> list[str]:
    return sorted(kernel_times(fn, repeat=1))


def bf16_and_fp16(device, tiny: bool, opts: SpeedOptions, fp16_copies: int = 1):
    """A bf16 ZImage, ``fp16_copies`` fp16 ZImages on copies of the same random real-size weights (sharing its
    text encoder and VAE), and the bf16 embeddings of a 128-token prompt."""
    transformer, _, our_te, vae = build_models(device, torch.bfloat16, tiny=tiny)
    copies = [copy.deepcopy(transformer).half() for _ in range(fp16_copies)]  # before fusing: no fused copies
    tokenizer = PromptTokenizer(find_tokenizer())
    zb = ZImage(transformer, our_te, vae, tokenizer, resolve_policy(device, "bf16"), device, speed=opts)
    emb = zb.encode_prompt(prompt_of_tokens(tokenizer, 128))
    fp16_policy = resolve_policy(device, "bf16", overrides={"transformer": ("fp16", "fp16")})
    return zb, [ZImage(t, our_te, vae, tokenizer, fp16_policy, device, speed=opts) for t in copies], emb


def kernel_times(fn, repeat: int = 5) -> dict[str, float]:
    """Mean microseconds per call of each kernel ``fn`` launches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeat):
            fn()
        sync()
    return {e.key: e.device_time_total / e.count for e in prof.key_averages() if e.device_time_total > 0}


def operands(kind: str, shape: tuple, seed: int) -> torch.Tensor:
    """Random normal values as ``kind``: bf16, fp16, or fp16 holding bf16-rounded values."""
    x = torch.randn(shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
    if kind == "bf16":
        return x.bfloat16()
    if kind == "fp16_bf16vals":
        return x.bfloat16().half()
    return x.half()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sections", default="gemm,attention,steps,autotune,chain,diagnose,block")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--deadline", type=float, default=540, help="seconds; later sections are skipped after it")
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--cuda-graph", action="store_true", help="steps: replay steps as CUDA graphs (the library default)")
    p.add_argument("--fp16-first", action="store_true", help="diagnose: compile the fp16 model first")
    p.add_argument("--tiny", action="store_true", help="tiny model, for a CPU smoke test of the steps section")
    args = p.parse_args()
    device = torch.device(args.device)
    t0 = time.perf_counter()
    sections = set(args.sections.split(","))
    res = Results(args.out or out_dir() / "fp16_gap.json", {"setting": "H100 side by side, interleaved rounds"})
    clocks = ClockLog(Path(os.environ.get("OUT", "/tmp")) / "nvidia_smi.csv")
    torch.backends.cuda.matmul.allow_tf32 = True
    R = args.rounds
    default_blas = str(torch.backends.cuda.preferred_blas_library()).split(".")[-1].lower()
    res.note("default_blas_library", default_blas)

    def blas_library(name):
        return lambda: torch.backends.cuda.preferred_blas_library(name)

    @section("gemm")
    def gemm(results):
        for shape_name, (k, n) in SHAPES.items():
            variants, kinds = {}, {"bf16": ("bf16", "bf16"), "fp16": ("fp16", "fp16"),
                                   "fp16_bf16w": ("fp16", "fp16_bf16vals"),
                                   "fp16_bf16vals": ("fp16_bf16vals", "fp16_bf16vals")}
            kinds["fp16_bf16w_cublaslt"] = ("fp16", "fp16_bf16vals")
            for name, (a_kind, w_kind) in kinds.items():
                a, w = operands(a_kind, (TOKENS, k), 1), operands(w_kind, (n, k), 2)
                blas = blas_library("cublaslt" if name.endswith("cublaslt") else default_blas)
                variants[name] = (blas, lambda a=a, w=w: [torch.nn.functional.linear(a, w) for _ in range(100)])
                blas()
                results.note(f"gemm_{shape_name}_{name}_kernels", kernel_names(lambda a=a, w=w: a @ w.t()))
                variants[name][1]()
            times = interleaved(variants, R, clocks, prefix=f"gemm_{shape_name}_")
            for name, ts in times.items():
                per = statistics.median(ts) / 100
                results[f"gemm_{shape_name}_{name}_us"] = per * 1e6
                results[f"gemm_{shape_name}_{name}_tflops"] = 2 * TOKENS * k * n / per / 1e12
            base = statistics.median(times["bf16"])
            for name in kinds:
                results[f"gemm_{shape_name}_{name}_vs_bf16"] = statistics.median(times[name]) / base

    @section("attention")
    def attention(results):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        F = torch.nn.functional
        for backend_name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            variants = {}
            for kind in ("bf16", "fp16", "fp16_bf16vals"):
                q, kk, v = (operands(kind, (1, 30, TOKENS, 128), s) for s in (3, 4, 5))

                def run(q=q, kk=kk, v=v, backend=backend):
                    with sdpa_kernel([backend]):
                        for _ in range(50):
                            F.scaled_dot_product_attention(q, kk, v)
                variants[kind] = run
                run()
            times = interleaved(variants, R, clocks, prefix=f"attn_{backend_name}_")
            base = statistics.median(times["bf16"])
            for kind, ts in times.items():
                results[f"attn_{backend_name}_{kind}_us"] = statistics.median(ts) / 50 * 1e6
                results[f"attn_{backend_name}_{kind}_vs_bf16"] = statistics.median(ts) / base

    @section("steps")
    def steps(results):
        opts = SpeedOptions(compile=device.type == "cuda", cuda_graph=args.cuda_graph)
        results.note("steps_speed_options", repr(opts))
        zb, (z16, z16p), emb = bf16_and_fp16(device, args.tiny, opts, fp16_copies=2)
        emb16 = [e.half() for e in emb]
        t16p = z16p.transformer
        n = len(t16p.layers)
        planted = [f"layers.{n // 3}", f"layers.{2 * n // 3}"]
        with torch.no_grad():
            for name in planted:  # SwiGLU products past 65504 in fp16; the FFN norm keeps the block output finite
                ffn = t16p.get_submodule(name).feed_forward
                ffn.w1.weight.mul_(400.0 if args.tiny else 60.0)
                ffn.w3.weight.mul_(400.0 if args.tiny else 60.0)
        size = 128 if args.tiny else 1024
        kw = {"seed": 42, "width": size, "height": size, "steps": 8}
        start = time.perf_counter()
        ref_bf16 = zb.sample(emb, **kw)
        results["compile_first_run_bf16_s"] = time.perf_counter() - start
        z16.set_precision_guard("off")
        plain16 = z16.sample(emb16, **kw)
        results["fp16_plain_finite"] = bool(torch.isfinite(plain16).all())
        results["fp16_vs_bf16_rel_l2"] = rel_l2(plain16, ref_bf16)
        z16p.set_precision_guard("off")
        results["planted_plain_fp16_finite"] = bool(torch.isfinite(z16p.sample(emb16, **kw)).all())
        guard_p = z16p.set_precision_guard("auto")
        sync()
        start = time.perf_counter()
        repaired = z16p.sample(emb16, **kw)
        sync()
        results["guard_first_run_with_detection_s"] = time.perf_counter() - start
        results["guard_sticky_blocks"] = guard_p.sticky()
        zb_planted = plain_copy(t16p, torch.bfloat16)  # the planted weights in bf16, for the error
        # A plain denoiser, not a ZImage: a ZImage would take the text encoder over and release z16p's guard.
        reference = sample(FastDenoiser(zb_planted, device, dtype=torch.bfloat16), emb, shift=3.0, **kw)
        results["guard_planted_rel_l2_vs_bf16"] = rel_l2(repaired, reference)
        del zb_planted
        probes_before = guard_p.probe_runs
        guards = {}

        def with_guard(z, policy):
            def setup():
                if policy != "keep":
                    guards[id(z)] = z.set_precision_guard(policy)
            return setup

        def lt_guarded():
            blas_library("cublaslt")()
            with_guard(z16, "auto")()

        variants = {
            "bf16": (blas_library(default_blas), lambda: zb.sample(emb, **kw)),
            "fp16_guarded_cublaslt": (lt_guarded, lambda: z16.sample(emb16, **kw)),
            "fp16": (with_guard(z16, "off"), lambda: z16.sample(emb16, **kw)),
            "fp16_guarded": (with_guard(z16, "auto"), lambda: z16.sample(emb16, **kw)),
            "fp16_guarded_two_blocks": (None, lambda: z16p.sample(emb16, **kw)),
        }
        for name, (setup, run) in variants.items():  # warm-up: compile for both dtypes and any sticky block
            blas_library(default_blas)()
            if setup:
                setup()
            run()
        times = interleaved(variants, R, clocks, prefix="steps_", blas_reset=blas_library(default_blas))
        med = {k: statistics.median(v) for k, v in times.items()}
        results.note("steps_all_times_s", {k: [round(x, 4) for x in v] for k, v in times.items()})
        results["ours_steps8_bf16_s"] = med["bf16"]
        results["ours_steps8_fp16_s"] = med["fp16"]
        results["ours_steps8_fp16_guarded_s"] = med["fp16_guarded"]
        results["ours_steps8_fp16_guarded_two_blocks_s"] = med["fp16_guarded_two_blocks"]
        results["guard_overhead_no_overflow_ratio"] = med["fp16_guarded"] / med["fp16"]
        results["guard_two_blocks_ratio"] = med["fp16_guarded_two_blocks"] / med["fp16"]
        results["fp16_guarded_vs_bf16_ratio"] = med["fp16_guarded"] / med["bf16"]
        results["fp16_vs_bf16_ratio"] = med["fp16"] / med["bf16"]
        results["fp16_guarded_cublaslt_vs_bf16_ratio"] = med["fp16_guarded_cublaslt"] / med["bf16"]
        results["guard_probe_runs_after_first"] = guard_p.probe_runs - probes_before
        results.note("steps_cuda_graphs", {name: None if z.denoiser.graphs is None else
                                           {"captured": len(z.denoiser.graphs.graphs), "failed": z.denoiser.graphs.failed}
                                           for name, z in (("bf16", zb), ("fp16", z16), ("fp16_two_blocks", z16p))})
        g = guards.get(id(z16))
        results.note("guard_no_overflow_report", g.report() if g else None)

    @section("autotune")
    def autotune(results):
        import torch._inductor.config as inductor_config

        inductor_config.max_autotune_gemm_backends = "ATEN,TRITON"
        for shape_name in ("w1", "qkv"):
            k, n = SHAPES[shape_name]
            a, w = operands("fp16", (TOKENS, k), 1), operands("fp16_bf16vals", (n, k), 2)
            mm = torch.compile(lambda a, w: torch.nn.functional.linear(a, w), mode="max-autotune-no-cudagraphs",
                               dynamic=False)
            start = time.perf_counter()
            mm(a, w)
            sync()
            results[f"autotune_{shape_name}_compile_s"] = time.perf_counter() - start
            variants = {"cublas": lambda a=a, w=w: [torch.nn.functional.linear(a, w) for _ in range(100)],
                        "autotuned": lambda a=a, w=w, mm=mm: [mm(a, w) for _ in range(100)]}
            times = interleaved(variants, R, clocks, prefix=f"autotune_{shape_name}_")
            results[f"autotune_{shape_name}_fp16_vs_cublas"] = (statistics.median(times["autotuned"])
                                                                / statistics.median(times["cublas"]))
            results.note(f"autotune_{shape_name}_kernels", kernel_names(lambda a=a, w=w, mm=mm: mm(a, w)))
            torch._dynamo.reset()

    @section("diagnose")
    def diagnose(results):
        """Where the full model's fp16 time goes: the same step cold (after 1.5 s idle, below the power cap)
        and hot, kernel time per kind, and the matrix multiplies on the model's own operands."""
        import torch.nn.functional as F

        from zimage_core.fast_denoiser import _rms

        zb, (z16,), emb = bf16_and_fp16(device, args.tiny, SpeedOptions(compile=device.type == "cuda",
                                                                         cuda_graph=False))
        transformer = zb.transformer
        models = {"bf16": (zb, emb), "fp16": (z16, [e.half() for e in emb])}
        side = 16 if args.tiny else 128
        lat = torch.randn(1, 16, side, side, device=device, generator=torch.Generator(device).manual_seed(0))
        t = torch.full((1,), 0.5, device=device)
        ctxs = {k: z.denoiser.prepare(e) for k, (z, e) in models.items()}

        def step(k):
            return lambda: models[k][0].denoiser(ctxs[k], lat, t)

        for k in (list(models)[::-1] if args.fp16_first else models):
            step(k)()  # compile
        results.note("diag_compiled_first", "fp16" if args.fp16_first else "bf16")

        # GPU time alone: a 1 s sleep kernel goes first, so every kernel of the step is queued before the GPU
        # reaches it (no launch gaps); the host time to queue the step is measured alongside.
        gpu_only, host = {k: [] for k in models}, {k: [] for k in models}
        for r in range(R if device.type == "cuda" else 0):
            for k in (list(models) if r % 2 == 0 else list(models)[::-1]):
                sync()
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda._sleep(1_000_000_000)
                begin.record()
                start = time.perf_counter()
                step(k)()
                host[k].append((time.perf_counter() - start) * 1e3)
                end.record()
                sync()
                gpu_only[k].append(begin.elapsed_time(end))
        for k in models if device.type == "cuda" else ():
            results[f"diag_step_gpu_only_{k}_ms"] = statistics.median(gpu_only[k])
            results[f"diag_step_host_queue_{k}_ms"] = statistics.median(host[k])
        if device.type == "cuda":
            results["diag_step_gpu_only_fp16_vs_bf16"] = (statistics.median(gpu_only["fp16"])
                                                          / statistics.median(gpu_only["bf16"]))
        hot = interleaved({k: (lambda k=k: [step(k)() for _ in range(16)]) for k in models}, R, clocks, "hot_")
        for k, ts in hot.items():
            results[f"diag_step_hot_{k}_ms"] = statistics.median(ts) / 16 * 1e3
        results["diag_step_hot_fp16_vs_bf16"] = statistics.median(hot["fp16"]) / statistics.median(hot["bf16"])

        cold = {k: [] for k in models}
        for r in range(R):
            for k in (list(models) if r % 2 == 0 else list(models)[::-1]):
                sync()
                time.sleep(1.5)
                wall, start = datetime.datetime.now(), time.perf_counter()
                step(k)()
                sync()
                cold[k].append((time.perf_counter() - start) * 1e3)
                clocks.window(f"cold_{k}", wall, datetime.datetime.now())
        for k, ts in cold.items():
            results[f"diag_step_cold_{k}_ms"] = statistics.median(ts)
        results["diag_step_cold_fp16_vs_bf16"] = statistics.median(cold["fp16"]) / statistics.median(cold["bf16"])

        from torch.profiler import ProfilerActivity, profile

        kinds, names = {}, {}
        for r, k in enumerate(["bf16", "fp16", "bf16", "fp16"] if device.type == "cuda" else []):
            step(k)()
            sync()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                step(k)()
                sync()
            per = {}
            names[k] = names.get(k, []) + [(e.key, e.count, e.device_time_total) for e in prof.key_averages()
                                          if e.device_time_total > 50]
            for e in prof.key_averages():
                name = e.key
                kind = ("gemm" if name.startswith("nvjet") or "gemm" in name else
                        "attention" if "sdpa" in name or "flash" in name or "fmha" in name else
                        "triton" if name.startswith("triton") else "other")
                per[kind] = per.get(kind, 0.0) + e.device_time_total / 1e3
            kinds[f"{k}_{r // 2}"] = {kk: round(v, 3) for kk, v in per.items()}
        results.note("diag_kernel_ms_by_kind", kinds)
        table = {}
        for k, rows in names.items():  # mean microseconds per call over the two profiles
            for key, count, total in rows:
                entry = table.setdefault(key, {}).setdefault(k, [0, 0.0])
                entry[0] += count
                entry[1] += total
        results.note("diag_kernel_us_per_call", {key: {k: [c // 2, round(t / c, 2)] for k, (c, t) in v.items()}
                                                 for key, v in table.items()})
        for kind in ("gemm", "attention", "triton", "other") if kinds else ():
            b = (kinds["bf16_0"].get(kind, 0) + kinds["bf16_1"].get(kind, 0)) / 2
            f = (kinds["fp16_0"].get(kind, 0) + kinds["fp16_1"].get(kind, 0)) / 2
            results[f"diag_kernel_{kind}_fp16_minus_bf16_ms"] = f - b

        # The matrix multiplies of the middle block (layers.15) on its real input at t = 0.5.
        operands_of = {}
        for k, (z, _) in models.items():
            d, inner, calls = z.denoiser, z.denoiser._block, []
            d._block = lambda *a, inner=inner, calls=calls: calls.append(a) or inner(*a)
            step(k)()
            d._block = inner
            x, _, _, _, adaln, weights, _, eps, _ = calls[len(transformer.noise_refiner) + len(transformer.layers) // 2]
            modulation, norms, qkv_w, _, ffn_w, w2_w = weights
            with torch.no_grad():
                scale = 1 + F.linear(adaln, modulation[0], modulation[2]).unsqueeze(1).chunk(4, dim=2)[0]
                h = (_rms(x, norms[0], eps) * scale)[0]
                g = F.silu(F.linear(h, ffn_w[0][0])) * F.linear(h, ffn_w[1][0])
            operands_of[k] = {"qkv": (h, qkv_w[0]), "w1": (h, ffn_w[0][0]), "w2": (g, w2_w[0])}
        for name in ("qkv", "w1", "w2"):
            hb, wb = operands_of["bf16"][name]
            hf, wf = operands_of["fp16"][name]
            results[f"diag_real_{name}_fp16_abs_max"] = hf.abs().max().item()
            hr = hf.bfloat16().half()  # the same activations with bf16's mantissa
            variants = {"bf16": lambda hb=hb, wb=wb: [F.linear(hb, wb) for _ in range(100)],
                        "fp16": lambda hf=hf, wf=wf: [F.linear(hf, wf) for _ in range(100)],
                        "fp16_bf16vals": lambda hr=hr, wf=wf: [F.linear(hr, wf) for _ in range(100)]}
            times = interleaved(variants, R, clocks, prefix=f"real_{name}_")
            for k, ts in times.items():
                results[f"diag_real_{name}_{k}_vs_bf16"] = statistics.median(ts) / statistics.median(times["bf16"])

    @section("chain")
    def chain(results):
        """Matrix multiplies and attention whose inputs another kernel has just written (as in the model, where
        they are partly in L2), fp16 against bf16, and the multiply with its operands swapped (W @ h^T), which
        makes cuBLAS choose among other kernels."""
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for shape_name in ("qkv", "w1", "w2"):
            k, n = SHAPES[shape_name]
            variants = {}
            for kind in ("bf16", "fp16"):
                a, src = operands(kind, (TOKENS, k), 1), operands(kind, (TOKENS, k), 3)
                w = operands("bf16" if kind == "bf16" else "fp16_bf16vals", (n, k), 2)
                variants[f"{kind}_copy_only"] = lambda a=a, src=src: [a.copy_(src) for _ in range(50)]
                variants[f"{kind}_plain"] = lambda a=a, src=src, w=w: [(a.copy_(src), F.linear(a, w)) for _ in range(50)]
                variants[f"{kind}_swapped"] = lambda a=a, src=src, w=w: [(a.copy_(src), torch.mm(w, a.t()))
                                                                         for _ in range(50)]
                results.note(f"chain_{shape_name}_{kind}_swapped_kernels", kernel_names(lambda a=a, w=w: torch.mm(w, a.t())))
            for v in variants.values():
                v()
            times = {kk: statistics.median(v) for kk, v in interleaved(variants, R, clocks, f"chain_{shape_name}_").items()}
            for kind in ("bf16", "fp16"):
                for how in ("plain", "swapped"):
                    results[f"chain_{shape_name}_{kind}_{how}_us"] = (times[f"{kind}_{how}"] - times[f"{kind}_copy_only"]) / 50 * 1e6
            results[f"chain_{shape_name}_fp16_vs_bf16"] = (results.data["metrics"][f"chain_{shape_name}_fp16_plain_us"]
                                                          / results.data["metrics"][f"chain_{shape_name}_bf16_plain_us"])
        variants = {}
        for kind in ("bf16", "fp16"):
            qkv = [operands(kind, (1, 30, TOKENS, 128), s) for s in (3, 4, 5)]
            src = operands(kind, (1, 30, TOKENS, 128), 6)

            def run(qkv=qkv, src=src, attend=True):
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    for _ in range(30):
                        for t in qkv:
                            t.copy_(src)
                        if attend:
                            F.scaled_dot_product_attention(*qkv)
            variants[f"{kind}_attn"] = run
            variants[f"{kind}_copy_only"] = lambda run=run: run(attend=False)
            run()
        times = {kk: statistics.median(v) for kk, v in interleaved(variants, R, clocks, "chain_attn_").items()}
        for kind in ("bf16", "fp16"):
            results[f"chain_attn_{kind}_us"] = (times[f"{kind}_attn"] - times[f"{kind}_copy_only"]) / 30 * 1e6
        results["chain_attn_fp16_vs_bf16"] = results.data["metrics"]["chain_attn_fp16_us"] / results.data["metrics"]["chain_attn_bf16_us"]

    @section("block")
    def block(results):
        """One compiled main-layer block (4224 tokens) in bf16 and in fp16, with inductor's default kernel
        configurations and with its coordinate-descent tuning (run with TORCH_LOGS=output_code to keep the
        generated kernels of both dtypes)."""
        import torch._inductor.config as inductor_config
        from diffusers import ZImageTransformer2DModel

        from common import configs, random_
        from zimage_core.fast_denoiser import block_forward, fuse_block

        cfg = dict(configs(False)[0], n_layers=1, n_refiner_layers=1)
        with torch.device(device):
            model = random_(ZImageTransformer2DModel(**cfg).to(torch.bfloat16), 0).eval()
        blocks = {"bf16": model.layers[0], "fp16": copy.deepcopy(model.layers[0]).half()}
        gen = torch.Generator(device).manual_seed(0)
        angles = torch.rand(1, TOKENS, 1, 64, device=device, generator=gen) * 6.28
        inputs = {}
        for k, b in blocks.items():
            dtype = torch.bfloat16 if k == "bf16" else torch.float16
            x = torch.randn(1, TOKENS, 3840, device=device, generator=gen).to(dtype)
            adaln = torch.randn(1, 256, device=device, generator=gen).to(dtype)
            inputs[k] = (x, None, angles.cos(), angles.sin(), adaln, fuse_block(b).tensors(False), 30, 1e-5, False)
        for tuning in (False, True):
            torch._dynamo.reset()
            inductor_config.coordinate_descent_tuning = tuning
            fn = torch.compile(block_forward, fullgraph=True)
            for k in blocks:
                fn(*inputs[k])
            variants = {k: (lambda k=k, fn=fn: [fn(*inputs[k]) for _ in range(40)]) for k in blocks}
            times = interleaved(variants, R, clocks, f"block_tuned{int(tuning)}_")
            for k, ts in times.items():
                results[f"block_tuned{int(tuning)}_{k}_us"] = statistics.median(ts) / 40 * 1e6
            results[f"block_tuned{int(tuning)}_fp16_vs_bf16"] = statistics.median(times["fp16"]) / statistics.median(
                times["bf16"])
            for k in blocks:
                fn(*inputs[k])
                sync()
                results.note(f"block_tuned{int(tuning)}_{k}_kernels_us", {
                    name: round(us, 2) for name, us in kernel_times(lambda k=k, fn=fn: fn(*inputs[k])).items()})
        inductor_config.coordinate_descent_tuning = False

    for name, fn in (("gemm", gemm), ("attention", attention), ("steps", steps), ("autotune", autotune),
                     ("chain", chain), ("diagnose", diagnose), ("block", block)):
        if name not in sections:
            continue
        if time.perf_counter() - t0 > args.deadline:
            res.note(f"{name}_skipped", "deadline")
            continue
        fn(res)
        res.note("clocks", clocks.summary())
    clocks.stop()
    print(f"total {time.perf_counter() - t0:.1f} s")
    for k, v in res.data["metrics"].items():
        print(f"{k:48s} {v}")
    for k, v in res.data["notes"].get("clocks", {}).items():
        print(f"{k:48s} {v}")


if __name__ == "__main__":
    sys.exit(main())
