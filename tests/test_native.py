"""Z-Image Turbo Accelerate on ComfyUI's own Z-Image model (0.3.75 and 0.33.0), against ComfyUI itself.

The tiny model is written in ComfyUI's layout and loaded by ComfyUI's own loader (``comfy_zimage.tiny_native_model``:
the test-only config mapping). In a subprocess per ComfyUI version (this file is also that subprocess's script:
``python test_native.py COMFY_ROOT IN_DIR OUT_DIR``), ComfyUI's sampler runs with and without our node and the
latents are compared here:

- fp32 parity within 1e-5: euler and res_multistep, cfg 1 and 3 (cond and uncond batched), batch 2, denoise 0.6,
  two sizes on one accelerated model (a change of resolution), LoRAs in every key format the version maps, two
  LoRAs stacked, a strength changed between runs on the same accelerated model;
- a partly loaded model (ComfyUI's low-VRAM load, every module or half the model; a LoRA applied per op) runs our
  maths on weights fetched through ComfyUI's ``cast_bias_weight`` (never more than two held at once, every one given
  back) and matches;
- the cases users have, each with no block run natively (``users_cases``): an fp8 ``weight_dtype`` (stays fp8 under
  the node), legacy scaled fp8, comfy_quant e4m3 and int8_convrot files (0.33; int8 within its rounding, ours at
  least as near the unquantized model), omni calls with reference latents (0.33), a padded caption batch (0.33;
  0.3.75's own attention fails on it), ``ModelAttentionBackend``'s attention inside our blocks (0.33), dynamic
  VRAM's cast (faked: comfy-aimdo needs a CUDA device; its marks on every module make ComfyUI's ``cast_bias_weight``
  take its dynamic branch; also on an fp8 model built by ComfyUI's lazy layers, whose tensor is the file's and whose
  fp8 dtype is a mark the node must read), and 0.3.75's all-ones caption mask;
- fp16 with planted overflows: native is NaN (0.3.75) or clamped (0.33.0); ours with ``auto`` is finite and within
  1e-2 of fp32, with exactly the planted blocks made sticky;
- a non-Z-Image MODEL is refused with our error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PLANTS = {"noise_refiner.0.feed_forward.w1": 400.0, "noise_refiner.0.feed_forward.w3": 400.0,
          "layers.1.feed_forward.w1": 400.0, "layers.1.feed_forward.w3": 400.0}
PLANTED_BLOCKS = {"noise_refiner.0", "layers.1"}
# (name, sampler, cfg, batch, denoise, latent height, latent width)
CASES = [
    ("euler", "euler", 1.0, 1, 1.0, 8, 8),
    ("res_multistep", "res_multistep", 1.0, 1, 1.0, 8, 8),
    ("cfg3", "euler", 3.0, 1, 1.0, 8, 8),
    ("batch2", "res_multistep", 1.0, 2, 1.0, 8, 8),
    ("denoise06", "res_multistep", 1.0, 1, 0.6, 8, 8),
    ("size96x64", "euler", 1.0, 1, 1.0, 8, 12),
    ("cfg3_batch2_size", "res_multistep", 3.0, 2, 1.0, 12, 8),
]
LORA_FORMATS = {"0.3.75": ["native_dm", "native_kohya", "diffusers_dm", "lycoris"],
                "0.33.0": ["native_dm", "native_kohya", "diffusers_dm", "lycoris", "peft", "bare"]}
STEPS = 4


# ===================================================================================== ComfyUI side (subprocess)
def boot(root: Path) -> None:
    """ComfyUI's core on the CPU, its V3 API importable (comfy_zimage.boot stubs PyAV, which comfy_api needs)."""
    sys.path.insert(0, str(root))
    sys.argv = ["main.py", "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()


def comfy_side(root: Path, inp: Path, out: Path) -> None:
    sys.path.insert(0, str(HERE))
    from comfy_zimage import tiny_native_model
    from helpers import load_pack

    boot(root)
    import comfy.model_management
    import comfy.patcher_extension
    import comfy.sample
    import comfy.sd
    import comfyui_version
    import torch
    from safetensors.torch import load_file, save_file

    accel_mod = load_pack()
    from zimage_core import ZImageError

    torch.manual_seed(0)
    results: dict = {"comfyui_version": comfyui_version.__version__, "cases": {}, "lora": {}}
    tensors: dict = {}
    base_sd = load_file(str(inp / "transformer.safetensors"))
    cap_dim = base_sd["cap_embedder.0.weight"].shape[0]
    gen = torch.Generator().manual_seed(5)
    positive = [[torch.randn(1, 19, cap_dim, generator=gen), {}]]
    negative = [[torch.randn(1, 19, cap_dim, generator=gen), {}]]

    def sample(model, sampler="euler", cfg=1.0, batch=1, denoise=1.0, h=8, w=8, seed=3, positive=positive,
               negative=negative, steps=STEPS):
        gen = torch.Generator().manual_seed(11)
        latent = torch.randn(batch, 16, h, w, generator=gen) if denoise < 1 else torch.zeros(batch, 16, h, w)
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(model, noise, steps, cfg, sampler, "simple", positive, negative, latent,
                                   denoise=denoise, disable_pbar=True, seed=seed).float()

    def report(accel):
        r = accel.report()
        accel.fast_runs = accel.native_runs = 0
        accel.fallbacks.clear()
        return r

    # ------------------------------------------------------------ fp32 parity, one accelerated model for all cases
    base = tiny_native_model(base_sd)
    fast, accel = accel_mod.accelerate(base, compile=False, attention="auto", precision_guard="off")
    for name, sampler, cfg, batch, denoise, h, w in CASES:
        tensors[f"{name}_native"] = sample(base, sampler, cfg, batch, denoise, h, w)
        tensors[f"{name}_ours"] = sample(fast, sampler, cfg, batch, denoise, h, w)
        results["cases"][name] = report(accel)
    results["input_untouched"] = "forward" not in base.model.diffusion_model.layers[0].__dict__
    # bf16 compute (no manual cast) on the same weights: each path's rounding against the fp32 run above
    bf16 = tiny_native_model(base_sd, dtype=torch.bfloat16)
    bf16.model.manual_cast_dtype = None
    tensors["bf16_native"] = sample(bf16)
    tensors["bf16_ours"] = sample(accel_mod.accelerate(bf16, compile=False)[0])
    # the kernel warm-up's thread: never beside dynamic VRAM at DEBUG/DETAIL verbosity (aimdo's hooks log into
    # Python), read from ComfyUI's --verbose as its main.py reads it (0.33: a list of outputs; 0.3.75: a level)
    from comfy import cli_args

    dynamic = base.clone()
    dynamic.is_dynamic = lambda: True
    verbose, armed = cli_args.args.verbose, []
    real_start = accel_mod.NativeAccelerator.start_warm_up
    accel_mod.NativeAccelerator.start_warm_up = lambda self, *a: armed.append(True)
    safe = {}
    try:
        for name, patcher, level in (("dynamic_info", dynamic, "INFO"), ("dynamic_debug", dynamic, "DEBUG"),
                                     ("dynamic_detail", dynamic, "DETAIL"), ("static_debug", base, "DEBUG")):
            cli_args.args.verbose = [(level, None)] if hasattr(cli_args, "get_console_log_level") else level
            armed.clear()
            accel_mod.accelerate(patcher)
            safe[name] = [accel_mod.background_warm_up_safe(patcher), bool(armed)]
    finally:
        cli_args.args.verbose = verbose
        accel_mod.NativeAccelerator.start_warm_up = real_start
    results["background_warm_up_safe"] = safe
    # when the armed warm-up starts in ComfyUI's sampler (none is armed on the CPU: a recording one here, done at
    # once): as a short schedule's last call returns, after a long one's first call (native.warm_up_due)
    warm_up_starts = {}
    for steps in (STEPS, 24):
        fast_w, accel_w = accel_mod.accelerate(base, compile=False)
        started = []
        accel_w._warm_up_start = lambda started=started, accel_w=accel_w: started.append(accel_w.warming_calls)
        sample(fast_w, steps=steps, cfg=3.0)  # cond and uncond in one call a step
        warm_up_starts[steps] = {"started_after_calls": started, "warming_calls": accel_w.warming_calls,
                                 "fast_blocks": accel_w.report()["fast_blocks"]}
    results["warm_up_starts"] = warm_up_starts
    results["wrapper_on_input"] = accel_mod.WRAPPER_KEY in json.dumps(base.wrappers, default=str)
    results["wrapper_on_clone"] = accel_mod.WRAPPER_KEY in json.dumps(fast.wrappers, default=str)

    # ------------------------------------------------------------ LoRA: every accepted key format, on LoRA -> Accelerate
    for fmt in LORA_FORMATS[results["comfyui_version"]]:
        lora = load_file(str(inp / f"lora_{fmt}.safetensors"))
        patched = comfy.sd.load_lora_for_models(base, None, lora, 0.8, 0)[0]
        tensors[f"lora_{fmt}_native"] = sample(patched, "res_multistep")
        tensors[f"lora_{fmt}_ours"] = sample(accel_mod.accelerate(patched, compile=False)[0], "res_multistep")
        tensors[f"lora_{fmt}_base"] = tensors["res_multistep_native"]
    # two stacked, and Accelerate -> LoRA with the strength changed between runs on the same accelerated model
    a = load_file(str(inp / "lora_native_dm.safetensors"))
    b = load_file(str(inp / "lora_lycoris.safetensors"))
    two = comfy.sd.load_lora_for_models(comfy.sd.load_lora_for_models(base, None, a, 0.7, 0)[0], None, b, -0.5, 0)[0]
    tensors["lora_stack_native"] = sample(two)
    tensors["lora_stack_ours"] = sample(accel_mod.accelerate(two, compile=False)[0])
    for strength in (1.0, 0.3):
        tensors[f"lora_strength{strength}_native"] = sample(comfy.sd.load_lora_for_models(base, None, a, strength, 0)[0])
        tensors[f"lora_strength{strength}_ours"] = sample(comfy.sd.load_lora_for_models(fast, None, a, strength, 0)[0])
    results["lora"]["after_accelerate"] = report(accel)

    # ------------------------------------------------------------ partly loaded (low VRAM: LoRA per op): fallback
    # a LoRA on layers.0 only: that block is patched per op once partly loaded, the others stay plain
    a_one = {k: v for k, v in a.items() if k.startswith("diffusion_model.layers.0.")}
    patched = comfy.sd.load_lora_for_models(base, None, a_one, 0.8, 0)[0]
    fast_patched, accel_p = accel_mod.accelerate(patched, compile=False)
    x = torch.randn(1, 16, 8, 8, generator=gen)
    sigma = torch.tensor([0.7])
    cond = positive[0][0]

    def call(patcher):  # one model call as ComfyUI's sampler makes it (its wrappers put in transformer_options)
        opts = comfy.patcher_extension.copy_nested_dicts(patcher.model_options["transformer_options"])
        comfy.patcher_extension.merge_nested_dicts(opts.setdefault("wrappers", {}), patcher.wrappers, copy_dict1=False)
        return patcher.model.apply_model(x, sigma, c_crossattn=cond, transformer_options=opts,
                                         num_tokens=cond.shape[1]).float()

    comfy.model_management.unload_all_models()  # the sampler's loads above left another clone's LoRA patched in
    patched.patch_model(device_to=torch.device("cpu"))
    tensors["full_native"] = call(patched)
    tensors["full_ours"] = call(fast_patched)
    results["full_load"] = report(accel_p)
    patched.unpatch_model(device_to=torch.device("cpu"))
    held = watch_fetches(accel_p)
    for budget_name, budget in (("lowvram", 1), ("lowvram_half", patched.model_size() // 2)):
        patched.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=budget)  # 1 byte: every module
        results[f"{budget_name}_modules"] = sum(1 for m in patched.model.diffusion_model.modules()
                                                if getattr(m, "weight_function", None)
                                                or getattr(m, "comfy_cast_weights", False))
        tensors[f"{budget_name}_native"] = call(patched)
        tensors[f"{budget_name}_ours"] = call(fast_patched)
        results[budget_name] = report(accel_p)
        patched.unpatch_model(device_to=torch.device("cpu"))
    results["fetches"] = dict(held)

    # ------------------------------------------------------------ users' cases on ComfyUI's sampler: no fallback
    users_cases(base, accel_mod, sample, positive, negative, cap_dim, gen, inp, results, tensors)

    # ------------------------------------------------------------ fp16 with planted overflows
    planted = dict(base_sd)
    for key, scale in PLANTS.items():
        planted[f"{key}.weight"] = planted[f"{key}.weight"] * scale
    ref = tiny_native_model(planted)
    tensors["planted_fp32"] = sample(ref, "res_multistep")
    half = tiny_native_model(planted, dtype=torch.float16)
    half.model.manual_cast_dtype = torch.float16  # ComfyUI computes fp16 only on GPUs; the CPU test forces it
    tensors["planted_fp16_native"] = sample(half, "res_multistep")
    guarded, accel_g = accel_mod.accelerate(half, compile=False, precision_guard="auto")
    tensors["planted_fp16_auto"] = sample(guarded, "res_multistep")
    results["planted_auto"] = accel_g.report()
    tensors["planted_fp16_auto_again"] = sample(guarded, "res_multistep")  # sticky: no probe this time
    results["planted_auto_again"] = accel_g.report()
    # fresh models: the sticky blocks found above stay with that model's weight owner (as our pipeline's do)
    half = tiny_native_model(planted, dtype=torch.float16)
    half.model.manual_cast_dtype = torch.float16
    detect = accel_mod.accelerate(half, compile=False, precision_guard="detect")[0]
    results["planted_detect"] = _error_of(lambda: sample(detect, "res_multistep"))
    half = tiny_native_model(planted, dtype=torch.float16)
    half.model.manual_cast_dtype = torch.float16
    clamp = accel_mod.accelerate(half, compile=False, precision_guard="clamp")[0]
    tensors["planted_fp16_clamp"] = sample(clamp, "res_multistep")

    # ------------------------------------------------------------ exact tiled decode on ComfyUI's own VAE
    import comfy.utils

    from zturbo_pack.nodes.native_vae import ZTurboNativeVAEDecodeTiled

    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(inp / "ae.safetensors")))
    z = torch.randn(1, 16, 16, 20, generator=gen)  # 128x160 pixels: several 64-pixel tiles
    tensors["vae_native"] = vae.decode(z).float()
    for overlap in (0, 32):
        decoded = ZTurboNativeVAEDecodeTiled.execute({"samples": z}, vae, tile_size=64, overlap=overlap)
        tensors[f"vae_tiled_{overlap}"] = (decoded.result[0] if hasattr(decoded, "result") else decoded[0]).float()
    results["vae_bad_latent"] = _error_of(
        lambda: ZTurboNativeVAEDecodeTiled.execute({"samples": torch.zeros(1, 4, 8, 8)}, vae))

    # ------------------------------------------------------------ one block: diffusers' layout vs ComfyUI's
    from diffusers import ZImageTransformer2DModel

    from zimage_core.blocks import block_forward, original_block_shape, original_block_weights
    from zimage_core.native import native_blocks, rope_tables
    from zimage_core.tiny import tiny_configs
    from zimage_core.weights import TransformerWeights

    ref = ZImageTransformer2DModel(**tiny_configs()[0])
    ref.load_state_dict(load_file(str(inp / "diffusers_transformer.safetensors")))
    owner = TransformerWeights.of(ref)
    dm = base.model.diffusion_model
    seq = 40
    pos = torch.stack([torch.arange(seq), torch.arange(seq) % 5, torch.arange(seq) % 7], -1).float()[None]
    freqs = dm.rope_embedder(pos).movedim(1, 2)  # ComfyUI's own rotation matrices
    cos, sin = rope_tables(freqs)
    x = torch.randn(2, seq, dm.dim, generator=gen)
    adaln = torch.randn(2, 256 if dm.dim > 256 else dm.dim, generator=gen)
    worst = 0.0
    for name, block in native_blocks(dm).items():
        a = adaln if block.modulation else None
        ours_native = block_forward(x, None, cos, sin, a, original_block_weights(block), original_block_shape(block),
                                    False)
        # the same shape for both: the layouts alone (q/k norm eps differ, 1e-5 vs float32's eps: 6e-5 here)
        ours_diffusers = block_forward(x, None, cos, sin, a, owner.block(name), original_block_shape(block), False)
        comfy_own = type(block).forward(block, x, None, freqs, a)
        worst = max(worst, (ours_native - ours_diffusers).abs().max().item())
        results.setdefault("block_vs_comfy", {})[name] = (ours_native - comfy_own).abs().max().item()
    results["block_layouts_max_diff"] = worst
    results["block_shapes"] = [list(original_block_shape(dm.layers[0])), list(owner.shape)]

    # ------------------------------------------------------------ a model that is not Z-Image is refused
    lumina = _lumina2_patcher(base_sd)
    results["refused"] = _error_of(lambda: accel_mod.ZTurboAccelerate.execute(lumina))
    results["zimage_error"] = ZImageError.__module__ + "." + ZImageError.__qualname__

    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(out / "tensors.safetensors"))
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))


