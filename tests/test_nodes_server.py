"""A headless ComfyUI 0.3.75 server with the pack in custom_nodes and tiny models under the real file names.

The example workflows are converted to the API format with /object_info, shrunk (sizes and tiles only, the graph
stays) and posted to /prompt; each must leave a PNG of the requested size in the output folder. Workflow 2 runs
whole: ComfyUI's own CLIPLoader (lumina2) + CLIPTextEncode (its Qwen3 class sized to the tiny model by a
test-only custom node) into our sampler, and our LATENT into ComfyUI's VAELoader + VAEDecode with a full-size
Flux VAE (random weights).
"""

import json
import re
from urllib.parse import quote

import pytest
from PIL import Image

from comfy_harness import (PACK_NAME, REPO, WORKFLOWS, ComfyServer, load_workflow, messages, nodes_of, shared_env,
                           ui_to_api)

NODE_IDS = ["ZTurboFileLoader", "ZTurboDiffusersLoader", "ZTurboLoadOptions", "ZTurboTextEncode", "ZTurboSampler",
            "ZTurboVAEDecode", "ZTurboVAEDecodeTiled", "ZTurboVAEEncode", "ZTurboPrecisionGuard", "ZTurboLoRA",
            "ZTurboAccelerate", "ZTurboNativeVAEDecodeTiled"]
DEPRECATED = ["ZTurboLoader"]  # 0.1's one-node loader: registered (saved workflows), hidden from search
WORKFLOW_NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
T2I = "Text to Image"
NATIVE = "Native Nodes"
FP16 = "fp16 Guard"
TILED = "2048px Tiled"
I2I = "Image to Image"


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
    """{node id: {input: (type, default)}} from the node tables of docs/nodes.md."""
    doc, node, tables = (REPO / "docs" / "nodes.md").read_text(encoding="utf-8"), None, {}
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
    for node_id in DEPRECATED:
        assert object_info[node_id]["deprecated"] is True and object_info[node_id]["category"] == "Z-Image Turbo"
    for node_id in NODE_IDS:
        assert object_info[node_id].get("deprecated") is not True, node_id
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
    assert set(sampler["input"]["optional"]) == {"negative", "latent_image", "precision_guard", "sampler"}
    loader = object_info["ZTurboFileLoader"]["input"]
    assert list(loader["required"]) == ["transformer", "text_encoder", "vae", "dtype"]  # the common case: 4 widgets
    assert list(loader["optional"]) == ["options"] and loader["optional"]["options"][0] == "ZTURBO_LOAD_OPTIONS"
    assert "z_image_turbo_bf16.safetensors" in loader["required"]["transformer"][1]["options"]
    folder = object_info["ZTurboDiffusersLoader"]["input"]["required"]
    assert folder["diffusers_model"][1]["options"] == ["Z-Image-Turbo"]
    assert object_info["ZTurboLoadOptions"]["output"] == ["ZTURBO_LOAD_OPTIONS"]
    assert "(8-step)" not in object_info["ZTurboSampler"]["display_name"]  # steps is a widget
    assert sampler["input"]["optional"]["precision_guard"][1]["options"][0] == "from model"


def test_workflow_templates_are_served(server):
    listing = server.get("/api/workflow_templates")
    assert list(listing) == [PACK_NAME] and sorted(listing[PACK_NAME]) == WORKFLOW_NAMES
    for name in WORKFLOW_NAMES:
        served = server.get(f"/api/workflow_templates/{PACK_NAME}/{quote(name)}.json")
        assert served == json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))


def test_workflows_follow_the_recipe(object_info):
    prompts = {name: api_prompt(object_info, name) for name in WORKFLOW_NAMES}
    for name, prompt in prompts.items():
        if nodes_of(prompt, "UNETLoader"):
            continue  # ComfyUI's own model with our Accelerate node: tests/test_native_workflows.py
        (sampler,) = nodes_of(prompt, "ZTurboSampler")
        assert sampler["inputs"]["steps"] == 8 and sampler["inputs"]["guidance"] == 0.0, name
        (loader,) = nodes_of(prompt, "ZTurboFileLoader")
        assert loader["inputs"]["transformer"] == "z_image_turbo_bf16.safetensors", name
        assert loader["inputs"]["dtype"] == ("fp16" if name == FP16 else "auto"), name
        size = (sampler["inputs"]["width"], sampler["inputs"]["height"])
        if name != NATIVE and name != I2I:
            assert size == ((2048, 2048) if name == TILED else (1024, 1024)), name
        assert nodes_of(prompt, "SaveImage"), name
    assert nodes_of(prompts[T2I], "ZTurboVAEDecode")
    (clip,) = nodes_of(prompts[NATIVE], "CLIPLoader")
    assert clip["inputs"]["type"] == "lumina2" and clip["inputs"]["clip_name"] == "qwen_3_4b.safetensors"
    assert nodes_of(prompts[NATIVE], "EmptySD3LatentImage")[0]["inputs"]["width"] == 1024
    (guard,) = nodes_of(prompts[FP16], "ZTurboPrecisionGuard")
    assert guard["inputs"]["policy"] == "auto"
    (tiled,) = nodes_of(prompts[TILED], "ZTurboVAEDecodeTiled")
    assert (tiled["inputs"]["tile_size"], tiled["inputs"]["overlap"]) == (512, 64)
    img2img = prompts[I2I]
    (sampler,) = nodes_of(img2img, "ZTurboSampler")
    assert sampler["inputs"]["denoise"] == 0.6 and img2img[sampler["inputs"]["latent_image"][0]]["class_type"] == \
        "ZTurboVAEEncode"


