"""The example workflows in ComfyUI's real frontend: Debian's chromium driven by playwright-core (tests/browser/).

A headless ComfyUI (the harness's copy: 0.3.75, or the tree $COMFYUI_SOURCE names) serves the pack, the tiny models
under the official file names and its own frontend. For every workflow: open the frontend, load the workflow the
way the template browser does, and check that no missing-node / missing-model / error dialog shows, no node is
errored, every widget holds the value of the file, and the sampler hides its size widgets exactly when a latent is
connected. Workflows 01 and 05 then run from the Run button (at a small size, with the tiny VAE, as a user would
set the widgets) until the output image is on the canvas. The template browser's search for "Z-Image Turbo" must
show all five cards with their thumbnails. Screenshots stay in the test's temp folder.

Needs ``scripts/browser-install.sh`` (chromium + playwright-core); the test fails, naming that script, without them.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from comfy_harness import PACK_NAME, REPO, WORKFLOWS, ComfyServer, shared_env

BROWSER_DIR = REPO / "tests" / "browser"
CHROMIUM = os.environ.get("ZTURBO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
T2I, I2I = "Text to Image", "Image to Image"
SIZE_WIDGETS = ["width", "height", "batch_size"]
RUN_EDITS = {  # what a user on a CPU would change before pressing Run: a small image, the small VAE
    T2I: [{"type": "ZTurboSampler", "widget": "width", "value": 128},
          {"type": "ZTurboSampler", "widget": "height", "value": 96}],
    I2I: [{"type": "ImageScale", "widget": "width", "value": 128},
          {"type": "ImageScale", "widget": "height", "value": 96}],
}


@pytest.fixture(scope="session")
def comfy_env(tmp_path_factory, tiny_split, tiny_dir):
    return shared_env(tmp_path_factory, tiny_split, tiny_dir)


@pytest.fixture(scope="module")
def browser_run(comfy_env, tmp_path_factory):
    assert Path(CHROMIUM).exists() and (BROWSER_DIR / "node_modules" / "playwright-core").is_dir(), (
        "chromium or playwright-core is missing: run scripts/browser-install.sh"
    )
    out = tmp_path_factory.mktemp("browser")
    server = ComfyServer(comfy_env, out / "comfyui.log")
    server.start()
    try:
        workflows = []
        for name in NAMES:
            edits = [*RUN_EDITS.get(name, []), {"type": "ZTurboFileLoader", "widget": "vae", "value": comfy_env.tiny_vae}]
            workflows.append({"name": name, "run": name in RUN_EDITS, "edits": edits})
        plan = {"url": server.url, "pack": PACK_NAME, "out": str(out), "chromium": CHROMIUM, "workflows": workflows,
                "templates": True, "thumbnails": bool(os.environ.get("ZTURBO_THUMBNAILS"))}
        (out / "plan.json").write_text(json.dumps(plan, indent=1))
        proc = subprocess.run(["node", str(BROWSER_DIR / "drive.cjs"), str(out / "plan.json")], cwd=BROWSER_DIR,
                              capture_output=True, text=True, timeout=900)
        assert (out / "results.json").is_file(), f"drive.cjs wrote no results:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        results = json.loads((out / "results.json").read_text())
        assert "fatal" not in results, f"{results['fatal']}\nscreenshots in {out}\n{server.log_text()[-3000:]}"
        results["out"] = out
        results["history"] = server.get("/history")
        yield results
    finally:
        server.stop()


def file_nodes(name: str) -> dict:
    return {n["id"]: n for n in json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))["nodes"]}


def test_frontend_loads_the_pack_extension(browser_run):
    assert browser_run["extension_loaded"] is True  # web/zturbo.js, served through WEB_DIRECTORY
    ours = [r for r in browser_run["failed_requests"] if PACK_NAME in r or "zturbo" in r.lower()]
    assert ours == []  # no 404 for our templates, thumbnails or script


@pytest.mark.parametrize("name", NAMES)
def test_workflow_opens_clean(browser_run, name):
    result = browser_run["workflows"][name]
    shot = result["screenshot"]
    assert result["status"] == 200, name
    assert result["dialogs"] == [], f"{result['dialogs']} ({shot})"  # missing nodes / models / errors
    nodes = {str(n["id"]): n for n in result["nodes"]}  # 1.49 gives string ids
    expected = {str(k): v for k, v in file_nodes(name).items()}
    assert set(nodes) == set(expected)
    for node_id, node in nodes.items():
        assert node["type"] == expected[node_id]["type"] and not node["has_errors"], (node, shot)
        # (1.49 leaves widgets_values out for a node without widgets, the files hold [])
        assert (node["widgets_values"] or []) == expected[node_id]["widgets_values"], (name, node["type"], shot)


@pytest.mark.parametrize("name", NAMES)
def test_sampler_sizes_show_only_without_a_latent(browser_run, name):
    result = browser_run["workflows"][name]
    expected = {str(k): v for k, v in file_nodes(name).items()}
    for node in result["nodes"]:
        if node["type"] != "ZTurboSampler":
            continue
        inputs = expected[str(node["id"])]["inputs"]
        linked = any(i["name"] == "latent_image" and i["link"] is not None for i in inputs)
        assert node["hidden_widgets"] == (SIZE_WIDGETS if linked else []), (name, result["screenshot"])


@pytest.mark.parametrize("name", NAMES)
def test_workflow_opens_fitted_to_the_view(browser_run, name):
    """Every node lies inside the visible canvas area (the frontend's fitView, as no view is saved)."""
    result = browser_run["workflows"][name]
    left, top, width, height = result["visible_area"]
    for node in result["nodes"]:
        x, y, w, h = node["bounding"]
        assert x >= left - 1 and y >= top - 1 and x + w <= left + width + 1 and y + h <= top + height + 1, (
            name, node["type"], result["screenshot"])


@pytest.mark.parametrize("name", NAMES)
def test_workflow_opens_readable(browser_run, name):
    """At the fitted zoom (1600x1000 window) LiteGraph still draws the nodes' text: below its level-of-detail zoom
    (1.32: 8 px / 14 px font = 0.57) nodes are drawn as empty boxes, which is what the 0.1 layouts gave."""
    result = browser_run["workflows"][name]
    threshold = result["lod_threshold"] or 0.6
    assert result["ds"]["scale"] > threshold and result["low_quality"] is not True, (result["ds"], result["screenshot"])


@pytest.mark.parametrize("name", [T2I, I2I])
def test_run_button_puts_the_image_on_the_canvas(browser_run, name):
    run = browser_run["workflows"][name]["run"]
    assert run["ok"], run
    (image,) = run["images"]
    assert image["complete"] and (image["width"], image["height"]) == (128, 96), run
    assert browser_run["workflows"][name]["dialogs_after_run"] == []
    statuses = [entry["status"]["status_str"] for entry in browser_run["history"].values()]
    assert statuses.count("success") == 2 and "error" not in statuses


def test_template_browser_finds_all_five_with_thumbnails(browser_run):
    assert "error" not in browser_run["templates"], browser_run["templates"]
    templates = browser_run["templates"]["cards"]
    for name in NAMES:
        assert name in templates["text"], (name, browser_run["templates"]["screenshot"])
    served = {Path(url.split("?")[0]).stem for url in browser_run["thumbnails_served"]}
    assert sorted(served) == NAMES, (served, browser_run["templates"]["screenshot"])
    for thumb in templates["thumbnails"]:  # where the cards show them as <img src> (1.32): decoded
        assert thumb["complete"] and thumb["width"] > 0, thumb
