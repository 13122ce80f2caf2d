"""Runs ComfyUI in process (0.3.75 or 0.33.0, whichever tree comfy_harness copied; in a subprocess of pytest,
so its modules never mix with the other tests') and exercises the node pack against ComfyUI's own code. Results
go to ``results.json`` and ``tensors.safetensors`` in the output folder; ``test_nodes_inprocess.py`` asserts on
them.

    python comfy_inprocess.py COMFY_ROOT OUT_DIR

COMFY_ROOT is a ComfyUI copy made by ``comfy_harness`` (pack in custom_nodes, small models in models/).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

PROMPT = "a red fox in fresh snow, morning light"
SIZE = dict(width=96, height=64)  # non-square on purpose
SEED = 7


def boot(root: Path):
    """Import ComfyUI the way main.py does and load built-in and custom nodes (our pack among them)."""
    os.chdir(root)
    sys.path.insert(0, str(root))
    sys.argv = ["main.py", "--cpu", "--fp32-text-enc"]  # fp32 text encoder: exact parity with ours on the CPU
    import comfy.options

    comfy.options.enable_args_parsing()
    import utils.install_util  # noqa: F401  (before nodes and execution, as main.py does)
    import execution
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    # our warm-up's INFO lines in the log (ComfyUI's root logger here shows warnings only): the test reads them
    logging.getLogger("zimage_core.fast_denoiser").setLevel(logging.INFO)
    return nodes, execution


class Recorder:
    """The timesteps the transformer is called with (its t_embedder's input is (1 - sigma) * t_scale)."""

    def __init__(self, zimage):
        self.t_scale = zimage.transformer.config.t_scale
        self.calls: list[float] = []
        self.handle = zimage.transformer.t_embedder.register_forward_pre_hook(self.hook)

    def hook(self, _module, args):
        self.calls.append(1.0 - float(args[0].flatten()[0]) / self.t_scale)

    def close(self):
        self.handle.remove()


def error_of(fn) -> dict:
    try:
        fn()
    except BaseException as err:  # noqa: BLE001 - we record any error for the test to judge
        # BaseException: ComfyUI 0.33's InterruptProcessingException derives from it (0.3.75's from Exception)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        return {"type": f"{type(err).__module__}.{type(err).__qualname__}", "message": str(err)}
    return {"type": None, "message": None}


def main(root: Path, out: Path) -> None:
    import time

    start = time.perf_counter()
    timings = {}

    def mark(name):  # seconds since start at the end of each section, for slow-test hunting
        timings[name] = round(time.perf_counter() - start, 2)
        print(f"comfy_inprocess: {name} done at {timings[name]} s", flush=True)  # progress for the harness's wait

    nodes, execution = boot(root)
    mark("boot")
    import torch
    from safetensors.torch import save_file

    import comfy.model_management
    import comfy.utils
    from comfy_harness import WORKFLOWS, ui_to_api

    M = nodes.NODE_CLASS_MAPPINGS
    results: dict = {"zturbo_nodes": sorted(k for k in M if k.startswith("ZTurbo"))}
    tensors: dict[str, torch.Tensor] = {}

    def input_types(class_type):
        return M[class_type].INPUT_TYPES()

    def validate(prompt):
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("zturbo-test", prompt, None))
        return {"valid": valid, "error": error, "outputs": sorted(outputs),
                "node_errors": json.loads(json.dumps(node_errors, default=str))}

    # ---------------------------------------------------------------- static validation of the workflows
    results["validate"] = {}
    prompts = {}
    for path in sorted(WORKFLOWS.glob("*.json")):
        prompts[path.stem] = ui_to_api(json.loads(path.read_text(encoding="utf-8")), input_types)
        results["validate"][path.stem] = validate(json.loads(json.dumps(prompts[path.stem])))
    broken = json.loads(json.dumps(prompts["Text to Image"]))
    loader_id = next(k for k, n in broken.items() if n["class_type"] == "ZTurboFileLoader")
    sampler_id = next(k for k, n in broken.items() if n["class_type"] == "ZTurboSampler")
    broken[sampler_id]["inputs"]["steps"] = 0
    results["validate_bad_steps"] = validate(broken)
    broken = json.loads(json.dumps(prompts["Text to Image"]))
    broken[loader_id]["inputs"]["transformer"] = "z_image_turbo_fp8_e4m3fn.safetensors"
    results["validate_missing_model"] = validate(broken)  # accepted: the loader says what is missing when it runs
    broken = json.loads(json.dumps(prompts["Native Nodes"]))
    decode_id = next(k for k, n in broken.items() if n["class_type"] == "VAEDecode")
    broken[decode_id]["inputs"]["vae"] = [loader_id, 0]  # ZTURBO_MODEL into a VAE input
    results["validate_bad_link"] = validate(broken)
    mark("validate")

    # ---------------------------------------------------------------- our nodes on the tiny model
    Loader, Encode, Sampler = M["ZTurboLoader"], M["ZTurboTextEncode"], M["ZTurboSampler"]
    Decode, DecodeTiled, VAEEncode, Guard = (M["ZTurboVAEDecode"], M["ZTurboVAEDecodeTiled"], M["ZTurboVAEEncode"],
                                             M["ZTurboPrecisionGuard"])
    tiny_vae = os.environ["ZTURBO_TINY_VAE"]

    def load(vae=tiny_vae, **kw):
        args = dict(diffusers_model="none", transformer="z_image_turbo_bf16.safetensors",
                    text_encoder="qwen_3_4b.safetensors", vae=vae, dtype="auto", transformer_storage="auto",
                    text_encoder_storage="auto", vae_dtype="auto", attention="auto") | kw
        return Loader.execute(**args)[0]

    def sample(model, positive, **kw):
        args = dict(seed=SEED, steps=8, guidance=0.0, denoise=1.0, batch_size=1, **SIZE) | kw
        return Sampler.execute(model, positive, **args)

    model = load()
    results["device"] = str(model.zimage.device)
    results["policy"] = model.zimage.policy.describe()
    cond = Encode.execute(model, PROMPT)[0]
    results["cond_ours"] = describe_conditioning(cond)
    tensors["cond_ours"] = cond[0][0]
    latent, report = sample(model, cond).args
    tensors["t2i_latent"] = latent["samples"]
    results["t2i_report"] = report
    image = Decode.execute(latent, model)[0]
    tensors["t2i_image"] = image
    tensors["t2i_image_tiled"] = DecodeTiled.execute(latent, model, tile_size=64, overlap=32)[0]
    encoded = VAEEncode.execute(image, model)[0]
    tensors["enc_latent"] = encoded["samples"]
    tensors["i2i_latent"] = sample(model, cond, latent_image=encoded, denoise=0.6)[0]["samples"]
    zero = {"samples": torch.zeros(1, 16, SIZE["height"] // 8, SIZE["width"] // 8)}  # EmptySD3LatentImage
    tensors["zero_i2i_latent"] = sample(model, cond, latent_image=zero, denoise=0.5)[0]["samples"]
    tensors["zero_t2i_latent"] = sample(model, cond, latent_image=zero)[0]["samples"]
    tensors["batch2_latent"] = sample(model, cond, batch_size=2)[0]["samples"]
    # A batched conditioning with two prompts of different lengths, padded like a batch: rows go to images in turn.
    other = Encode.execute(model, "a small cat asleep on a sofa")[0][0][0]
    length = max(cond[0][0].shape[1], other.shape[1])
    padded = torch.zeros(2, length, other.shape[2])
    mask = torch.zeros(2, length, dtype=torch.long)
    for i, row in enumerate((cond[0][0][0], other[0])):
        padded[i, : len(row)], mask[i, : len(row)] = row, 1
    two = [[padded, {"pooled_output": None, "attention_mask": mask}]]
    tensors["batched_cond_latent"] = sample(model, two, batch_size=2)[0]["samples"]
    mark("nodes")

    # ---------------------------------------------------------------- loader variants give the same model
    folder = load(diffusers_model="Z-Image-Turbo", transformer="(from diffusers_model)",
                  text_encoder="(from diffusers_model)", vae="(from diffusers_model)")
    tensors["diffusers_folder_latent"] = sample(folder, Encode.execute(folder, PROMPT)[0])[0]["samples"]
    results["attention_backends"] = list(Loader.INPUT_TYPES()["required"]["attention"][1]["options"])
    math_model = load(attention="math")
    results["math_attention"] = math_model.zimage.speed.attention
    tensors["math_attention_latent"] = sample(math_model, cond)[0]["samples"]
    mark("loader variants")

    # ---------------------------------------------------------------- sigmas: ours vs ComfyUI's KSampler rule
    results["sigmas"] = []
    for steps, denoise in ((8, 1.0), (9, 1.0), (8, 0.6), (4, 1.0), (20, 0.3), (8, 0.05)):
        rec = Recorder(model.zimage)
        try:
            sample(model, cond, steps=steps, denoise=denoise, latent_image=zero)
        finally:
            rec.close()
        results["sigmas"].append({"steps": steps, "denoise": denoise, "ours": rec.calls,
                                  "comfy": comfy_sigmas(steps, denoise)})
    mark("sigmas")

    # ---------------------------------------------------------------- progress bar and cancel
    updates = []
    for name in ("PROGRESS_THROTTLE_MIN_INTERVAL", "PROGRESS_THROTTLE_MIN_PERCENT"):  # ComfyUI 0.33 throttles
        if hasattr(comfy.utils, name):  # updates (100 ms, 0.5 %); we count every step
            setattr(comfy.utils, name, 0)
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append([value, total]))
    sample(model, cond)
    results["progress"] = updates[:]
    rec = Recorder(model.zimage)
    comfy.model_management.interrupt_current_processing(True)
    results["interrupt"] = error_of(lambda: sample(model, cond))
    results["interrupt_calls"] = len(rec.calls)
    rec.close()
    # Cancel reaches the VAE decode too: the nodes hand the core ComfyUI's interrupt check, called between decoder
    # blocks and tiles, so a pending Cancel stops the decode at its first block
    # (the check clears the flag when it raises: set it again before each)
    comfy.model_management.interrupt_current_processing(True)
    results["decode_interrupt"] = error_of(lambda: Decode.execute(latent, model))
    comfy.model_management.interrupt_current_processing(True)
    results["tiled_decode_interrupt"] = error_of(lambda: DecodeTiled.execute(latent, model, tile_size=64, overlap=32))
    comfy.model_management.interrupt_current_processing(False)
    comfy.utils.set_progress_bar_global_hook(None)

    # our models are not in ComfyUI's model manager: the loader node asks it to free memory for them on the GPU
    # (not on the CPU). Run the node itself with ComfyUI's device reported as cuda:0; the recording stand-in for
    # free_memory stops the load there (this machine has no GPU), so what is recorded is the node's own request.
    class Stop(Exception):
        pass

    def record(nbytes, device, keep_loaded=()):
        requests.append([nbytes, str(device)])
        if str(device).startswith("cuda"):
            raise Stop()

    requests, real_free, real_device = [], comfy.model_management.free_memory, comfy.model_management.get_torch_device
    comfy.model_management.free_memory = record
    try:
        comfy.model_management.get_torch_device = lambda: torch.device("cuda", 0)
        results["make_room_stop"] = (error_of(lambda: load())["type"] or "").endswith("Stop")
        comfy.model_management.get_torch_device = lambda: torch.device("cpu")
        load()  # on the CPU nothing is asked for
    finally:
        comfy.model_management.free_memory = real_free
        comfy.model_management.get_torch_device = real_device
    import folder_paths

    results["make_room_expected"] = sum(os.path.getsize(folder_paths.get_full_path(folder, name)) for folder, name in (
        ("diffusion_models", "z_image_turbo_bf16.safetensors"), ("text_encoders", "qwen_3_4b.safetensors"),
        ("vae", tiny_vae)))
    results["make_room"] = requests
    mark("progress")

    # ---------------------------------------------------------------- ComfyUI's own Z-Image text encoder
    # custom_nodes/zturbo_test_tiny_qwen3.py (written by comfy_harness) sized ComfyUI's Qwen3 class to the tiny model
    clip = M["CLIPLoader"]().load_clip("qwen_3_4b.safetensors", "lumina2")[0]
    native = M["CLIPTextEncode"]().encode(clip, PROMPT)[0]
    results["cond_native"] = describe_conditioning(native)
    tensors["cond_native"] = native[0][0]
    tensors["native_cond_latent"] = sample(model, native)[0]["samples"]
    mark("native text encoder")

    # ---------------------------------------------------------------- ComfyUI's VAE on our LATENT (full size)
    full = load(vae="ae.safetensors")
    small = {"samples": latent["samples"][:, :, :8, :8].contiguous()}  # 64x64 keeps the full-size VAE quick
    vae = M["VAELoader"]().load_vae("ae.safetensors")[0]
    tensors["native_decode"] = M["VAEDecode"]().decode(vae, small)[0]
    tensors["full_decode"] = Decode.execute(small, full)[0]
    tensors["native_encode"] = M["VAEEncode"]().encode(vae, tensors["full_decode"])[0]["samples"]
    tensors["full_encode"] = VAEEncode.execute(tensors["full_decode"], full)[0]["samples"]
    mark("native vae")

    # ---------------------------------------------------------------- precision guard with a planted overflow
    planted = load(transformer="z_image_turbo_planted.safetensors", dtype="fp16")
    results["planted_policy"] = planted.zimage.policy.describe()
    results["planted_off"] = error_of(lambda: sample(planted, cond, precision_guard="off", steps=4))
    results["planted_detect"] = error_of(lambda: sample(planted, cond, precision_guard="detect", steps=4))
    guarded = Guard.execute(planted, "auto")[0]
    fixed, guard_report = sample(guarded, cond, steps=4).args
    tensors["planted_auto_latent"] = fixed["samples"]
    results["planted_auto_report"] = guard_report
    results["guarded_handle"] = {"loader": planted.guard, "guard_node": guarded.guard}
    mark("guard")

    # ---------------------------------------------------------------- bad input gives our message
    errors = results["errors"] = {}
    errors["latent_4_channels"] = error_of(lambda: sample(model, cond, latent_image={"samples": torch.zeros(1, 4, 8, 8)}))
    errors["latent_video"] = error_of(lambda: sample(model, cond, latent_image={"samples": torch.zeros(1, 16, 2, 8, 8)}))
    errors["latent_odd_size"] = error_of(lambda: sample(model, cond, latent_image={"samples": torch.zeros(1, 16, 25, 25)}))
    errors["cond_768"] = error_of(lambda: sample(model, [[torch.zeros(1, 77, 768), {}]]))
    errors["cond_two_entries"] = error_of(lambda: sample(model, cond + cond))
    errors["cond_area"] = error_of(lambda: sample(model, [[cond[0][0], {"area": (8, 8, 0, 0)}]]))
    errors["denoise_without_latent"] = error_of(lambda: sample(model, cond, denoise=0.5))
    errors["decode_4_channels"] = error_of(lambda: Decode.execute({"samples": torch.zeros(1, 4, 8, 8)}, model))
    errors["encode_odd_image"] = error_of(lambda: VAEEncode.execute(torch.rand(1, 60, 100, 3), model))
    errors["width_1000"] = error_of(lambda: sample(model, cond, width=1000))
    errors["tiles_overlap"] = error_of(lambda: DecodeTiled.execute(latent, model, tile_size=256, overlap=256))
    errors["loader_missing"] = error_of(lambda: load(transformer="nope.safetensors"))
    errors["loader_folder_none"] = error_of(lambda: load(transformer="(from diffusers_model)"))
    errors["loader_no_folder"] = error_of(lambda: load(diffusers_model="Gone", transformer="(from diffusers_model)"))
    errors["loader_dtype"] = error_of(lambda: load(dtype="fp64"))
    errors["loader_wrong_file"] = error_of(lambda: load(transformer="misplaced_vae.safetensors"))
    passthrough = sample(model, cond, latent_image=encoded, denoise=0.0)[0]["samples"]
    results["denoise_0_is_identity"] = bool(torch.equal(passthrough, encoded["samples"]))

    mark("errors")
    results["timings"] = timings
    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(out / "tensors.safetensors"))
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))


