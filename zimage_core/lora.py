"""LoRA files for Z-Image: every key naming ComfyUI maps (and Musubi-tuner's), parsed to per-weight patches.

A LoRA file names the layer it changes in one of several conventions; each is parsed to the *canonical*
name: the original Z-Image checkpoint layout without a prefix (what ComfyUI's NextDiT uses), e.g.
``layers.3.attention.qkv.weight``. diffusers' separate ``to_q``/``to_k``/``to_v`` become a row range
``(offset, rows)`` of the fused ``qkv`` (offsets 0, dim, 2*dim), as in ComfyUI's ``z_image_to_diffusers``.

Namings (``key base`` = the part before ``.lora_up.weight``, ``.alpha`` ...):

======================================  ========================  ======================================
naming                                  example                   mapped by ComfyUI
======================================  ========================  ======================================
native, ``diffusion_model.`` prefix     diffusion_model.layers.0.attention.qkv     0.3.75 and 0.33
native, kohya ``lora_unet_``            lora_unet_layers_0_attention_qkv            0.3.75 and 0.33
diffusers, ``diffusion_model.``         diffusion_model.layers.0.attention.to_q     0.3.75 and 0.33
diffusers, ``lycoris_``                 lycoris_layers_0_attention_to_q             0.3.75 and 0.33
diffusers/PEFT, ``transformer.``        transformer.layers.0.attention.to_q         0.33
diffusers, bare                         layers.0.attention.to_q                     0.33
Musubi-tuner, ``lora_unet_`` diffusers  lora_unet_layers_0_attention_to_q           no (needs a converter)
native, bare                            layers.0.attention.qkv                      no
======================================  ========================  ======================================

Weight forms, with ComfyUI's formulas (``comfy/weight_adapter``): LoRA (``lora_up``/``lora_down``,
``lora_B``/``lora_A``, ``_lora.up``, ``.lora.up``, ``lora_linear_layer.up``, ``lora_B.default``),
``alpha`` (scale alpha/rank), DoRA ``dora_scale``, LoHa (``hada_w1_a`` ...), LoKr (``lokr_w1`` or
``lokr_w1_a/b`` ...), full differences (``diff``, ``diff_b``, ``w_norm``, ``b_norm``). OFT, BOFT, GLoRA,
Tucker/CP factors (``lora_mid``, ``hada_t1``, ``lokr_t2``: convolution-only) raise a ``ZImageError``.
Text-encoder keys (``lora_te_``, ``text_encoders.qwen3_4b.transformer.model.``, ``text_encoder.``) map to
``Qwen3Model`` names (``layers.N.self_attn.q_proj.weight``). Keys that match nothing are listed in
``LoraFile.unmatched`` with their likely cause, never dropped silently.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import torch

from .errors import ZImageError

# ------------------------------------------------------------------------------------------ key names
BLOCKS = ("layers", "noise_refiner", "context_refiner")
# block-relative module name (either naming) -> (canonical module name, index into fused qkv or None)
BLOCK_MODULES: dict[str, tuple[str, int | None]] = {
    "attention.qkv": ("attention.qkv", None),
    "attention.to_q": ("attention.qkv", 0),
    "attention.to_k": ("attention.qkv", 1),
    "attention.to_v": ("attention.qkv", 2),
    "attention.out": ("attention.out", None),
    "attention.to_out.0": ("attention.out", None),
    "attention.to_out": ("attention.out", None),  # some trainers drop the ".0"
    "attention.q_norm": ("attention.q_norm", None),
    "attention.k_norm": ("attention.k_norm", None),
    "attention.norm_q": ("attention.q_norm", None),
    "attention.norm_k": ("attention.k_norm", None),
    "attention_norm1": ("attention_norm1", None),
    "attention_norm2": ("attention_norm2", None),
    "ffn_norm1": ("ffn_norm1", None),
    "ffn_norm2": ("ffn_norm2", None),
    "feed_forward.w1": ("feed_forward.w1", None),
    "feed_forward.w2": ("feed_forward.w2", None),
    "feed_forward.w3": ("feed_forward.w3", None),
    "adaLN_modulation.0": ("adaLN_modulation.0", None),
}
TOP_MODULES: dict[str, str] = {
    "x_embedder": "x_embedder",
    "all_x_embedder.2-1": "x_embedder",
    "final_layer.linear": "final_layer.linear",
    "all_final_layer.2-1.linear": "final_layer.linear",
    "final_layer.adaLN_modulation.1": "final_layer.adaLN_modulation.1",
    "all_final_layer.2-1.adaLN_modulation.1": "final_layer.adaLN_modulation.1",
    "t_embedder.mlp.0": "t_embedder.mlp.0",
    "t_embedder.mlp.2": "t_embedder.mlp.2",
    "cap_embedder.0": "cap_embedder.0",
    "cap_embedder.1": "cap_embedder.1",
}
DIFFUSERS_ONLY = {"attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "attention.to_out",
                  "attention.norm_q", "attention.norm_k"}
# underscore spellings (kohya/lycoris/Musubi: dots turned into underscores)
_BLOCK_US = {k.replace(".", "_"): v for k, v in BLOCK_MODULES.items()}
_TOP_US = {k.replace(".", "_"): v for k, v in TOP_MODULES.items()}
DOTTED_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.", "")
UNDERSCORE_PREFIXES = ("lora_unet_", "lycoris_", "lora_transformer_")
# (prefixes, separator in the key, block modules, top modules, diffusers-only block names) of each key style
_NAMINGS = ((DOTTED_PREFIXES, r"\.", BLOCK_MODULES, TOP_MODULES, DIFFUSERS_ONLY),
            (UNDERSCORE_PREFIXES, "_", _BLOCK_US, _TOP_US, {d.replace(".", "_") for d in DIFFUSERS_ONLY}))
TE_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "self_attn.q_norm", "self_attn.k_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
              "input_layernorm", "post_attention_layernorm")
_TE_US = {m.replace(".", "_"): m for m in TE_MODULES}
TE_DOTTED_PREFIXES = ("text_encoders.qwen3_4b.transformer.model.", "text_encoders.transformer.model.",
                      "text_encoders.qwen3_4b.transformer.", "text_encoder.model.", "text_encoder.")
TE_UNDERSCORE_PREFIXES = ("lora_te_", "lora_te1_")

# weight-form suffixes: suffix -> (form, role)
SUFFIXES: dict[str, tuple[str, str]] = {
    ".lora_up.weight": ("lora", "up"), ".lora_down.weight": ("lora", "down"),
    ".lora_B.weight": ("lora", "up"), ".lora_A.weight": ("lora", "down"),
    "_lora.up.weight": ("lora", "up"), "_lora.down.weight": ("lora", "down"),
    ".lora.up.weight": ("lora", "up"), ".lora.down.weight": ("lora", "down"),
    ".lora_linear_layer.up.weight": ("lora", "up"), ".lora_linear_layer.down.weight": ("lora", "down"),
    ".lora_B.default.weight": ("lora", "up"), ".lora_A.default.weight": ("lora", "down"),
    ".lora_B": ("lora", "up"), ".lora_A": ("lora", "down"),
    ".lora_mid.weight": ("lora", "mid"),
    ".alpha": ("common", "alpha"), ".dora_scale": ("common", "dora_scale"),
    ".hada_w1_a": ("loha", "w1a"), ".hada_w1_b": ("loha", "w1b"), ".hada_w2_a": ("loha", "w2a"),
    ".hada_w2_b": ("loha", "w2b"), ".hada_t1": ("loha", "t1"), ".hada_t2": ("loha", "t2"),
    ".lokr_w1": ("lokr", "w1"), ".lokr_w2": ("lokr", "w2"), ".lokr_w1_a": ("lokr", "w1a"),
    ".lokr_w1_b": ("lokr", "w1b"), ".lokr_w2_a": ("lokr", "w2a"), ".lokr_w2_b": ("lokr", "w2b"),
    ".lokr_t2": ("lokr", "t2"),
    ".diff": ("diff", "weight"), ".diff_b": ("diff", "bias"), ".w_norm": ("diff", "weight"),
    ".b_norm": ("diff", "bias"),
    ".set_weight": ("unsupported", "set_weight (replaces the weight)"),
    ".reshape_weight": ("unsupported", "reshape_weight (pads the weight to another shape)"),
    ".oft_blocks": ("unsupported", "OFT"), ".oft_diag": ("unsupported", "OFT"), ".rescale": ("unsupported", "OFT"),
    ".oft_R.weight": ("unsupported", "OFT"),
    ".a1.weight": ("unsupported", "GLoRA"), ".a2.weight": ("unsupported", "GLoRA"),
    ".b1.weight": ("unsupported", "GLoRA"), ".b2.weight": ("unsupported", "GLoRA"),
    ".boft_blocks": ("unsupported", "BOFT"),
}
_SUFFIX_ORDER = sorted(SUFFIXES, key=len, reverse=True)  # longest first: ".lora_B.weight" before ".lora_B"

OTHER_MODELS = (  # (regex on the key, what it is)
    (r"double_blocks|single_blocks|img_attn|txt_attn|img_mlp|txt_mlp|single_transformer_blocks", "a Flux LoRA"),
    (r"transformer_blocks[._]\d+[._](attn|ff|norm1|img_mod|txt_mod)", "a Flux/SD3/Qwen-Image (MMDiT) LoRA"),
    (r"joint_blocks", "an SD3 LoRA"),
    (r"input_blocks|output_blocks|middle_block|down_blocks|up_blocks|mid_block", "an SD 1.x/SDXL UNet LoRA"),
    (r"text_model[._]encoder|lora_te[12]_text_model|lora_te2_", "an SD/SDXL CLIP text-encoder LoRA"),
    (r"encoder[._]block[._]\d+", "a T5 text-encoder LoRA"),
    (r"(^|[._])blocks[._]\d+[._](self_attn|cross_attn|ffn)", "a Wan video LoRA"),
)


def _strip_form(key: str) -> tuple[str, str, str] | None:
    """(key base, form, role) of a LoRA tensor name, or None when its suffix is no known weight form."""
    for suffix in _SUFFIX_ORDER:
        if key.endswith(suffix):
            form, role = SUFFIXES[suffix]
            return key[: -len(suffix)], form, role
    return None


def _transformer_target(base: str) -> tuple[str, int | None, str] | None:
    """(canonical module, qkv index or None, naming) of a LoRA key base that names a Z-Image transformer layer."""
    for prefixes, sep, blocks, tops, diffusers_only in _NAMINGS:
        for prefix in prefixes:
            if not base.startswith(prefix):
                continue
            rest = base[len(prefix):]
            m = re.fullmatch(rf"(layers|noise_refiner|context_refiner){sep}(\d+){sep}(.+)", rest)
            if m and m.group(3) in blocks:
                module, index = blocks[m.group(3)]
                return f"{m.group(1)}.{m.group(2)}.{module}", index, _naming(prefix, m.group(3) in diffusers_only)
            if rest in tops:
                return tops[rest], None, _naming(prefix, rest.startswith("all_"))
    return None


def _naming(prefix: str, diffusers: bool) -> str:
    if prefix == "lora_unet_" and diffusers:
        return "Musubi-tuner (lora_unet_ + diffusers names)"
    kind = "diffusers" if diffusers else "native"
    return f"{kind}, {prefix!r} prefix" if prefix else f"{kind}, no prefix"


def _text_encoder_target(base: str) -> str | None:
    for prefix in TE_DOTTED_PREFIXES:
        if base.startswith(prefix):
            m = re.fullmatch(r"layers\.(\d+)\.(.+)", base[len(prefix):])
            if m and m.group(2) in TE_MODULES:
                return f"layers.{m.group(1)}.{m.group(2)}"
    for prefix in TE_UNDERSCORE_PREFIXES:
        if base.startswith(prefix):
            m = re.fullmatch(r"(?:model_)?layers_(\d+)_(.+)", base[len(prefix):])
            if m and m.group(2) in _TE_US:
                return f"layers.{m.group(1)}.{_TE_US[m.group(2)]}"
    return None


def _other_model(key: str) -> str | None:
    for pattern, what in OTHER_MODELS:
        if re.search(pattern, key):
            return what
    return None


# ------------------------------------------------------------------------------------------- patches
@dataclass
class Patch:
    """One adapter on one weight: ``delta(weight)`` is what it adds at strength 1 (fp32).

    ``rows`` is ``(offset, count)`` when the patch covers only some rows of the target (diffusers'
    ``to_q``/``to_k``/``to_v`` on the fused ``qkv``): ``delta`` then takes and returns those rows.
    """

    form: str  # "lora", "loha", "lokr", "diff"
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None
    rows: tuple[int, int] | None = None
    source: str = ""  # the LoRA key base it came from

    @property
    def out_in(self) -> tuple[int, ...]:
        """Shape of the weight (or rows) it changes, from the factors alone."""
        t = self.tensors
        if self.form == "lora":
            return (t["up"].shape[0], t["down"].flatten(1).shape[1])
        if self.form == "loha":
            return (t["w1a"].shape[0], t["w1b"].shape[1])
        if self.form == "lokr":
            r1, c1 = t["w1"].shape if "w1" in t else (t["w1a"].shape[0], t["w1b"].shape[1])
            r2, c2 = t["w2"].shape if "w2" in t else (t["w2a"].shape[0], t["w2b"].shape[1])
            return (r1 * r2, c1 * c2)
        return tuple(t["diff"].shape)

    def _scale(self) -> float:
        """alpha / rank as ComfyUI computes it (1.0 without alpha)."""
        t = self.tensors
        if self.alpha is None:
            return 1.0
        if self.form == "lora":
            return self.alpha / t["down"].shape[0]
        if self.form == "loha":
            return self.alpha / t["w1b"].shape[0]
        if self.form == "lokr":
            # ComfyUI: rank of the last decomposed factor (w2 wins over w1); no decomposition -> no scaling
            dim = t["w2b"].shape[0] if "w2b" in t else t["w1b"].shape[0] if "w1b" in t else None
            return self.alpha / dim if dim is not None else 1.0
        return 1.0

    def _product(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The factors' product on ``device`` (the weight's, as ComfyUI's ``calculate_weight`` does): moving the
        rank-r factors costs kilobytes, a full-size delta made on the CPU costs the weight's size in fp32 over PCIe
        (rank-32 LoRA on every matrix, H200: 18 s per merge that way)."""
        t = {k: v.to(device, torch.float32) for k, v in self.tensors.items()}
        if self.form == "lora":
            return torch.mm(t["up"].flatten(start_dim=1), t["down"].flatten(start_dim=1)).reshape(shape)
        if self.form == "loha":
            return (torch.mm(t["w1a"], t["w1b"]) * torch.mm(t["w2a"], t["w2b"])).reshape(shape)
        if self.form == "lokr":
            w1 = t["w1"] if "w1" in t else torch.mm(t["w1a"], t["w1b"])
            w2 = t["w2"] if "w2" in t else torch.mm(t["w2a"], t["w2b"])
            return torch.kron(w1, w2).reshape(shape)
        return t["diff"].reshape(shape)

    def delta(self, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """What this patch adds to ``weight`` (the target, or its ``rows``) at ``strength``, in fp32.

        Same formula and order as ComfyUI's ``calculate_weight``: ``(strength * alpha/rank) * (up @ down)``;
        with DoRA the weight-decomposed result minus the weight, times strength.
        """
        w = weight.float()
        if self.form == "diff":
            return strength * self._product(w.shape, w.device)
        diff = self._product(w.shape, w.device)
        scale = self._scale()
        if self.dora_scale is None:
            return (strength * scale) * diff
        return self._dora(w, diff, scale, strength)

    def _dora(self, w: torch.Tensor, diff: torch.Tensor, scale: float, strength: float) -> torch.Tensor:
        """DoRA: rescale (w + scale*diff) to the learned magnitude; the norm is taken per output row of the
        original weight when ``dora_scale`` has one entry per row, else per input column of the merged
        weight (ComfyUI's ``weight_decompose``)."""
        magnitude = self.dora_scale.to(w.device, torch.float32)
        merged = w + scale * diff
        if magnitude.shape[0] == merged.shape[0]:
            norm = w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True).reshape(w.shape[0], *[1] * (w.dim() - 1))
        else:
            norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
                    .reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1))
        norm = norm + torch.finfo(torch.float32).eps
        merged = merged * (magnitude / norm)
        return strength * (merged - w)