# ------------------------------------------------------------------------------------ running workflows
@pytest.mark.parametrize("name,width,height", [
    (T2I, 64, 64),
    (FP16, 64, 64),
    (TILED, 128, 64),  # two 64 px tiles across
    (I2I, 64, 64),
])
def test_workflow_runs_to_png(server, object_info, name, width, height):
    prompt = shrink(api_prompt(object_info, name), width, height, prefix=name)
    if name == FP16:  # a transformer whose weights overflow fp16 in two blocks
        nodes_of(prompt, "ZTurboFileLoader")[0]["inputs"]["transformer"] = "z_image_turbo_planted.safetensors"
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:3000]
    (image,) = saved_images(server, entry)
    assert image.size == (width, height) and image.mode == "RGB"
    if name == FP16:
        (preview,) = nodes_of(prompt, "PreviewAny")
        preview_id = next(k for k, n in prompt.items() if n is preview)
        text = entry["outputs"][preview_id]["text"][0]  # the sampler's guard_report, shown by Preview as Text
        assert text.startswith("precision guard: auto: higher precision for transformer: noise_refiner.0 → bf16")
        # Markdown (Preview as Text): the list stands apart from the lines before and after it
        lines = text.splitlines()
        items = [i for i, line in enumerate(lines) if line.startswith("- ")]
        assert items and lines[items[0] - 1] == "" and lines[items[-1] + 1] == "" and lines[-1].startswith("checks:")


def test_fp16_overflow_without_the_guard_is_an_error_not_a_black_image(server, object_info):
    prompt = shrink(api_prompt(object_info, FP16))
    nodes_of(prompt, "ZTurboFileLoader")[0]["inputs"]["transformer"] = "z_image_turbo_planted.safetensors"
    nodes_of(prompt, "ZTurboPrecisionGuard")[0]["inputs"]["policy"] = "off"
    error = execution_error(server.run(prompt))
    assert error["node_type"] == "ZTurboSampler"
    assert "NaN/inf" in error["exception_message"] and "precision guard" in error["exception_message"].lower()


def test_native_clip_latent_and_vae_interop(server, object_info):
    """Workflow 2 as it is: native CLIPLoader(lumina2)/CLIPTextEncode/EmptySD3LatentImage -> our sampler -> native
    VAELoader/VAEDecode (full-size Flux VAE)."""
    prompt = shrink(api_prompt(object_info, NATIVE), prefix="interop")
    assert {n["class_type"] for n in prompt.values()} >= {"CLIPLoader", "CLIPTextEncode", "VAELoader", "VAEDecode",
                                                          "EmptySD3LatentImage", "ZTurboSampler"}
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:3000]
    (image,) = saved_images(server, entry)
    assert image.size == (64, 64)
    assert max(image.getextrema()[c][1] - image.getextrema()[c][0] for c in range(3)) > 10  # not a flat image


# ------------------------------------------------------------------------------------ bad input
def test_missing_model_names_folder_and_download(server, object_info):
    prompt = shrink(api_prompt(object_info, T2I))
    (loader,) = nodes_of(prompt, "ZTurboFileLoader")
    loader["inputs"]["transformer"] = "z_image_turbo_fp8_e4m3fn.safetensors"
    error = execution_error(server.run(prompt))
    assert error["node_type"] == "ZTurboFileLoader"
    assert error["exception_type"] == "zimage_core.errors.ZImageError"
    message = error["exception_message"]
    assert "'z_image_turbo_fp8_e4m3fn.safetensors' was not found in ComfyUI/models/diffusion_models/" in message
    assert "https://huggingface.co/Comfy-Org/z_image_turbo" in message and "Traceback" not in message


def test_every_missing_model_is_named_in_one_message(server, object_info):
    """A new user without model files learns all three at the first run, not one per run."""
    prompt = shrink(api_prompt(object_info, T2I))
    (loader,) = nodes_of(prompt, "ZTurboFileLoader")
    loader["inputs"].update(transformer="gone_dit.safetensors", text_encoder="gone_te.safetensors",
                            vae="gone_vae.safetensors")
    message = execution_error(server.run(prompt))["exception_message"]
    assert message.startswith("3 model files are missing:")
    for name, folder in (("gone_dit", "diffusion_models"), ("gone_te", "text_encoders"), ("gone_vae", "vae")):
        assert f"'{name}.safetensors' was not found in ComfyUI/models/{folder}/" in message
    assert message.count("\n- ") == 3


