"""LoRA files in every naming and weight form: our parser and merge against ComfyUI's own LoRA code (0.3.75 and
0.33.0, in subprocesses, on the tiny model loaded by ComfyUI's loader) and against diffusers + peft.

ComfyUI 0.3.75 maps only ``diffusion_model.`` (native and diffusers names), ``lora_unet_`` (native) and
``lycoris_`` keys for Z-Image, and text-encoder keys only as ``text_encoders.qwen3_4b.transformer.model.``;
0.33.0 adds ``transformer.``, bare diffusers names and ``lora_te_``. Each file is compared with the versions
that map it; for the others the test asserts that ComfyUI ignored it (the gap we close). Musubi-tuner's names
are mapped by neither: they are compared with ComfyUI on the same file converted to ``diffusion_model.`` names.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from comfy_zimage import comfy_root, python_for, run_task
from helpers import transformer_to_original
from zimage_core import ZImageError
from zimage_core.lora import apply_to_state_dict, diffusers_name, diffusers_parts, load_lora

DIM = 64
GEN = torch.Generator().manual_seed(1234)


def rnd(*shape, scale=0.1):
    return torch.randn(*shape, generator=GEN) * scale


def lora_pair(out_f, in_f, rank=4):
    return rnd(out_f, rank), rnd(rank, in_f)


# (native name, diffusers name) of module targets; shapes come from the tiny model
TARGETS = [
    ("layers.0.attention.qkv", None), (None, "layers.0.attention.to_q"), (None, "layers.0.attention.to_k"),
    (None, "layers.1.attention.to_v"), ("layers.1.attention.out", "layers.1.attention.to_out.0"),
    ("layers.0.feed_forward.w2", "layers.0.feed_forward.w2"), ("layers.1.feed_forward.w3", "layers.1.feed_forward.w3"),
    ("noise_refiner.0.adaLN_modulation.0", "noise_refiner.0.adaLN_modulation.0"),
    ("context_refiner.0.feed_forward.w1", "context_refiner.0.feed_forward.w1"),
    (None, "noise_refiner.0.attention.to_q"),
    ("x_embedder", "all_x_embedder.2-1"), ("final_layer.linear", "all_final_layer.2-1.linear"),
    ("final_layer.adaLN_modulation.1", "all_final_layer.2-1.adaLN_modulation.1"),
    ("t_embedder.mlp.0", "t_embedder.mlp.0"), ("cap_embedder.1", "cap_embedder.1"),
]


def shape_of(shapes, native, diffusers):
    if native:
        return shapes[f"{native}.weight"]
    block = diffusers.rsplit(".", 1)[0]
    return (DIM, shapes[f"{block}.qkv.weight"][1])


def write_lora(path, shapes, naming: str, form: str = "lora", alpha: bool = True, dora: str | None = None):
    """A LoRA over TARGETS in ``naming``: native_dm, native_kohya, diffusers_dm, lycoris, peft, bare, musubi."""
    sd = {}
    for native, diffusers in TARGETS:
        out_f, in_f = shape_of(shapes, native, diffusers)
        if naming in ("native_dm", "native_kohya"):
            if native is None:
                continue
            base = {"native_dm": f"diffusion_model.{native}", "native_kohya": "lora_unet_" + native.replace(".", "_")}[naming]
        else:
            if diffusers is None:
                continue
            base = {"diffusers_dm": f"diffusion_model.{diffusers}", "lycoris": "lycoris_" + diffusers.replace(".", "_"),
                    "peft": f"transformer.{diffusers}", "bare": diffusers,
                    "musubi": "lora_unet_" + diffusers.replace(".", "_")}[naming]
        if form == "lora":
            up, down = lora_pair(out_f, in_f)
            if naming in ("peft", "bare"):
                sd[f"{base}.lora_B.weight"], sd[f"{base}.lora_A.weight"] = up, down
            else:
                sd[f"{base}.lora_up.weight"], sd[f"{base}.lora_down.weight"] = up, down
        elif form == "loha":
            for i in (1, 2):
                sd[f"{base}.hada_w{i}_a"], sd[f"{base}.hada_w{i}_b"] = rnd(out_f, 3, scale=0.3), rnd(3, in_f, scale=0.3)
        elif form == "lokr":  # alternate the factorisations LyCORIS writes
            a, b = (2, out_f // 2), (2, in_f // 2)
            if len(sd) % 2 == 0:
                sd[f"{base}.lokr_w1"] = rnd(a[0], b[0], scale=0.5)
                sd[f"{base}.lokr_w2_a"], sd[f"{base}.lokr_w2_b"] = rnd(a[1], 4), rnd(4, b[1])
            else:
                sd[f"{base}.lokr_w1_a"], sd[f"{base}.lokr_w1_b"] = rnd(a[0], 2), rnd(2, b[0])
                sd[f"{base}.lokr_w2"] = rnd(a[1], b[1], scale=0.05)
        if alpha:
            sd[f"{base}.alpha"] = torch.tensor(float(2 + len(sd) % 5))
        if dora == "rows":
            sd[f"{base}.dora_scale"] = (1.0 + rnd(out_f, 1)).abs()
        elif dora == "cols":
            sd[f"{base}.dora_scale"] = (1.0 + rnd(1, in_f)).abs()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def musubi_to_comfy(sd: dict) -> dict:
    """What users' converters do: lora_unet_<diffusers with underscores> -> diffusion_model.<diffusers>."""
    out = {}
    for key, value in sd.items():
        base, _, suffix = key.partition(".")
        rest = base[len("lora_unet_"):]
        m = re.fullmatch(r"(layers|noise_refiner|context_refiner)_(\d+)_(.+)", rest)
        if m:
            mod = m.group(3).replace("attention_", "attention.").replace("to_out_0", "to_out.0")
            mod = mod.replace("feed_forward_", "feed_forward.").replace("adaLN_modulation_0", "adaLN_modulation.0")
            name = f"{m.group(1)}.{m.group(2)}.{mod}"
        else:
            name = {n.replace(".", "_"): n for _, n in TARGETS if n}[rest]
        out[f"diffusion_model.{name}.{suffix}"] = value
    return out


