"""Every choice and limit the core accepts, in one place: the nodes, the CLI and the checks read them here.

Nothing else in the package writes these lists again; ``zimage_core`` re-exports them as its public API.
"""

from __future__ import annotations

LATENT_CHANNELS = 16  # the Flux VAE's latent channels
MIN_SIZE, MAX_SIZE, SIZE_MULTIPLE = 64, 8192, 16  # 8192 px = 512 patches of 16 px: the RoPE table's length
MIN_STEPS, MAX_STEPS = 1, 100
MAX_BATCH = 64

# What the nodes offer. The experimental "fp8" kernel (fp8_attention.py) is accepted by the Python API only: on
# the H200 it was slower than cuDNN's bf16 attention (491 vs 463 us a call) at 0.052 relative L2 error.
ATTENTION_BACKENDS = ("auto", "sdpa", "cudnn", "flash", "efficient", "math")
OFFLOAD_MODES = ("none", "model", "sequential")
GUARD_POLICIES = ("off", "detect", "auto", "clamp")
COMPUTE_DTYPES = ("auto", "bf16", "fp16", "fp32")
STORAGE_DTYPES = ("auto", "bf16", "fp16", "fp32", "fp8_e4m3fn", "int8")

MIN_TILE_SIZE, MAX_TILE_SIZE, TILE_SIZE_STEP = 64, 4096, 8  # pixels, for the tiled VAE decode
