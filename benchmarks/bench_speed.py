"""Speed and precision-guard benchmark: our paths against diffusers' ZImagePipeline on the same weights.

Real-size Z-Image-Turbo with random weights built on the GPU (weights don't change the cost).
Setting: 1024x1024, batch 1, 8 steps, a 128-token prompt; CUDA-synchronised medians after warm-up.

    python benchmarks/bench_speed.py --out benchmarks/results/speed_h100.json
    python benchmarks/bench_speed.py --tiny --device cpu --size 128 --out /tmp/speed.json   # smoke test

Its fp16 section times variants one after another; the precision guard's figures of record come from
``bench_fp16_gap.py --sections steps``, which interleaves them (``benchmarks/results/guard_h100.json``).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch

from common import Results, build_models, fp8_copy, out_dir, peak_gib, prompt_of_tokens, rel_l2, section, sync, timed

from zimage_core import SpeedOptions, ZImage  # noqa: E402
from zimage_core.dtypes import resolve_policy  # noqa: E402
from zimage_core.tokenizer import PromptTokenizer, find_tokenizer  # noqa: E402
from zimage_core.weights import WeightOwner  # noqa: E402

STEP_FLOP_1024 = 56.5e12  # one transformer call at 1024^2 (facts section 7)


def make_pipe(transformer, full_te, vae, tokenizer_dir):
    import tempfile

    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import AutoTokenizer

    from zimage_core.tiny import copy_tokenizer

    tok_dir = copy_tokenizer(tokenizer_dir, tempfile.mkdtemp() + "/tokenizer")  # with Qwen3's chat template
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
                          vae=vae, text_encoder=full_te, tokenizer=AutoTokenizer.from_pretrained(str(tok_dir)),
                          transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--sections", default="speed,fp16,fp8,stages")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    sections = set(args.sections.split(","))
    res = Results(args.out or out_dir() / "speed.json", {"setting": f"{args.size}x{args.size}, batch 1, 8 steps, "
                                                          f"{args.tokens}-token prompt, random weights"})
    torch.backends.cuda.matmul.allow_tf32 = True
    size, R = args.size, args.repeat
    t0 = time.perf_counter()
    transformer, full_te, our_te, vae = build_models(device, torch.bfloat16, tiny=args.tiny)
    print(f"built models in {time.perf_counter() - t0:.1f} s", flush=True)
    tok_dir = find_tokenizer()
    tokenizer = PromptTokenizer(tok_dir)
    policy = resolve_policy(device, "bf16")
    zimage = ZImage(transformer, our_te, vae, tokenizer, policy, device)
    prompt = prompt_of_tokens(tokenizer, args.tokens)
    res.note("prompt_tokens", len(tokenizer(prompt)))
    pipe = make_pipe(transformer, full_te, vae, tok_dir)
    with torch.no_grad():
        emb = zimage.encode_prompt(prompt)
    gen_kw = dict(seed=42, width=size, height=size, steps=8)

    def diffusers_steps(dtype_pipe=pipe, embeds=None):
        with torch.no_grad():
            return dtype_pipe(prompt_embeds=embeds or emb, height=size, width=size, num_inference_steps=8,
                              guidance_scale=0.0, generator=torch.Generator().manual_seed(42),
                              output_type="latent").images

    def ours_steps(z=zimage, e=None):
        return z.sample(e or emb, **gen_kw)

    state = {}

    @section("bf16 8 steps")
    def speed(results):
        results["diffusers_steps8_bf16_s"], _ = timed(diffusers_steps, repeat=R)
        state["ref"] = diffusers_steps()
        variants = [("eager_auto", SpeedOptions(cuda_graph=False)),
                    ("eager_cudnn", SpeedOptions(attention="cudnn", cuda_graph=False)),
                    ("eager_graph_cudnn", SpeedOptions(attention="cudnn", cuda_graph=True))]
        best = {}
        for name, opts in variants:
            zimage.set_speed(opts)
            try:
                results[f"ours_steps8_bf16_{name}_s"], _ = timed(ours_steps, repeat=R)
                best[name] = results.data["metrics"][f"ours_steps8_bf16_{name}_s"]
            except Exception as err:
                results.note(f"ours_steps8_bf16_{name}_error", repr(err)[:500])
        attention = "cudnn" if best.get("eager_cudnn", 9) <= best.get("eager_auto", 9) else "auto"
        zimage.set_speed(SpeedOptions(compile=True, attention=attention, cuda_graph=False, fuse_ffn=True))
        start = time.perf_counter()
        ours_steps()
        sync()
        results["compile_first_run_s"] = time.perf_counter() - start
        results[f"ours_steps8_bf16_compiled_fusedffn_{attention}_s"], _ = timed(ours_steps, repeat=R)
        zimage.set_speed(SpeedOptions(compile=True, attention=attention, cuda_graph=False))
        results[f"ours_steps8_bf16_compiled_{attention}_s"], _ = timed(ours_steps, warmup=2, repeat=R)
        zimage.set_speed(SpeedOptions(compile=True, attention=attention, cuda_graph=True))
        try:
            results[f"ours_steps8_bf16_compiled_graph_{attention}_s"], _ = timed(ours_steps, warmup=2, repeat=R)
            zimage.sample(zimage.encode_prompt("a different prompt, so a new caption stream of another length"),
                          **gen_kw)  # a new prompt: tables and graphs must follow
        except Exception as err:
            results.note("compiled_graph_error", repr(err)[:500])
        ctx = zimage.denoiser.prepare(emb)
        lat = torch.randn(1, 16, size // 8, size // 8, device=device)
        tt = torch.full((1,), 0.5, device=device)
        results["ours_prepare_s"], _ = timed(lambda: zimage.denoiser.prepare(emb), warmup=1, repeat=5)
        results["ours_loop8_only_s"], _ = timed(lambda: [zimage.denoiser(ctx, lat, tt) for _ in range(8)], repeat=R)
        times = {k: v for k, v in results.data["metrics"].items() if k.startswith("ours_steps8_bf16_")}
        best_name = min(times, key=times.get)
        results["ours_steps8_bf16_s"] = times[best_name]
        results.note("ours_steps8_bf16_best", best_name)
        results["ours_steps8_bf16_tflops"] = 8 * STEP_FLOP_1024 / times[best_name] / 1e12 * (size / 1024) ** 2
        state["best_opts"] = SpeedOptions(compile="compiled" in best_name, cuda_graph="graph" in best_name,
                                          attention=best_name.split("_")[-2], fuse_ffn="fusedffn" in best_name)
        zimage.set_speed(state["best_opts"])
        ours = ours_steps()
        results["latents_rel_l2_bf16_vs_diffusers"] = rel_l2(ours, state["ref"])
        results["diffusers_vs_itself_flash_rel_l2"] = _diffusers_noise_floor(pipe, diffusers_steps, state["ref"])
        _profile(results, "ours_bf16_step", lambda: ours_steps_one(zimage, emb, size))
        _profile(results, "diffusers_bf16_step", lambda: diffusers_one(pipe, emb, size))

    @section("stages")
    def stages(results):
        zimage.set_speed(state.get("best_opts", SpeedOptions()))

        def encode():
            zimage.prompt_encoder.clear_cache()
            return zimage.encode_prompt(prompt)

        results["ours_text_encode_s"], _ = timed(encode, warmup=2, repeat=5)
        graphs, zimage.prompt_encoder.graphs = zimage.prompt_encoder.graphs, None
        results["ours_text_encode_eager_s"], _ = timed(encode, warmup=1, repeat=5)
        zimage.prompt_encoder.graphs = graphs
        with torch.no_grad():
            ids = torch.tensor([tokenizer(prompt)])
            eager = zimage.prompt_encoder._run(ids.to(device))
            graphed = zimage.prompt_encoder.forward(ids)
            bucket = -(-ids.shape[1] // 64) * 64
            padded = torch.full((1, bucket), 151643, dtype=torch.long)
            padded[:, :ids.shape[1]] = ids
            eager_padded = zimage.prompt_encoder._run(padded.to(device))[:ids.shape[1]]
        results["text_encode_graph_vs_eager_rel_l2"] = rel_l2(graphed, eager)
        results["text_encode_graph_vs_eager_same_padding_rel_l2"] = rel_l2(graphed, eager_padded)
        results["text_encode_eager_padded_vs_unpadded_rel_l2"] = rel_l2(eager_padded, eager)
        results["diffusers_text_encode_s"], _ = timed(
            lambda: pipe.encode_prompt(prompt, device=device, do_classifier_free_guidance=False), warmup=2, repeat=5)
        lat = state.get("ref") if state.get("ref") is not None else diffusers_steps()
        results["ours_vae_decode_1024_s"], _ = timed(lambda: zimage.decode(lat, tiled=False), warmup=2, repeat=5)
        results["vae_decode_peak_gib"] = peak_gib(lambda: zimage.decode(lat, tiled=False))

        def diffusers_decode():
            with torch.no_grad():
                z = lat.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
                return vae.decode(z).sample

        results["diffusers_vae_decode_1024_s"], _ = timed(diffusers_decode, warmup=2, repeat=5)
        for tile, overlap in ((size, 0), (512, 0), (512, 64)):
            run = lambda: zimage.decode(lat, tiled=True, tile_size=tile, overlap=overlap)  # noqa: E731
            results[f"ours_vae_decode_1024_exact_tiles_{tile}_{overlap}_s"], _ = timed(run, warmup=2, repeat=5)
        ours_img = zimage.decode(lat, tiled=False)
        plain = (diffusers_decode().float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()
        results["vae_decode_ours_vs_diffusers_max_abs"] = (ours_img - plain).abs().max().item()
        results["vae_decode_ours_vs_diffusers_mean_abs"] = (ours_img - plain).abs().mean().item()

        def ours_e2e():
            zimage.prompt_encoder.clear_cache()
            return zimage.generate(prompt, tiled_decode=False, **gen_kw)

        def diffusers_e2e():
            with torch.no_grad():
                return pipe(prompt, height=size, width=size, num_inference_steps=8, guidance_scale=0.0,
                            generator=torch.Generator().manual_seed(42), output_type="pt").images

        results["ours_end_to_end_bf16_s"], _ = timed(ours_e2e, repeat=R)
        results["diffusers_end_to_end_bf16_s"], _ = timed(diffusers_e2e, repeat=R)
        results["peak_vram_gib_bf16"] = peak_gib(ours_e2e)

    @section("fp16 and the precision guard")
    def fp16(results):
        transformer.to(torch.float16)
        emb16 = [e.to(torch.float16) for e in emb]
        z16 = ZImage(transformer, our_te, vae, tokenizer, resolve_policy(device, "bf16", overrides={
            "transformer": ("fp16", "fp16")}), device)
        results["diffusers_steps8_fp16_s"], _ = timed(lambda: diffusers_steps(pipe, emb16), repeat=R)
        results["diffusers_fp16_latents_finite"] = bool(torch.isfinite(diffusers_steps(pipe, emb16)).all())
        _profile(results, "diffusers_fp16_step", lambda: diffusers_one(pipe, emb16, size))
        opts = state.get("best_opts", SpeedOptions())
        z16.set_speed(opts)
        plain = lambda: z16.sample(emb16, **gen_kw)  # noqa: E731
        results["ours_steps8_fp16_s"], _ = timed(plain, warmup=2, repeat=R)
        _profile(results, "ours_fp16_step", lambda: ours_steps_one(z16, emb16, size))
        lat16 = plain()
        results["ours_fp16_latents_finite"] = bool(torch.isfinite(lat16).all())
        if state.get("ref") is not None:
            results["latents_rel_l2_fp16_vs_diffusers_bf16"] = rel_l2(lat16, state["ref"])
        guard = z16.set_precision_guard("auto")
        results["ours_steps8_fp16_guarded_s"], _ = timed(plain, warmup=1, repeat=R)
        results["guard_overhead_no_overflow_ratio"] = (results.data["metrics"]["ours_steps8_fp16_guarded_s"]
                                                       / results.data["metrics"]["ours_steps8_fp16_s"])
        results.note("guard_no_overflow_report", guard.report())
        # Plant two overflowing blocks: their SwiGLU products pass 65504 in fp16 (the FFN norm keeps outputs finite).
        n = len(transformer.layers)
        planted = [f"layers.{n // 3}", f"layers.{2 * n // 3}"]
        scale = 400.0 if args.tiny else 60.0
        with torch.no_grad():
            for name in planted:
                ffn = transformer.get_submodule(name).feed_forward
                ffn.w1.weight.mul_(scale)
                ffn.w3.weight.mul_(scale)
        WeightOwner.of(transformer).clear_sticky()
        z16.set_precision_guard("off")
        results["planted_plain_fp16_finite"] = bool(torch.isfinite(plain()).all())
        guard = z16.set_precision_guard("auto")
        start = time.perf_counter()
        first = plain()
        sync()
        results["guard_first_run_with_detection_s"] = time.perf_counter() - start
        results["guard_sticky_blocks"] = guard.sticky()
        results["ours_steps8_fp16_guarded_two_blocks_s"], _ = timed(plain, warmup=0, repeat=R)
        results["guard_two_blocks_ratio"] = (results.data["metrics"]["ours_steps8_fp16_guarded_two_blocks_s"]
                                             / results.data["metrics"]["ours_steps8_fp16_s"])
        results["guard_probe_runs_after_first"] = guard.probe_runs
        # The repaired fp16 result against a bf16 run of the same planted weights.
        transformer.to(torch.bfloat16)
        zb = ZImage(transformer, our_te, vae, tokenizer, policy, device)
        zb.set_speed(opts)
        results["guard_planted_rel_l2_vs_bf16"] = rel_l2(first, zb.sample(emb, **gen_kw))
        with torch.no_grad():
            for name in planted:
                ffn = transformer.get_submodule(name).feed_forward
                ffn.w1.weight.div_(scale)
                ffn.w3.weight.div_(scale)
        WeightOwner.of(transformer).clear_sticky()
        z16.set_precision_guard("off")

    @section("fp8")
    def fp8(results):
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
            results.note("fp8", "skipped: no fp8 matrix multiply on this device")
            return
        q = fp8_copy(transformer, torch.bfloat16)
        policy8 = resolve_policy(device, "bf16", "fp8")
        z8 = ZImage(q, our_te, vae, tokenizer, policy8, device)
        opts = state.get("best_opts", SpeedOptions())
        for name, fp8mm in (("dequant", False), ("scaled_mm", True)):
            z8.set_speed(SpeedOptions(compile=opts.compile, attention=opts.attention, fp8_matmul=fp8mm))
            results[f"ours_steps8_fp8_{name}_s"], _ = timed(lambda: z8.sample(emb, **gen_kw), warmup=2, repeat=R)
            lat8 = z8.sample(emb, **gen_kw)
            if state.get("ref") is not None:
                results[f"latents_rel_l2_fp8_{name}_vs_diffusers"] = rel_l2(lat8, state["ref"])
        results["ours_steps8_fp8_s"] = results.data["metrics"]["ours_steps8_fp8_scaled_mm_s"]
        results["latents_rel_l2_fp8_vs_diffusers"] = results.data["metrics"].get(
            "latents_rel_l2_fp8_scaled_mm_vs_diffusers", float("nan"))
        if state.get("ref") is not None:
            img8 = z8.decode(z8.sample(emb, **gen_kw), tiled=False)
            img = zimage.decode(state["ref"], tiled=False)
            results["image_max_abs_fp8_vs_diffusers_bf16"] = (img8 - img).abs().max().item()
            results["image_mean_abs_fp8_vs_diffusers_bf16"] = (img8 - img).abs().mean().item()
            results["image_psnr_db_fp8_vs_diffusers_bf16"] = (10 * torch.log10(1 / ((img8 - img) ** 2).mean())).item()
        del q, z8
        gc.collect()
        torch.cuda.empty_cache()

    if "speed" in sections:
        speed(res)
    if "stages" in sections:
        stages(res)
    if "fp8" in sections:
        fp8(res)
    if "fp16" in sections:
        fp16(res)
    print(f"total {time.perf_counter() - t0:.1f} s")
    for k, v in res.data["metrics"].items():
        print(f"{k:48s} {v}")


def ours_steps_one(zimage, emb, size):
    """One step's kernels, launched eagerly (with graphs the profile would show one replay)."""
    ctx = zimage.denoiser.prepare(emb)
    lat = torch.randn(1, 16, size // 8, size // 8, device=zimage.device)
    t = torch.tensor([0.5], device=zimage.device)
    zimage.denoiser._tables(ctx, 1, size // 8, size // 8)
    return zimage.denoiser._forward(ctx, lat, t)


def diffusers_one(pipe, emb, size):
    lat = torch.randn(1, 16, 1, size // 8, size // 8, device=emb[0].device, dtype=pipe.transformer.dtype)
    with torch.no_grad():
        return pipe.transformer(list(lat.unbind(0)), torch.tensor([0.5], device=emb[0].device), emb, return_dict=False)


def _diffusers_noise_floor(pipe, run, ref):
    """diffusers against itself with another attention kernel: the bf16 noise floor of any comparison."""
    if not torch.cuda.is_available():
        return float("nan")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        other = run()
    return rel_l2(other, ref)


def _profile(results, name, fn):
    """Top CUDA kernels of one call, written next to the results (where the time goes)."""
    if not torch.cuda.is_available():
        return
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    (results.path.parent / f"profile_{name}.txt").write_text(table)
    total = sum(e.device_time_total for e in prof.key_averages()) / 1e3
    results[f"profile_{name}_cuda_ms"] = total


if __name__ == "__main__":
    sys.exit(main())
