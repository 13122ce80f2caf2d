"""The workflows in ComfyUI's real frontend: Debian's chromium driven by playwright-core (tests/browser/).

A headless ComfyUI (the harness's copy: 0.3.75, or the tree $COMFYUI_SOURCE names) serves the pack, the tiny models
under the official file names and a frontend: its own, then each one named by $ZTURBO_FRONTENDS (folders holding a
``comfyui_frontend_package``, given to ComfyUI as ``--front-end-root``; scripts/test.sh passes the newest on the
package index, which scripts/browser-install.sh installs). In both render modes (the canvas, and Nodes 2.0: the
setting ``Comfy.VueNodes.Enabled``; 1.32's early Nodes 2.0, which rescales layouts, is left out) every workflow is
opened the way the template browser does it and checked: no
missing-node / missing-model / error dialog, no errored node, every widget holds the value of the file, the sampler
hides its size widgets exactly when a latent is connected, no node is drawn over another (a note over a node's
widgets, say), the graph fits the window at a readable zoom. Text to Image and Image to Image run from the Run button
(at a small size, with the tiny VAE, as a user would set the widgets) until the image is on the canvas; Text to Image
also in Nodes 2.0. The template browser's category for the pack shows the seven cards, titles not cut off, with their
thumbnails. No console warning or error may come from the pack's web extension. Screenshots stay in the test's temp
folder.

Needs ``scripts/browser-install.sh`` (chromium, playwright-core, the newest frontend); the test fails, naming that
script, without them.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from comfy_harness import PACK_NAME, REPO, WORKFLOWS, ComfyServer, shared_env

BROWSER_DIR = REPO / "tests" / "browser"
CHROMIUM = os.environ.get("ZTURBO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
NAMES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
MODES = ["classic", "vue"]  # LiteGraph's canvas, Nodes 2.0 (Comfy.VueNodes.Enabled)
T2I, I2I = "Text to Image", "Image to Image"
SIZE_WIDGETS = ["width", "height", "batch_size"]
RUN_EDITS = {  # what a user on a CPU would change before pressing Run: a small image, the small VAE
    T2I: [{"type": "ZTurboSampler", "widget": "width", "value": 128},
          {"type": "ZTurboSampler", "widget": "height", "value": 96}],
    I2I: [{"type": "ImageScale", "widget": "width", "value": 128},
          {"type": "ImageScale", "widget": "height", "value": 96}],
}
RUNS = [(T2I, "classic"), (I2I, "classic"), (T2I, "vue")]
EXTENSION_URL = f"/extensions/{PACK_NAME}/"  # where ComfyUI serves web/ (WEB_DIRECTORY)


def frontends() -> list:
    """The frontend ComfyUI ships with (None), then each folder in $ZTURBO_FRONTENDS (os.pathsep-separated)."""
    found = [pytest.param(None, id="bundled")]
    for folder in filter(None, os.environ.get("ZTURBO_FRONTENDS", "").split(os.pathsep)):
        static = Path(folder) / "comfyui_frontend_package" / "static"
        versions = [p.name.removeprefix("comfyui_frontend_package-").removesuffix(".dist-info")
                    for p in Path(folder).glob("comfyui_frontend_package-*.dist-info")]
        found.append(pytest.param(static, id=f"frontend-{versions[0] if versions else Path(folder).name}"))
    return found


@pytest.fixture(scope="session")
def comfy_env(tmp_path_factory, tiny_split, tiny_dir):
    return shared_env(tmp_path_factory, tiny_split, tiny_dir)


@pytest.fixture(scope="module", params=frontends())
def browser_run(request, comfy_env, tmp_path_factory):
    static = request.param
    assert Path(CHROMIUM).exists() and (BROWSER_DIR / "node_modules" / "playwright-core").is_dir(), (
        "chromium or playwright-core is missing: run scripts/browser-install.sh"
    )
    assert static is None or (static / "index.html").is_file(), (
        f"$ZTURBO_FRONTENDS names {static.parents[1]}, which holds no frontend (comfyui_frontend_package/static/"
        "index.html): run scripts/browser-install.sh, or leave the variable unset to test only ComfyUI's own")
    out = tmp_path_factory.mktemp("browser")
    server = ComfyServer(comfy_env, out / "comfyui.log", args=() if static is None else ("--front-end-root", str(static)))
    server.start()
    try:
        workflows = []
        for name in NAMES:
            edits = [*RUN_EDITS.get(name, []), {"type": "ZTurboFileLoader", "widget": "vae", "value": comfy_env.tiny_vae}]
            workflows.append({"name": name, "run": [mode for wf, mode in RUNS if wf == name], "edits": edits})
        plan = {"url": server.url, "pack": PACK_NAME, "out": str(out), "chromium": CHROMIUM, "workflows": workflows,
                "modes": MODES, "templates": True}
        (out / "plan.json").write_text(json.dumps(plan, indent=1))
        proc = subprocess.run(["node", str(BROWSER_DIR / "drive.cjs"), str(out / "plan.json")], cwd=BROWSER_DIR,
                              capture_output=True, text=True, timeout=1500)
        assert (out / "results.json").is_file(), f"drive.cjs wrote no results:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        results = json.loads((out / "results.json").read_text())
        assert "fatal" not in results, f"{results['fatal']}\nscreenshots in {out}\n{server.log_text()[-3000:]}"
        results["out"] = out
        results["history"] = server.get("/history")
        yield results
    finally:
        server.stop()


def file_nodes(name: str) -> dict:
    return {str(n["id"]): n for n in json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))["nodes"]}


def drawn_box(node: dict, mode: str) -> list:
    """The box a node is drawn in, in graph units: Nodes 2.0's element, or LiteGraph's title bar and body."""
    box = node["dom_box"] if mode == "vue" else node["bounding"]
    assert box is not None, (mode, node["type"], "not drawn")
    return box


def culprit(stack: str) -> str:
    """The frame that caused a console message: the first one below the init script's console wrapper and the
    frontend's own plumbing (LiteGraph's deprecation helper and property getters, Vue's reactive proxies)."""
    for line in stack.splitlines():
        frame = line.strip()
        if not frame.startswith("at ") or "<anonymous>" in frame:
            continue
        if re.search(r"/assets/(litegraph|vendor)[^/()]*\.js", frame):
            continue
        return frame
    return ""


