"""Torch reference attention: plain tensor ops, runs anywhere (CPU, and GPU as a fallback).

It synchronises with the host (boolean indexing, per-sequence loops), so the model runner never
captures it in a CUDA graph. An fp8 cache is dequantized to float32 before the matmuls.
"""

from __future__ import annotations

import torch

from nanovllm.attention.backend import AttentionBackend
from nanovllm.attention.metadata import AttentionMetadata

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_kv(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """``x`` as the cache stores it: fp8 holds ``clamp(x / scale, -448, 448)`` (saturating, not
    NaN, out of range), any other dtype a plain cast. Shape unchanged."""
    if dtype != FP8:
        return x.to(dtype)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(dtype)


def dequantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Cache values as numbers: fp8 to float32 times ``scale``; other dtypes unchanged."""
    if x.dtype != FP8:
        return x
    return x.float() * scale


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Keys [0, num_keys) of one sequence: [num_keys, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = (num_keys + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [num_blocks, block_size, kvh, d]
    return blocks.flatten(0, 1)[:num_keys]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float):
    """q [..., H, Lq, D], k/v [..., H, Lk, D], mask [..., H, Lq, Lk]-broadcastable (True: keep)."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no key (padding) -> 0
    return torch.matmul(probs, v.float())


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    graph_safe = False  # host syncs (boolean indexing, per-sequence loops)
    fp8_kv_cache = True

    def store_kvcache(
        self, k, v, k_cache, v_cache, slot_mapping, k_scale: float = 1.0, v_scale: float = 1.0
    ) -> None:
        valid = slot_mapping >= 0  # boolean indexing syncs: the torch backend runs eagerly
        slots = slot_mapping[valid].long()
        k_rows = quantize_kv(k[valid], k_cache.dtype, k_scale)  # [num_valid, kvh, d]
        v_rows = quantize_kv(v[valid], v_cache.dtype, v_scale)
        k_cache.view(-1, *k_cache.shape[2:])[slots] = k_rows
        v_cache.view(-1, *v_cache.shape[2:])[slots] = v_rows

    def prefill(
        self,
        q,
        k,
        v,
        k_cache,
        v_cache,
        meta: AttentionMetadata,
        scale: float,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ):
        num_heads, num_kv_heads = q.shape[1], k.shape[1]
        group = num_heads // num_kv_heads
        out = torch.empty_like(q)
        cu_q = meta.cu_seqlens_q.tolist()
        cu_k = meta.cu_seqlens_k.tolist()
        for i in range(len(cu_q) - 1):
            q_i = q[cu_q[i] : cu_q[i + 1]]
            len_q, len_k = q_i.shape[0], cu_k[i + 1] - cu_k[i]
            if meta.block_tables is None:
                k_i, v_i = k[cu_k[i] : cu_k[i + 1]], v[cu_k[i] : cu_k[i + 1]]
            else:
                k_i = dequantize_kv(gather_paged(k_cache, meta.block_tables[i], len_k), k_scale)
                v_i = dequantize_kv(gather_paged(v_cache, meta.block_tables[i], len_k), v_scale)
            k_i = k_i.repeat_interleave(group, dim=1)
            v_i = v_i.repeat_interleave(group, dim=1)
            q_pos = torch.arange(len_q, device=q.device) + (len_k - len_q)
            mask = q_pos[:, None] >= torch.arange(len_k, device=q.device)[None, :]
            o = _attend(q_i.transpose(0, 1), k_i.transpose(0, 1), v_i.transpose(0, 1), mask, scale)
            out[cu_q[i] : cu_q[i + 1]] = o.transpose(0, 1).to(q.dtype)
        return out

    def decode(
        self,
        q,
        k_cache,
        v_cache,
        meta: AttentionMetadata,
        scale: float,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ):
        num_seqs, num_heads, head_dim = q.shape
        num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
        group = num_heads // num_kv_heads
        tables = meta.block_tables.clamp(min=0).long()  # [num_seqs, max_blocks]
        max_keys = tables.shape[1] * block_size
        k = k_cache[tables].view(num_seqs, max_keys, num_kv_heads, head_dim)
        v = v_cache[tables].view(num_seqs, max_keys, num_kv_heads, head_dim)
        k, v = dequantize_kv(k, k_scale), dequantize_kv(v, v_scale)
        # [num_seqs, kvh, group, 1, d] x [num_seqs, kvh, 1, max_keys, d]
        qg = q.view(num_seqs, num_kv_heads, group, 1, head_dim)
        kg = k.permute(0, 2, 1, 3).unsqueeze(2)
        vg = v.permute(0, 2, 1, 3).unsqueeze(2)
        keys = torch.arange(max_keys, device=q.device)
        mask = (keys[None, :] < meta.context_lens[:, None]).view(num_seqs, 1, 1, 1, max_keys)
        o = _attend(qg, kg, vg, mask, scale)  # [num_seqs, kvh, group, 1, d]
        return o.view(num_seqs, num_heads, head_dim).to(q.dtype)
