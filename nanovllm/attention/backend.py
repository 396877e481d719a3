"""The attention-backend interface: three operations over a paged KV cache.

KV cache layout, per layer: ``k_cache`` / ``v_cache`` are [num_blocks, block_size, num_kv_heads,
head_dim]. Heads are grouped (GQA): query head h reads KV head ``h // (num_heads // num_kv_heads)``.

The cache is in the model dtype or float8 e4m3 (``kv_cache_dtype="fp8"``). With fp8, a store
writes ``clamp(k / k_scale, -448, 448)`` and reads dequantize ``stored * k_scale`` (the same for
V with ``v_scale``); ``k_scale`` / ``v_scale`` are per-layer scalars, passed by keyword with an
fp8 cache only (the Attention layer keeps the plain calls for a cache in the model dtype). A
backend that reads fp8 caches sets ``fp8_kv_cache = True``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from nanovllm.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str
    fp8_kv_cache: bool  # reads and writes float8 e4m3 caches

    def store_kvcache(
        self,
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [num_tokens]; -1 = skip
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> None: ...

    def prefill(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor: ...  # [num_tokens, num_heads, head_dim]

    def decode(
        self,
        q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor: ...  # [num_seqs, num_heads, head_dim]
