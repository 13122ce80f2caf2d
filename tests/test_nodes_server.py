"""A headless ComfyUI 0.3.75 server with the pack in custom_nodes and tiny models under the real file names.

The example workflows are converted to the API format with /object_info, shrunk (sizes and tiles only, the graph
stays) and posted to /prompt; each must leave a PNG of the requested size in the output folder. Workflow 2 runs
whole: ComfyUI's own CLIPLoader (lumina2) + CLIPTextEncode (its Qwen3 class sized to the tiny model by a
test-only custom node) into our sampler, and our LATENT into ComfyUI's VAELoader + VAEDecode with a full-size
Flux VAE (random weights).
"""

import json
import re

import pytest
from PIL import Image

from comfy_harness import (PACK_NAME, REPO, WORKFLOWS, ComfyServer, load_workflow, messages, nodes_of, shared_env,
                           ui_to_api)

NODE_IDS = ["ZTurboLoader", "ZTurboTextEncode", "ZTurboSampler", "ZTurboVAEDecode", "ZTurboVAEDecodeTiled",
            "ZTurboVAEEncode", "ZTurboPrecisionGuard"]
WORKFLOW_NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))


@pytest.fixture(scope="session")
def comfy_env(tmp_path_factory, tiny_split, tiny_dir):
    return shared_env(tmp_path_factory, tiny_split, tiny_dir)


@pytest.fixture(scope="module")
def server(comfy_env, tmp_path_factory):
    server = ComfyServer(comfy_env, tmp_path_factory.mktemp("server") / "comfyui.log")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def api_prompt(object_info, name: str) -> dict:
    return ui_to_api(load_workflow(name + ".json"), lambda class_type: object_info[class_type]["input"])


def shrink(prompt: dict, width: int = 64, height: int = 64, prefix: str = "test") -> dict:
    """Smaller images and tiles for the CPU; the graph is unchanged."""
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] in ("ZTurboSampler", "EmptySD3LatentImage", "ImageScale"):
            inputs["width"], inputs["height"] = width, height
        if node["class_type"] == "ZTurboVAEDecodeTiled":
            inputs["tile_size"], inputs["overlap"] = 64, 32
        if node["class_type"] == "SaveImage":
            inputs["filename_prefix"] = prefix
    return prompt


def saved_images(server, entry: dict) -> list[Image.Image]:
    found = []
    for output in entry["outputs"].values():
        for item in output.get("images", []):
            assert item["type"] == "output"
            path = server.env.output / item["subfolder"] / item["filename"]
            assert path.is_file() and path.suffix == ".png"
            found.append(Image.open(path))
    return found


