"""Triton attention kernels over a paged KV cache, and their launchers.

KV cache layout (per layer): ``k_cache`` / ``v_cache`` are [num_blocks, block_size, num_kv_heads,
head_dim] with a contiguous last dim; block tables map a sequence's logical block i to a physical
block. Query head h reads KV head ``h // group`` with ``group = num_heads // num_kv_heads``.

- ``store_kvcache``: scatter new K/V rows into cache slots (slot -1 = skip).
- ``paged_decode_attention``: one query token per sequence, flash-decoding (split-KV): stage 1
  computes a partial softmax-weighted sum and its log-sum-exp per (sequence, KV head, split);
  stage 2 merges the splits. The number of splits depends on shapes only, so the call has no host
  sync and can be captured in a CUDA graph.
- ``prefill_attention``: variable-length causal attention; keys come from the paged cache (prefix
  hits, chunked prefill) or, without block tables, straight from the new K/V.

Softmax runs in base 2 (``exp2``) with the scale folded into ``scale * log2(e)``; everything is
accumulated in fp32.

FP8 caches (``torch.float8_e4m3fn``, Triton's ``float8e4nv``: sm_89+ on NVIDIA): the store
writes ``clamp(k / k_scale, -448, 448)``; the readers convert each loaded tile to q's dtype
(exact: every e4m3 value is a bf16/fp16/fp32 value) before the dots, fold the per-layer
``k_scale`` into the softmax scale and multiply the output by ``v_scale``. For a cache in the
model dtype the conversions are no-ops and the scales 1.0.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)

LOG2E = 1.4426950408889634
FP8_KV_DTYPE = torch.float8_e4m3fn

# Split-KV policy: aim for this many stage-1 programs per SM (a few waves, so that programs with
# short contexts do not leave SMs idle), never cut a sequence's keys into splits of fewer than
# MIN_KEYS_PER_SPLIT keys (measured on the table width), and cap the stage-2 fan-in.
PROGRAMS_PER_SM = 4
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 64


# --------------------------------------------------------------------------------------------
# KV-cache write
# --------------------------------------------------------------------------------------------


@triton.jit
def _store_kvcache_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    k_scale_inv,
    v_scale_inv,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    KV_BLOCK_SIZE: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    # One program per token: all its KV heads, [BLOCK_H, HEAD_DIM].
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    blk = slot // KV_BLOCK_SIZE
    off = slot % KV_BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    # Slot -1 masks every lane. The slot is broadcast to a vector before the `&`: the Triton
    # interpreter turns (block & scalar) masks into int32 and rejects them.
    slot_vec = tl.zeros([BLOCK_H], dtype=tl.int64) + slot
    mask = ((offs_h < NUM_KV_HEADS) & (slot_vec >= 0))[:, None]
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    if KV_FP8:  # scale into the e4m3 range and saturate there (448 = its largest finite value)
        k = tl.minimum(tl.maximum(k.to(tl.float32) * k_scale_inv, -448.0), 448.0)
        v = tl.minimum(tl.maximum(v.to(tl.float32) * v_scale_inv, -448.0), 448.0)
    kc = k_cache_ptr + blk * stride_kcb + off * stride_kcs
    vc = v_cache_ptr + blk * stride_vcb + off * stride_vcs
    tl.store(
        kc + offs_h[:, None] * stride_kch + offs_d[None, :],
        k.to(k_cache_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        vc + offs_h[:, None] * stride_vch + offs_d[None, :],
        v.to(v_cache_ptr.dtype.element_ty),
        mask=mask,
    )


def store_kvcache(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], any token/head strides
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64; -1 = skip
    k_scale: float = 1.0,  # fp8 caches: stored = clamp(k / k_scale, -448, 448)
    v_scale: float = 1.0,
) -> None:
    if k_cache.numel() == 0:  # warm-up pass before the KV cache exists
        return
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _check_head_dim(head_dim)
    assert k.stride(2) == 1 and v.stride(2) == 1, "k/v need a contiguous head_dim"
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "KV cache needs a contiguous head_dim"
    assert k_cache.shape[2:] == (num_kv_heads, head_dim) and v_cache.shape == k_cache.shape
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.is_contiguous()
    _store_kvcache_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        1.0 / k_scale,
        1.0 / v_scale,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        KV_BLOCK_SIZE=k_cache.shape[1],
        KV_FP8=k_cache.dtype == FP8_KV_DTYPE,
    )


# --------------------------------------------------------------------------------------------
# Decode: split-KV, GQA-packed
# --------------------------------------------------------------------------------------------


@triton.jit
def _online_softmax_step(q, k, v, offs_t, num_valid, m_i, l_i, acc, scale_log2e):
    """One [BLOCK_N]-key tile of flash-decoding (keys offs_t < num_valid are real): returns the
    updated (m_i, l_i, acc). k/v tiles of an fp8 cache are converted to q's dtype (fp16 then)
    first; their scales are applied outside: k_scale in scale_log2e, v_scale to the output."""
    k = k.to(q.dtype)  # [BLOCK_N, HEAD_DIM]; no-op unless the cache is fp8
    v = v.to(q.dtype)
    s = tl.dot(q, tl.trans(k)) * scale_log2e  # [BLOCK_H, BLOCK_N], log2 domain
    s = tl.where((offs_t < num_valid)[None, :], s, float("-inf"))
    # Every tile holds at least one valid key, so m_new is finite and nothing is NaN.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


# Block tables are as wide as the batch's longest sequence needs, so their row stride changes from
# step to step; specialised on its value it would compile new variants in the middle of a run.
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    o_ptr,
    part_o_ptr,
    part_lse_ptr,
    scale_log2e,
    v_scale,
    stride_qs,
    stride_qh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_bt,
    stride_os,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    KV_BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PREFETCH_TABLE: tl.constexpr,
    TILE_IN_BLOCK: tl.constexpr,
):
    # Program (seq, kv_head, split): the GROUP query heads sharing one KV head are packed into
    # the rows of a [BLOCK_H, HEAD_DIM] tile (BLOCK_H >= 16 for tl.dot, padded rows masked), so
    # each K/V byte of the split is read from HBM once.
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    ctx = tl.load(context_lens_ptr + seq)
    # Splits are cut from this sequence's own length, in whole tiles: every split except the
    # last is full, and only the last tile of a split is partial.
    split_len = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, ctx)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    head = kvh * GROUP + offs_h
    h_mask = offs_h < GROUP
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_qs + head[:, None] * stride_qh + offs_d[None, :],
        mask=h_mask[:, None],
        other=0.0,
    )  # [BLOCK_H, HEAD_DIM]
    if k_cache_ptr.dtype.element_ty.primitive_bitwidth == 8 and q.dtype == tl.bfloat16:
        # An fp8 (e4m3) cache under bf16 queries: the dots run in fp16. e4m3 pairs convert to
        # fp16 in one instruction, to bf16 only through fp16 and two more, and on a cache half
        # the size of a bf16 one those conversions, not the bytes, would bound the kernel.
        # bf16 queries are exact in fp16 at their magnitudes; the probabilities round finer.
        q = q.to(tl.float16)

    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
    offs_t = tl.arange(0, BLOCK_N)
    if TILE_IN_BLOCK:
        # BLOCK_N divides the cache block size and splits start on tile boundaries, so a tile
        # lies in one cache block: one block id per tile, and the tile's element offsets are
        # loop-invariant ([BLOCK_N, HEAD_DIM], hoisted), leaving one scalar add per tile for
        # the addresses. Full tiles load without masks; at most the last one is partial. This
        # halves the instructions per byte, which is what limits the kernel on a partition of
        # few SMs.
        k_tile = k_cache_ptr + kvh * stride_kch + offs_t[:, None] * stride_kcs + offs_d[None, :]
        v_tile = v_cache_ptr + kvh * stride_vch + offs_t[:, None] * stride_vcs + offs_d[None, :]
        full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N  # empty split: start
        # The block id comes one tile ahead (a loop-carried scalar), so the K/V loads depend on
        # no load of their own iteration and get all num_stages - 1 stages of prefetch.
        blk_next = tl.load(table + start // KV_BLOCK_SIZE, mask=start < end, other=0)
        for n0 in range(start, full_end, BLOCK_N):
            blk = blk_next.to(tl.int64)
            nxt = n0 + BLOCK_N
            blk_next = tl.load(table + nxt // KV_BLOCK_SIZE, mask=nxt < end, other=0)
            pos = n0 % KV_BLOCK_SIZE
            k = tl.load(k_tile + (blk * stride_kcb + pos * stride_kcs))
            v = tl.load(v_tile + (blk * stride_vcb + pos * stride_vcs))
            m_i, l_i, acc = _online_softmax_step(
                q, k, v, offs_t, BLOCK_N, m_i, l_i, acc, scale_log2e
            )
        if full_end < end:
            blk = blk_next.to(tl.int64)
            pos = full_end % KV_BLOCK_SIZE
            n_mask = (full_end + offs_t < end)[:, None]
            k = tl.load(k_tile + (blk * stride_kcb + pos * stride_kcs), mask=n_mask, other=0.0)
            v = tl.load(v_tile + (blk * stride_vcb + pos * stride_vcs), mask=n_mask, other=0.0)
            m_i, l_i, acc = _online_softmax_step(
                q, k, v, offs_t, end - full_end, m_i, l_i, acc, scale_log2e
            )
    else:
        # A tile may span several cache blocks (block_size < BLOCK_N): block ids are per token.
        blk_next = tl.load(
            table + (start + offs_t) // KV_BLOCK_SIZE, mask=start + offs_t < end, other=0
        )
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + offs_t
            if PREFETCH_TABLE:
                # Block ids come one iteration ahead through a loop-carried value: the K/V loads
                # then depend on no load of their own iteration, and Triton's pipeliner gives
                # them all num_stages - 1 stages of prefetch (an in-iteration index load would
                # count as a level of indirection and halve that).
                blk = blk_next.to(tl.int64)
                offs_next = offs_n + BLOCK_N
                blk_next = tl.load(
                    table + offs_next // KV_BLOCK_SIZE, mask=offs_next < end, other=0
                )
            else:
                blk = tl.load(table + offs_n // KV_BLOCK_SIZE, mask=offs_n < end, other=0).to(
                    tl.int64
                )
            n_mask = offs_n < end
            pos = offs_n % KV_BLOCK_SIZE
            k_row = blk * stride_kcb + pos * stride_kcs + kvh * stride_kch  # [BLOCK_N]
            v_row = blk * stride_vcb + pos * stride_vcs + kvh * stride_vch
            k = tl.load(
                k_cache_ptr + k_row[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0
            )
            v = tl.load(
                v_cache_ptr + v_row[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0
            )
            m_i, l_i, acc = _online_softmax_step(
                q, k, v, offs_t, end - n0, m_i, l_i, acc, scale_log2e
            )

    has_keys = l_i > 0.0  # False for empty splits and context_len 0 rows
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None] * v_scale  # v_scale: 1.0 unless fp8
    if NUM_SPLITS == 1:
        o = o_ptr + seq.to(tl.int64) * stride_os + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o, out.to(o_ptr.dtype.element_ty), mask=h_mask[:, None])
    else:
        # Partials are [num_seqs, NUM_HEADS, NUM_SPLITS, HEAD_DIM] / [num_seqs, NUM_HEADS,
        # NUM_SPLITS], contiguous. Empty splits store lse = -inf and zeros (stage 2 needs no
        # uninitialised memory).
        row = (seq.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + split  # [BLOCK_H]
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=h_mask)
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=h_mask[:, None])


@triton.jit
def _decode_merge_kernel(
    part_o_ptr,
    part_lse_ptr,
    o_ptr,
    stride_os,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # Program (seq, head): o = sum_s w_s * o_s / sum_s w_s with w_s = 2^(lse_s - max lse).
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    row = (seq * NUM_HEADS + head) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + row + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # all splits empty: weights 0
    w = tl.exp2(lse - lse_max)  # [BLOCK_S]
    live = lse > float("-inf")  # skip reading empty splits
    part = tl.load(
        part_o_ptr + (row + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=live[:, None],
        other=0.0,
    )  # [BLOCK_S, HEAD_DIM]
    w_sum = tl.sum(w, 0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(w_sum > 0.0, w_sum, 1.0)
    tl.store(o_ptr + seq * stride_os + head * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty))


@functools.cache
def _log_fallback_once(why: str) -> None:
    logger.info("decode attention: the Triton kernel, not the copy-engine one asked for: %s", why)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sm_count(device: torch.device) -> int:
    """SMs of ``device``; a small stand-in on CPU (interpreter) so several splits get tested."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_keys: int, num_sms: int) -> int:
    """Splits per (sequence, KV head), from shapes only (CUDA-graph safe).

    Enough stage-1 programs for about PROGRAMS_PER_SM per SM, but no split shorter than
    MIN_KEYS_PER_SPLIT keys of the table width ``max_keys`` and at most MAX_SPLITS; rounded to a
    power of two to bound the number of compiled variants.
    """
    want = triton.cdiv(PROGRAMS_PER_SM * num_sms, max(1, num_seqs * num_kv_heads))
    limit = min(MAX_SPLITS, max(1, max_keys // MIN_KEYS_PER_SPLIT))
    return min(triton.next_power_of_2(want), 1 << (limit.bit_length() - 1))


@dataclass(frozen=True)
class DecodeConfig:
    """Tile and pipelining knobs of the decode kernel (for tuning; defaults per device)."""

    block_n: int = 64  # keys per tile; K+V tile = 2 * block_n * head_dim * itemsize bytes
    num_warps: int = 4
    num_stages: int = 3  # tiles in flight per program = num_stages - 1
    prefetch_table: bool = True
    tile_in_block: bool = True  # one block id per tile when BLOCK_N divides the block size
    # Stage 1 on the Hopper copy engine (kernels/tma_decode.py) where the call qualifies (with
    # max(2, num_stages) tiles in flight; block_n and num_warps do not apply), the Triton kernel
    # otherwise. Faster per SM, which is what a small green partition needs.
    tma: bool = False


def default_decode_config(head_dim: int, is_gpu: bool) -> DecodeConfig:
    if not is_gpu:  # interpreter: small tiles so that tests cover multi-tile loops
        return DecodeConfig(block_n=16, num_stages=1)
    # bf16, head_dim 128: K+V tiles of 32 KB; 3 stages keep two of them (64 KB) in flight per
    # program within about 100 KB of shared memory, so two programs fit on one SM.
    return DecodeConfig(block_n=64 if head_dim <= 128 else 32)


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim], any seq/head strides
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32, -1 padded
    context_lens: torch.Tensor,  # [num_seqs] int32; 0 = padding row (output zeros)
    scale: float,
    *,
    num_splits: int | None = None,
    num_sms: int | None = None,
    config: DecodeConfig | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim], dtype of q
    """Flash-decoding over the paged cache. No host sync: safe inside CUDA-graph capture.

    ``num_splits`` overrides the shape-based choice (``choose_num_splits`` with ``num_sms``,
    default the device's SM count); ``config`` overrides the tile defaults (tuning, benchmarks).
    ``k_scale`` / ``v_scale`` dequantize an fp8 cache (values = stored * scale).
    """
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, kv_block_size = k_cache.shape[2], k_cache.shape[1]
    _check_head_dim(head_dim)
    assert num_heads % num_kv_heads == 0, f"{num_heads} heads vs {num_kv_heads} KV heads"
    assert q.stride(2) == 1, "q needs a contiguous head_dim"
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "KV cache needs a contiguous head_dim"
    assert k_cache.shape[3] == head_dim and v_cache.shape == k_cache.shape
    assert block_tables.shape[0] == num_seqs and context_lens.shape == (num_seqs,)
    assert block_tables.stride(1) == 1 or block_tables.shape[1] == 1, "tables: contiguous rows"
    assert context_lens.stride(0) == 1 or num_seqs == 1, "context_lens must be contiguous"
    group = num_heads // num_kv_heads
    out = torch.empty((num_seqs, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out

    is_gpu = q.device.type == "cuda"
    cfg = config or default_decode_config(head_dim, is_gpu)
    assert cfg.block_n >= 16 and cfg.block_n & (cfg.block_n - 1) == 0, "block_n: power of 2 >= 16"
    if num_splits is None:
        max_keys = block_tables.shape[1] * kv_block_size
        num_splits = choose_num_splits(
            num_seqs, num_kv_heads, max_keys, num_sms or device_sm_count(q.device)
        )
    if num_splits > 1:
        part_o = torch.empty(
            (num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty(
            (num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device
        )
    else:
        part_o = part_lse = out  # unused by the single-split variant

    if cfg.tma and is_gpu:
        from nanovllm.kernels import tma_decode

        why = tma_decode.supported(q, k_cache, v_cache)  # a reason for fp8 caches
        if why is None:
            tma_decode.decode_stage1(
                q, k_cache, v_cache, block_tables, context_lens, out, part_o, part_lse,
                scale * LOG2E, num_splits, stages=max(2, cfg.num_stages),
            )  # fmt: skip
            return out if num_splits == 1 else _merge(part_o, part_lse, out, num_splits)
        _log_fallback_once(why)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        part_o,
        part_lse,
        scale * k_scale * LOG2E,
        v_scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        NUM_HEADS=num_heads,
        GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        KV_BLOCK_SIZE=kv_block_size,
        BLOCK_N=cfg.block_n,
        NUM_SPLITS=num_splits,
        PREFETCH_TABLE=cfg.prefetch_table,
        TILE_IN_BLOCK=cfg.tile_in_block and kv_block_size % cfg.block_n == 0,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out if num_splits == 1 else _merge(part_o, part_lse, out, num_splits)


def _merge(part_o: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, num_splits: int):
    """Stage 2 of split-KV decode: ``out`` = the splits' partials weighted by their LSEs."""
    num_seqs, num_heads, head_dim = out.shape
    _decode_merge_kernel[(num_seqs, num_heads)](
        part_o,
        part_lse,
        out,
        out.stride(0),
        out.stride(1),
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        NUM_SPLITS=num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits),
        num_warps=4 if out.is_cuda else 1,
    )
    return out


# --------------------------------------------------------------------------------------------
# Prefill: variable-length causal attention, keys from the paged cache or the new K/V
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["stride_bt"])  # as the decode kernel's
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    cu_q_ptr,
    cu_k_ptr,
    block_tables_ptr,
    scale_log2e,
    v_scale,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KV_BLOCK_SIZE: tl.constexpr,
    PAGED: tl.constexpr,
):
    # Program (query tile, seq, head). PAGED: k/v are the caches (stride_kb/vb per block,
    # stride_kt/vt per slot in a block); otherwise k/v are the new tokens (stride_kt/vt per token).
    m_blk = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kvh = head // GROUP

    q_start = tl.load(cu_q_ptr + seq)
    len_q = tl.load(cu_q_ptr + seq + 1) - q_start
    if m_blk * BLOCK_M >= len_q:
        return
    k_start = tl.load(cu_k_ptr + seq)
    len_k = tl.load(cu_k_ptr + seq + 1) - k_start
    prefix = len_k - len_q  # query j sits at absolute position prefix + j

    offs_m = m_blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < len_q
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_mask[:, None],
        other=0.0,
    )  # [BLOCK_M, HEAD_DIM]
    q_pos = prefix + offs_m

    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Keys past the tile's last query position are masked for every row: stop there.
    end = tl.minimum(len_k, prefix + (m_blk + 1) * BLOCK_M)
    for n0 in range(0, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        if PAGED:
            blk = tl.load(table + offs_n // KV_BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
            pos = offs_n % KV_BLOCK_SIZE
            k_row = blk * stride_kb + pos * stride_kt
            v_row = blk * stride_vb + pos * stride_vt
        else:
            tok = (k_start + offs_n).to(tl.int64)
            k_row = tok * stride_kt
            v_row = tok * stride_vt
        k = tl.load(
            k_ptr + (k_row + kvh * stride_kh)[:, None] + offs_d[None, :],
            mask=n_mask[:, None],
            other=0.0,
        )
        v = tl.load(
            v_ptr + (v_row + kvh * stride_vh)[:, None] + offs_d[None, :],
            mask=n_mask[:, None],
            other=0.0,
        )
        k = k.to(q.dtype)  # no-op unless PAGED over an fp8 cache (k_scale is in scale_log2e)
        v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k)) * scale_log2e  # [BLOCK_M, BLOCK_N]
        keep = (q_pos[:, None] >= offs_n[None, :]) & n_mask[None, :]
        s = tl.where(keep, s, float("-inf"))
        # Key 0 is visible to every row and lies in the first tile, so m_i is finite from then
        # on and fully masked rows of later tiles contribute exp2(-inf) = 0.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None] * v_scale  # 1.0 unless fp8 cache
    tl.store(
        o_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=m_mask[:, None],
    )


def _prefill_defaults(head_dim: int, is_gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if not is_gpu:
        return 16, 16, 4, 1
    return 64, 64, 4, (3 if head_dim <= 128 else 2)


def prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim] (new tokens)
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int32
    cu_seqlens_k: torch.Tensor,  # [num_seqs + 1] int32
    max_seqlen_q: int,
    block_tables: torch.Tensor | None,  # [num_seqs, max_blocks] int32, or None: keys = k/v
    scale: float,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal varlen attention; query j of sequence i sits at position len_k - len_q + j.

    With ``block_tables`` every key (cached prefix and new tokens, already stored) is read from
    the cache; without, ``cu_seqlens_k`` must equal ``cu_seqlens_q`` and keys are ``k``/``v``.
    ``k_scale`` / ``v_scale`` dequantize an fp8 cache and apply only to keys read from it.
    Eager only: ``max_seqlen_q`` <= 0 is recomputed on the host.
    """
    num_tokens, num_heads, head_dim = q.shape
    _check_head_dim(head_dim)
    assert q.stride(2) == 1, "q needs a contiguous head_dim"
    num_seqs = cu_seqlens_q.shape[0] - 1
    assert cu_seqlens_q.is_contiguous() and cu_seqlens_k.is_contiguous()
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_seqlen_q <= 0:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())

    paged = block_tables is not None
    if paged:
        kt, vt = k_cache, v_cache
        assert kt.shape[3] == head_dim and vt.shape == kt.shape
        num_kv_heads, kv_block_size = kt.shape[2], kt.shape[1]
        kb, vb = kt.stride(0), vt.stride(0)
        k_strides = (kt.stride(1), kt.stride(2))
        v_strides = (vt.stride(1), vt.stride(2))
        assert block_tables.stride(1) == 1 or block_tables.shape[1] == 1, "tables: contiguous rows"
        tables, stride_bt = block_tables, block_tables.stride(0)
    else:
        kt, vt = k, v
        num_kv_heads, kv_block_size = k.shape[1], 1
        kb = vb = 0
        k_strides = (k.stride(0), k.stride(1))
        v_strides = (v.stride(0), v.stride(1))
        tables, stride_bt = cu_seqlens_q, 0  # unused
        k_scale = v_scale = 1.0  # keys are the new tokens, not the (possibly fp8) cache
    assert kt.stride(-1) == 1 and vt.stride(-1) == 1, "k/v need a contiguous head_dim"
    assert num_heads % num_kv_heads == 0, f"{num_heads} heads vs {num_kv_heads} KV heads"

    d_bm, d_bn, warps, stages = _prefill_defaults(head_dim, q.device.type == "cuda")
    block_m, block_n = block_m or d_bm, block_n or d_bn
    grid = (triton.cdiv(max_seqlen_q, block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        q,
        kt,
        vt,
        out,
        cu_seqlens_q,
        cu_seqlens_k,
        tables,
        scale * k_scale * LOG2E,
        v_scale,
        q.stride(0),
        q.stride(1),
        kb,
        *k_strides,
        vb,
        *v_strides,
        out.stride(0),
        out.stride(1),
        stride_bt,
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        KV_BLOCK_SIZE=kv_block_size,
        PAGED=paged,
        num_warps=warps,
        num_stages=stages,
    )
    return out


def _check_head_dim(head_dim: int) -> None:
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, (
        f"Triton attention needs a power-of-two head_dim >= 16, got {head_dim}"
    )


__all__ = [
    "DecodeConfig",
    "choose_num_splits",
    "default_decode_config",
    "device_sm_count",
    "paged_decode_attention",
    "prefill_attention",
    "store_kvcache",
]
