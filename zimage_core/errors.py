"""User-facing errors.

Every error a user can cause (bad size, missing file, wrong checkpoint, unsupported dtype) is a
``ZImageError``: a ``ValueError`` whose message names the input, the allowed range and the fix.
ComfyUI shows the message of a ``ValueError`` raised by a node as the node's error text.
"""


class ZImageError(ValueError):
    """A problem with the user's input, with a message that says how to fix it."""


class GenerationCancelled(RuntimeError):
    """The per-step callback asked the sampler to stop."""