@pytest.fixture(scope="module")
def base_state(tiny_models):
    return transformer_to_original(tiny_models[0].state_dict(), prefix="")


@pytest.fixture(scope="module")
def te_state(tiny_models):
    return {k: v.detach().clone().contiguous() for k, v in tiny_models[1].state_dict().items()}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, base_state, te_state):
    """Every LoRA file, the stacks to run, and the tiny model, as ComfyUI's subprocess reads them."""
    from safetensors.torch import load_file

    d = tmp_path_factory.mktemp("loras")
    shapes = {k: tuple(v.shape) for k, v in base_state.items()}
    files = {
        "native_dm": write_lora(d / "native_dm.safetensors", shapes, "native_dm"),
        "native_kohya": write_lora(d / "native_kohya.safetensors", shapes, "native_kohya", alpha=False),
        "diffusers_dm": write_lora(d / "diffusers_dm.safetensors", shapes, "diffusers_dm"),
        "lycoris_loha": write_lora(d / "lycoris_loha.safetensors", shapes, "lycoris", form="loha"),
        "lycoris_lokr": write_lora(d / "lycoris_lokr.safetensors", shapes, "lycoris", form="lokr"),
        "dora_rows": write_lora(d / "dora_rows.safetensors", shapes, "native_dm", dora="rows"),
        "dora_cols": write_lora(d / "dora_cols.safetensors", shapes, "diffusers_dm", dora="cols"),
        "peft": write_lora(d / "peft.safetensors", shapes, "peft", alpha=False),
        "bare": write_lora(d / "bare.safetensors", shapes, "bare"),
        "musubi": write_lora(d / "musubi.safetensors", shapes, "musubi"),
    }
    save_file(musubi_to_comfy(load_file(str(files["musubi"]))), str(d / "musubi_converted.safetensors"))
    diffs = {  # full differences, on a norm weight and a bias
        "diffusion_model.layers.0.attention.q_norm.diff": rnd(32),
        "diffusion_model.layers.1.adaLN_modulation.0.diff_b": rnd(4 * DIM),
        "diffusion_model.layers.1.adaLN_modulation.0.diff": rnd(4 * DIM, DIM),
    }
    save_file(diffs, str(d / "diff.safetensors"))
    files["diff"] = d / "diff.safetensors"
    te = {}
    for i, mod in ((0, "self_attn.q_proj"), (1, "mlp.down_proj"), (2, "self_attn.o_proj")):
        out_f, in_f = te_state[f"layers.{i}.{mod}.weight"].shape
        base = f"text_encoders.qwen3_4b.transformer.model.layers.{i}.{mod}"
        te[f"{base}.lora_up.weight"], te[f"{base}.lora_down.weight"] = lora_pair(out_f, in_f)
        te[f"{base}.alpha"] = torch.tensor(2.0)
    out_f, in_f = te_state["layers.1.self_attn.k_proj.weight"].shape
    te["lora_te_layers_1_self_attn_k_proj.lora_up.weight"], te["lora_te_layers_1_self_attn_k_proj.lora_down.weight"] = \
        lora_pair(out_f, in_f)
    up, down = lora_pair(*shapes["layers.1.feed_forward.w1.weight"])
    te["diffusion_model.layers.1.feed_forward.w1.lora_up.weight"], te["diffusion_model.layers.1.feed_forward.w1.lora_down.weight"] = up, down
    save_file(te, str(d / "with_te.safetensors"))
    files["with_te"] = d / "with_te.safetensors"

    stacks = {name: [[path.name, 0.8]] for name, path in files.items()}
    stacks["musubi_converted"] = [["musubi_converted.safetensors", 0.8]]
    stacks["stack_two"] = [["native_dm.safetensors", 0.7], ["lycoris_lokr.safetensors", -0.5]]
    stacks["stack_sliced_and_full"] = [["diffusers_dm.safetensors", 1.0], ["native_dm.safetensors", 0.3]]
    stacks["none"] = []
    (d / "stacks.json").write_text(json.dumps(stacks))
    save_file(base_state, str(d / "transformer.safetensors"))
    save_file(te_state, str(d / "text_encoder.safetensors"))
    (d / "te_keys.json").write_text(json.dumps([f"qwen3_4b.transformer.model.{k}" for k in te_state]))
    return d, files, stacks


