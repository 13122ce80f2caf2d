"""The workflows' layouts, from the JSON alone: no note or group is drawn over a node's widgets and no two nodes
touch, with room to spare for Nodes 2.0, which draws nodes up to ~30 px taller than the canvas does (the browser
test, tests/test_browser.py, checks the boxes both renderers really draw on three frontends)."""

import json
from itertools import combinations

import pytest

from comfy_harness import WORKFLOWS

TITLE = 30  # LiteGraph's NODE_TITLE_HEIGHT: a node's pos is its body's corner, the title bar is drawn above it
GROUP_TITLE = 34  # a group's title band (its font size 24 x 1.4), over which nothing may sit
GAP = 20  # px between any two nodes' boxes
NOTES = {"Note", "MarkdownNote"}
WORKFLOW_FILES = sorted(WORKFLOWS.glob("*.json"))


def node_box(node: dict) -> tuple:
    """(x, y, w, h) of a node as drawn: the title bar and the body."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE, w, h + TITLE


def gap(a: tuple, b: tuple) -> float:
    """How far apart two boxes are: the larger of the horizontal and vertical distances; negative when they
    overlap (by the smaller overlap)."""
    (ax, ay, aw, ah), (bx, by, bw, bh) = a, b
    return max(max(bx - (ax + aw), ax - (bx + bw)), max(by - (ay + ah), ay - (by + bh)))


def covered(workflow: dict) -> list:
    """Every note or group that is drawn over (part of) a node, and every pair of nodes closer than GAP."""
    nodes = workflow["nodes"]
    found = []
    for a, b in combinations(nodes, 2):
        distance = gap(node_box(a), node_box(b))
        if distance < GAP:
            note = a if a["type"] in NOTES else b if b["type"] in NOTES else None
            what = f"note #{note['id']} covers" if note and distance < 0 else "too close:"
            found.append(f"{what} {a['type']} #{a['id']} {node_box(a)} / {b['type']} #{b['id']} {node_box(b)} "
                         f"({distance:.0f} px)")
    for group in workflow.get("groups", []):
        x, y, w, h = group["bounding"]
        band = (x, y, w, GROUP_TITLE)
        for node in nodes:
            box = node_box(node)
            inside = box[0] >= x and box[1] >= y + GROUP_TITLE and box[0] + box[2] <= x + w and box[1] + box[3] <= y + h
            if gap(band, box) < 0 or (gap((x, y, w, h), box) < 0 and not inside):
                found.append(f"group {group.get('title')!r} {group['bounding']} covers {node['type']} #{node['id']} {box}")
    return found


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.stem)
def test_no_note_or_group_covers_a_node(path):
    assert covered(json.loads(path.read_text(encoding="utf-8"))) == []


def test_the_check_sees_a_note_over_a_node_and_a_group_over_one():
    latent = {"id": 7, "type": "EmptySD3LatentImage", "pos": [380, 460], "size": [300, 106]}
    note = {"id": 12, "type": "MarkdownNote", "pos": [0, 450], "size": [760, 240]}  # 0.2's Native fp16 Guard
    assert covered({"nodes": [latent, note]}) == [
        "note #12 covers EmptySD3LatentImage #7 (380, 430, 300, 136) / MarkdownNote #12 (0, 420, 760, 270) (-146 px)"]
    apart = dict(note, pos=[0, 630])
    assert covered({"nodes": [latent, apart]}) == []
    assert covered({"nodes": [latent, dict(note, pos=[0, 610])]}) != []  # 14 px apart: too close
    holding = {"title": "Latent", "bounding": [360, 380, 340, 220]}  # holds the node below its title band
    assert covered({"nodes": [latent], "groups": [holding]}) == []
    assert covered({"nodes": [latent], "groups": [dict(holding, bounding=[360, 410, 340, 220])]}) != []  # title band
    assert covered({"nodes": [latent], "groups": [dict(holding, bounding=[500, 380, 340, 220])]}) != []  # half over