def watch_fetches(accel) -> dict:
    """Counts of the weights the accelerator's provider fetched through ComfyUI's cast_bias_weight: how many at
    once at most (ComfyUI's own ops hold two: the q/k norms), how many in all, how many never given back."""
    provider = accel.weights
    cast, uncast = provider.cast, provider.uncast
    counts = {"max_held": 0, "casts": 0, "held": 0}

    def counting_cast(module, x, mode):
        counts["casts"] += 1
        counts["held"] += 1
        counts["max_held"] = max(counts["max_held"], counts["held"])
        return cast(module, x, mode)

    def counting_uncast(*args):
        counts["held"] -= 1
        return uncast(*args)

    provider.cast, provider.uncast = counting_cast, counting_uncast
    return counts


def users_cases(base, accel_mod, sample, positive, negative, cap_dim, gen, inp, results, tensors):
    """The calls and models users have, with and without our node on ComfyUI's sampler (issues 22 and 26): each
    pair of latents is compared by the pytest side, and each report must show no block run natively."""
    import comfy.model_management
    import comfyui_version
    import torch
    from safetensors.torch import load_file

    current = comfyui_version.__version__ != "0.3.75"
    cases = results.setdefault("users", {})

    def pair(name, patcher, **kw):
        """native and accelerated latents of one case (the accelerated clone made from this patcher)."""
        tensors[f"u_{name}_native"] = sample(patcher, **kw)
        fast, accel = accel_mod.accelerate(patcher, compile=False)
        held = watch_fetches(accel)
        tensors[f"u_{name}_ours"] = sample(fast, **kw)
        cases[name] = accel.report() | {"fetches": dict(held)}
        comfy.model_management.unload_all_models()
        return fast, accel

    # an fp8 weight_dtype (computed in fp32 on the CPU): the weights stay fp8 under the node
    sd = load_file(str(inp / "transformer.safetensors"))
    fp8 = accel_mod_model(sd, torch.float8_e4m3fn)
    fast, _ = pair("fp8_weight_dtype", fp8, sampler="res_multistep")
    cases["fp8_weight_dtype"]["clone_weight_dtype"] = str(fast.model.diffusion_model.layers[0].attention.qkv.weight.dtype)
    # quantized checkpoints as ComfyUI loads them (0.33: comfy_quant; both: legacy scaled fp8)
    for name in ("legacy_scaled_fp8",) + (("comfy_quant_float8_e4m3fn", "comfy_quant_int8_convrot") if current else ()):
        import comfy.utils

        qsd, metadata = comfy.utils.load_torch_file(str(inp / "quant" / f"{name}.safetensors"), return_metadata=True)
        pair(name, accel_mod_model(qsd, torch.float32, metadata), sampler="res_multistep")
        tensors[f"u_{name}_reference"] = tensors["res_multistep_native"]  # the unquantized model
    if current:
        # an omni call: reference latents with their text (what TextEncodeZImageOmni adds), cfg 1 and 3
        ref = torch.randn(1, 16, 8, 8, generator=gen)
        extra = torch.randn(1, 7, cap_dim, generator=gen)
        omni = [[positive[0][0], {"reference_latents": [ref], "reference_latents_text_embeds": [extra]}]]
        for cfg in (1.0, 3.0):
            pair(f"omni_cfg{cfg:g}", base, positive=omni, cfg=cfg)
        # a batch of two prompts of different lengths (a padded caption batch with its mask)
        caps = torch.randn(2, 25, cap_dim, generator=gen)
        mask = torch.ones(2, 25, dtype=torch.long)
        mask[1, 19:] = 0
        pair("padded_batch", base, positive=[[caps, {"attention_mask": mask}]], batch=2, cfg=3.0,
             negative=[[torch.randn(2, 25, cap_dim, generator=gen), {}]])
        # another node chose the attention (ModelAttentionBackend): it runs inside our blocks
        from comfy_extras.nodes_model_advanced import ModelAttentionBackend

        pair("attention_backend", ModelAttentionBackend().patch(base, "pytorch attention")[0])
        # dynamic VRAM can't run on the CPU (comfy-aimdo needs a CUDA device): its marks on every module make
        # ComfyUI's cast_bias_weight take its dynamic branch, which our provider then calls for every weight
        for name, dtype in (("dynamic_marks", torch.float32), ("dynamic_marks_fp8", torch.float8_e4m3fn)):
            dyn = accel_mod_model(sd, dtype)
            for module in dyn.model.diffusion_model.modules():
                if hasattr(module, "comfy_cast_weights"):
                    module._v = object()
                    module.comfy_cast_weights = True
            fast, _ = pair(name, dyn)
            cases[name]["clone_weight_dtype"] = str(fast.model.diffusion_model.layers[0].attention.qkv.weight.dtype)
        # and built as dynamic VRAM builds it: ComfyUI's lazy layers hold the file's tensor (fp32 here, bf16 for
        # users) and mark the model's dtype, fp8, on the module; the node must read the mark (it read the tensor's
        # dtype and ran fp8_e4m3fn_fast on weights cast to bf16: H100). On the CPU both sides cast the file's tensor.
        import comfy.memory_management

        comfy.memory_management.aimdo_enabled = True
        try:
            lazy = accel_mod_model(sd, torch.float8_e4m3fn)
        finally:
            comfy.memory_management.aimdo_enabled = False
        for module in lazy.model.diffusion_model.modules():
            if hasattr(module, "comfy_cast_weights"):
                module._v = object()
                module.comfy_cast_weights = True
        qkv = lazy.model.diffusion_model.layers[0].attention.qkv
        pair("dynamic_lazy_fp8", lazy)
        cases["dynamic_lazy_fp8"] |= {"tensor_dtype": str(qkv.weight.dtype),
                                      "stored_dtype": str(accel_mod.stored_dtype(qkv))}
    # ComfyUI 0.3.75's caption mask: the CLIP text encoder's all-ones mask reaches the caption refiner
    pair("caption_mask", base, positive=[[positive[0][0], {"attention_mask": torch.ones(1, 19, dtype=torch.long)}]])