def describe_conditioning(cond) -> dict:
    """The structure of a CONDITIONING, with tensors as (dtype, shape, device, values) descriptions."""
    import torch

    def describe(value):
        if torch.is_tensor(value):
            return {"tensor": str(value.dtype), "shape": list(value.shape), "device": str(value.device),
                    "values": value.flatten()[:64].tolist() if value.dtype == torch.long else None}
        return repr(value)

    return {"type": type(cond).__name__, "len": len(cond),
            "entries": [{"type": type(e).__name__, "len": len(e), "cond": describe(e[0]),
                         "extras": {k: describe(v) for k, v in e[1].items()}} for e in cond]}


def comfy_sigmas(steps: int, denoise: float) -> list[float]:
    """Sigmas of ComfyUI's KSampler with ModelSamplingAuraFlow(shift 3) and the 'simple' scheduler, by its own code."""
    import comfy.samplers
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow

    class Patchable:  # the parts of a ModelPatcher these two use
        def __init__(self, patches=None):
            self.model = SimpleNamespace(model_config=None)
            self.patches = dict(patches or {})

        def clone(self):
            return Patchable(self.patches)

        def add_object_patch(self, name, obj):
            self.patches[name] = obj

        def get_model_object(self, name):  # ComfyUI 0.33's ModelSamplingSD3.patch reads the current one first
            return self.patches.get(name, getattr(self.model, name, None))

    patched = ModelSamplingAuraFlow().patch_aura(Patchable(), 3.0)[0]
    ksampler = comfy.samplers.KSampler(patched, steps, "cpu", sampler="res_multistep", scheduler="simple", denoise=denoise)
    return ksampler.sigmas.tolist()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        main(Path(sys.argv[1]), Path(sys.argv[2]))
    except Exception:
        traceback.print_exc()
        sys.exit(1)
