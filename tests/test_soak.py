"""Soak: 50 generations with varying prompts and sizes in one process; memory settles after the first few."""

import gc

import psutil
import torch


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def test_fifty_generations_keep_memory_flat(zimage):
    sizes = [(64, 64), (96, 64), (64, 128), (128, 96), (80, 112)]
    rss = []
    for i in range(50):
        width, height = sizes[i % len(sizes)]
        result = zimage.generate(f"soak prompt number {i}: a {['fox', 'owl', 'cat'][i % 3]} at dusk", seed=i,
                                 steps=2, width=width, height=height, batch_size=1 + i % 2)
        assert result.images.shape == (1 + i % 2, height, width, 3) and torch.isfinite(result.images).all()
        rss.append(_rss())
    settled = max(rss[4:10])  # every size and both batch sizes have been seen by run 10
    growth = max(rss[10:]) - settled
    # 50 distinct prompts sit in the 64-entry embedding cache (a few KiB each on the tiny model); allocator noise
    # is a few MiB. A leak of one tiny generation's tensors per run would add far more over 40 runs.
    assert growth < 24 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB after run 10: {[r // 2**20 for r in rss]}"
