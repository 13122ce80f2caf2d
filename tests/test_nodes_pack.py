"""The node pack's files, without ComfyUI: the entry point, the example workflows, the UI->API converter."""

import importlib.util
import inspect
import json
import re

import pytest
from PIL import Image

from comfy_harness import REPO, WORKFLOWS, ui_to_api, widget_slots

WORKFLOW_FILES = sorted(WORKFLOWS.glob("*.json"))
LOADERS = {"ZTurboFileLoader", "ZTurboLoader", "CLIPLoader", "VAELoader", "UNETLoader"}
TITLES = ["2048px Tiled", "Image to Image", "Native LoRA Accelerate", "Native Nodes", "Native fp16 Guard",
          "Text to Image", "fp16 Guard"]
MODEL_DIRECTORIES = {"diffusion_models", "text_encoders", "vae"}


def test_root_init_is_a_lazy_v3_entry_point():
    """Importing the repository root (as ComfyUI and pytest do) must not need ComfyUI."""
    spec = importlib.util.spec_from_file_location("zturbo_pack_under_test", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert inspect.iscoroutinefunction(module.comfy_entrypoint)
    assert not hasattr(module, "NODE_CLASS_MAPPINGS")  # ComfyUI would take it for a V1 pack
    assert importlib.util.find_spec("comfy_api") is None  # ...and that import worked without ComfyUI around


def test_core_never_imports_comfyui():
    pattern = re.compile(r"^\s*(import|from)\s+(comfy\w*|folder_paths|nodes|execution|server)\b", re.M)
    offenders = [p.name for p in (REPO / "zimage_core").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_example_workflows_with_titles_and_thumbnails():
    """ComfyUI's template browser shows a custom node's template by its file name (title and search text) and
    fetches ``<name>.jpg`` beside it as the card's thumbnail (frontends 1.32, 1.49 and 1.58 alike). The cards sit
    under the pack's folder name (ComfyUI-Z-Image-Turbo), so the titles are short enough not to be cut off."""
    assert WORKFLOWS == REPO / "workflows"  # the pack's design; ComfyUI 0.3.75 and 0.33 serve it as templates
    assert not (REPO / "example_workflows").exists()  # one folder: ComfyUI would serve both under one route
    assert sorted(TITLES) == sorted(p.stem for p in WORKFLOW_FILES)
    for path in WORKFLOW_FILES:
        thumb = path.with_suffix(".jpg")
        assert thumb.is_file(), thumb.name
        with Image.open(thumb) as image:
            assert image.format == "JPEG" and image.width >= 400 and image.height >= 250
            assert max(hi - lo for lo, hi in image.convert("RGB").getextrema()) > 60  # not a blank card
        assert thumb.stat().st_size < 120_000  # small enough for a card grid


def test_readme_names_every_workflow():
    readme = (REPO / "README.md").read_text()
    assert all(f"`{p.stem}`" in readme for p in WORKFLOW_FILES)


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.stem)
def test_workflow_opens_fitted_to_the_view(path):
    """Without extra.ds the frontend fits the graph to the window on load (1.32: fitView when ds is absent;
    1.49: templates always fit); a saved ds put part of every graph under the sidebar."""
    wf = json.loads(path.read_text(encoding="utf-8"))
    assert "ds" not in wf.get("extra", {})


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.stem)
def test_workflow_is_consistent_ui_json(path):
    wf = json.loads(path.read_text(encoding="utf-8"))
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] == max(nodes)
    assert wf["last_link_id"] == max(link[0] for link in wf["links"])
    notes = [n for n in wf["nodes"] if n["type"] in ("MarkdownNote", "Note")]
    assert len(notes) == 1 and len(notes[0]["widgets_values"][0]) > 200  # a note that explains the workflow
    for link_id, src, src_slot, dst, dst_slot, kind in wf["links"]:
        out, inp = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id
        assert out["type"] == kind and inp["type"] in (kind, "*")
    for node in wf["nodes"]:
        for slot in node.get("inputs", []):
            assert slot["link"] is None or any(link[0] == slot["link"] for link in wf["links"])


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.stem)
def test_loaders_carry_model_download_info(path):
    """ComfyUI's frontend offers a model for download when a node's properties.models has it as {name, url,
    directory}, the url is on huggingface.co, the name ends in .safetensors and the name is one of the node's
    widget values (frontend 1.32: getSelectedModelsMetadata, MissingModelsWarning)."""
    wf = json.loads(path.read_text(encoding="utf-8"))
    loaders = [n for n in wf["nodes"] if n["type"] in LOADERS]
    assert any(n["type"] in ("ZTurboFileLoader", "UNETLoader") for n in loaders)  # ours, or ComfyUI's own model
    for node in loaders:
        models = node["properties"]["models"]
        assert models
        for model in models:
            assert set(model) == {"name", "url", "directory"}
            assert model["name"].endswith(".safetensors") and model["name"] in node["widgets_values"]
            assert re.match(r"https://huggingface\.co/(Comfy-Org|Tongyi-MAI)/", model["url"])
            assert model["url"].endswith("/" + model["name"]) and "/resolve/main/" in model["url"]
            assert model["directory"] in MODEL_DIRECTORIES
            assert f"/split_files/{model['directory']}/" in model["url"]
        names = {m["name"] for m in models}
        assert {v for v in node["widgets_values"] if str(v).endswith(".safetensors")} <= names