@dataclass
class LoraFile:
    """A parsed LoRA: patches per canonical weight name, and every key it could not use."""

    name: str
    transformer: dict[str, list[Patch]] = field(default_factory=dict)
    text_encoder: dict[str, list[Patch]] = field(default_factory=dict)
    unmatched: dict[str, str] = field(default_factory=dict)
    namings: set[str] = field(default_factory=set)
    forms: set[str] = field(default_factory=set)

    def unmatched_lines(self) -> list[str]:
        return [f"{self.name}: key {k!r} not used: {cause}" for k, cause in self.unmatched.items()]

    def unmatched_message(self) -> str:
        """One line per key that matched nothing, with its likely cause ('' when every key was used)."""
        return "\n".join(self.unmatched_lines())

    def describe(self) -> str:
        return (f"{self.name}: {sum(map(len, self.transformer.values()))} transformer patches on "
                f"{len(self.transformer)} weights, {len(self.text_encoder)} text-encoder weights; "
                f"naming {', '.join(sorted(self.namings)) or '-'}; forms {', '.join(sorted(self.forms)) or '-'}"
                + (f"; {len(self.unmatched)} keys not used" if self.unmatched else ""))


# --------------------------------------------------------------------------------------------- parse
def _read(source) -> tuple[str, str, dict[str, torch.Tensor]]:
    """(name, where, state) of a LoRA given as a path or a state dict: ``where`` names it in messages (the path
    as given). A path must be a regular ``.safetensors`` file: a folder, a FIFO or a device is refused before
    anything opens it."""
    if isinstance(source, dict):
        bad = next((k for k, v in source.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        if bad is not None or not source:
            what = "is empty" if not source else f"maps {bad!r} to a {type(source[bad]).__name__}"
            raise ZImageError(f"the LoRA state dict {what}: give a dict of tensor names to torch tensors, or the "
                              ".safetensors file.")
        return "LoRA", "LoRA state dict", dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ZImageError(f"a LoRA must be a .safetensors file path (str or Path) or a state dict, got {source!r} "
                          f"({type(source).__name__}).")
    from .safetensors_io import Checkpoint, check_regular_file

    check_regular_file(source, "LoRA", "give the LoRA's .safetensors file")
    ckpt = Checkpoint.from_path(source)
    return os.path.basename(str(source)), str(source), dict(ckpt.files[0].iter_tensors())


def load_lora(source, shapes: dict[str, tuple] | None = None,
              text_encoder_shapes: dict[str, tuple] | None = None) -> LoraFile:
    """Parse a LoRA (a .safetensors path or a state dict).

    ``shapes``: canonical (original-layout, unprefixed) transformer weight name -> shape; when given, each
    patch is checked against its target and a mismatch (a LoRA of another model size, a layer the model
    does not have) is reported in ``unmatched`` instead of applied. ``text_encoder_shapes`` likewise for the
    Qwen3 names. Raises ``ZImageError`` for unsupported weight forms, when nothing at all matches, and for a
    damaged adapter (``check_patch``: dtypes, factor shapes against each other, ranks, alpha, ``dora_scale``,
    NaN/Inf in any tensor, a product that overflows fp32), before anything is merged.
    """
    name, where, state = _read(source)
    lora = LoraFile(name)
    groups: dict[str, dict[str, tuple[str, str, torch.Tensor]]] = {}
    for key, tensor in state.items():
        parsed = _strip_form(key)
        if parsed is None:
            what = _other_model(key)
            lora.unmatched[key] = (f"not a LoRA tensor (no known weight-form suffix); looks like {what}" if what else
                                   "not a LoRA tensor: no known weight-form suffix (.lora_up/.lora_A/.alpha/"
                                   ".hada_*/.lokr_*/.diff ...)")
            continue
        base, form, role = parsed
        if form == "unsupported":
            raise ZImageError(
                f"{name}: {key!r} is a {role} adapter, which this loader does not support (LoRA, LoCon/LoRA with "
                "alpha, DoRA, LoHa, LoKr and full-difference patches are). Convert it to a plain LoRA, or use "
                "ComfyUI's LoraLoaderModelOnly on a native model.")
        groups.setdefault(base, {})[role if form in ("common", "lora", "diff") else f"{form}:{role}"] = (key, form, tensor)

    matched_any = False
    for base, parts in groups.items():
        keys = [k for k, _, _ in parts.values()]
        te_target = _text_encoder_target(base)
        target = None if te_target else _transformer_target(base)
        if target is None and te_target is None:
            what = _other_model(base)
            cause = (f"{what}, not Z-Image" if what else
                     "unknown layer name: not a Z-Image transformer or Qwen3 text-encoder layer in any known naming")
            for k in keys:
                lora.unmatched[k] = cause
            continue
        try:
            patches = _build_patches(base, parts, name, where)
        except _Unmatched as err:
            for k in keys:
                lora.unmatched[k] = str(err)
            continue
        if te_target is not None:
            for suffix, patch in patches:
                full = f"{te_target}.{suffix}"
                cause = _shape_problem(patch, full, text_encoder_shapes, "text encoder")
                if cause:
                    for k in keys:
                        lora.unmatched[k] = cause
                    continue
                lora.text_encoder.setdefault(full, []).append(patch)
                lora.forms.add(_form_name(patch))
                matched_any = True
            lora.namings.add("text encoder")
            continue
        module, index, naming = target
        for suffix, patch in patches:
            full = f"{module}.{suffix}"
            if index is not None:
                dim = _qkv_rows(full, shapes, patch)
                patch.rows = (index * dim, dim)
            cause = _shape_problem(patch, full, shapes, "transformer")
            if cause:
                for k in keys:
                    lora.unmatched[k] = cause
                continue
            lora.transformer.setdefault(full, []).append(patch)
            lora.forms.add(_form_name(patch))
            lora.namings.add(naming)
            matched_any = True
    if not matched_any:
        listed = "\n".join(f"  {k}: {c}" for k, c in list(lora.unmatched.items())[:20])
        more = f"\n  ... and {len(lora.unmatched) - 20} more" if len(lora.unmatched) > 20 else ""
        raise ZImageError(
            f"{name} is not a Z-Image LoRA: none of its {len(state)} tensors names a Z-Image layer.\n{listed}{more}\n"
            "Use a LoRA trained for Z-Image (Turbo).")
    return lora


class _Unmatched(Exception):
    pass


def _form_name(patch: Patch) -> str:
    return {"lora": "DoRA" if patch.dora_scale is not None else "LoRA", "loha": "LoHa", "lokr": "LoKr",
            "diff": "diff"}[patch.form]


def _build_patches(base: str, parts: dict, name: str, where: str = "") -> list[tuple[str, Patch]]:
    """(``weight``/``bias``, Patch) for one key base, by ComfyUI's rules: alpha and dora_scale go with the
    adapter; ``diff``/``w_norm`` patch the weight, ``diff_b``/``b_norm`` the bias. Each patch is checked
    (``check_patch``) before it is returned."""
    where = where or name
    for key, _, tensor in parts.values():
        _check_dtype(where, key, tensor, integers=key.endswith(".alpha"))
    alpha = _alpha(where, *parts["alpha"][::2]) if "alpha" in parts else None
    dora = parts["dora_scale"][2] if "dora_scale" in parts else None
    out: list[tuple[str, Patch]] = []
    roles = set(parts) - {"alpha", "dora_scale"}
    if "mid" in roles or "loha:t1" in roles or "loha:t2" in roles or "lokr:t2" in roles:
        raise ZImageError(f"{name}: {base!r} has Tucker/CP factors (lora_mid / hada_t1 / lokr_t2), which only apply "
                          "to convolutions; Z-Image has none. The file is for another model.")
    t = {r: parts[r][2] for r in roles}
    if "up" in t or "down" in t:
        if not ("up" in t and "down" in t):
            raise _Unmatched("half a LoRA pair (up/B without down/A or the reverse): the file is damaged")
        out.append(("weight", Patch("lora", {"up": t["up"], "down": t["down"]}, alpha, dora, source=base)))
    loha = {r.split(":")[1]: v for r, v in t.items() if r.startswith("loha:")}
    if loha:
        if set(loha) != {"w1a", "w1b", "w2a", "w2b"}:
            raise _Unmatched(f"incomplete LoHa (has {sorted(loha)}): the file is damaged")
        out.append(("weight", Patch("loha", loha, alpha, dora, source=base)))
    lokr = {r.split(":")[1]: v for r, v in t.items() if r.startswith("lokr:")}
    if lokr:
        ok1 = "w1" in lokr or {"w1a", "w1b"} <= set(lokr)
        ok2 = "w2" in lokr or {"w2a", "w2b"} <= set(lokr)
        if not (ok1 and ok2):
            raise _Unmatched(f"incomplete LoKr (has {sorted(lokr)}): the file is damaged")
        out.append(("weight", Patch("lokr", lokr, alpha, dora, source=base)))
    if "weight" in t:
        out.append(("weight", Patch("diff", {"diff": t["weight"]}, source=base)))
    if "bias" in t:
        out.append(("bias", Patch("diff", {"diff": t["bias"]}, source=base)))
    if not out:
        raise _Unmatched("alpha/dora_scale without any adapter weights")
    common = {r: parts[r][0] for r in ("alpha", "dora_scale") if r in parts}
    for suffix, patch in out:
        if patch.form == "diff":
            keys = {"diff": parts[suffix][0]}
        else:
            prefix = "" if patch.form == "lora" else f"{patch.form}:"
            keys = {r: parts[prefix + r][0] for r in patch.tensors}
        check_patch(patch, where, {**common, **keys})
    return out


# ------------------------------------------------------------------------------------------- checks
# Everything a merge could trip over is checked when the file is parsed, so a damaged LoRA is refused before any
# weight changes. Cost: one pass over each tensor of the file (a rank-32 LoRA on every matrix of the 6B model is
# ~190 MB in bf16); the exact product is computed only for a file whose cheap bound fails (see _check_product).
MAX_LORA_STRENGTH = 100.0  # the strengths the API, the CLI and the node accept: -100..100
FP32_MAX = float(torch.finfo(torch.float32).max)
_CHUNK = 1 << 22  # elements per piece when scanning a tensor or a product (16 MiB of fp32)
_ROLE_ORDER = ("up", "down", "w1", "w1a", "w1b", "w2", "w2a", "w2b", "diff")
DAMAGED = "The file is damaged or was written by a broken tool: export or download the LoRA again"


def _damaged(where: str, key: str, problem: str) -> ZImageError:
    return ZImageError(f"{where}: LoRA tensor {key!r} {problem}. {DAMAGED}.")


def _check_dtype(where: str, key: str, tensor: torch.Tensor, integers: bool = False) -> None:
    """Factors must be floating point (fp8 included, as ComfyUI casts them); an integer tensor of a LoRA has no
    scales to turn it into values (checkpoints with such tensors are refused too); ``alpha`` may be an integer."""
    dtype = str(tensor.dtype).replace("torch.", "")
    if tensor.is_floating_point() or (integers and not tensor.is_complex() and tensor.dtype != torch.bool):
        return
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise _damaged(where, key, f"is stored as {dtype}: LoRA tensors are real floating-point numbers (fp32, "
                                   "fp16, bf16)")
    raise ZImageError(f"{where}: LoRA tensor {key!r} is stored as {dtype}, an integer type without the scales that "
                      "would turn it into weights (LoRA files have none; integer checkpoint tensors are refused the "
                      "same way). Use the LoRA's fp16, bf16 or fp32 release, or convert it to one.")


def _abs_max(tensor: torch.Tensor) -> float:
    """max |x| in fp32, NaN when any element is NaN, inf when any is infinite. One pass, 16 MiB at a time."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return 0.0
    best = 0.0
    for part in flat.split(_CHUNK):
        value = float(part.float().abs().amax())  # amax propagates NaN
        if not math.isfinite(value):
            return value
        best = max(best, value)
    return best


def _alpha(where: str, key: str, tensor: torch.Tensor) -> float:
    """ComfyUI's alpha: one finite number (``.item()``), scaling the patch by alpha / rank."""
    if tensor.numel() != 1:
        raise _damaged(where, key, f"has shape {list(tensor.shape)}: alpha is one number (shape [] or [1])")
    value = float(tensor.reshape(()).to(torch.float64).item())
    if not math.isfinite(value):
        raise _damaged(where, key, f"is {value}: alpha must be a finite number")
    return value


def _matrix(where: str, key: str, tensor: torch.Tensor, role: str, flat: bool = False) -> tuple[int, int]:
    """The (rows, columns) of a factor that must be a matrix (``flat``: columns are all dimensions after the
    first, as ComfyUI flattens LoRA factors); no dimension may be 0."""
    if tensor.dim() < 2 or (tensor.dim() > 2 and not flat):
        raise _damaged(where, key, f"has shape {list(tensor.shape)}: a {role} is a matrix"
                                   + (" [rows, columns] (trailing 1x1 allowed)" if flat else " [rows, columns]"))
    rows, cols = tensor.shape[0], int(torch.Size(tensor.shape[1:]).numel())
    if rows == 0 or cols == 0:
        raise _damaged(where, key, f"has shape {list(tensor.shape)}: a {role} of rank 0 (an empty factor) "
                                   "changes nothing and cannot be scaled by alpha/rank")
    return rows, cols


def _pair(where: str, keys: dict, a: str, b: str, left: torch.Tensor, right: torch.Tensor, what: str,
          flat: bool = False) -> tuple[int, int, int]:
    """``left @ right``: (rows, inner rank, columns), the inner sizes equal."""
    rows, inner = _matrix(where, keys[a], left, f"{what} up factor ({a})", flat)
    rank, cols = _matrix(where, keys[b], right, f"{what} down factor ({b})", flat)
    if inner != rank:
        raise _damaged(where, keys[a], f"has shape {list(left.shape)} but its partner {keys[b]!r} has shape "
                                       f"{list(right.shape)}: the rank must be the same in both ({inner} columns of "
                                       f"the first, {rank} rows of the second)")
    return rows, rank, cols


def check_patch(patch: Patch, where: str, keys: dict[str, str]) -> None:
    """A patch whose factors fit together, hold finite numbers and whose product stays finite in fp32 at every
    allowed strength; ``keys``: the file's key of each role (``up``, ``w1a``, ``alpha``, ``dora_scale`` ...).
    Raises a ``ZImageError`` naming the file, the key and the fix. The fit with the model's weight is checked
    afterwards (``_shape_problem``: a LoRA of another model is listed in ``unmatched``)."""
    t = patch.tensors
    if patch.form == "lora":
        out_f, _, in_f = _pair(where, keys, "up", "down", t["up"], t["down"], "LoRA", flat=True)
    elif patch.form == "loha":
        out_f, _, in_f = _pair(where, keys, "w1a", "w1b", t["w1a"], t["w1b"], "LoHa")
        out2, _, in2 = _pair(where, keys, "w2a", "w2b", t["w2a"], t["w2b"], "LoHa")
        if (out2, in2) != (out_f, in_f):
            raise _damaged(where, keys["w2a"], f"and {keys['w2b']!r} make a [{out2}, {in2}] matrix but "
                                               f"{keys['w1a']!r} and {keys['w1b']!r} a [{out_f}, {in_f}] one: LoHa's "
                                               "two products are multiplied element by element and must be the same size")
    elif patch.form == "lokr":
        sizes = []
        for i in ("1", "2"):
            if f"w{i}" in t:
                sizes.append(_matrix(where, keys[f"w{i}"], t[f"w{i}"], f"LoKr factor (w{i})"))
            else:
                rows, _, cols = _pair(where, keys, f"w{i}a", f"w{i}b", t[f"w{i}a"], t[f"w{i}b"], "LoKr")
                sizes.append((rows, cols))
        out_f, in_f = sizes[0][0] * sizes[1][0], sizes[0][1] * sizes[1][1]
    else:
        if t["diff"].numel() == 0:
            raise _damaged(where, keys["diff"], f"has shape {list(t['diff'].shape)}: an empty difference")
        out_f, in_f = t["diff"].shape[0], t["diff"][0].numel() if t["diff"].dim() > 1 else 1
    norm_length = None  # DoRA per input column: the merged weight's column norms, over out_f values each
    if patch.dora_scale is not None:
        shape = list(patch.dora_scale.shape)
        rows_form = patch.dora_scale.dim() >= 2 and shape[0] == out_f and patch.dora_scale.numel() == out_f
        cols_form = patch.dora_scale.dim() == 2 and shape == [1, in_f] and not rows_form
        norm_length = out_f if cols_form else None
        if not (rows_form or cols_form):
            raise _damaged(where, keys["dora_scale"], f"has shape {shape}: DoRA's magnitude is [{out_f}, 1] (one per "
                                                      f"output row) or [1, {in_f}] (one per input column) for this "
                                                      f"[{out_f}, {in_f}] patch")
    maxima = {}
    for role, tensor in t.items():
        value = _abs_max(tensor)
        if not math.isfinite(value):
            raise _damaged(where, keys[role], "holds NaN or Inf values: merged, it would turn every image black "
                                              "or make sampling fail")
        maxima[role] = value
    if patch.dora_scale is not None and not math.isfinite(_abs_max(patch.dora_scale)):
        raise _damaged(where, keys["dora_scale"], "holds NaN or Inf values")
    _check_product(patch, where, keys, maxima, norm_length)


def _check_product(patch: Patch, where: str, keys: dict, maxima: dict[str, float], norm_length: int | None) -> None:
    """The merged delta ``strength * alpha/rank * product`` must be finite in fp32 for |strength| up to
    MAX_LORA_STRENGTH (DoRA per input column: the merged weight's column norms, over ``norm_length`` values, must
    be too, so |delta| <= sqrt(fp32 max / n) / 2; per output row ComfyUI takes the original weight's norms).

    First a bound from the maxima already taken (free): |up @ down| <= rank * max|up| * max|down|, LoHa the product
    of two such bounds, LoKr max|w1| * max|w2|. Real LoRAs pass it by 30 orders of magnitude. Only when it fails is
    the product computed, in fp32 as the merge computes it, 16 MiB of rows at a time on the CPU (the cost of one
    merge of that weight), and its true maximum used: so a file is refused only when the merge really overflows."""
    t = patch.tensors
    scale = abs(patch._scale())
    limit = FP32_MAX / MAX_LORA_STRENGTH if norm_length is None else math.sqrt(FP32_MAX / norm_length) / 2
    if patch.form == "diff":
        bound = maxima["diff"]
    elif patch.form == "lora":
        bound = t["down"].shape[0] * maxima["up"] * maxima["down"]
    elif patch.form == "loha":
        bound = (t["w1b"].shape[0] * maxima["w1a"] * maxima["w1b"]) * (t["w2b"].shape[0] * maxima["w2a"] * maxima["w2b"])
    else:
        bound = 1.0
        for i in ("1", "2"):
            bound *= maxima[f"w{i}"] if f"w{i}" in t else t[f"w{i}b"].shape[0] * maxima[f"w{i}a"] * maxima[f"w{i}b"]
    if scale * bound < limit:
        return
    if patch.form == "diff":
        raise _damaged(where, keys["diff"], f"holds values up to {bound:.3g}: at strength {MAX_LORA_STRENGTH:g} the "
                                            "merged weight would overflow fp32 (Inf/NaN weights, black images)")
    exact = _product_max(patch)
    if not math.isfinite(exact) or scale * exact >= limit:
        roles = sorted(patch.tensors, key=_ROLE_ORDER.index)
        size = "overflow fp32" if not math.isfinite(exact) else f"reach {scale * exact:.3g} at strength 1"
        raise _damaged(where, keys[roles[0]], f"and its partner factors ({', '.join(repr(keys[r]) for r in roles[1:])}"
                                     f") multiply to values that {size}: merged at the strengths allowed (up to "
                                     f"{MAX_LORA_STRENGTH:g}), they would give Inf/NaN weights and black images")


def _product_max(patch: Patch) -> float:
    """max |product| of a LoRA/LoHa/LoKr patch in fp32, computed in pieces of rows (NaN/inf when it overflows)."""
    t = {k: v.float() for k, v in patch.tensors.items()}

    def rows_max(rows: int, fn) -> float:  # fn(row slice) -> those rows of the product
        best = 0.0
        step = max(1, _CHUNK // fn(slice(0, 1)).shape[1])
        for start in range(0, rows, step):
            value = float(fn(slice(start, start + step)).abs().amax())
            if not math.isfinite(value):
                return value
            best = max(best, value)
        return best

    if patch.form == "lora":
        up, down = t["up"].flatten(1), t["down"].flatten(1)
        return rows_max(up.shape[0], lambda r: up[r] @ down)
    if patch.form == "loha":
        return rows_max(t["w1a"].shape[0], lambda r: (t["w1a"][r] @ t["w1b"]) * (t["w2a"][r] @ t["w2b"]))
    result = 1.0
    for i in ("1", "2"):  # max |kron(w1, w2)| = max |w1| * max |w2|
        if f"w{i}" in t:
            result *= _abs_max(t[f"w{i}"])
        else:
            a, b = t[f"w{i}a"], t[f"w{i}b"]
            result *= rows_max(a.shape[0], lambda r, a=a, b=b: a[r] @ b)
    return result


def _qkv_rows(target: str, shapes, patch: Patch) -> int:
    """Rows of one of q/k/v in the fused qkv: a third of the target's rows, else the patch's own output rows."""
    if shapes is not None and target in shapes:
        return shapes[target][0] // 3
    return patch.out_in[0]


def _shape_problem(patch: Patch, target: str, shapes, what: str) -> str | None:
    if shapes is None:
        return None
    if target not in shapes:
        m = re.match(r"(layers|noise_refiner|context_refiner|)\.?(\d+)?", target)
        if target.endswith(".bias"):
            return f"the {what} has no {target} (a bias patch for a layer without bias): LoRA of another model"
        if m and m.group(2) is not None:
            count = len({k.split(".")[1] for k in shapes if k.startswith(m.group(1) + ".")})
            if what == "text encoder" and int(m.group(2)) == count:
                return (f"no effect on Z-Image: {target} is in the last Qwen3 layer, which Z-Image never runs (it "
                        "uses the second-to-last layer's output)")
            return f"the {what} has no {target} (it has {count} {m.group(1)}): a LoRA of another, larger model"
        return f"the {what} has no {target}: a LoRA of another model"
    full = tuple(shapes[target])
    expected = full if patch.rows is None else (patch.rows[1],) + full[1:]
    got = patch.out_in
    flat = (expected[0], int(torch.Size(expected[1:]).numel())) if len(expected) > 1 else expected
    if patch.form == "diff":
        flat, got = expected, tuple(got)
    if tuple(got) != tuple(flat):
        hint = " (Lumina 2 is 2304 wide, Z-Image 3840)" if 2304 in got else ""
        return f"shape {tuple(got)} does not fit {target} {tuple(flat)}: a LoRA of another model size{hint}"
    return None


# ---------------------------------------------------------------------------------------------- merge
def apply_patches(weight: torch.Tensor, patches: list[Patch], strength: float) -> torch.Tensor:
    """``weight`` with ``patches`` merged at ``strength``, in fp32 and in order (each sees the previous
    result, as ComfyUI's stacked patches do), cast back to ``weight``'s dtype."""
    out = weight.detach().float().clone()
    for patch in patches:
        view = out if patch.rows is None else out.narrow(0, patch.rows[0], patch.rows[1])
        view += patch.delta(view, strength)
    return out.to(weight.dtype)


def apply_to_state_dict(state: dict[str, torch.Tensor], lora: LoraFile, strength: float = 1.0,
                        component: str = "transformer") -> dict[str, torch.Tensor]:
    """A copy of ``state`` (canonical names: original transformer layout without prefix, or Qwen3Model
    names) with ``lora`` merged at ``strength``. For tests and offline merging; the weight owner does the
    same per weight on the live model."""
    patches = lora.transformer if component == "transformer" else lora.text_encoder
    missing = [k for k in patches if k not in state]
    if missing:
        raise ZImageError(f"{lora.name}: the {component} has no {', '.join(missing[:4])}; load the LoRA with the "
                          "model's shapes to have such keys reported instead.")
    out = dict(state)
    for key, plist in patches.items():
        out[key] = apply_patches(state[key], plist, strength)
    return out


# ---------------------------------------------------------------------------------------- diffusers names
_TO_DIFFUSERS_BLOCK = {"attention.out": "attention.to_out.0", "attention.q_norm": "attention.norm_q",
                       "attention.k_norm": "attention.norm_k"}
_TO_DIFFUSERS_TOP = {"x_embedder": "all_x_embedder.2-1", "final_layer.linear": "all_final_layer.2-1.linear",
                     "final_layer.adaLN_modulation.1": "all_final_layer.2-1.adaLN_modulation.1"}


def diffusers_name(canonical: str, rows: tuple[int, int] | None = None) -> str:
    """The ``ZImageTransformer2DModel`` parameter a canonical (original-layout) name, or rows of the fused
    ``qkv`` (``(offset, count)`` with offsets 0, dim, 2*dim), lives in."""
    module, _, param = canonical.rpartition(".")
    if not module:  # x_pad_token, cap_pad_token
        return canonical
    m = re.fullmatch(r"(layers|noise_refiner|context_refiner)\.(\d+)\.(.+)", module)
    if m:
        rel = m.group(3)
        if rel == "attention.qkv":
            if rows is None:
                raise ZImageError(f"{canonical}: diffusers splits qkv into to_q/to_k/to_v; give the rows.")
            rel = "attention.to_" + "qkv"[rows[0] // rows[1]]
        rel = _TO_DIFFUSERS_BLOCK.get(rel, rel)
        return f"{m.group(1)}.{m.group(2)}.{rel}.{param}"
    return f"{_TO_DIFFUSERS_TOP.get(module, module)}.{param}"


def diffusers_parts(canonical: str, rows: tuple[int, int] | None, total_rows: int) -> list[tuple[str, slice]]:
    """Where a patch's delta goes in ``ZImageTransformer2DModel``: ``[(parameter name, rows of the delta)]``.

    A patch on the whole fused ``qkv`` (native naming, ``total_rows`` = 3*dim rows) lands in to_q, to_k and to_v;
    a patch with ``rows`` lands whole in the one it names; any other weight maps one to one.
    """
    if canonical.endswith(".attention.qkv.weight") and rows is None:
        dim = total_rows // 3
        return [(diffusers_name(canonical, (i * dim, dim)), slice(i * dim, (i + 1) * dim)) for i in range(3)]
    return [(diffusers_name(canonical, rows), slice(None))]
