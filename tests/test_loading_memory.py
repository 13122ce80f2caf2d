"""Loading fp32 shards into bf16 streams tensor by tensor: peak RSS growth stays near the bf16 size.

Each measurement runs in a fresh subprocess (ru_maxrss is a per-process high-water mark).
"""

import json
import subprocess
import sys
import textwrap

import pytest

WRITE = textwrap.dedent("""
    import sys, torch
    from diffusers import ZImageTransformer2DModel
    from zimage_core.formats import shipped_config
    from zimage_core.tiny import randomize_
    cfg = {k: v for k, v in shipped_config("transformer").items() if not k.startswith("_")}
    cfg.update(dim=1024, n_heads=8, n_kv_heads=8, n_layers=6, n_refiner_layers=1, cap_feat_dim=256)
    model = randomize_(ZImageTransformer2DModel(**cfg), 0)
    model.save_pretrained(sys.argv[1], safe_serialization=True, max_shard_size="150MB")
""")

LOAD = textwrap.dedent("""
    import json, resource, sys, torch
    from zimage_core.dtypes import ComponentDtype
    from zimage_core.loading import load_transformer
    from diffusers import ZImageTransformer2DModel  # imported before the baseline, like the loader's needs
    def peak_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    base = peak_mib()
    model = load_transformer(sys.argv[1], ComponentDtype(torch.bfloat16, torch.bfloat16))
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    bf16_mib = sum(p.numel() for p in model.parameters()) * 2 / 2**20
    print(json.dumps({"growth_mib": peak_mib() - base, "bf16_mib": bf16_mib, "dtypes": dtypes}))
""")


def _run(code, *args):
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


@pytest.fixture(scope="module")
def fp32_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fp32") / "transformer"
    _run(WRITE, folder)
    assert len(list(folder.glob("*.safetensors"))) >= 2  # really sharded
    return folder


def test_fp32_shards_load_into_bf16_without_an_fp32_copy(fp32_shards):
    ours = json.loads(_run(LOAD, fp32_shards))
    assert ours["dtypes"] == ["torch.bfloat16"]
    assert ours["bf16_mib"] > 200  # a model of a few hundred MB
    # Issue targets: <= 1.3x (core) and <= 1.2x (memory) the bf16 size, plus a fixed 32 MiB (allocator,
    # module objects). Measured here: 1.10x.
    assert ours["growth_mib"] <= 1.2 * ours["bf16_mib"] + 32, ours
