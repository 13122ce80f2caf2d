"""The node pack inside a real ComfyUI 0.3.75, in process (a subprocess of pytest: comfy_inprocess.py).

ComfyUI loads the pack from custom_nodes through its ``comfy_entrypoint``; the workflows pass ComfyUI's own
``execution.validate_prompt``; our nodes' outputs are checked against the core (same model files) and against
ComfyUI's own nodes: CLIPTextEncode with a lumina2 CLIP (ComfyUI's Qwen3-4B class at the tiny model's sizes),
VAEDecode/VAEEncode on the full-size Flux VAE, and KSampler's sigmas with ModelSamplingAuraFlow(3) + simple.
"""

import pytest
import torch

from comfy_harness import WORKFLOWS, run_inprocess, shared_env
from zimage_core import ZImage
from zimage_core.schedules import ksampler_sigmas
from zimage_core.vae import to_model_space, to_vae_space

PROMPT = "a red fox in fresh snow, morning light"  # as in comfy_inprocess.py
KW = dict(seed=7, width=96, height=64)
ATOL = 1e-5
NODE_IDS = ["ZTurboAccelerate", "ZTurboDiffusersLoader", "ZTurboFileLoader", "ZTurboLoRA", "ZTurboLoadOptions", "ZTurboLoader", "ZTurboNativeVAEDecodeTiled", "ZTurboPrecisionGuard",
            "ZTurboSampler", "ZTurboTextEncode", "ZTurboVAEDecode", "ZTurboVAEDecodeTiled", "ZTurboVAEEncode"]


@pytest.fixture(scope="session")
def comfy_env(tmp_path_factory, tiny_split, tiny_dir):
    return shared_env(tmp_path_factory, tiny_split, tiny_dir)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("inprocess")


@pytest.fixture(scope="module")
def run(comfy_env, run_dir):
    return run_inprocess(comfy_env, run_dir)


@pytest.fixture(scope="module")
def results(run):
    return run[0]


@pytest.fixture(scope="module")
def tensors(run):
    return run[1]