def test_frontend_loads_the_pack_extension(browser_run):
    assert browser_run["extension_loaded"] is True  # web/zturbo.js, served through WEB_DIRECTORY
    ours = [r for r in browser_run["failed_requests"] if PACK_NAME in r or "zturbo" in r.lower()]
    assert ours == []  # no 404 for our templates, thumbnails or script


def test_no_console_warning_or_error_from_the_pack(browser_run):
    """Every console.warn/console.error (deprecations included: LiteGraph is told to repeat them) and every uncaught
    error while the workflows open and run in both modes: none may come from web/zturbo.js."""
    seen = browser_run["console"]
    assert any(entry["stack"] for entry in seen) or seen == [], seen  # the init script recorded stacks
    ours = [entry for entry in seen
            if EXTENSION_URL in culprit(entry["stack"]) or re.search(r"zturbo|ZImageTurbo|ZTurbo", entry["text"])]
    assert ours == [], json.dumps(ours, indent=1)[:6000]


def checked(browser_run, name: str):
    """(mode, result) of each render mode the workflow was opened in."""
    return [(mode, done["workflows"][name]) for mode, done in browser_run["modes"].items()]


def test_both_render_modes_are_checked(browser_run):
    """The canvas and Nodes 2.0, except where the frontend rescales layouts when Nodes 2.0 is switched on (the
    setting Comfy.VueNodes.AutoScaleLayout of the early Nodes 2.0, frontend 1.32: positions and sizes x 1.2, and
    nodes misplaced after a tab switch), where only the canvas is checked."""
    expected = ["classic"] if browser_run["vue_autoscale"] else MODES
    assert list(browser_run["modes"]) == expected
    for mode, done in browser_run["modes"].items():
        assert done["vue_nodes"] is (mode == "vue")
        for result in done["workflows"].values():  # Nodes 2.0 draws DOM elements, the canvas none
            assert all((node["dom_box"] is not None) is (mode == "vue") for node in result["nodes"]), result["screenshot"]


@pytest.mark.parametrize("name", NAMES)
def test_workflow_opens_clean(browser_run, name):
    expected = file_nodes(name)
    for mode, result in checked(browser_run, name):
        shot = result["screenshot"]
        assert result["status"] == 200, name
        assert result["dialogs"] == [], f"{result['dialogs']} ({shot})"  # missing nodes / models / errors
        nodes = {str(n["id"]): n for n in result["nodes"]}  # 1.49 gives string ids
        assert set(nodes) == set(expected)
        for node_id, node in nodes.items():
            assert node["type"] == expected[node_id]["type"] and not node["has_errors"], (node, shot)
            # (1.49 leaves widgets_values out for a node without widgets, the files hold [])
            assert (node["widgets_values"] or []) == expected[node_id]["widgets_values"], (node["type"], shot)


def shown_sizes(dom_text: str) -> list:
    """The size widgets whose rows a Nodes 2.0 node shows (its text: one label or value a line)."""
    return [w for w in SIZE_WIDGETS if w in dom_text.splitlines()]