VERSIONS = ("0.3.75", "0.33.0")
# what each ComfyUI version maps (the rest it ignores, logging "lora key not loaded")
MAPPED = {"0.3.75": {"native_dm", "native_kohya", "diffusers_dm", "lycoris_loha", "lycoris_lokr", "dora_rows",
                     "dora_cols", "diff", "musubi_converted", "stack_two", "stack_sliced_and_full", "none", "with_te"},
          "0.33.0": {"native_dm", "native_kohya", "diffusers_dm", "lycoris_loha", "lycoris_lokr", "dora_rows",
                     "dora_cols", "diff", "musubi_converted", "stack_two", "stack_sliced_and_full", "none", "peft",
                     "bare", "with_te"}}


@pytest.fixture(scope="module", params=VERSIONS)
def comfy_lora(request, lora_dir, tmp_path_factory):
    version = request.param
    if python_for(version) is None:
        pytest.skip(f"the ComfyUI {version} test venv is not installed (scripts/dev-install.sh makes it)")
    root = comfy_root(version, tmp_path_factory.getbasetemp())
    out = tmp_path_factory.mktemp(f"comfy-lora-{version}")
    results = run_task(version, "lora", root, lora_dir[0], out)
    assert results["comfyui_version"] == version
    return version, results, out


def ours(lora_dir, stack, base_state, te_state):
    shapes = {k: tuple(v.shape) for k, v in base_state.items()}
    te_shapes = {k: tuple(v.shape) for k, v in te_state.items()}
    state, te = dict(base_state), dict(te_state)
    parsed = []
    for file, strength in stack:
        lora = load_lora(lora_dir / file, shapes, te_shapes)
        assert not lora.unmatched, lora.unmatched_message()
        state = apply_to_state_dict(state, lora, strength)
        te = apply_to_state_dict(te, lora, strength, component="text_encoder")
        parsed.append(lora)
    return state, te, parsed


def comfy_targets(lora) -> list[str]:
    out = []
    for name, patches in lora.transformer.items():
        for p in patches:
            key = f"diffusion_model.{name}"
            out.append(str((key, (0, p.rows[0], p.rows[1]))) if p.rows else key)
    return sorted(set(out))


