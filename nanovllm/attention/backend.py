"""The attention-backend interface: three operations over a paged KV cache, plus what a backend
owns around them: building its per-step metadata from a step plan, the static metadata buffers
its decode step is captured over, and whether a CUDA graph can capture it.

KV cache layout, per layer: ``k_cache`` / ``v_cache`` are [num_blocks, block_size, num_kv_heads,
head_dim]. Heads are grouped (GQA): query head h reads KV head ``h // (num_heads // num_kv_heads)``.

The cache is in the model dtype or float8 e4m3 (``kv_cache_dtype="fp8"``). With fp8, a store
writes ``clamp(k / k_scale, -448, 448)`` and reads dequantize ``stored * k_scale`` (the same for
V with ``v_scale``); ``k_scale`` / ``v_scale`` are per-layer scalars, passed by keyword with an
fp8 cache only (the Attention layer keeps the plain calls for a cache in the model dtype). A
backend that reads fp8 caches sets ``fp8_kv_cache = True``.
"""

from __future__ import annotations

import torch

from nanovllm.attention.metadata import AttentionMetadata
from nanovllm.utils.tensors import to_device


class DecodeMetadataBuffers:
    """Static decode metadata for up to ``max_num_seqs`` rows, the inputs a captured decode
    graph reads; ``max_blocks`` covers ``max_model_len``. Rows past the live batch are padding:
    slot -1, context length 0. Made in inference mode, like every tensor a step passes to the
    model: torch.compile guards on that."""

    @torch.inference_mode()
    def __init__(self, max_num_seqs: int, max_blocks: int, device: torch.device):
        self.slot_mapping = torch.full((max_num_seqs,), -1, dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(max_num_seqs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_num_seqs, max_blocks, dtype=torch.int32, device=device)

    def meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            is_prefill=False,
            slot_mapping=self.slot_mapping[:bs],
            context_lens=self.context_lens[:bs],
            block_tables=self.block_tables[:bs],
        )

    def load(self, meta: AttentionMetadata, n: int, bs: int) -> None:
        """Copy ``n`` live rows of ``meta`` in and pad up to the bucket ``bs``."""
        self.slot_mapping[:n] = meta.slot_mapping
        self.slot_mapping[n:bs] = -1
        self.context_lens[:n] = meta.context_lens
        self.context_lens[n:bs] = 0
        width = meta.block_tables.shape[1]
        # Entries past a row's context are never read, so stale columns need no clearing.
        self.block_tables[:n, :width] = meta.block_tables.clamp(min=0)


class AttentionBackend:
    """Base of every backend. ``graph_safe``: the decode path never synchronises with the host,
    so the model runner may capture it in a CUDA graph."""

    name: str = ""
    graph_safe: bool = False

    # -- metadata ----------------------------------------------------------------------------
    def build_metadata(self, plan, device: torch.device) -> AttentionMetadata:
        """The metadata of one step from its plan (``engine.model_inputs.StepPlan``: plain
        lists), on ``device``."""
        i32 = torch.int32
        tables = plan.block_tables
        slots = to_device(plan.slot_mapping, i32, device)
        if not plan.is_prefill:
            return AttentionMetadata(
                is_prefill=False,
                slot_mapping=slots,
                context_lens=to_device(plan.context_lens, i32, device),
                block_tables=to_device(tables, i32, device),
            )
        d = plan.num_decode_rows  # a mixed step: its decode rows' tables come first
        decode = None
        if d:
            # Two tensors, not two views of one: the prefill rows' view would start 4 * d * width
            # bytes in, and Triton specialises kernels on 16-byte pointer alignment (a second
            # compile of the prefill kernel in the middle of a run).
            decode = AttentionMetadata(
                is_prefill=False,
                slot_mapping=slots[:d],
                context_lens=to_device(plan.context_lens, i32, device),
                block_tables=to_device(tables[:d], i32, device),
            )
            tables = to_device(tables[d:], i32, device) if len(tables) > d else None
        elif tables is not None:
            tables = to_device(tables, i32, device)
        return AttentionMetadata(
            is_prefill=True,
            slot_mapping=slots,
            cu_seqlens_q=to_device(plan.cu_seqlens_q, i32, device),
            cu_seqlens_k=to_device(plan.cu_seqlens_k, i32, device),
            max_seqlen_q=plan.max_seqlen_q,
            max_seqlen_k=plan.max_seqlen_k,
            block_tables=tables,
            decode=decode,
        )

    def decode_buffers(
        self, max_num_seqs: int, max_blocks: int, device: torch.device
    ) -> DecodeMetadataBuffers:
        return DecodeMetadataBuffers(max_num_seqs, max_blocks, device)

    # -- a step's attention --------------------------------------------------------------------
    def attend(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        **scales: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """The attention of one step whose new K/V are stored already: decode, prefill, or a
        mixed step in two launches (its decode rows through ``decode``, the prefill rows after
        them through ``prefill``; each row's keys are in the cache or the new tokens)."""
        if not meta.is_prefill:
            return self.decode(q, k_cache, v_cache, meta, scale, **scales)
        d = meta.num_decode_tokens
        if not d:
            return self.prefill(q, k, v, k_cache, v_cache, meta, scale, **scales)
        out = torch.empty_like(q)
        out[:d] = self.decode(q[:d], k_cache, v_cache, meta.decode, scale, **scales)
        out[d:] = self.prefill(q[d:], k[d:], v[d:], k_cache, v_cache, meta, scale, **scales)
        return out

    # -- kernels -----------------------------------------------------------------------------
    def store_kvcache(
        self,
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [num_tokens]; -1 = skip
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> None:
        raise NotImplementedError

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
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        raise NotImplementedError

    def decode(
        self,
        q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
        raise NotImplementedError
