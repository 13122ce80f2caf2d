"""Damaged quantized checkpoints on a real ComfyUI server (issue 25, defects 4 and 5): the Z-Image Turbo Loader node
itself refuses each file with our error naming the file and the tensor, never an internal error or a model loaded
silently wrong; the same server then runs a good graph. Runs on both ComfyUI versions (scripts/test.sh)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file

from comfy_harness import ComfyServer, messages, shared_env
from helpers import transformer_to_original
from test_reliability_quant_files import cases

# the kinds the issue names: defect 4 (internal errors before) and defect 5 (loaded silently wrong before)
NAMED = ("legacy_scale_shape", "comfy_quant_scale_shape", "comfy_quant_json_list", "mxfp8_on_e4m3_data",
         "metadata_layers_list", "mxfp8_scale_shape", "nvfp4_scale_dtype", "nvfp4_weight_f32", "nvfp4_scale_2_shape",
         "metadata_extra_layer", "int8_tag_on_e4m3", "fp8_without_scale", "zero_scale")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_split, tiny_dir, tiny_models):
    env = shared_env(tmp_path_factory, tiny_split, tiny_dir)
    built = cases(transformer_to_original(tiny_models[0].state_dict(), prefix=""))
    for name in NAMED:
        sd, metadata, _, _ = built[name]
        save_file({k: v.contiguous() for k, v in sd.items()},
                  str(env.models / "diffusion_models" / f"damaged_{name}.safetensors"), metadata=metadata)
    server = ComfyServer(env, tmp_path_factory.mktemp("server-damaged") / "comfyui.log")
    try:
        yield server.start(), {name: built[name][2] for name in NAMED}
    finally:
        server.stop()


def graph(server, transformer: str, prefix: str) -> dict:
    env = server.env
    loader = {"transformer": transformer, "text_encoder": "qwen_3_4b.safetensors", "vae": env.tiny_vae, "dtype": "auto"}
    return {
        "1": {"class_type": "ZTurboFileLoader", "inputs": loader},
        "2": {"class_type": "ZTurboTextEncode", "inputs": {"model": ["1", 0], "text": "a damaged file"}},
        "3": {"class_type": "ZTurboSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "seed": 1, "steps": 2, "guidance": 0.0, "denoise": 1.0,
            "width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "ZTurboVAEDecode", "inputs": {"model": ["1", 0], "samples": ["3", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": prefix}},
    }


@pytest.mark.parametrize("name", NAMED)
def test_damaged_quantized_file_is_refused_by_the_loader_node(server, name):
    server, tensors = server
    file = f"damaged_{name}.safetensors"
    entry = server.run(graph(server, file, f"damaged_{name}"))
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"])[:2000]
    (error,) = messages(entry, "execution_error")
    assert error["node_type"] == "ZTurboFileLoader", error
    assert error["exception_type"] == "zimage_core.errors.ZImageError", error
    message = error["exception_message"]
    assert file in message and "Traceback" not in message, message
    if tensors[name]:
        assert repr(tensors[name]) in message, message


def test_a_good_file_still_runs_on_the_same_server(server):
    server, _ = server
    entry = server.run(graph(server, "z_image_turbo_bf16.safetensors", "after_damaged"))
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:2000]