def test_lora_matches_comfyui(comfy_lora, lora_dir, base_state, te_state):
    from safetensors.torch import load_file

    version, results, out = comfy_lora
    d, files, stacks = lora_dir
    compared = []
    for name, stack in stacks.items():
        reference = load_file(str(out / f"{name}.safetensors"))
        mine, mine_te, parsed = ours(d, stack, base_state, te_state)
        info = results[name]["stack"]
        if name not in MAPPED[version]:
            # this ComfyUI version does not know the naming: it maps a strict part of what we map (none, or for
            # Musubi's file only the layers whose native and diffusers names agree: half a LoRA, silently)
            for s, lora in zip(info, parsed):
                assert set(s["targets"]) < set(comfy_targets(lora)), (version, name, s["targets"])
                if name == "musubi":
                    assert s["targets"] and not any("attention" in t or "final_layer" in t for t in s["targets"])
            continue
        for s, lora in zip(info, parsed):  # the same targets, sliced the same way
            assert s["targets"] == comfy_targets(lora), (version, name)
        # ComfyUI 0.3.75's NextDiT has a norm_final that Z-Image files lack and never use ("unet missing" in its log)
        reference.pop("norm_final.weight", None)
        assert {k for k in reference if not k.startswith("te.")} == set(base_state)
        changed = 0
        for key, ref in reference.items():
            if key.startswith("te."):
                got = mine_te[key[3:]].float()
            else:
                got = mine[key].float()
            err = (got - ref).abs().max().item()
            assert err <= 1e-6, (version, name, key, err)
            base = te_state[key[3:]] if key.startswith("te.") else base_state[key]
            changed += int(not torch.equal(ref, base.float()))
        assert (changed > 0) == bool(stack), (version, name, changed)  # a LoRA that did nothing would fail here
        if name == "with_te":  # 0.3.75 does not map lora_te_ names for Qwen3 (0.33 does); we map all four
            assert len(results[name]["te_patched"]) == (4 if version == "0.33.0" else 3), results[name]
            assert sum(len(v) for v in parsed[0].text_encoder.values()) == 4
        compared.append(name)
    assert set(compared) == MAPPED[version]


def test_naming_detected(lora_dir, base_state):
    d, files, _ = lora_dir
    shapes = {k: tuple(v.shape) for k, v in base_state.items()}
    seen = {name: load_lora(path, shapes).namings for name, path in files.items() if name != "with_te"}
    assert seen["native_kohya"] == {"native, 'lora_unet_' prefix"}
    assert seen["musubi"] >= {"Musubi-tuner (lora_unet_ + diffusers names)"}
    assert seen["peft"] >= {"diffusers, 'transformer.' prefix"}
    lokr = load_lora(files["lycoris_lokr"], shapes)
    assert lokr.forms == {"LoKr"} and load_lora(files["lycoris_loha"], shapes).forms == {"LoHa"}
    assert load_lora(files["dora_rows"], shapes).forms == {"DoRA"}
    qkv = load_lora(files["diffusers_dm"], shapes).transformer["layers.0.attention.qkv.weight"]
    assert sorted(p.rows for p in qkv) == [(0, DIM), (DIM, DIM)]


def test_musubi_equals_converted(lora_dir, base_state):
    d, files, _ = lora_dir
    a, _, _ = ours(d, [["musubi.safetensors", 0.8]], base_state, {})
    b, _, _ = ours(d, [["musubi_converted.safetensors", 0.8]], base_state, {})
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], base_state[k]) for k in a)


def test_strength_zero_and_sign(lora_dir, base_state):
    d, files, _ = lora_dir
    lora = load_lora(files["native_dm"])
    same = apply_to_state_dict(base_state, lora, 0.0)
    assert all(torch.equal(same[k], base_state[k]) for k in base_state)
    plus, minus = apply_to_state_dict(base_state, lora, 0.5), apply_to_state_dict(base_state, lora, -0.5)
    for k in lora.transformer:
        torch.testing.assert_close(plus[k] - base_state[k], base_state[k] - minus[k], atol=1e-7, rtol=0)


