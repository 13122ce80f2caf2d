"""The fused eager kernels (zimage_core/kernels.py) against the torch code they replace, and the compile cache.

1. Per kernel, at real-size shapes (dim 3840, 30 heads of 128, 4096 + 128 tokens, ffn 10240, bf16): ours, the torch
   eager reference (blocks.py with the kernels off) and ``torch.compile`` of that reference: median time
   (``triton.testing.do_bench``), rel-L2 from the reference, and the bytes each must move against the card's rate.
2. A whole transformer step (real-size random weights, ``FastDenoiser``), 8 steps at 1024², kernels on vs off,
   with CUDA graphs (the default path) and without; rel-L2 of the latents; a profile of one eager step.
3. ``--second-process``: the compiled path's first generation in a fresh process, cold cache then warm cache
   (``compile_cache``): ``compile_second_process_s`` = first call minus a later call, in the warm process.

    python benchmarks/bench_eager.py --out benchmarks/results/eager_kernels_h200.json
    python benchmarks/bench_eager.py --second-process --out benchmarks/results/compile_cache_h200.json
    python benchmarks/bench_eager.py --smoke            # CPU, tiny shapes, Triton's interpreter: catches typos

The table printed last is the summary; every number is also in the JSON (``--out``).
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # must precede the first import of triton (torch imports it lazily)
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["ZIMAGE_KERNELS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Results, build_models, profile_eager_step, rel_l2, sync  # noqa: E402

from zimage_core import blocks, kernels  # noqa: E402

H200_BYTES_PER_S = 4.8e12  # HBM3e peak of the H200 datasheet; the measured copy rate is printed next to it


def bench(fn, smoke: bool, graph: bool = True) -> float:
    """Median seconds of ``fn`` on the GPU: replayed from a CUDA graph (``graph``: the GPU's time alone, as the
    default path runs it) or launched from Python (the launch cost included when it exceeds the GPU's time)."""
    if not smoke:
        import triton.testing

        if graph:
            return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median") / 1e3
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    ts = []
    for _ in range(1):  # smoke (Triton's interpreter, ~1 s a launch): the code path, not a timing
        start = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - start)
    return statistics.median(ts)


def copy_rate(device, smoke: bool) -> float:
    """Measured device-to-device copy rate (bytes read + written per second) of a 1 GiB buffer."""
    n = (1 << 20) if smoke else (1 << 29)
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() * a.element_size() / bench(lambda: b.copy_(a), smoke)


