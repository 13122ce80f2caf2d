"""The two example workflows on ComfyUI's own Z-Image model run in a headless ComfyUI server (the one
``comfy_harness`` makes: 0.3.75, or the tree in $COMFYUI_SOURCE).

Its UNETLoader loads the tiny Z-Image under the official file name (a test-only custom node installs
``comfy_zimage.install_tiny_zimage_detection``: ComfyUI recognises Z-Image only at width 3840), its LoraLoaderModelOnly
a tiny LoRA under the workflow's file name, its CLIPLoader the tiny Qwen3 (the harness's test node) and its
VAELoader the full-size Flux VAE. Each workflow is converted to the API format with /object_info, passes
validate_prompt (the server's /prompt check) and leaves a PNG of the requested size; the server log shows that our
blocks ran (no native fallback line).
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from comfy_harness import REPO, ComfyServer, load_workflow, nodes_of, shared_env, ui_to_api

LORA_WF = "Native LoRA Accelerate"
FP16_WF = "Native fp16 Guard"
LORA_FILE = "my_z_image_lora.safetensors"
DETECT_NODE = f'''"""Test only: ComfyUI's UNETLoader loads the tiny Z-Image (written by tests/test_native_workflows.py)."""
import sys

sys.path.insert(0, {str(REPO / "tests")!r})
from comfy_zimage import install_tiny_zimage_detection  # noqa: E402

install_tiny_zimage_detection()
NODE_CLASS_MAPPINGS = {{}}
'''


def install_native_workflow_files(root, tiny_split: dict) -> None:
    """What the native workflows need in a ComfyUI copy beyond the harness's models (comfy_harness.build_env calls
    it): the tiny-Z-Image detection node for UNETLoader and a tiny LoRA under the workflow's file name."""
    from safetensors.torch import load_file

    from test_lora import write_lora

    (root / "custom_nodes" / "zturbo_test_tiny_zimage.py").write_text(DETECT_NODE)
    state = load_file(str(tiny_split["transformer"]))
    shapes = {k.removeprefix("model.diffusion_model."): tuple(v.shape) for k, v in state.items()}
    (root / "models" / "loras").mkdir(parents=True, exist_ok=True)
    write_lora(root / "models" / "loras" / LORA_FILE, shapes, "native_dm")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_split, tiny_dir):
    env = shared_env(tmp_path_factory, tiny_split, tiny_dir)
    server = ComfyServer(env, tmp_path_factory.mktemp("server-native") / "comfyui.log")
    try:
        yield server.start()
    finally:
        server.stop()


def api_prompt(server, name: str) -> dict:
    info = server.get("/object_info")
    return ui_to_api(load_workflow(name + ".json"), lambda class_type: info[class_type]["input"])


def run_small(server, name: str, prefix: str) -> tuple[dict, dict]:
    prompt = api_prompt(server, name)
    for node in prompt.values():  # small images for the CPU; the graph and options stay
        if node["class_type"] == "EmptySD3LatentImage":
            node["inputs"]["width"], node["inputs"]["height"] = 64, 48
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 3
        if node["class_type"] == "ZTurboAccelerate":
            node["inputs"]["compile"] = False  # torch.compile on 2 CPU cores takes minutes; its maths are the same
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] = prefix
    return prompt, server.run(prompt)


def images(server, entry: dict) -> list[Image.Image]:
    found = []
    for output in entry["outputs"].values():
        for item in output.get("images", []):
            found.append(Image.open(server.env.output / item["subfolder"] / item["filename"]))
    return found


@pytest.mark.parametrize("name", [LORA_WF, FP16_WF])
def test_native_workflow_runs(server, name):
    workflow = load_workflow(name + ".json")
    prompt = api_prompt(server, name)
    (accel,) = nodes_of(prompt, "ZTurboAccelerate")
    (sampler,) = nodes_of(prompt, "KSampler")
    assert sampler["inputs"]["sampler_name"] == "res_multistep" and sampler["inputs"]["cfg"] == 1.0
    assert sampler["inputs"]["steps"] == 9
    (shift,) = nodes_of(prompt, "ModelSamplingAuraFlow")
    assert shift["inputs"]["shift"] == 3.0
    (clip,) = nodes_of(prompt, "CLIPLoader")
    assert clip["inputs"]["type"] == "lumina2"
    if name == LORA_WF:
        (lora,) = nodes_of(prompt, "LoraLoaderModelOnly")
        assert lora["inputs"]["lora_name"] == LORA_FILE and accel["inputs"]["compile"] is False
    else:
        assert accel["inputs"]["precision_guard"] == "auto"
    assert workflow["version"] == 0.4 and any(n["type"] == "MarkdownNote" for n in workflow["nodes"])
    _, entry = run_small(server, name, prefix=name.replace(" ", "_"))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:4000]
    (image,) = images(server, entry)
    assert image.size == (64, 48)
    log = server.log_text()
    assert "runs ComfyUI's own forward" not in log  # our blocks ran every block
    # after the sampler, one line says what ran on which weights and how ComfyUI held them (issue 26)
    summary = [line for line in log.splitlines() if "block calls ran our maths on" in line]
    assert summary, log[-3000:]
    assert "fp32 (" in summary[-1] and "ComfyUI holds the model:" in summary[-1] and " GiB on cpu" in summary[-1]


def test_invalid_accelerate_input_is_refused(server):
    prompt = api_prompt(server, LORA_WF)
    (accel_id,) = [k for k, n in prompt.items() if n["class_type"] == "ZTurboAccelerate"]
    prompt[accel_id]["inputs"]["precision_guard"] = "sometimes"
    status, body = server.queue(prompt)
    if status == 400:  # ComfyUI's validation checks V3 combo options (0.33)
        assert accel_id in body["node_errors"], body
        return
    entry = server.wait(body["prompt_id"])  # 0.3.75 passes V3 combos through: the node itself refuses the value
    assert entry["status"]["status_str"] == "error"
    (error,) = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert error["node_id"] == accel_id and "precision guard 'sometimes' is unknown" in error["exception_message"]
    assert "auto" in error["exception_message"]