def test_other_models_reported_key_by_key(tmp_path, base_state):
    shapes = {k: tuple(v.shape) for k, v in base_state.items()}
    flux = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": rnd(8, 4),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": rnd(4, 8),
        "lora_unet_single_blocks_3_linear1.alpha": torch.tensor(4.0),
        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": rnd(8, 4),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": rnd(8, 4),
    }
    save_file(flux, str(tmp_path / "flux.safetensors"))
    with pytest.raises(ZImageError) as err:
        load_lora(tmp_path / "flux.safetensors", shapes)
    text = str(err.value)
    assert "not a Z-Image LoRA" in text
    for key in flux:
        assert key in text
    assert "Flux" in text and "SDXL" in text and "CLIP" in text

    mixed = dict(flux)
    up, down = lora_pair(DIM, DIM)
    mixed["diffusion_model.layers.0.attention.out.lora_up.weight"] = up
    mixed["diffusion_model.layers.0.attention.out.lora_down.weight"] = down
    mixed["diffusion_model.layers.7.attention.out.lora_up.weight"] = up  # a layer the tiny model lacks
    mixed["diffusion_model.layers.7.attention.out.lora_down.weight"] = down
    mixed["diffusion_model.layers.0.attention.wrong_name.lora_up.weight"] = up
    mixed["diffusion_model.layers.1.feed_forward.w1.lora_up.weight"] = rnd(2304, 4)  # another model's width
    mixed["diffusion_model.layers.1.feed_forward.w1.lora_down.weight"] = rnd(4, DIM)
    save_file({k: v.clone() for k, v in mixed.items()}, str(tmp_path / "mixed.safetensors"))
    lora = load_lora(tmp_path / "mixed.safetensors", shapes)
    assert list(lora.transformer) == ["layers.0.attention.out.weight"]
    assert set(lora.unmatched) == set(mixed) - {"diffusion_model.layers.0.attention.out.lora_up.weight",
                                                 "diffusion_model.layers.0.attention.out.lora_down.weight"}
    assert "2 layers" in lora.unmatched["diffusion_model.layers.7.attention.out.lora_up.weight"]
    assert "unknown layer name" in lora.unmatched["diffusion_model.layers.0.attention.wrong_name.lora_up.weight"]
    assert "Lumina 2" in lora.unmatched["diffusion_model.layers.1.feed_forward.w1.lora_up.weight"]
    lines = lora.unmatched_message().splitlines()
    assert len(lines) == len(lora.unmatched) and all("mixed.safetensors: key '" in line for line in lines)


def test_unsupported_forms_named(tmp_path):
    save_file({"diffusion_model.layers.0.attention.out.oft_blocks": rnd(4, 16, 16)}, str(tmp_path / "oft.safetensors"))
    with pytest.raises(ZImageError, match="OFT"):
        load_lora(tmp_path / "oft.safetensors")
    save_file({"diffusion_model.layers.0.attention.out.hada_w1_a": rnd(8, 2), "diffusion_model.layers.0.attention.out.hada_t1": rnd(2, 2, 3, 3)},
              str(tmp_path / "cp.safetensors"))
    with pytest.raises(ZImageError, match="Tucker"):
        load_lora(tmp_path / "cp.safetensors")
    (tmp_path / "lora.ckpt").write_bytes(b"PK\x03\x04 a pickle")
    with pytest.raises(ZImageError, match="only .safetensors"):
        load_lora(tmp_path / "lora.ckpt")


def test_diffusers_names_round_trip():
    assert diffusers_name("layers.3.attention.qkv.weight", (128, 64)) == "layers.3.attention.to_v.weight"
    assert diffusers_name("layers.3.attention.out.weight") == "layers.3.attention.to_out.0.weight"
    assert diffusers_name("noise_refiner.0.attention.k_norm.weight") == "noise_refiner.0.attention.norm_k.weight"
    assert diffusers_name("x_embedder.bias") == "all_x_embedder.2-1.bias"
    assert diffusers_name("final_layer.adaLN_modulation.1.weight") == "all_final_layer.2-1.adaLN_modulation.1.weight"
    assert diffusers_name("cap_embedder.1.weight") == "cap_embedder.1.weight"
    assert diffusers_parts("layers.0.attention.qkv.weight", None, 192) == [
        ("layers.0.attention.to_q.weight", slice(0, 64)), ("layers.0.attention.to_k.weight", slice(64, 128)),
        ("layers.0.attention.to_v.weight", slice(128, 192))]
    assert diffusers_parts("layers.0.attention.qkv.weight", (64, 64), 192) == [("layers.0.attention.to_k.weight", slice(None))]