def test_workflow_saved_with_the_old_loader_still_runs(server, object_info):
    """Workflows saved with 0.1's one-node loader (11 widgets) and precision_guard 'model' load and run."""
    workflow = load_workflow(T2I + ".json")
    for node in workflow["nodes"]:
        if node["type"] == "ZTurboFileLoader":  # back to 0.1's node and its widget order
            node["type"] = "ZTurboLoader"
            node["widgets_values"] = ["none", *node["widgets_values"], "auto", "auto", "auto", "auto", False, "none"]
            node["inputs"] = []
        if node["type"] == "ZTurboSampler":  # 0.1 had no sampler widget and called "from model" "model"
            node["widgets_values"] = node["widgets_values"][:-1]
            node["widgets_values"][-1] = "model"
    prompt = shrink(ui_to_api(workflow, lambda class_type: object_info[class_type]["input"]), prefix="old_loader")
    (loader,) = nodes_of(prompt, "ZTurboLoader")
    assert loader["inputs"]["diffusers_model"] == "none" and loader["inputs"]["offload"] == "none"
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:3000]
    (image,) = saved_images(server, entry)
    assert image.size == (64, 64)


def test_load_options_node_reaches_the_loader(server, object_info):
    prompt = shrink(api_prompt(object_info, T2I), prefix="options")
    (loader,) = nodes_of(prompt, "ZTurboFileLoader")
    prompt["900"] = {"class_type": "ZTurboLoadOptions",
                     "inputs": {"transformer_storage": "auto", "text_encoder_storage": "auto", "vae_dtype": "fp64",
                                "attention": "math", "compile": False, "offload": "none"}}
    loader["inputs"]["options"] = ["900", 0]
    status, body = server.queue(prompt)
    if status == 400:  # ComfyUI 0.33 checks V3 combo values when queueing (0.3.75 checks only list-style combos)
        errors = json.dumps(body["node_errors"])
        assert '"900"' in errors and "value_not_in_list" in errors and "vae_dtype: 'fp64'" in errors
    else:  # the options reach the core, which names the bad one
        assert status == 200, body
        error = execution_error(server.wait(body["prompt_id"]))
        assert error["node_type"] == "ZTurboFileLoader" and "'fp64'" in error["exception_message"]


def test_latent_of_wrong_size_is_refused(server, object_info):
    prompt = shrink(api_prompt(object_info, NATIVE))
    (empty,) = nodes_of(prompt, "EmptySD3LatentImage")
    empty["inputs"]["width"] = empty["inputs"]["height"] = 200  # latent 25x25: not whole 16-pixel patches
    error = execution_error(server.run(prompt))
    assert error["node_type"] == "ZTurboSampler"
    assert "latent_image is 200x200 pixels" in error["exception_message"]
    assert "multiple of 16" in error["exception_message"]
    assert "nearest allowed sizes are 192x192, 192x208, 208x192, 208x208" in error["exception_message"]


def test_latent_with_wrong_channel_count_is_refused(server, object_info):
    prompt = shrink(api_prompt(object_info, NATIVE))
    (empty,) = nodes_of(prompt, "EmptySD3LatentImage")
    empty["class_type"] = "EmptyLatentImage"  # SD1/SDXL: 4 channels
    error = execution_error(server.run(prompt))
    assert error["node_type"] == "ZTurboSampler"
    assert "has 4 channels; Z-Image needs a 16-channel Flux-VAE latent" in error["exception_message"]


def test_image_of_wrong_size_is_refused(server, object_info):
    prompt = shrink(api_prompt(object_info, I2I))
    (load,) = nodes_of(prompt, "LoadImage")
    load["inputs"]["image"] = "not_multiple_of_16.png"
    (encode,) = nodes_of(prompt, "ZTurboVAEEncode")
    scale_id = next(k for k, n in prompt.items() if n["class_type"] == "ImageScale")
    load_id = next(k for k, n in prompt.items() if n is load)
    assert encode["inputs"]["pixels"] == [scale_id, 0]
    encode["inputs"]["pixels"] = [load_id, 0]  # skip the Image Scale
    error = execution_error(server.run(prompt))
    assert error["node_type"] == "ZTurboVAEEncode"
    assert "the image is 100x60 pixels, not a multiple of 16" in error["exception_message"]
    assert "nearest allowed sizes are 96x64, 112x64" in error["exception_message"]
    assert "ImageScale" in error["exception_message"]


def test_out_of_range_input_is_refused_before_running(server, object_info):
    prompt = shrink(api_prompt(object_info, T2I))
    (sampler,) = nodes_of(prompt, "ZTurboSampler")
    sampler["inputs"]["steps"] = 0
    status, body = server.queue(prompt)
    assert status == 400
    (errors,) = [e["errors"] for e in body["node_errors"].values()]
    assert errors[0]["type"] == "value_smaller_than_min" and errors[0]["details"] == "steps"
