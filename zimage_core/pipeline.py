"""``ZImage``: the three models, the tokenizer and the recipe behind one object.

Loads from a diffusers folder or from ComfyUI split files, encodes prompts, samples and decodes. It is
what the command line and the ComfyUI nodes call; each step is also usable alone (``encode_prompt``,
``sample``, ``decode``).
"""

from __future__ import annotations

import json
import logging
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import compile_cache, loading, sampler, samplers, vae as vae_ops
from .denoiser import Denoiser
from .fast_denoiser import FastDenoiser, start_process_warm_up, wait_warm_ups
from .attention import check_backend
from .fp8 import scaled_mm_available
from .int8 import int8_mm_available
from .offload import Offloader, place
from .dtypes import DtypePolicy, resolve_policy
from .errors import ZImageError
from .inputs import check_device, check_generate_args, is_real, out_of_memory_error, read_json
from .text_encoding import PromptEncoder
from .weights import TransformerWeights, WeightOwner
from .tokenizer import PromptTokenizer, find_tokenizer

log = logging.getLogger("zimage_core")
DEFAULT_SHIFT = 3.0


def _check_strength(strength) -> float:
    import math

    from .lora import MAX_LORA_STRENGTH

    if not is_real(strength) or not math.isfinite(strength) or abs(strength) > MAX_LORA_STRENGTH:
        raise ZImageError(f"LoRA strength {strength!r} is not allowed: use a number in -{MAX_LORA_STRENGTH:g}.."
                          f"{MAX_LORA_STRENGTH:g} (1 is the LoRA as trained, 0 turns it off).")
    return float(strength)


def _describe(value) -> str:
    text = repr(value)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({type(value).__name__})"


def _check_batch(what: str, name: str, value) -> None:
    if torch.is_tensor(value) and value.ndim >= 1 and value.shape[0] == 0:
        raise ZImageError(f"{what}: {name} is an empty batch (shape {list(value.shape)}): give at least one item.")


def _is_lora_file(source) -> bool:
    return hasattr(source, "transformer") and hasattr(source, "text_encoder") and hasattr(source, "unmatched")


def _lora_key(source) -> tuple:
    """A LoRA file's identity: its resolved path, size and modification time (a file rewritten in place is a new
    version); a state dict's object identity."""
    if isinstance(source, dict):
        return ("dict", id(source))
    try:
        st = os.stat(source)
    except OSError:
        return ("path", str(source))  # load_lora names the problem
    return ("file", os.path.realpath(source), st.st_size, st.st_mtime_ns)


# model -> the ZImage using it (weakly both ways): a cached load hands a model to a new ZImage, the old one lets go
_USERS: "weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _shift_of(model_dir: Path | None) -> float:
    if model_dir and (model_dir / "scheduler" / "scheduler_config.json").is_file():
        cfg = read_json(model_dir / "scheduler" / "scheduler_config.json")
        if cfg.get("use_dynamic_shifting"):
            raise ZImageError(f"{model_dir}: dynamic shifting is not the Z-Image recipe (shift 3).")
        return float(cfg.get("shift", DEFAULT_SHIFT))
    return DEFAULT_SHIFT


@dataclass(frozen=True)
class SpeedOptions:
    """Transformer speed options; each one's measured effect is in the README (benchmarks/bench_speed.py)."""

    fast: bool = True  # fused weights, real-arithmetic RoPE, per-generation tables (same numbers)
    compile: bool = False  # torch.compile of the block function (first run pays the compile)
    attention: str = "auto"  # auto | sdpa | cudnn | flash | efficient | math
    fp8_matmul: bool | str = "auto"  # fp8 tensor-core matmuls for fp8-stored weights where the GPU has them
    cuda_graph: bool = True  # replay whole steps as CUDA graphs (CUDA only; off under offload)
    fuse_ffn: bool = False  # one w1|w3 matmul instead of two (slower on an H100: see the README)


@dataclass
class GenerationResult:
    images: torch.Tensor  # float32 [B, H, W, 3] in 0..1
    latents: torch.Tensor  # float32 model-space latents [B, 16, H/8, W/8]
    report: dict = field(default_factory=dict)