def test_merge_into_diffusers_model(lora_dir, base_state, tiny_models):
    """Native (whole-qkv) and diffusers (to_q rows) patches merged straight into ZImageTransformer2DModel's
    parameters through diffusers_parts equal the original-layout merge."""
    d, files, _ = lora_dir
    state = {k: v.clone() for k, v in tiny_models[0].state_dict().items()}
    merged, _, parsed = ours(d, [["native_dm.safetensors", 0.6], ["diffusers_dm.safetensors", 0.9]], base_state, {})
    for lora, strength in zip(parsed, (0.6, 0.9)):
        for name, patches in lora.transformer.items():
            for p in patches:
                full = torch.cat([state[n] for n, _ in diffusers_parts(name, None, 3 * DIM)]) if name.endswith("qkv.weight") \
                    else state[diffusers_name(name)]
                view = full if p.rows is None else full[p.rows[0]:p.rows[0] + p.rows[1]]
                delta = p.delta(view, strength)
                for target, rows in diffusers_parts(name, p.rows, full.shape[0]):
                    state[target] = state[target] + delta[rows]
    for name in merged:
        if name.endswith("qkv.weight"):
            got = torch.cat([state[n] for n, _ in diffusers_parts(name, None, 3 * DIM)])
        else:
            got = state[diffusers_name(name)]
        torch.testing.assert_close(got, merged[name], atol=1e-6, rtol=0)


def test_diffusers_peft_fuse_matches(lora_dir, base_state, tiny_models):
    """The PEFT file through diffusers' ZImagePipeline.load_lora_weights + fuse_lora, against our merge."""
    pytest.importorskip("peft")
    from diffusers import ZImagePipeline

    d, files, _ = lora_dir
    transformer = copy.deepcopy(tiny_models[0])
    pipe = ZImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    pipe.load_lora_weights(str(files["peft"]), adapter_name="style")
    pipe.fuse_lora(lora_scale=0.8)
    pipe.unload_lora_weights()
    fused = transformer.state_dict()
    mine, _, parsed = ours(d, [["peft.safetensors", 0.8]], base_state, {})
    checked = 0
    for name, patches in parsed[0].transformer.items():
        for p in patches:
            target = diffusers_name(name, p.rows)
            got = mine[name] if p.rows is None else mine[name][p.rows[0]:p.rows[0] + p.rows[1]]
            torch.testing.assert_close(fused[target], got, atol=1e-6, rtol=0)
            assert not torch.equal(fused[target], before[target])
            checked += 1
    assert checked == sum(1 for _, n in TARGETS if n)


def test_text_encoder_last_layer_reported(tmp_path, te_state):
    """Our Qwen3 stops before its last layer (Z-Image uses hidden_states[-2]): a LoRA key there is reported."""
    from zimage_core.loading import load_text_encoder  # noqa: F401  (the loader that cuts the last layer)

    full = max(int(k.split(".")[1]) for k in te_state if k.startswith("layers.")) + 1
    cut = {k: tuple(v.shape) for k, v in te_state.items() if not k.startswith(f"layers.{full - 1}.")}
    out_f, in_f = te_state["layers.0.mlp.up_proj.weight"].shape
    sd = {}
    for i in (0, full - 1):
        base = f"lora_te_layers_{i}_mlp_up_proj"
        sd[f"{base}.lora_up.weight"], sd[f"{base}.lora_down.weight"] = lora_pair(out_f, in_f)
    save_file(sd, str(tmp_path / "te.safetensors"))
    lora = load_lora(tmp_path / "te.safetensors", {}, cut)
    assert list(lora.text_encoder) == ["layers.0.mlp.up_proj.weight"]
    assert len(lora.unmatched) == 2 and all("never runs" in c for c in lora.unmatched.values())