def test_node_files_follow_the_structure_rules():
    """nodes/: only names that zimage_core/__init__.py exports; node files reach ComfyUI's types through the one
    adapters module (and the API module), never through each other's helpers."""
    import ast

    import zimage_core

    shared = {"api", "adapters", "preview"}  # the API, the one adapters module, its preview callback
    for path in sorted((REPO / "nodes").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("zimage_core.") for a in node.names), (path.name, ast.dump(node))
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.module and node.module.split(".")[0] == "zimage_core":
                assert node.module == "zimage_core", f"{path.name} imports {node.module} (private)"
                private = [a.name for a in node.names if a.name not in zimage_core.__all__]
                assert not private, f"{path.name} imports {private}, not exported by zimage_core"
            if node.level == 1 and path.name != "__init__.py":
                assert node.module in shared, f"{path.name} imports from .{node.module}"


# ---------------------------------------------------------------------------------------- converter
TYPES = {
    "Sampler": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}],
                             "steps": ["INT", {"default": 8}], "name": [["a", "b"], {}]},
                "optional": {"latent": ["LATENT", {}], "mode": ["COMBO", {"options": ["x", "y"]}],
                             "hidden_int": ["INT", {"forceInput": True}]}},
    "Load": {"required": {"image": [["cat.png"], {"image_upload": True}], "noise_seed": ["INT", {}]}},
    "Model": {"required": {}},
}


def workflow(nodes, links):
    return {"nodes": nodes, "links": links}


def test_converter_maps_widgets_in_order_with_control_values():
    wf = workflow([
        {"id": 1, "type": "Model", "mode": 0, "outputs": [{"name": "MODEL", "type": "MODEL", "links": [1]}]},
        {"id": 2, "type": "Sampler", "mode": 0, "inputs": [{"name": "model", "type": "MODEL", "link": 1}],
         "widgets_values": [5, "randomize", 8, "b", "y"]},
        {"id": 3, "type": "Load", "mode": 0, "widgets_values": ["cat.png", "image", 9, "fixed"]},
        {"id": 4, "type": "MarkdownNote", "mode": 0, "widgets_values": ["notes are frontend-only"]},
    ], [[1, 1, 0, 2, 0, "MODEL"]])
    prompt = ui_to_api(wf, TYPES.__getitem__)
    assert prompt["2"]["inputs"] == {"model": ["1", 0], "seed": 5, "steps": 8, "name": "b", "mode": "y"}
    assert prompt["3"]["inputs"] == {"image": "cat.png", "noise_seed": 9}
    assert set(prompt) == {"1", "2", "3"}
    assert widget_slots(TYPES["Sampler"]) == [("seed", 2), ("steps", 1), ("name", 1), ("mode", 1)]


def test_converter_lets_links_replace_widget_values():
    wf = workflow([
        {"id": 7, "type": "Model", "mode": 0, "outputs": [{"name": "INT", "type": "INT", "links": [3]}]},
        {"id": 8, "type": "Sampler", "mode": 0,
         "inputs": [{"name": "steps", "type": "INT", "link": 3, "widget": {"name": "steps"}}],
         "widgets_values": [1, "fixed", 8, "a", "x"]},
    ], [[3, 7, 0, 8, 0, "INT"]])
    assert ui_to_api(wf, TYPES.__getitem__)["8"]["inputs"]["steps"] == ["7", 0]


def test_converter_rejects_a_widget_count_mismatch():
    for values in ([5, "fixed", 8], [5, "fixed", 8, "a", "x", "extra"]):  # a required widget missing; one too many
        wf = workflow([{"id": 1, "type": "Sampler", "mode": 0, "widgets_values": values}], [])
        with pytest.raises(AssertionError, match="widget values"):
            ui_to_api(wf, TYPES.__getitem__)
    # a workflow saved before the optional widget at the end existed: the frontend keeps its default
    wf = workflow([{"id": 1, "type": "Sampler", "mode": 0, "widgets_values": [5, "fixed", 8, "a"]}], [])
    assert ui_to_api(wf, TYPES.__getitem__)["1"]["inputs"] == {"seed": 5, "steps": 8, "name": "a"}
