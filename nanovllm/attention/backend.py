"""The attention-backend interface: three operations over a paged KV cache.

KV cache layout, per layer: ``k_cache`` / ``v_cache`` are [num_blocks, block_size, num_kv_heads,
head_dim]. Heads are grouped (GQA): query head h reads KV head ``h // (num_heads // num_kv_heads)``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from nanovllm.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def store_kvcache(
        self,
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [num_tokens]; -1 = skip
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
    ) -> torch.Tensor: ...  # [num_tokens, num_heads, head_dim]

    def decode(
        self,
        q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor: ...  # [num_seqs, num_heads, head_dim]
