"""The ComfyUI API this pack is written against.

The V3 node API is imported from the pinned ``comfy_api.v0_0_2`` when the running ComfyUI has it, else from
``comfy_api.latest``. ComfyUI 0.3.75 ships both, and its ``v0_0_2`` re-exports ``latest``'s ``io``, ``ui`` and
``ComfyExtension``, so today they are the same objects. The pinned name is the one ComfyUI keeps
compatible when ``latest`` changes (old versions get adapters); ``latest`` is the fallback for a ComfyUI in
which the pinned module is gone.
"""

try:
    from comfy_api.v0_0_2 import ComfyExtension, io, ui
except ImportError:  # a ComfyUI without the pinned version
    from comfy_api.latest import ComfyExtension, io, ui

__all__ = ["ComfyExtension", "io", "ui"]