@pytest.mark.parametrize("name", NAMES)
def test_sampler_sizes_show_only_without_a_latent(browser_run, name):
    """On opening, and after the user removes the latent link and connects it again."""
    samplers = {i: n for i, n in file_nodes(name).items() if n["type"] == "ZTurboSampler"}
    linked = {i: any(s["name"] == "latent_image" and s["link"] is not None for s in n["inputs"])
              for i, n in samplers.items()}
    for mode, result in checked(browser_run, name):
        for node in (n for n in result["nodes"] if str(n["id"]) in samplers):
            hidden = SIZE_WIDGETS if linked[str(node["id"])] else []
            assert node["hidden_widgets"] == hidden, (mode, result["screenshot"])
            if mode == "vue":  # what Nodes 2.0 draws: the widgets' labels, one a line
                assert shown_sizes(node["dom_text"]) == [w for w in SIZE_WIDGETS if w not in hidden], (
                    mode, node["dom_text"])
        toggled = {str(t["id"]): t for t in result["toggled"]}
        assert sorted(toggled) == sorted(i for i, is_linked in linked.items() if is_linked)
        for t in toggled.values():
            assert t["unlinked"]["hidden"] == [] and t["relinked"]["hidden"] == SIZE_WIDGETS, (mode, t)
            if mode == "vue":
                assert shown_sizes(t["unlinked"]["dom_text"]) == SIZE_WIDGETS, (mode, t)
                assert shown_sizes(t["relinked"]["dom_text"]) == [], (mode, t)


@pytest.mark.parametrize("name", NAMES)
def test_no_node_is_drawn_over_another(browser_run, name):
    """As the frontend draws them (Nodes 2.0 draws nodes taller than the canvas does): no two nodes' boxes meet, so
    no note covers a node's widgets and no node hides another's."""
    for mode, result in checked(browser_run, name):
        boxes = [(node["type"], node["id"], drawn_box(node, mode)) for node in result["nodes"]]
        overlaps = []
        for i, (type_a, id_a, (ax, ay, aw, ah)) in enumerate(boxes):
            for type_b, id_b, (bx, by, bw, bh) in boxes[i + 1:]:
                dx, dy = min(ax + aw, bx + bw) - max(ax, bx), min(ay + ah, by + bh) - max(ay, by)
                if dx > 0.5 and dy > 0.5:
                    overlaps.append(f"{type_a} #{id_a} and {type_b} #{id_b}: {dx:.0f} x {dy:.0f} px")
        assert overlaps == [], (mode, overlaps, result["screenshot"])


@pytest.mark.parametrize("name", NAMES)
def test_workflow_opens_fitted_to_the_view(browser_run, name):
    """Every node lies inside the visible canvas area (the frontend's fitView, as no view is saved)."""
    for mode, result in checked(browser_run, name):
        left, top, width, height = result["visible_area"]
        for node in result["nodes"]:
            x, y, w, h = drawn_box(node, mode)
            assert x >= left - 1 and y >= top - 1 and x + w <= left + width + 1 and y + h <= top + height + 1, (
                mode, node["type"], result["screenshot"])


@pytest.mark.parametrize("name", NAMES)
def test_workflow_opens_readable(browser_run, name):
    """At the fitted zoom (1600x1000 window) the nodes' text is drawn: below the level-of-detail zoom (8 px / 14 px
    font = 0.57) nodes are drawn as empty boxes (both renderers), which is what the 0.1 layouts gave."""
    for mode, result in checked(browser_run, name):
        threshold = result["lod_threshold"] or 0.6
        assert result["ds"]["scale"] > threshold and result["low_quality"] is not True, (
            mode, result["ds"], result["screenshot"])


@pytest.mark.parametrize("name", sorted({name for name, _ in RUNS}))
def test_run_button_puts_the_image_on_the_canvas(browser_run, name):
    runs = [(mode, result) for mode, result in checked(browser_run, name) if (name, mode) in RUNS]
    assert [mode for mode, _ in runs] == [mode for wf, mode in RUNS if wf == name and mode in browser_run["modes"]]
    assert runs, "the canvas renderer is always checked"
    for mode, result in runs:
        run = result["run"]
        assert run["ok"], (mode, run)
        (image,) = run["images"]
        assert image["complete"] and (image["width"], image["height"]) == (128, 96), (mode, run)
        assert result["dialogs_after_run"] == [], mode
    statuses = [entry["status"]["status_str"] for entry in browser_run["history"].values()]
    ran = sum(1 for _, mode in RUNS if mode in browser_run["modes"])
    assert statuses.count("success") == ran and "error" not in statuses


def test_template_browser_shows_the_packs_cards(browser_run):
    """The pack's category (Extensions -> its folder name) holds exactly its seven templates, each card's title whole
    (the file name: frontends read nothing else of a custom node's template) and its thumbnail served."""
    templates = browser_run["templates"]
    assert "error" not in templates, templates
    cards = {card["name"]: card for card in templates["cards"]}
    assert sorted(cards) == NAMES, (sorted(cards), templates["screenshot"])
    for name, card in cards.items():
        assert card["title"] == name and card["title_cut"] is False, (card, templates["screenshot"])
        assert card["description"] in (None, name.replace("-", " ")), card  # 1.32 shows the name again below it
        assert card["image"]["complete"] and card["image"]["width"] > 0, (card, templates["screenshot"])
    served = {Path(url.split("?")[0]).stem for url in browser_run["thumbnails_served"]}
    assert sorted(served) == NAMES, (served, templates["screenshot"])