def execution_error(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error"
    (error,) = messages(entry, "execution_error")
    return error


# ------------------------------------------------------------------------------------ object_info
def documented_inputs() -> dict[str, dict[str, tuple[str, str]]]:
    """{node id: {input: (type, default)}} from the node tables of README.md."""
    doc, node, tables = (REPO / "README.md").read_text(encoding="utf-8"), None, {}
    for line in doc.splitlines():
        heading = re.match(r"#+ .* — `(ZTurbo\w+)`$", line)
        if heading:
            node = heading.group(1)
            tables[node] = {}
        elif node and line.startswith("| ") and not line.startswith(("| input", "|---")):
            name, kind, default = [c.strip() for c in line.strip("|").split("|")[:3]]
            tables[node][name] = (kind, default)
        elif line.startswith("### "):
            node = None
    return tables


def test_object_info_lists_every_node_as_documented(object_info):
    docs = documented_inputs()
    assert sorted(docs) == sorted(NODE_IDS)
    for node_id in NODE_IDS:
        info = object_info[node_id]
        assert info["category"] == "Z-Image Turbo"
        assert info["display_name"].startswith("Z-Image Turbo ")
        assert info["python_module"] == f"custom_nodes.{PACK_NAME}"
        inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
        assert set(inputs) == set(docs[node_id]), node_id
        for name, (kind, default) in docs[node_id].items():
            spec = inputs[name]
            options = spec[1]
            assert options.get("tooltip"), (node_id, name)
            assert spec[0] == kind, (node_id, name, spec[0])
            if default:
                assert str(options["default"]) == default, (node_id, name, options["default"])
            else:
                assert "default" not in options or options["default"] == "", (node_id, name)
        assert all(tip for tip in info["output_tooltips"]), node_id
    sampler = object_info["ZTurboSampler"]
    assert sampler["input"]["required"]["seed"][1]["control_after_generate"] is True
    assert sampler["output"] == ["LATENT", "STRING"]
    assert set(sampler["input"]["optional"]) == {"negative", "latent_image", "precision_guard"}
    loader = object_info["ZTurboLoader"]["input"]["required"]
    assert loader["diffusers_model"][1]["options"] == ["none", "Z-Image-Turbo"]
    assert "z_image_turbo_bf16.safetensors" in loader["transformer"][1]["options"]


def test_workflow_templates_are_served(server):
    listing = server.get("/api/workflow_templates")
    assert list(listing) == [PACK_NAME] and sorted(listing[PACK_NAME]) == WORKFLOW_NAMES
    for name in WORKFLOW_NAMES:
        served = server.get(f"/api/workflow_templates/{PACK_NAME}/{name}.json")
        assert served == json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


def test_workflows_follow_the_recipe(object_info):
    prompts = {name: api_prompt(object_info, name) for name in WORKFLOW_NAMES}
    for name, prompt in prompts.items():
        (sampler,) = nodes_of(prompt, "ZTurboSampler")
        assert sampler["inputs"]["steps"] == 8 and sampler["inputs"]["guidance"] == 0.0, name
        (loader,) = nodes_of(prompt, "ZTurboLoader")
        assert loader["inputs"]["transformer"] == "z_image_turbo_bf16.safetensors", name
        assert loader["inputs"]["dtype"] == ("fp16" if name == "03_fp16_precision_guard" else "auto"), name
        size = (sampler["inputs"]["width"], sampler["inputs"]["height"])
        if name != "02_native_clip_and_vae_interop" and name != "05_img2img":
            assert size == ((2048, 2048) if name == "04_2048px_tiled_decode" else (1024, 1024)), name
        assert nodes_of(prompt, "SaveImage"), name
    assert nodes_of(prompts["01_text_to_image"], "ZTurboVAEDecode")
    (clip,) = nodes_of(prompts["02_native_clip_and_vae_interop"], "CLIPLoader")
    assert clip["inputs"]["type"] == "lumina2" and clip["inputs"]["clip_name"] == "qwen_3_4b.safetensors"
    assert nodes_of(prompts["02_native_clip_and_vae_interop"], "EmptySD3LatentImage")[0]["inputs"]["width"] == 1024
    (guard,) = nodes_of(prompts["03_fp16_precision_guard"], "ZTurboPrecisionGuard")
    assert guard["inputs"]["policy"] == "auto"
    (tiled,) = nodes_of(prompts["04_2048px_tiled_decode"], "ZTurboVAEDecodeTiled")
    assert (tiled["inputs"]["tile_size"], tiled["inputs"]["overlap"]) == (512, 64)
    img2img = prompts["05_img2img"]
    (sampler,) = nodes_of(img2img, "ZTurboSampler")
    assert sampler["inputs"]["denoise"] == 0.6 and img2img[sampler["inputs"]["latent_image"][0]]["class_type"] == \
        "ZTurboVAEEncode"


# ------------------------------------------------------------------------------------ running workflows
@pytest.mark.parametrize("name,width,height", [
    ("01_text_to_image", 64, 64),
    ("03_fp16_precision_guard", 64, 64),
    ("04_2048px_tiled_decode", 128, 64),  # two 64 px tiles across
    ("05_img2img", 64, 64),
])
def test_workflow_runs_to_png(server, object_info, name, width, height):
    prompt = shrink(api_prompt(object_info, name), width, height, prefix=name)
    if name == "03_fp16_precision_guard":  # a transformer whose weights overflow fp16 in two blocks
        nodes_of(prompt, "ZTurboLoader")[0]["inputs"]["transformer"] = "z_image_turbo_planted.safetensors"
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:3000]
    (image,) = saved_images(server, entry)
    assert image.size == (width, height) and image.mode == "RGB"
    if name == "03_fp16_precision_guard":
        (preview,) = nodes_of(prompt, "PreviewAny")
        preview_id = next(k for k, n in prompt.items() if n is preview)
        text = entry["outputs"][preview_id]["text"][0]  # the sampler's guard_report, shown by Preview as Text
        assert text.startswith("precision guard: auto: higher precision for transformer: noise_refiner.0 → bf16")


