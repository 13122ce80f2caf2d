"""Prompt encoding: the output of Qwen3's second-to-last layer, one ``[L, hidden]`` tensor per prompt.

Each prompt is encoded alone, without padding: attention is causal, so this equals the reference's
padded batch with its pad positions dropped. Results are cached per (prompt, encoder). On CUDA the
encoder replays a CUDA graph per length bucket (``cuda_graphs.EncoderGraphs``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .cuda_graphs import EncoderGraphs, graphs_usable
from .tokenizer import PromptTokenizer


class PromptEncoder:
    """Tokenizer + truncated Qwen3 (see ``loading.load_text_encoder``) with an LRU cache of embeddings."""

    def __init__(self, tokenizer: PromptTokenizer, text_encoder: torch.nn.Module, cache_size: int = 64,
                 device: torch.device | str | None = None):
        self.tokenizer = tokenizer
        self._device = torch.device(device) if device is not None else None
        self.text_encoder = text_encoder
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.guard = None  # set by the precision guard
        self.graphs = EncoderGraphs() if self.device.type == "cuda" else None

    @property
    def device(self) -> torch.device:
        """Where the encoder runs (its weights may live on the CPU under offload)."""
        return self._device or next(self.text_encoder.parameters()).device

    @torch.no_grad()
    def encode_one(self, prompt: str) -> torch.Tensor:
        if prompt in self._cache:
            self._cache.move_to_end(prompt)
            return self._cache[prompt]
        ids = torch.tensor([self.tokenizer(prompt)], dtype=torch.long)
        if self.guard is not None:
            embedding = self.guard.guarded_call("text_encoder", self.forward, ids)
        else:
            embedding = self.forward(ids)
        self._cache[prompt] = embedding
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return embedding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.device)
        if self.graphs is not None and graphs_usable(self.text_encoder, self.guard):
            out = self.graphs(self.text_encoder, ids, self._run)
            if out is not None:
                return out
        return self._run(ids)[:ids.shape[1]]

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids=ids, use_cache=False).last_hidden_state[0]

    def encode(self, prompts: list[str] | str) -> list[torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return [self.encode_one(p) for p in prompts]

    def clear_cache(self) -> None:
        self._cache.clear()
