"""flash-attn (Dao-AILab) backend, used on a GPU when the package is importable.

Paged reads through ``block_table`` need ``kvcache_block_size`` to be a multiple of 256 in
flash-attn 2.
"""

from __future__ import annotations

from nanovllm.attention.backend import AttentionBackend
from nanovllm.attention.metadata import AttentionMetadata


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"
    graph_safe = True

    def __init__(self):
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        from nanovllm.kernels.triton_attention import store_kvcache

        self._varlen, self._with_kvcache = flash_attn_varlen_func, flash_attn_with_kvcache
        self.store_kvcache = store_kvcache  # flash-attn has no paged store; ours is graph-safe

    def prefill(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        if meta.block_tables is not None:
            k, v = k_cache, v_cache
        return self._varlen(
            q,
            k,
            v,
            cu_seqlens_q=meta.cu_seqlens_q,
            cu_seqlens_k=meta.cu_seqlens_k,
            max_seqlen_q=meta.max_seqlen_q,
            max_seqlen_k=meta.max_seqlen_k,
            softmax_scale=scale,
            causal=True,
            block_table=meta.block_tables,
        )

    def decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        o = self._with_kvcache(
            q.unsqueeze(1),
            k_cache,
            v_cache,
            cache_seqlens=meta.context_lens,
            block_table=meta.block_tables,
            softmax_scale=scale,
            causal=True,
        )
        return o.squeeze(1)