def test_fp16_overflow_without_the_guard_is_an_error_not_a_black_image(server, object_info):
    prompt = shrink(api_prompt(object_info, "03_fp16_precision_guard"))
    nodes_of(prompt, "ZTurboLoader")[0]["inputs"]["transformer"] = "z_image_turbo_planted.safetensors"
    nodes_of(prompt, "ZTurboPrecisionGuard")[0]["inputs"]["policy"] = "off"
    error = execution_error(server.run(prompt))
    assert error["node_type"] == "ZTurboSampler"
    assert "NaN/inf" in error["exception_message"] and "Precision Guard (auto)" in error["exception_message"]


def test_native_clip_latent_and_vae_interop(server, object_info):
    """Workflow 2 as it is: native CLIPLoader(lumina2)/CLIPTextEncode/EmptySD3LatentImage -> our sampler -> native
    VAELoader/VAEDecode (full-size Flux VAE)."""
    prompt = shrink(api_prompt(object_info, "02_native_clip_and_vae_interop"), prefix="interop")
    assert {n["class_type"] for n in prompt.values()} >= {"CLIPLoader", "CLIPTextEncode", "VAELoader", "VAEDecode",
                                                          "EmptySD3LatentImage", "ZTurboSampler"}
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:3000]
    (image,) = saved_images(server, entry)
    assert image.size == (64, 64)
    assert max(image.getextrema()[c][1] - image.getextrema()[c][0] for c in range(3)) > 10  # not a flat image


# ------------------------------------------------------------------------------------ bad input
def test_missing_model_names_folder_and_download(server, object_info):
    prompt = shrink(api_prompt(object_info, "01_text_to_image"))
    (loader,) = nodes_of(prompt, "ZTurboLoader")
    loader["inputs"]["transformer"] = "z_image_turbo_fp8_e4m3fn.safetensors"
    error = execution_error(server.run(prompt))
    assert error["node_type"] == "ZTurboLoader"
    assert error["exception_type"] == "zimage_core.errors.ZImageError"
    message = error["exception_message"]
    assert "'z_image_turbo_fp8_e4m3fn.safetensors' was not found in ComfyUI/models/diffusion_models/" in message
    assert "https://huggingface.co/Comfy-Org/z_image_turbo" in message and "Traceback" not in message


def test_latent_of_wrong_size_is_refused(server, object_info):
    prompt = shrink(api_prompt(object_info, "02_native_clip_and_vae_interop"))
    (empty,) = nodes_of(prompt, "EmptySD3LatentImage")
    empty["inputs"]["width"] = empty["inputs"]["height"] = 200  # latent 25x25: not whole 16-pixel patches
    error = execution_error(server.run(prompt))
    assert error["node_type"] == "ZTurboSampler"
    assert "latent_image is 200x200 pixels" in error["exception_message"]
    assert "multiple of 16" in error["exception_message"] and "192 and 208" in error["exception_message"]


def test_latent_with_wrong_channel_count_is_refused(server, object_info):
    prompt = shrink(api_prompt(object_info, "02_native_clip_and_vae_interop"))
    (empty,) = nodes_of(prompt, "EmptySD3LatentImage")
    empty["class_type"] = "EmptyLatentImage"  # SD1/SDXL: 4 channels
    error = execution_error(server.run(prompt))
    assert error["node_type"] == "ZTurboSampler"
    assert "has 4 channels; Z-Image needs a 16-channel Flux-VAE latent" in error["exception_message"]


def test_image_of_wrong_size_is_refused(server, object_info):
    prompt = shrink(api_prompt(object_info, "05_img2img"))
    (load,) = nodes_of(prompt, "LoadImage")
    load["inputs"]["image"] = "not_multiple_of_16.png"
    (encode,) = nodes_of(prompt, "ZTurboVAEEncode")
    scale_id = next(k for k, n in prompt.items() if n["class_type"] == "ImageScale")
    load_id = next(k for k, n in prompt.items() if n is load)
    assert encode["inputs"]["pixels"] == [scale_id, 0]
    encode["inputs"]["pixels"] = [load_id, 0]  # skip the Image Scale
    error = execution_error(server.run(prompt))
    assert error["node_type"] == "ZTurboVAEEncode"
    assert "100x60 is not a multiple of 16" in error["exception_message"]
    assert "ImageScale" in error["exception_message"]


def test_out_of_range_input_is_refused_before_running(server, object_info):
    prompt = shrink(api_prompt(object_info, "01_text_to_image"))
    (sampler,) = nodes_of(prompt, "ZTurboSampler")
    sampler["inputs"]["steps"] = 0
    status, body = server.queue(prompt)
    assert status == 400
    (errors,) = [e["errors"] for e in body["node_errors"].values()]
    assert errors[0]["type"] == "value_smaller_than_min" and errors[0]["details"] == "steps"
