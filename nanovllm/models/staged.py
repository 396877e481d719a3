"""The staged-decoder interface: what the decode pipeline needs from a model.

A decode step of a pre-norm decoder is cut, per layer, into the parts the pipeline places on
different SM partitions: the GEMM-bound parts (embedding, input norm and QKV projection, o_proj
and FFN, final norm) and the memory-bound part (KV store and paged attention). A model
implements these once; ``forward`` must equal their composition (tests check it bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from nanovllm.attention.metadata import AttentionMetadata

# (hidden_states, residual), each [num_tokens, hidden]; residual None before the first layer.
Hidden = tuple[torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class AttentionShape:
    """This rank's attention shapes, for buffers that carry q/k/v/o between stages."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int


class StagedDecoder(Protocol):
    num_layers: int

    def attention_shape(self) -> AttentionShape: ...

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def qkv(
        self, layer: int, positions: torch.Tensor, hidden_states: torch.Tensor, residual
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input norm (+ residual add), QKV projection, rotary -> (q, k, v, residual):
        q [num_tokens, num_heads, head_dim], k/v [num_tokens, num_kv_heads, head_dim]."""

    def attend(self, layer: int, q, k, v, meta: AttentionMetadata, backend=None) -> torch.Tensor:
        """KV store and attention -> [num_tokens, num_heads * head_dim]; ``backend`` overrides
        the engine's attention backend (a kernel chosen for an SM partition)."""

    def post_attention(self, layer: int, attn_out: torch.Tensor, residual) -> Hidden:
        """o_proj, post-attention norm (+ residual add) and the FFN."""

    def final_norm(self, hidden_states: torch.Tensor, residual) -> torch.Tensor: ...

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor: ...
