"""The transformer call of one sampling step, for Z-Image's plain text-to-image mode (the reference path).

It runs the blocks of diffusers' ``ZImageTransformer2DModel`` in the order of its ``forward`` and with its
own helpers (patchify, padding, RoPE, unpatchify), so the numbers are the reference's. What differs:
the caption embedder and caption refiner, which do not depend on the step, run once per generation in
``prepare``; attention goes through the package's one dispatch (``attention.backend_context``); the precision
guard, when given, wraps the blocks themselves (``guard.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import backend_context, check_backend
from .weights import transformer_blocks  # noqa: F401  (re-exported: the block order is part of this API)

PATCH, F_PATCH = 2, 1


@dataclass
class DenoiseContext:
    """Per-generation state: caption stream and padded caption features, shared by every step."""

    cap_feats: list[torch.Tensor]
    cap_stream: torch.Tensor
    cap_seqlens: list[int]
    cap_freqs: torch.Tensor
    extras: dict = field(default_factory=dict)


class Denoiser:
    """Predicts the flow velocity for a batch of latents with the transformer (output sign as the model's).

    ``dtype`` is the compute dtype, ``guard`` the precision guard in force (or None); both are fixed for the
    denoiser's life: a new guard or new speed options make a new denoiser (cheap: the weights' owner keeps
    the fused views, compiled code is shared).
    """

    context_type = DenoiseContext  # what ``prepare`` returns

    def __init__(self, transformer: torch.nn.Module, device: torch.device | str | None = None, *,
                 dtype: torch.dtype | None = None, attention: str = "auto", guard=None):
        self.transformer = transformer
        self._device = torch.device(device) if device is not None else None
        self._dtype = dtype
        self.attention = check_backend(attention)
        self.guard = guard

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype or self.transformer.x_pad_token.dtype

    @property
    def device(self) -> torch.device:
        """Where the computation runs (the weights may live on the CPU under offload)."""
        return self._device or self.transformer.x_pad_token.device

    def prepare(self, cap_feats: list[torch.Tensor]) -> DenoiseContext:
        """Embed and refine the captions once; they are the same at every step."""
        if self.guard is not None:
            return self.guard.guarded_call("transformer", self._prepare, cap_feats, check=lambda c: c.cap_stream)
        return self._prepare(cap_feats)

    @torch.no_grad()
    def _prepare(self, cap_feats: list[torch.Tensor]) -> DenoiseContext:
        t = self.transformer
        device = self.device
        cap_feats = [c.to(device=device, dtype=self.dtype) for c in cap_feats]
        dummy = [torch.zeros(t.in_channels, 1, PATCH, PATCH, device=device, dtype=self.dtype)] * len(cap_feats)
        _, caps, _, _, cap_pos_ids, _, cap_pad_mask = t.patchify_and_embed(dummy, cap_feats, PATCH, F_PATCH)
        cap_seqlens = [len(c) for c in caps]
        cap = t.cap_embedder(torch.cat(caps, dim=0))
        cap, cap_freqs, cap_mask, _, _ = t._prepare_sequence(
            list(cap.split(cap_seqlens, dim=0)), cap_pos_ids, cap_pad_mask, t.cap_pad_token, None, device
        )
        with backend_context(self.attention):
            for layer in t.context_refiner:
                cap = layer(cap, cap_mask, cap_freqs)
        return self.context_type(cap_feats=cap_feats, cap_stream=cap, cap_seqlens=cap_seqlens, cap_freqs=cap_freqs)

    @torch.no_grad()
    def forward(self, ctx: DenoiseContext, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Model output for latents ``[B, C, h, w]`` (any float dtype) at ``timestep`` = 1 - sigma, shape [B]."""
        t = self.transformer
        device = self.device
        x = list(latents.to(device=device, dtype=self.dtype).unsqueeze(2).unbind(0))
        adaln_input = t.t_embedder(timestep.to(device) * t.t_scale).type_as(x[0])
        x, _, x_size, x_pos_ids, _, x_pad_mask, _ = t.patchify_and_embed(x, ctx.cap_feats, PATCH, F_PATCH)
        x_seqlens = [len(xi) for xi in x]
        x = t.all_x_embedder[f"{PATCH}-{F_PATCH}"](torch.cat(x, dim=0))
        x, x_freqs, x_mask, _, _ = t._prepare_sequence(
            list(x.split(x_seqlens, dim=0)), x_pos_ids, x_pad_mask, t.x_pad_token, None, device
        )
        with backend_context(self.attention):
            for layer in t.noise_refiner:
                x = layer(x, x_mask, x_freqs, adaln_input)
            unified, unified_freqs, unified_mask, _ = t._build_unified_sequence(
                x, x_freqs, x_seqlens, None, ctx.cap_stream, ctx.cap_freqs, ctx.cap_seqlens, None,
                None, None, None, None, False, device,
            )
            for layer in t.layers:
                unified = layer(unified, unified_mask, unified_freqs, adaln_input)
        unified = t.all_final_layer[f"{PATCH}-{F_PATCH}"](unified, c=adaln_input)
        out = t.unpatchify(list(unified.unbind(dim=0)), x_size, PATCH, F_PATCH)
        return torch.stack(out, dim=0).squeeze(2)

    def __call__(self, ctx: DenoiseContext, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.forward(ctx, latents, timestep)
