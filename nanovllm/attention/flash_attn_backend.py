"""flash-attn (Dao-AILab) backend, used on a GPU when the package is importable.

Paged reads through ``block_table`` need ``kvcache_block_size`` to be a multiple of 256 in
flash-attn 2. It reads bf16/fp16 caches only: ``kv_cache_dtype="fp8"`` is refused at start-up
(``Config`` when this backend is forced, ``engine/kv_cache.py`` when it was picked automatically).
"""

from __future__ import annotations

from nanovllm.attention.backend import AttentionBackend
from nanovllm.attention.metadata import AttentionMetadata


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"
    graph_safe = True
    fp8_kv_cache = False

    def __init__(self):
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

        from nanovllm.kernels.triton_attention import store_kvcache

        self._varlen, self._with_kvcache = flash_attn_varlen_func, flash_attn_with_kvcache
        self.store_kvcache = store_kvcache  # flash-attn has no paged store; ours is graph-safe

    def prefill(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, **_scales):
        # **_scales: k_scale / v_scale of the interface, 1.0 for the caches this backend reads
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

    def decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, **_scales):
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
