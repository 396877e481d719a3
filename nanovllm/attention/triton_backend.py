"""Triton attention backend: paged KV-cache writes, varlen prefill and split-KV decode.

Decode has no host sync (split count from shapes only), so the model runner can capture it in a
CUDA graph. On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch

from nanovllm.attention.backend import AttentionBackend
from nanovllm.attention.metadata import AttentionMetadata
from nanovllm.kernels import triton_attention as kernels

DECODE_KERNELS = ("triton", "tma")


class TritonAttentionBackend(AttentionBackend):
    """``decode_kernel="tma"``: decode attention's first stage on the Hopper copy engine
    (``kernels/tma_decode.py``) where a call qualifies, faster per SM, which is what a small SM
    partition needs; the Triton kernel elsewhere. The pipeline makes this variant for its
    attention partition."""

    name = "triton"
    graph_safe = True
    fp8_kv_cache = True  # float8e4nv: sm_89+ on NVIDIA GPUs (checked at KV allocation)

    def __init__(self, decode_kernel: str = "triton"):
        if decode_kernel not in DECODE_KERNELS:
            raise ValueError(f"decode_kernel={decode_kernel!r}: use one of {DECODE_KERNELS}")
        self.decode_kernel = decode_kernel
        self._decode_config = kernels.DecodeConfig(tma=True) if decode_kernel == "tma" else None

    def store_kvcache(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> None:
        kernels.store_kvcache(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        return kernels.prefill_attention(
            q,
            k,
            v,
            k_cache,
            v_cache,
            meta.cu_seqlens_q,
            meta.cu_seqlens_k,
            meta.max_seqlen_q,
            meta.block_tables,
            scale,
            k_scale=k_scale,
            v_scale=v_scale,
        )

    def decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor:
        return kernels.paged_decode_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.context_lens,
            scale,
            config=self._decode_config,
            k_scale=k_scale,
            v_scale=v_scale,
        )