@pytest.fixture(scope="module")
def core(comfy_env):
    """The core on the very files the nodes loaded (tiny VAE), fp32 on the CPU like the nodes there."""
    m = comfy_env.models
    return ZImage.load(transformer=m / "diffusion_models" / "z_image_turbo_bf16.safetensors",
                       text_encoder=m / "text_encoders" / "qwen_3_4b.safetensors",
                       vae=m / "vae" / comfy_env.tiny_vae, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def core_t2i(core):
    return core.generate(PROMPT, **KW)


def close(a, b, atol=ATOL):
    return a.shape == b.shape and (a.float() - b.float()).abs().max().item() <= atol


# ----------------------------------------------------------------------------------------- loading
def test_comfyui_loads_the_pack_through_comfy_entrypoint(results):
    assert results["zturbo_nodes"] == NODE_IDS
    assert results["device"] == "cpu"  # comfy.model_management.get_torch_device() under --cpu
    assert results["policy"] == "transformer: fp32, text_encoder: fp32, vae: fp32"  # auto on the CPU


@pytest.mark.parametrize("name", sorted(p.stem for p in WORKFLOWS.glob("*.json")))
def test_workflow_passes_comfyui_validate_prompt(results, name):
    report = results["validate"][name]
    assert report["valid"] is True, report
    assert report["node_errors"] == {}
    assert report["outputs"]  # SaveImage (and PreviewAny) are outputs


def test_validation_is_real(results):
    bad_link = results["validate_bad_link"]
    assert bad_link["valid"] is False
    error = next(iter(bad_link["node_errors"].values()))["errors"][0]
    assert error["type"] == "return_type_mismatch" and "ZTURBO_MODEL" in error["details"]
    bad_steps = results["validate_bad_steps"]
    assert bad_steps["valid"] is False
    error = next(iter(bad_steps["node_errors"].values()))["errors"][0]
    assert error["type"] == "value_smaller_than_min" and error["details"] == "steps"


def test_the_loaders_warm_up_ran_inside_comfyui(run, run_dir):
    """The harness turns the warm-up on (it is off on the CPU by default): it ran in ComfyUI's execution (inference
    mode, our nodes' threads) without a failure, and the nodes' outputs compared with the core below include it."""
    log = (run_dir / "comfy_inprocess.log").read_text(errors="replace")
    assert "Z-Image start-up warm-up done" in log and "Z-Image warm-up (auto) done" in log
    assert "warm-up failed" not in log


def test_loader_variants_load_the_same_model(results, tensors):
    # diffusers folder (models/diffusers/Z-Image-Turbo) and split files hold the same tiny weights
    assert close(tensors["diffusers_folder_latent"], tensors["t2i_latent"])
    # the attention option reaches the core's SpeedOptions and keeps the numbers
    assert results["attention_backends"][:2] == ["auto", "sdpa"]
    assert results["math_attention"] == "math"
    assert close(tensors["math_attention_latent"], tensors["t2i_latent"], 1e-4)


# ------------------------------------------------------------------------------------ standard types
def test_conditioning_has_comfyui_layout(results, tensors):
    ours, native = results["cond_ours"], results["cond_native"]
    assert ours == native  # list of one [tensor, {"pooled_output": None, "attention_mask": int64 ones}] entry
    entry = ours["entries"][0]
    assert entry["cond"]["tensor"] == "torch.float32" and entry["cond"]["device"] == "cpu"
    assert set(entry["extras"]) == {"pooled_output", "attention_mask"}
    assert entry["extras"]["pooled_output"] == "None"
    mask = entry["extras"]["attention_mask"]
    assert mask["tensor"] == "torch.int64" and mask["shape"] == [1, entry["cond"]["shape"][1]]
    assert set(mask["values"]) == {1}
    # the same numbers as ComfyUI's own Qwen3 encoder (fp32) on the same weights
    assert close(tensors["cond_ours"], tensors["cond_native"], 1e-4)
    assert close(tensors["native_cond_latent"], tensors["t2i_latent"], 1e-4)


def test_conditioning_equals_core_embedding(core, tensors):
    embedding = core.encode_prompt(PROMPT)[0]
    assert close(tensors["cond_ours"], embedding[None])


def test_latent_is_raw_vae_space(core, core_t2i, tensors):
    latent = tensors["t2i_latent"]
    assert latent.dtype == torch.float32 and latent.shape == (1, 16, 8, 12)
    assert close(latent, to_vae_space(core.vae, core_t2i.latents))
    assert close(to_model_space(core.vae, latent), core_t2i.latents)
    assert (latent - core_t2i.latents).abs().max() > 0.05  # the two spaces really differ


def test_image_is_comfyui_image(core_t2i, tensors):
    image = tensors["t2i_image"]
    assert image.dtype == torch.float32 and image.shape == (1, 64, 96, 3)  # [B, H, W, C]
    assert image.min() >= 0 and image.max() <= 1 and image.std() > 0.01
    assert close(image, core_t2i.images)


def test_tiled_decode_is_exact(tensors):
    assert close(tensors["t2i_image_tiled"], tensors["t2i_image"])


def test_vae_encode_and_img2img_match_core(core, tensors):
    image = tensors["t2i_image"]
    assert close(tensors["enc_latent"], to_vae_space(core.vae, core.encode_image(image)))
    reference = core.generate(PROMPT, init_image=image, denoise=0.6, decode=False, **KW).latents
    assert close(tensors["i2i_latent"], to_vae_space(core.vae, reference))


def test_all_zero_latent_maps_to_vae_zero(core, tensors):
    # EmptySD3LatentImage's zeros are raw VAE space: model space -0.1159 * 0.3611, not 0
    assert close(tensors["zero_t2i_latent"], tensors["t2i_latent"])  # denoise 1: only the shape counts
    zeros = torch.zeros(1, 16, 8, 12)
    init = to_model_space(core.vae, zeros)
    assert init.abs().min() > 0.04
    cap = core.encode_prompt([PROMPT])
    reference = core.sample(cap, init_latents=init, denoise=0.5, **KW)
    assert close(tensors["zero_i2i_latent"], to_vae_space(core.vae, reference))


def test_batches(core, tensors):
    two = core.generate(PROMPT, batch_size=2, decode=False, **KW).latents
    assert close(tensors["batch2_latent"], to_vae_space(core.vae, two))
    # a padded batched conditioning: row i (mask-trimmed) goes to image i
    mixed = core.generate([PROMPT, "a small cat asleep on a sofa"], decode=False, **KW).latents
    assert close(tensors["batched_cond_latent"], to_vae_space(core.vae, mixed))
    assert not close(tensors["batched_cond_latent"][1:], tensors["batch2_latent"][1:], 1e-3)


def test_denoise_0_returns_the_input(results):
    assert results["denoise_0_is_identity"] is True


# -------------------------------------------------------------------------------- ComfyUI's own VAE
def test_native_vae_decode_reads_our_latent(tensors):
    native, ours = tensors["native_decode"], tensors["full_decode"]
    assert native.shape == ours.shape == (1, 64, 64, 3) and native.dtype == ours.dtype == torch.float32
    assert ours.std() > 0.01
    assert (native - ours).abs().max() <= 2e-3  # ComfyUI's Flux VAE code vs diffusers', both fp32


def test_native_vae_encode_gives_our_latent(tensors):
    native, ours = tensors["native_encode"], tensors["full_encode"]
    assert native.shape == ours.shape == (1, 16, 8, 8)
    assert (native - ours).abs().max() <= 2e-3 * ours.abs().max()


# ------------------------------------------------------------------------------------ sampler semantics
def test_sigmas_follow_ksampler_with_auraflow_shift_3_and_simple(results):
    for case in results["sigmas"]:
        ours, comfy = case["ours"], case["comfy"]
        steps, denoise = case["steps"], case["denoise"]
        assert len(ours) == steps and len(comfy) == steps + 1 and comfy[-1] == 0.0
        core = ksampler_sigmas(steps, 3.0, denoise).tolist()
        assert ours == pytest.approx(core[:-1], abs=1e-6)  # the node runs the core's schedule
        # ... which is KSampler's (its 1000-entry table), at any step count, the template's 9 included
        assert ours == pytest.approx(comfy[:-1], abs=1e-6), case
    assert {(c["steps"], c["denoise"]) for c in results["sigmas"]} >= {(8, 1.0), (8, 0.6)}


def test_progress_bar_and_cancel(results):
    assert results["progress"] == [[i, 8] for i in range(1, 9)]
    assert results["interrupt"]["type"] == "comfy.model_management.InterruptProcessingException"
    assert results["interrupt_calls"] == 1  # stopped right after the first step


def test_nodes_ask_comfyui_to_make_room_on_the_gpu(results):
    """The loader node itself asks ComfyUI to unload its models for the bytes it will load, on the GPU only."""
    assert results["make_room_stop"] is True
    assert results["make_room"] == [[results["make_room_expected"], "cuda:0"]]


# ---------------------------------------------------------------------------------- precision guard
def test_precision_guard_node(results, tensors):
    assert results["planted_policy"] == "transformer: fp16, text_encoder: fp16, vae: fp16"
    off = results["planted_off"]
    assert off["type"] == "zimage_core.errors.ZImageError"
    assert "NaN/inf" in off["message"] and "precision guard" in off["message"].lower()
    detect = results["planted_detect"]
    assert detect["type"] == "zimage_core.guard.PrecisionOverflow"
    assert "step 1, block noise_refiner.0" in detect["message"] and "'auto'" in detect["message"]
    assert torch.isfinite(tensors["planted_auto_latent"]).all()
    report = results["planted_auto_report"]
    assert report.startswith("precision guard: auto: higher precision for transformer: noise_refiner.0 → bf16")
    assert "layers.1 → bf16" in report and "fell back (bf16)" in report
    # the guard node returns a new handle; the loader's cached output keeps its own (default) policy
    assert results["guarded_handle"] == {"loader": None, "guard_node": "auto"}
    assert results["t2i_report"] == "precision guard: off (transformer: fp32, text_encoder: fp32, vae: fp32)"


# ---------------------------------------------------------------------------------------- bad input
ERRORS = {
    "latent_4_channels": ["4 channels", "16-channel Flux-VAE latent", "EmptySD3LatentImage"],
    "latent_video": ["[1, 16, 2, 8, 8]", "image latent"],
    "latent_odd_size": ["latent_image is 200x200 pixels", "multiple of 16",
                        "nearest allowed sizes are 192x192, 192x208, 208x192, 208x208"],
    "cond_768": ["768 wide", "CLIPLoader with qwen_3_4b.safetensors and type 'lumina2'"],
    "cond_two_entries": ["2 entries", "ConditioningConcat"],
    "cond_area": ["'area'", "ConditioningSetArea"],
    "denoise_without_latent": ["needs a latent_image", "set denoise to 1"],
    "decode_4_channels": ["4 channels", "16-channel"],
    "encode_odd_image": ["image is 100x60 pixels", "multiple of 16", "nearest allowed sizes are 96x64, 112x64",
                         "ImageScale"],
    "width_1000": ["width 1000", "992 and 1008"],
    "tiles_overlap": ["overlap 256", "below the tile size"],
    "loader_missing": ["'nope.safetensors' was not found in ComfyUI/models/diffusion_models/",
                       "https://huggingface.co/Comfy-Org/z_image_turbo"],
    "loader_folder_none": ["(from diffusers_model)", "diffusers_model is 'none'", "z_image_turbo_bf16.safetensors"],
    "loader_no_folder": ["'Gone' was not found", "ComfyUI/models/diffusers/", "Tongyi-MAI/Z-Image-Turbo"],
    "loader_dtype": ["'fp64'", "bf16, fp16, fp32"],
    "loader_wrong_file": ["misplaced_vae.safetensors is a VAE, not a transformer", "models/diffusion_models"],
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_gives_our_message(results, case):
    error = results["errors"][case]
    assert error["type"] in ("zimage_core.errors.ZImageError",), error
    for fragment in ERRORS[case]:
        assert fragment in error["message"], (fragment, error["message"])


def test_cancel_stops_the_vae_decode(results):
    """A pending Cancel stops both decode nodes at their first decoder block (the core calls the nodes' interrupt
    check between blocks and tiles) instead of after the whole decode."""
    for case in ("decode_interrupt", "tiled_decode_interrupt"):
        assert results[case]["type"] == "comfy.model_management.InterruptProcessingException", results[case]
