"""``ZTURBO_MODEL``: what the loader outputs and every other node of the pack takes.

A ``ModelHandle`` wraps one loaded ``zimage_core.ZImage`` plus the precision-guard policy chosen for it in the
graph. The Precision Guard node returns a new handle rather than changing the loader's cached output; each
node applies its handle's policy to the shared model before it runs (``ready``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from zimage_core import ZImage

from .api import io

CATEGORY = "Z-Image Turbo"
ZTurboModel = io.Custom("ZTURBO_MODEL")
MODEL_TOOLTIP = "The Z-Image Turbo model from the Z-Image Turbo Loader (or the Precision Guard node)."


@dataclass(frozen=True)
class ModelHandle:
    zimage: ZImage
    guard: str | None = None  # None: the core default (auto with fp16 compute, else off)

    def with_guard(self, policy: str) -> "ModelHandle":
        return replace(self, guard=policy)

    def ready(self, guard_override: str | None = None) -> ZImage:
        """The model with this handle's precision-guard policy (or ``guard_override``) attached."""
        zimage = self.zimage
        policy = guard_override or self.guard or zimage.default_guard_policy()
        current = zimage.guard.policy if zimage.guard is not None else "off"
        if policy != current:
            zimage.set_precision_guard(policy)
            zimage.prompt_encoder.clear_cache()  # embeddings made under the old policy may hold its overflow
        return zimage

    def __repr__(self) -> str:  # shown by ComfyUI in error reports
        return f"ZTurboModel({self.zimage.policy.describe()} on {self.zimage.device}, guard={self.guard or 'default'})"


def make_room(nbytes: int, device: torch.device) -> None:
    """Ask ComfyUI to unload its own models until ``nbytes`` are free on ``device`` (ours are not tracked by it)."""
    if torch.device(device).type == "cpu":
        return
    import comfy.model_management as mm

    mm.free_memory(nbytes, torch.device(device))