def accel_mod_model(sd, dtype, metadata=None):
    from comfy_zimage import tiny_native_model
    import torch

    patcher = tiny_native_model(sd, dtype=dtype, metadata=metadata)
    if dtype != torch.float32:
        patcher.model.manual_cast_dtype = torch.float32  # compute in fp32 on the CPU, weights as loaded
    return patcher


def _lumina2_patcher(sd):
    """A ModelPatcher whose diffusion model is a Lumina 2 NextDiT (SiLU modulation, no pad tokens)."""
    import comfy.ldm.lumina.model as lumina
    import comfy.model_patcher
    import comfy.ops
    import torch
    from types import SimpleNamespace

    dm = lumina.NextDiT(patch_size=2, in_channels=16, dim=64, n_layers=1, n_refiner_layers=1, n_heads=2,
                        n_kv_heads=2, qk_norm=True, cap_feat_dim=32, axes_dims=[8, 12, 12],
                        operations=comfy.ops.disable_weight_init, dtype=torch.float32)
    model = torch.nn.Module()
    model.diffusion_model = dm
    model.model_sampling = SimpleNamespace()
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def _error_of(fn) -> dict:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - recorded for the test to judge
        return {"type": f"{type(err).__module__}.{type(err).__qualname__}", "message": str(err)}
    return {"type": None, "message": None}