class ZImage:
    """Z-Image-Turbo ready to run: ``ZImage.load(...)`` then ``generate(...)``."""

    def __init__(self, transformer, text_encoder, vae, tokenizer: PromptTokenizer, policy: DtypePolicy,
                 device: torch.device, shift: float = DEFAULT_SHIFT, sources: dict | None = None,
                 speed: SpeedOptions | None = None, offload: str = "none"):
        self.transformer, self.text_encoder, self.vae = transformer, text_encoder, vae
        self.policy, self.device, self.shift = policy, torch.device(device), shift
        self.sources = sources or {}
        self._adopt(*self.models().values())
        # Without a text encoder (ComfyUI's own CLIP nodes encode) or a VAE (ComfyUI's own VAE nodes decode) the
        # parts that need them say so; nothing is loaded twice.
        self.prompt_encoder = PromptEncoder(tokenizer, text_encoder, device=self.device) if text_encoder else None
        self.guard = None
        self.loras: dict[str, tuple] = {}  # name -> (LoraFile, strength), in the order they apply (see load_lora)
        self._parsed: dict = {}  # file version -> LoraFile (parse_lora)
        self.offloader = Offloader(self)
        self._offload_mode, self._released = "none", False
        if offload == "none":  # a model taken over from an offloaded ZImage may sit on the CPU
            for model in self.models().values():
                place(model, self.device)
        self.set_speed(speed or SpeedOptions())
        if offload != "none":
            self.set_offload(offload)
        elif isinstance(self.denoiser, FastDenoiser):  # start-up work off the first image (fast_denoiser.py)
            self.denoiser.start_warm_up()
        cap_dim = transformer.config.cap_feat_dim
        if text_encoder is not None and text_encoder.config.hidden_size != cap_dim:
            raise ZImageError(
                f"the text encoder gives {text_encoder.config.hidden_size}-wide embeddings but the transformer "
                f"expects {cap_dim}: Z-Image-Turbo needs Qwen3-4B (qwen_3_4b.safetensors)."
            )

    def models(self) -> dict[str, torch.nn.Module]:
        """The components this ZImage holds, by name (the text encoder and the VAE may be left out)."""
        return {name: m for name, m in (("transformer", self.transformer), ("text_encoder", self.text_encoder),
                                        ("vae", self.vae)) if m is not None}

    def _need(self, component: str, fix: str):
        model = getattr(self, component)
        if model is None:
            raise ZImageError(f"this model was loaded without its {component.replace('_', ' ')}: {fix}")
        return model

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        model: str | os.PathLike | None = None,
        *,
        transformer: str | os.PathLike | None = None,
        text_encoder: str | os.PathLike | None = None,
        vae: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: str = "auto",
        storage: str | None = None,
        overrides: dict | None = None,
        speed: SpeedOptions | None = None,
        offload: str = "none",
        reuse: bool = False,
        skip: tuple[str, ...] = (),
    ) -> "ZImage":
        """From a diffusers folder (``model``) or split files; a split file given with ``model`` replaces that part.

        ``skip`` leaves out ``"text_encoder"`` and/or ``"vae"``, for graphs where ComfyUI's own CLIP and VAE nodes
        do that work: prompts then come as embeddings, latents go out undecoded.

        With ``reuse`` a component loaded before from the same files with the same dtypes is taken over
        instead of read again (``loading.cached_load``), so changing one dtype or the offload mode reloads
        only what changed; the ZImage that had it gives it up. The ComfyUI loader node loads this way.
        """
        wait_warm_ups()  # a reuse may take over (and convert) a model whose warm-up still reads it
        for what, value in (("model", model), ("transformer", transformer), ("text_encoder", text_encoder),
                            ("vae", vae), ("tokenizer", tokenizer)):
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ZImageError(f"{what} must be a path (str or Path), got {value!r} ({type(value).__name__}).")
        device = check_device(device) or default_device()
        model_dir = Path(model) if model else None
        if model_dir is not None and not (model_dir / "model_index.json").is_file():
            raise ZImageError(
                f"{model_dir} is not a diffusers folder (no model_index.json). Pass the folder of "
                "Tongyi-MAI/Z-Image-Turbo, or the three split files instead."
            )
        unknown = set(skip) - {"text_encoder", "vae"}
        if unknown:
            raise ZImageError(f"skip {sorted(unknown)} is not allowed: only 'text_encoder' and 'vae' can be left out.")
        parts = {"transformer": transformer, "text_encoder": text_encoder, "vae": vae}
        parts = {name: value for name, value in parts.items() if name not in skip}
        for name, value in parts.items():
            if value is None:
                if model_dir is None:
                    raise ZImageError(
                        f"no {name.replace('_', ' ')} given: pass a diffusers folder, or all three split files "
                        "(transformer, text encoder, VAE)."
                    )
                parts[name] = model_dir / name
            elif model_dir is not None and Path(value).is_file() and (model_dir / name / "config.json").is_file():
                # a split file given with a model folder: that folder's config, not one guessed from shapes
                parts[name] = (Path(value), model_dir / name)
        policy = resolve_policy(device, dtype, storage, overrides)
        speed = speed or SpeedOptions()
        if offload == "none" and speed.fast:  # CUDA's and Triton's start-up while the weights are read
            start_process_warm_up(device, policy.transformer.compute)
        tok = PromptTokenizer(find_tokenizer(tokenizer, model_dir)) if "text_encoder" in parts else None
        stats: list = []
        where = torch.device("cpu") if offload != "none" else device  # offloaded weights live on the CPU
        load = loading.cached_load if reuse else loading.load_component
        models = {c: load(c, parts[c], policy.for_component(c), where, stats) if c in parts else None
                  for c in ("transformer", "text_encoder", "vae")}
        sources = {k: str(v[0] if isinstance(v, tuple) else v) for k, v in parts.items()} | {
            "tokenizer": str(tok.path) if tok else None, "load_stats": stats}
        return cls(**models, tokenizer=tok, policy=policy, device=device, shift=_shift_of(model_dir),
                   sources=sources, speed=speed, offload=offload)

    def _adopt(self, *models) -> None:
        """Take the models over from a previous ``ZImage`` (a cached load): its hooks go, weights come back."""
        for model in models:
            user = _USERS.get(model)
            previous = user() if user is not None else None
            if previous is not None and previous is not self:
                previous.release()
            _USERS[model] = weakref.ref(self)

    def release(self) -> None:
        """Give the models up to another ``ZImage``: remove the guard's wrappers and the offload hooks (weights stay
        where they are). This ZImage keeps its settings and takes the models back when it is used again (``_use``)."""
        wait_warm_ups()
        if self.guard is not None:
            self.guard.detach()
        self.offloader.detach()
        self._released = True

    def _use(self) -> None:
        """Before this ZImage's models run: take them back when another ZImage (another loader of the same files)
        used them since, with this one's guard and offload mode, and bring the shared weights to this ZImage's LoRA
        list. Nothing happens when this ZImage was the last to run them and its LoRA list is merged."""
        models = self.models()
        if self._released or any(_USERS.get(m) is None or _USERS[m]() is not self for m in models.values()):
            wait_warm_ups()
            self._adopt(*models.values())
            self._released = False
            if self.guard is not None:
                self.guard.attach(models)
            if self._offload_mode == "none":
                for model in models.values():
                    place(model, self.device)
            else:
                self.offloader.apply(self._offload_mode)
        self._sync_loras()

    def set_speed(self, speed: SpeedOptions) -> None:
        """Choose the transformer path: the reference loop, or the fast one with its options."""
        check_backend(speed.attention)
        self.speed = speed
        self._make_denoiser()

    def _make_denoiser(self) -> None:
        """The denoiser for the current speed options and guard (cheap: the weights' owner keeps the fused views,
        compiled code is shared by every denoiser)."""
        speed, compute = self.speed, self.policy.transformer.compute
        if not speed.fast:
            self.denoiser = Denoiser(self.transformer, self.device, dtype=compute, attention=speed.attention,
                                     guard=self.guard)
        else:
            fp8 = speed.fp8_matmul  # fp8 and int8 weights multiply in their own precision where the GPU can
            if fp8 == "auto":
                storage = self.policy.transformer.storage
                fp8 = ((storage == torch.float8_e4m3fn and scaled_mm_available(self.device))
                       or (storage == torch.int8 and int8_mm_available(self.device) and self.device.type == "cuda"))
            self.denoiser = FastDenoiser(self.transformer, self.device, dtype=compute, compile=speed.compile,
                                         attention=speed.attention, fp8_matmul=bool(fp8), cuda_graph=speed.cuda_graph,
                                         fuse_ffn=speed.fuse_ffn, guard=self.guard, offloader=self.offloader)
            self.offloader.refresh()  # newly fused weights join the offloaded tensors

    def set_offload(self, mode: str) -> None:
        """none | model | sequential (see ``offload.py``); switching reloads nothing from disk."""
        wait_warm_ups()  # the weights move
        self.offloader.apply(mode)
        self._offload_mode = mode

    # ---------------------------------------------------------------- LoRA
    # The LoRAs a ZImage wants live here (``self.loras``: name -> (LoraFile, strength), in the order they apply); the
    # LoRAs merged into the weights live with the weights' owner (``WeightOwner.applied``), because several ZImages
    # may share one model (``ZImage.load(reuse=True)``: every loader node of the same files). Before the weights are
    # used (``_use``), the owner is brought to this ZImage's set; the empty set is the original weights, bit for bit.
    def load_lora(self, source, strength: float = 1.0, name: str | None = None):
        """Merge a LoRA file (every naming ComfyUI maps, and Musubi-tuner's) into the transformer and, when it has
        such keys, the text encoder; returns the parsed ``lora.LoraFile``. Keys that match nothing are logged one
        by one with their likely cause (``LoraFile.unmatched``). Several LoRAs stack in the order loaded; the same
        file loaded twice stacks twice. The LoRA is registered under ``name`` (default: the file name, with " #2",
        " #3" ... when that name is taken); see ``lora_names``. A LoRA that fails to parse or merge leaves the model
        and the list as they were."""
        strength = _check_strength(strength)
        if name is not None and (not isinstance(name, str) or not name):
            raise ZImageError(f"LoRA name {name!r} is not allowed: give a non-empty string, or leave it out.")
        lora = source if _is_lora_file(source) else self.parse_lora(source)
        wanted = dict(self.loras)
        wanted[self._free_name(name or lora.name, wanted)] = (lora, strength)
        self._set_wanted(wanted)
        return lora

    def lora_names(self) -> list[str]:
        """The names of the loaded LoRAs, in the order they apply (for ``set_lora_strength`` / ``remove_lora``)."""
        return list(self.loras)

    def set_loras(self, loras) -> None:
        """Make the merged LoRAs exactly ``loras``, a list of ``(file, strength)`` in the order they apply: files
        already parsed are not read again, and nothing is merged when the list is what is merged now (the ComfyUI
        nodes call this before every run). The same file twice stacks twice."""
        if isinstance(loras, (str, bytes, os.PathLike)) or not isinstance(loras, (list, tuple)):
            raise ZImageError(f"set_loras takes a list of (file, strength) pairs, got {_describe(loras)}: e.g. "
                              "set_loras([('style.safetensors', 0.8)]); set_loras([]) removes every LoRA.")
        wanted: dict[str, tuple] = {}
        for item in loras:
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise ZImageError(f"set_loras: {_describe(item)} is not a (file, strength) pair: give e.g. "
                                  "('style.safetensors', 1.0).")
            source, strength = item
            strength = _check_strength(strength)
            lora = source if _is_lora_file(source) else self.parse_lora(source)
            wanted[self._free_name(lora.name, wanted)] = (lora, strength)
        self._set_wanted(wanted)

    def parse_lora(self, source):
        """The parsed LoRA file ``source`` (a path), checked against this model's weights; parsed once per file
        version (path, size and modification time), so a LoRA node can check its file before anything merges."""
        from .lora import load_lora

        if isinstance(source, (bytes, bytearray)) or not isinstance(source, (str, os.PathLike, dict)):
            raise ZImageError(f"a LoRA must be a path to a .safetensors file, got {_describe(source)}.")
        key = _lora_key(source)
        lora = self._parsed.get(key) if key[0] == "file" else None
        if lora is not None:
            return lora
        if not isinstance(source, dict) and Path(source).is_dir():
            raise ZImageError(f"LoRA {source} is a folder, not a file: give the LoRA's .safetensors file.")
        lora = load_lora(source, shapes=TransformerWeights.of(self.transformer).canonical_shapes(),
                         text_encoder_shapes={n: tuple(p.shape) for n, p in self.text_encoder.named_parameters()}
                         if self.text_encoder is not None else {})
        lora.key = key
        for line in lora.unmatched_lines():
            log.warning("%s", line)
        if lora.text_encoder and self.text_encoder is None:
            log.warning("%s: its %d text-encoder weights are not applied: this model was loaded without its text "
                        "encoder (apply the LoRA to ComfyUI's CLIP with LoraLoader).", lora.name, len(lora.text_encoder))
        if key[0] == "file":
            self._parsed[key] = lora
        while len(self._parsed) > 16:  # parsed LoRAs hold their tensors: keep the latest few
            self._parsed.pop(next(iter(self._parsed)))
        return lora

    def set_lora_strength(self, name: str, strength: float) -> None:
        """Change a loaded LoRA's strength; the weights are recomputed from their originals (0 restores them)."""
        self._lora_named(name)
        wanted = dict(self.loras)
        wanted[name] = (wanted[name][0], _check_strength(strength))
        self._set_wanted(wanted)

    def remove_lora(self, name: str | None = None) -> None:
        """Remove one LoRA (all with ``None``): the weights it changed get their original values back, bit for bit,
        without reading the checkpoint again."""
        if name is not None:
            self._lora_named(name)
        self._set_wanted({k: v for k, v in self.loras.items() if name is not None and k != name})

    def _lora_named(self, name):
        if not isinstance(name, str) or name not in self.loras:
            raise ZImageError(f"no LoRA named {name!r} is loaded: loaded are {', '.join(map(repr, self.loras)) or 'none'}.")

    @staticmethod
    def _free_name(name: str, taken) -> str:
        free, n = name, 1
        while free in taken:
            n += 1
            free = f"{name} #{n}"
        return free

    def _set_wanted(self, wanted: dict[str, tuple]) -> None:
        """Make ``wanted`` this ZImage's LoRA list and merge it; when the merge fails, the list and the weights stay
        as they were."""
        previous, self.loras = self.loras, wanted
        try:
            self._use()
        except BaseException:
            self.loras = previous
            raise

    def _lora_signature(self, component: str) -> tuple:
        """This ZImage's LoRA list for ``component`` as ((file version, strength), ...): another ZImage with the same
        list finds the weights already merged."""
        return tuple((getattr(lora, "key", None) or ("object", id(lora)), strength)
                     for lora, strength in self.loras.values() if strength and getattr(lora, component))

    def _lora_patches(self, component: str) -> dict[str, list]:
        """weight name -> [(Patch, strength, LoRA name)] of this ZImage's LoRA list, in the order they apply."""
        patches: dict[str, list] = {}
        for name, (lora, strength) in self.loras.items():
            if strength:
                for target, plist in getattr(lora, component).items():
                    patches.setdefault(target, []).extend((p, strength, name) for p in plist)
        return patches

    def _sync_loras(self) -> None:
        """Bring the shared weights to this ZImage's LoRA list (nothing to do when they are there already)."""
        for component, model in (("transformer", self.transformer), ("text_encoder", self.text_encoder)):
            if model is None:
                continue
            owner = TransformerWeights.of(model) if component == "transformer" else WeightOwner.of(model)
            signature = self._lora_signature(component)
            if signature == owner.applied:
                continue
            wait_warm_ups()  # the weights change (in place, but a merge may also re-point them)
            self.offloader.finish()  # offloaded weights point at their CPU masters: merge there, where they persist
            owner.apply_loras(signature, self._lora_patches(component))
            if component == "text_encoder":
                self.prompt_encoder.clear_cache()

    def default_guard_policy(self) -> str:
        """auto when any component computes in fp16, else off."""
        fp16 = any(self.policy.for_component(c).compute == torch.float16 for c in self.models())
        return "auto" if fp16 else "off"

    def set_precision_guard(self, policy: str | None = None):
        """Attach a precision guard; ``None`` means auto with fp16 compute and off otherwise."""
        from .guard import PrecisionGuard

        policy = policy or self.default_guard_policy()
        if self.guard is not None:
            self.guard.detach()
        self.guard = None
        if policy != "off":
            self.guard = PrecisionGuard(policy, self.device).attach(self.models())
        if self.prompt_encoder is not None:
            self.prompt_encoder.guard = self.guard
            self.prompt_encoder.clear_cache()  # embeddings made under the old policy may hold its overflow
        self._make_denoiser()
        return self.guard

    # ---------------------------------------------------------------- the recipe
    def encode_prompt(self, prompts: list[str] | str) -> list[torch.Tensor]:
        self._need("text_encoder", "encode the prompt with ComfyUI's CLIPLoader (type lumina2) + CLIPTextEncode, or "
                   "load the text encoder too.")
        self._use()
        return self.prompt_encoder.encode(prompts)

    def sample(self, cap_feats: list[torch.Tensor], **kwargs) -> torch.Tensor:
        kwargs.setdefault("shift", self.shift)
        self._use()
        self.offloader.before("transformer")
        latents = sampler.sample(self.denoiser, cap_feats, runner=self.guard, **kwargs)
        if getattr(self.denoiser, "compiled", False):
            compile_cache.save_once()  # the first compiled generation's code, for the next process
        return latents

    def decode(self, latents: torch.Tensor, **kwargs) -> torch.Tensor:
        self._need("vae", "decode the LATENT with ComfyUI's VAELoader + VAEDecode (or our tiled decode for a native VAE), "
                   "or load the VAE too.")
        _check_batch("decode", "latents", latents)
        self._use()
        self.offloader.before("vae")  # the exact tiled decode calls the decoder's parts, not vae.decode
        return vae_ops.decode(self.vae, latents, guard=self.guard, device=self.device, **kwargs)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        self._need("vae", "encode the image with ComfyUI's VAELoader + VAEEncode, or load the VAE too.")
        _check_batch("encode_image", "image", image)
        self._use()
        return vae_ops.encode(self.vae, image, device=self.device)

    def generate(
        self,
        prompt: str | list[str],
        *,
        seed: int = 0,
        steps: int = 8,
        width: int = 1024,
        height: int = 1024,
        batch_size: int = 1,
        guidance: float = 0.0,
        negative_prompt: str | list[str] = "",
        denoise: float = 1.0,
        init_image: torch.Tensor | None = None,
        callback=None,
        decode: bool = True,
        tiled_decode: bool | str = "auto",
        tile_size: int = 512,
        tile_overlap: int = 64,
        sampler: str = "euler",
    ) -> GenerationResult:
        """Text (and optionally an init image) to images, following the reference recipe. ``sampler``: ``euler``
        (the diffusers reference) or ``res_multistep`` (ComfyUI's Z-Image template).

        Every argument is checked (``inputs.check_generate_args``) before any work; a non-finite result ends in a
        ``ZImageError`` naming the component that produced it, never in a black image.
        """
        prompts, negatives, init_image = check_generate_args(
            prompt, seed=seed, steps=steps, width=width, height=height, batch_size=batch_size, guidance=guidance,
            negative_prompt=negative_prompt, denoise=denoise, init_image=init_image, decode=decode,
            tiled_decode=tiled_decode, tile_size=tile_size, tile_overlap=tile_overlap)
        samplers.new(sampler)  # an unknown name fails here, before any work
        if callback is not None and not callable(callback):
            raise ZImageError(f"callback must be a function called after each step (or None), got "
                              f"{_describe(callback)}.")
        try:
            cap_feats = self.encode_prompt(prompts)
            negative_feats = self.encode_prompt(negatives) if negatives is not None else None
            for feats in (cap_feats, negative_feats or []):
                if not all(bool(torch.isfinite(f).all()) for f in feats):
                    raise ZImageError(
                        f"the text encoder gave NaN or Inf embeddings ({self.policy.text_encoder}): fp16 overflow "
                        "(use bf16/fp32 or the precision guard 'auto') or NaN weights in the text encoder file.")
            init_latents = self.encode_image(init_image) if init_image is not None else None
            if self.guard is not None:
                self.guard.begin_run()
            latents = self.sample(cap_feats, seed=seed, width=width, height=height, steps=steps, guidance=guidance,
                                  negative_feats=negative_feats, denoise=denoise, init_latents=init_latents,
                                  callback=callback, sampler=sampler)
            if not bool(torch.isfinite(latents).all()):
                raise ZImageError(
                    f"the transformer gave NaN or Inf latents ({self.policy.transformer}, guidance {guidance:g}): "
                    "no image is made. Causes: a guidance too large, fp16 overflow without the precision guard "
                    "(use set_precision_guard('auto') or bf16/fp32), NaN weights or a NaN init image.")
            images = (self.decode(latents, tiled=tiled_decode, tile_size=tile_size, overlap=tile_overlap)
                      if decode else None)
        except torch.OutOfMemoryError as err:
            raise out_of_memory_error(err, len(prompts), width, height, self.device) from None
        self.offloader.finish()
        report = self.guard.report() if self.guard is not None else {}
        return GenerationResult(images=images, latents=latents, report=report)