def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def kernel_table(res: Results, device, smoke: bool) -> list[tuple]:
    dt = torch.bfloat16
    dim, heads, seq, ffn = (64, 2, 40, 160) if smoke else (3840, 30, 4096 + 128, 10240)
    hd = dim // heads
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    x, o = rnd(1, seq, dim), rnd(1, seq, dim, scale=4.0)
    mod = rnd(1, 1, 4 * dim, scale=0.5)
    s1, g1_, s2, g2_ = mod.chunk(4, dim=2)
    scale, gate = 1.0 + s1, g1_.tanh()
    scale2 = 1.0 + s2
    w, w2 = rnd(dim, scale=0.1) + 1, rnd(dim, scale=0.1) + 1
    qkv = rnd(1, seq, 3, heads, hd, scale=2.0)
    wq, wk = rnd(hd, scale=0.1) + 1, rnd(hd, scale=0.1) + 1
    ang = torch.rand(1, seq, 1, hd // 2, generator=g, device=device) * 6.28
    cos, sin = ang.cos(), ang.sin()
    g13 = rnd(1, seq, 2 * ffn, scale=2.0)
    ga, gb = g13.chunk(2, dim=-1)
    eps = 1e-5

    def ref_rms_mod(x, w, scale):
        return blocks.rms(x, w, eps) * scale

    def ref_qk(qkv, wq, wk, cos, sin):
        q, k, _ = qkv.unbind(2)
        return blocks.rope(blocks.rms(q, wq, eps), cos, sin), blocks.rope(blocks.rms(k, wk, eps), cos, sin)

    def ref_residual_next(x, o, w, gate, w2, scale):
        xn = x + gate * blocks.rms(o, w, eps)
        return xn, blocks.rms(xn, w2, eps) * scale

    def ref_residual(x, o, w, gate):
        return x + gate * blocks.rms(o, w, eps)

    def ref_silu(a, b):
        return F.silu(a) * b

    cases = [  # name, ours, reference, args, bytes the fused kernel must move
        ("rms_norm_mod", lambda *a: kernels.rms_norm(a[0], a[1], eps, a[2]), ref_rms_mod, (x, w, scale),
         2 * nbytes(x)),
        ("qk_norm_rope", lambda *a: kernels.qk_norm_rope(a[0], a[1], a[2], eps, a[3], a[4]), ref_qk,
         (qkv, wq, wk, cos, sin), 4 * nbytes(x) + nbytes(cos, sin)),
        ("residual_next_norm", lambda *a: kernels.residual(a[0], a[1], a[2], eps, a[3], a[4], eps, a[5]),
         ref_residual_next, (x, o, w, gate, w2, scale2), 4 * nbytes(x)),
        ("residual", lambda *a: kernels.residual(a[0], a[1], a[2], eps, a[3]), ref_residual, (x, o, w, gate),
         3 * nbytes(x)),
        ("silu_mul", kernels.silu_mul, ref_silu, (ga, gb), nbytes(g13) + nbytes(ga)),
    ]
    backend = "eager" if smoke else "inductor"  # smoke: exercise the code path without a C++ toolchain build
    rows = []
    for name, ours, ref, args, moved in cases:
        with kernels.enabled(False):
            expected = ref(*args)
            compiled = torch.compile(ref, backend=backend, dynamic=False)
            got_compiled = compiled(*args)
            t_ref = bench(lambda: ref(*args), smoke)
            t_compiled = bench(lambda: compiled(*args), smoke)
        with kernels.enabled(True):
            got = ours(*args)
            t_ours = bench(lambda: ours(*args), smoke)
        pairs = list(zip(got, expected)) if isinstance(got, tuple) else [(got, expected)]
        err = max(rel_l2(a, b) for a, b in pairs)
        err_c = max(rel_l2(a, b) for a, b in (zip(got_compiled, expected) if isinstance(got, tuple)
                                               else [(got_compiled, expected)]))
        res[f"kernel_{name}_ours_us"] = t_ours * 1e6
        res[f"kernel_{name}_eager_us"] = t_ref * 1e6
        res[f"kernel_{name}_compiled_us"] = t_compiled * 1e6
        res[f"kernel_{name}_rel_l2"] = err
        res[f"kernel_{name}_compiled_rel_l2"] = err_c
        res[f"kernel_{name}_ours_gbps"] = moved / t_ours / 1e9
        if not smoke:  # launched from Python (no graph): what an eager caller without CUDA graphs pays
            with kernels.enabled(True):
                res[f"kernel_{name}_ours_launched_us"] = bench(lambda: ours(*args), smoke, graph=False) * 1e6
            with kernels.enabled(False):
                res[f"kernel_{name}_eager_launched_us"] = bench(lambda: ref(*args), smoke, graph=False) * 1e6
            default = kernels._warps
            sweep = {}
            for warps in (2, 4, 8, 16):  # the row kernels' warps per program (kernels._warps picks by width)
                kernels._warps = lambda block, w=warps: w
                try:
                    with kernels.enabled(True):
                        sweep[warps] = round(bench(lambda: ours(*args), smoke) * 1e6, 2)
                finally:
                    kernels._warps = default
            res.note(f"kernel_{name}_warps_sweep_us", sweep)
        rows.append((name, t_ours * 1e6, t_ref * 1e6, t_compiled * 1e6, err, moved / t_ours / 1e9))
    return rows


def step_table(res: Results, device, smoke: bool, size: int, rounds: int) -> list[tuple]:
    from zimage_core import sampler
    from zimage_core.fast_denoiser import FastDenoiser

    dt = torch.bfloat16
    transformer, _, _, _ = build_models(device, dt, tiny=smoke)
    feats = [torch.randn(128 if not smoke else 16, transformer.config.cap_feat_dim, device=device, dtype=dt)]
    kw = dict(seed=42, width=size, height=size, steps=8 if not smoke else 1)
    cuda = device.type == "cuda"
    variants = {}
    for graphs in ((True, False) if cuda else (False,)):
        for on in (False, True):
            d = FastDenoiser(transformer, device, dtype=dt, compile=False, cuda_graph=graphs)
            name = f"{'graphs' if graphs else 'nographs'}_kernels_{'on' if on else 'off'}"
            variants[name] = (d, on)

    def call(name):
        d, on = variants[name]
        with kernels.enabled(on):
            return sampler.sample(d, feats, **kw)

    outs = {}
    for name in variants:  # first call: Triton JIT of our kernels (cached on disk for later processes), capture
        sync()
        start = time.perf_counter()
        outs[name] = call(name)
        sync()
        res[f"step8_{name}_first_call_s"] = time.perf_counter() - start
    times = {n: [] for n in variants}
    names = list(variants)
    for r in range(rounds):  # interleaved round-robin: clock and thermal drift hit every variant alike
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            start = time.perf_counter()
            call(name)
            sync()
            times[name].append(time.perf_counter() - start)
    rows = []
    for name, ts in times.items():
        res[f"step8_{name}_s"] = statistics.median(ts)
    for prefix in ("graphs", "nographs"):
        if f"{prefix}_kernels_on" in outs:
            res[f"step8_{prefix}_kernels_latents_rel_l2"] = rel_l2(outs[f"{prefix}_kernels_on"],
                                                                   outs[f"{prefix}_kernels_off"])
            on, off = (res.data["metrics"][f"step8_{prefix}_kernels_{v}_s"] for v in ("on", "off"))
            res[f"step8_{prefix}_kernels_speedup"] = off / on
            rows.append((prefix, off, on, off / on, res.data["metrics"][f"step8_{prefix}_kernels_latents_rel_l2"]))
    res.note("step8_spread", {k: [round(min(v), 4), round(max(v), 4)] for k, v in times.items()})
    if cuda:  # where an eager step's time goes now, kernels on
        d = FastDenoiser(transformer, device, dtype=dt, cuda_graph=False)
        with kernels.enabled(True):
            res["eager_step_kernels_on_cuda_ms"] = profile_eager_step(
                d, feats, size, Path(res.path).with_suffix(".eager_step_profile.txt"))
    return rows


def compile_child(cache: str, device_name: str, smoke: bool, size: int) -> dict:
    """One fresh process: enable the cache, build, compiled first generation, a later generation."""
    t0 = time.perf_counter()
    from zimage_core import compile_cache, sampler
    from zimage_core.fast_denoiser import FastDenoiser

    compile_cache.enable(cache)
    device = torch.device(device_name)
    dt = torch.bfloat16
    transformer, _, _, _ = build_models(device, dt, tiny=smoke)
    feats = [torch.randn(128 if not smoke else 16, transformer.config.cap_feat_dim, device=device, dtype=dt)]
    kw = dict(seed=42, width=size, height=size, steps=8 if not smoke else 2)
    d = FastDenoiser(transformer, device, dtype=dt, compile=True, cuda_graph=device.type == "cuda")
    sync()
    t1 = time.perf_counter()
    sampler.sample(d, feats, **kw)
    sync()
    first = time.perf_counter() - t1
    saved = compile_cache.save_once()
    later = []
    for _ in range(3):
        sync()
        t2 = time.perf_counter()
        sampler.sample(d, feats, **kw)
        sync()
        later.append(time.perf_counter() - t2)
    steady = statistics.median(later)
    return {"first_call_s": first, "steady_s": steady, "compile_s": first - steady, "saved_bytes": saved,
            "process_to_first_image_s": t1 - t0 + first, **compile_cache.status()}


def second_process(res: Results, device, smoke: bool, size: int, cache: str | None) -> list[tuple]:
    folder = cache or tempfile.mkdtemp(prefix="zimage-compile-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "TRITON_INTERPRET",
                                                                     "ZIMAGE_COMPILE_CACHE"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    out = {}
    for tag in ("cold", "warm"):
        cmd = [sys.executable, __file__, "--compile-child", folder, "--device", str(device), "--size", str(size)]
        if smoke:
            cmd.append("--tiny")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"{tag} compile process failed:\n{proc.stderr[-4000:]}")
        out[tag] = json.loads(proc.stdout.strip().splitlines()[-1])
        for k in ("first_call_s", "steady_s", "compile_s", "process_to_first_image_s"):
            res[f"compile_{tag}_{k}"] = out[tag][k]
        res.note(f"compile_{tag}_cache", {k: v for k, v in out[tag].items() if "cache" in k or k == "folder"})
    res["compile_second_process_s"] = out["warm"]["compile_s"]
    res["compile_second_process_fxgraph_cache_hit"] = out["warm"]["fxgraph_cache_hit"]
    return [(tag, out[tag]["first_call_s"], out[tag]["steady_s"], out[tag]["compile_s"],
             out[tag]["fxgraph_cache_hit"], out[tag]["fxgraph_cache_miss"]) for tag in ("cold", "warm")]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, Triton's interpreter")
    p.add_argument("--device", default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--skip-step", action="store_true")
    p.add_argument("--second-process", action="store_true", help="only the compile-cache measurement")
    p.add_argument("--cache", default=None, help="compile cache folder for --second-process (default: a new one)")
    p.add_argument("--compile-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "eager_kernels.json"))
    args = p.parse_args()
    smoke = args.smoke or args.tiny
    device = torch.device(args.device or ("cpu" if smoke else "cuda"))
    size = args.size or (64 if smoke else 1024)
    if args.compile_child:
        print(json.dumps(compile_child(args.compile_child, str(device), smoke, size)))
        return 0
    res = Results(Path(args.out), {"setting": f"bf16, batch 1, {size}x{size}, random weights; smoke={args.smoke}"})
    lines = []
    if args.second_process:
        rows = second_process(res, device, smoke, size, args.cache)
        lines.append(f"{'process':8} {'first call s':>12} {'later s':>8} {'compile s':>9} {'fx hit':>6} {'fx miss':>7}")
        lines += [f"{r[0]:8} {r[1]:12.2f} {r[2]:8.3f} {r[3]:9.2f} {r[4]:6d} {r[5]:7d}" for r in rows]
    else:
        rate = copy_rate(device, smoke)
        res["copy_rate_gbps"] = rate / 1e9
        if not args.skip_kernels:
            rows = kernel_table(res, device, smoke)
            lines.append(f"{'kernel':20} {'ours us':>9} {'eager us':>9} {'compiled us':>11} {'rel-L2':>9} "
                         f"{'ours GB/s':>9} (copy {rate / 1e9:.0f} GB/s, peak {H200_BYTES_PER_S / 1e9:.0f})")
            lines += [f"{r[0]:20} {r[1]:9.1f} {r[2]:9.1f} {r[3]:11.1f} {r[4]:9.2e} {r[5]:9.0f}" for r in rows]
        if not args.skip_step:
            rows = step_table(res, device, smoke, size, 1 if smoke else args.rounds)
            lines.append(f"{'8 steps':10} {'kernels off s':>13} {'kernels on s':>12} {'speedup':>7} {'latents rel-L2':>14}")
            lines += [f"{r[0]:10} {r[1]:13.3f} {r[2]:12.3f} {r[3]:7.2f} {r[4]:14.2e}" for r in rows]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