# ===================================================================================== pytest side
if __name__ != "__main__":
    import pytest
    import torch

    from comfy_zimage import comfy_root, python_for

    VERSIONS = ("0.3.75", "0.33.0")

    @pytest.fixture(scope="module")
    def native_inputs(tmp_path_factory, tiny_models):
        from safetensors.torch import save_file

        from helpers import transformer_to_original, vae_to_original
        from test_lora import write_lora

        d = tmp_path_factory.mktemp("native-in")
        state = transformer_to_original(tiny_models[0].state_dict(), prefix="")
        save_file(state, str(d / "transformer.safetensors"))
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        for fmt in ("native_dm", "native_kohya", "diffusers_dm", "lycoris", "peft", "bare"):
            write_lora(d / f"lora_{fmt}.safetensors", shapes, fmt, alpha=fmt not in ("peft", "bare", "native_kohya"))
        from diffusers import AutoencoderKL

        from zimage_core.formats import shipped_config
        from zimage_core.tiny import randomize_

        # ComfyUI's VAE loader takes only the real Flux VAE architecture (84 M parameters, random weights here)
        vae = randomize_(AutoencoderKL(**{k: v for k, v in shipped_config("vae").items() if not k.startswith("_")}), 11)
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in vae_to_original(vae.state_dict(), vae.config).items()},
                  str(d / "ae.safetensors"))
        save_file({k: v.contiguous() for k, v in tiny_models[0].state_dict().items()},
                  str(d / "diffusers_transformer.safetensors"))
        from test_quantized import write_layouts

        write_layouts(state, d / "quant")
        return d

    @pytest.fixture(scope="module", params=VERSIONS)
    def native_run(request, native_inputs, tmp_path_factory):
        import os
        import subprocess

        from safetensors.torch import load_file

        version = request.param
        if python_for(version) is None:
            pytest.skip(f"the ComfyUI {version} test venv is not installed (scripts/dev-install.sh makes it)")
        root = comfy_root(version, tmp_path_factory.getbasetemp())
        out = tmp_path_factory.mktemp(f"native-{version}")
        env = dict(os.environ, PYTHONPATH="", CUDA_VISIBLE_DEVICES="")
        proc = subprocess.run([str(python_for(version)), __file__, str(root), str(native_inputs), str(out)],
                              capture_output=True, text=True, timeout=900, env=env, cwd=str(root))
        assert proc.returncode == 0, f"ComfyUI {version} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        results = json.loads((out / "results.json").read_text())
        assert results["comfyui_version"] == version
        return version, results, load_file(str(out / "tensors.safetensors")), proc.stderr

    def max_diff(a, b):
        """Largest difference, relative to the latents' range where it passes 1 (cfg 3 latents reach ~8: fp32
        rounding of the same sums in another order is ~1e-6 of that)."""
        return (a - b).abs().max().item() / max(1.0, b.abs().max().item())

    def rel_l2(a, b):
        return ((a - b).norm() / b.norm()).item()

    @pytest.mark.parametrize("case", [c[0] for c in CASES])
    def test_fp32_parity_with_native_ksampler(native_run, case):
        _, results, t, _ = native_run
        native, ours = t[f"{case}_native"], t[f"{case}_ours"]
        assert torch.isfinite(native).all() and native.abs().max() > 0.1
        assert max_diff(ours, native) < 1e-5, case
        r = results["cases"][case]
        assert r["fast_blocks"] > 0 and r["native_blocks"] == 0, r  # our maths ran, every block of every call

    def test_bf16_ours_as_near_fp32_as_native(native_run):
        """In bf16 our maths round no worse than native's: each path against the fp32 run of the same weights (the
        two bf16 paths round in different places, so they differ from each other by about as much)."""
        _, _, t, _ = native_run
        truth, native, ours = t["euler_native"], t["bf16_native"], t["bf16_ours"]
        native_err, ours_err = rel_l2(native, truth), rel_l2(ours, truth)
        assert 1e-4 < native_err < 3e-2, native_err  # bf16 really ran, and is near
        assert ours_err <= 1.25 * native_err, (ours_err, native_err)
        assert rel_l2(ours, native) <= 2.0 * native_err, (rel_l2(ours, native), native_err)

    def test_the_input_model_is_left_alone(native_run):
        _, results, _, _ = native_run
        assert results["input_untouched"] and not results["wrapper_on_input"] and results["wrapper_on_clone"]

    def test_lora_every_key_format(native_run):
        version, _, t, _ = native_run
        for fmt in LORA_FORMATS[version]:
            native, ours, base = t[f"lora_{fmt}_native"], t[f"lora_{fmt}_ours"], t[f"lora_{fmt}_base"]
            assert rel_l2(native, base) > 1e-3, f"{fmt}: ComfyUI did not apply the LoRA, the test proves nothing"
            assert max_diff(ours, native) < 1e-5, fmt

    def test_lora_stacked_and_strength_changed_between_runs(native_run):
        _, results, t, _ = native_run
        assert max_diff(t["lora_stack_ours"], t["lora_stack_native"]) < 1e-5
        assert rel_l2(t["lora_strength1.0_native"], t["lora_strength0.3_native"]) > 1e-3
        for s in ("1.0", "0.3"):
            assert max_diff(t[f"lora_strength{s}_ours"], t[f"lora_strength{s}_native"]) < 1e-5, s
        assert results["lora"]["after_accelerate"]["native_blocks"] == 0

    @pytest.mark.parametrize("budget", ["lowvram", "lowvram_half"])
    def test_partly_loaded_model_runs_our_maths_on_comfyuis_weight_movement(native_run, budget):
        """Low VRAM (every module, or half the model, cast per op; the LoRA on layers.0 applied per op): every block
        runs our maths on weights fetched through ComfyUI's cast_bias_weight, and the latents are native's."""
        _, results, t, _ = native_run
        assert max_diff(t["full_ours"], t["full_native"]) < 1e-5
        assert results["full_load"]["native_blocks"] == 0
        assert results[f"{budget}_modules"] > 0, "ComfyUI did not load the model partly: the test proves nothing"
        low = results[budget]
        assert low["native_blocks"] == 0 and low["fetched_blocks"] > 0, low
        assert max_diff(t[f"{budget}_ours"], t[f"{budget}_native"]) < 1e-5
        assert max_diff(t[f"{budget}_native"], t["full_native"]) < 1e-5  # the partial load is the same model
        fetches = results["fetches"]
        assert fetches["casts"] > 0 and fetches["held"] == 0, fetches  # every fetched weight given back
        assert fetches["max_held"] <= 2, fetches  # never more at once than ComfyUI's own ops (q/k norms)

    USERS = {"0.3.75": ["fp8_weight_dtype", "legacy_scaled_fp8", "caption_mask"],
             "0.33.0": ["fp8_weight_dtype", "legacy_scaled_fp8", "comfy_quant_float8_e4m3fn", "comfy_quant_int8_convrot",
                        "omni_cfg1", "omni_cfg3", "padded_batch", "attention_backend", "dynamic_marks", "dynamic_marks_fp8",
                        "dynamic_lazy_fp8", "caption_mask"]}
    # within the format's rounding where ComfyUI's own quantized matmul differs from ours on the CPU: ComfyUI's int8
    # linear quantizes the activations too (0.4% rel-L2 here), ours multiplies the dequantized weight
    TOLERANCE = {"comfy_quant_int8_convrot": 0.02}

    def test_users_cases_never_fall_back(native_run):
        """Omni calls, padded caption batches, fp8 and quantized checkpoints, another node's attention, dynamic VRAM's
        cast: every block of every call runs our maths (issue 22: a test fails if any of these falls back)."""
        version, results, _, _ = native_run
        users = results["users"]
        assert sorted(users) == sorted(USERS[version])
        for name, report in users.items():
            assert report["native_blocks"] == 0 and report["fast_blocks"] > 0, (name, report)
            assert report["fetches"]["held"] == 0 and report["fetches"]["max_held"] <= 2, (name, report["fetches"])

    def test_users_cases_equal_native(native_run):
        version, results, t, _ = native_run
        for name in USERS[version]:
            native, ours = t[f"u_{name}_native"], t[f"u_{name}_ours"]
            assert torch.isfinite(native).all() and native.abs().max() > 0.1, name
            tolerance = TOLERANCE.get(name)
            if tolerance is None:
                assert max_diff(ours, native) < 1e-5, (name, max_diff(ours, native))
            else:  # ComfyUI's own quantized matmul vs ours: ours at least as near the unquantized model
                assert rel_l2(ours, native) < tolerance, (name, rel_l2(ours, native))
                reference = t[f"u_{name}_reference"]
                assert rel_l2(ours, reference) <= rel_l2(native, reference) + 1e-4, name
        if version != "0.3.75":  # the omni call really is one: the reference latents change the result
            assert rel_l2(t["u_omni_cfg1_native"], t["euler_native"]) > 1e-2

    def test_quantized_and_streamed_weights_are_fetched_per_op(native_run):
        version, results, _, _ = native_run
        users = results["users"]
        fp8 = users["fp8_weight_dtype"]
        assert fp8["clone_weight_dtype"] == "torch.float8_e4m3fn"  # the user's fp8 stays fp8 under the node
        assert set(fp8["weight_dtypes"]) == {"fp8_e4m3fn"}, fp8
        if version != "0.3.75":
            assert users["comfy_quant_float8_e4m3fn"]["fetched_blocks"] > 0
            # int8_convrot runs our int8 matmul on the file's own codes and rotation (torch._int_mm runs on the CPU)
            assert set(users["comfy_quant_int8_convrot"]["weight_dtypes"]) == {"int8"}, users["comfy_quant_int8_convrot"]
            for name in ("dynamic_marks", "dynamic_marks_fp8"):  # every block through ComfyUI's dynamic cast
                assert users[name]["fetched_blocks"] == users[name]["fast_blocks"] > 0, users[name]
            fp8 = users["dynamic_marks_fp8"]  # an fp8 weight_dtype under dynamic VRAM stays fp8 (issue 26)
            assert fp8["clone_weight_dtype"] == "torch.float8_e4m3fn", fp8
            lazy = users["dynamic_lazy_fp8"]  # the file's tensor, the model's dtype marked: the node reads fp8
            assert (lazy["tensor_dtype"], lazy["stored_dtype"]) == ("torch.float32", "torch.float8_e4m3fn"), lazy
            assert lazy["fetched_blocks"] == lazy["fast_blocks"] > 0, lazy

    def test_fp16_planted_overflow_native_breaks_guard_repairs(native_run):
        version, results, t, _ = native_run
        fp32, native, ours = t["planted_fp32"], t["planted_fp16_native"], t["planted_fp16_auto"]
        assert torch.isfinite(fp32).all()
        if version == "0.3.75":
            assert not torch.isfinite(native).all()  # no clamp in 0.3.75: NaN latents, a black image
        else:
            assert not torch.isfinite(native).all() or rel_l2(native, fp32) > 1e-2  # 0.33 clamps: lossy
        assert torch.isfinite(ours).all()
        assert rel_l2(ours, fp32) < 1e-2, rel_l2(ours, fp32)
        first = results["planted_auto"]
        assert set(first["sticky"]) == PLANTED_BLOCKS, first
        assert first["probe_runs"] == 1 and first["checks"] >= STEPS
        again = results["planted_auto_again"]
        assert again["probe_runs"] == 1  # sticky blocks ran in bf16 at once: no second probe
        # the second run: the sticky blocks in bf16 from the start, as accurate as the first
        assert rel_l2(t["planted_fp16_auto_again"], fp32) < 1e-2

    def test_fp16_detect_names_the_block_and_clamp_is_finite(native_run):
        _, results, t, _ = native_run
        err = results["planted_detect"]
        assert err["type"] and err["type"].endswith("PrecisionOverflow"), err
        assert "noise_refiner.0" in err["message"] and "'auto'" in err["message"]
        clamp = t["planted_fp16_clamp"]
        assert torch.isfinite(clamp).all() and rel_l2(clamp, t["planted_fp32"]) > 1e-2  # finite, lossy

    def test_native_vae_exact_tiled_decode(native_run):
        _, results, t, _ = native_run
        native = t["vae_native"]
        assert native.shape == (1, 128, 160, 3) and native.std() > 0.01
        for overlap in (0, 32):
            tiled = t[f"vae_tiled_{overlap}"]
            assert tiled.shape == native.shape
            assert (tiled - native).abs().max().item() <= 2 / 255, overlap
        err = results["vae_bad_latent"]
        assert err["type"] == results["zimage_error"] and "16-channel" in err["message"], err

    def test_native_block_matches_diffusers_block(native_run):
        """One tiny transformer in both layouts (diffusers' through the weight owner's views, ComfyUI's NextDiT through
        original_block_weights) gives the same block outputs; and ComfyUI's own block forward agrees."""
        _, results, _, _ = native_run
        assert results["block_layouts_max_diff"] < 1e-6, results["block_layouts_max_diff"]
        heads, eps, _ = results["block_shapes"][0]
        assert [heads, eps] == results["block_shapes"][1][:2]  # q/k eps differ: ComfyUI's is float32's epsilon
        assert max(results["block_vs_comfy"].values()) < 1e-5, results["block_vs_comfy"]

    def test_no_warm_up_thread_beside_dynamic_vram_at_debug_verbosity(native_run):
        _, results, _, _ = native_run
        # [safe, the node armed its warm-up]
        assert results["background_warm_up_safe"] == {"dynamic_info": [True, True], "dynamic_debug": [False, False],
                                                      "dynamic_detail": [False, False],
                                                      "static_debug": [True, True]}

    def test_warm_up_starts_after_a_short_schedule_or_the_first_call_of_a_long_one(native_run):
        """Beside ComfyUI's blocks our warm-up slows them (GIL) more than a short first image's remaining steps of
        ours win back: an 8-step-like schedule runs ComfyUI's blocks to its end and starts it as its last call
        returns; a long one (base's 28 steps) starts it after the first call and runs ours after that."""
        _, results, _, _ = native_run
        short, long = results["warm_up_starts"][str(STEPS)], results["warm_up_starts"]["24"]
        assert short == {"started_after_calls": [STEPS], "warming_calls": STEPS, "fast_blocks": 0}, short
        assert long["started_after_calls"] == [1] and long["warming_calls"] == 1 and long["fast_blocks"] > 0, long

    def test_non_zimage_model_is_refused(native_run):
        _, results, _, _ = native_run
        err = results["refused"]
        assert err["type"] == results["zimage_error"], err
        assert "Z-Image" in err["message"] and "UNETLoader" in err["message"]


if __name__ == "__main__":
    comfy_side(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
