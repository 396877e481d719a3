"""Fused sampling without filters: one pass over each row's logits.

``gumbel_argmax`` returns, per row, ``argmax(logits / t + G)`` with G i.i.d. standard Gumbel
noise, an exact draw from ``softmax(logits / t)``; rows with ``t <= 0`` take the plain argmax.
The logits are read once in their own dtype (bf16 from the LM head) and nothing of vocabulary
size is written: the torch version of the same draw makes five full passes in float32. The
noise comes from Triton's counter-based Philox generator keyed by ``seed`` and the element's
offset, so the call is deterministic for a given seed and needs no generator state on the
device. A row with its own seed (``SamplingParams.seed``) keys its noise by that seed and the
token's index alone, so its draw does not depend on the other rows of the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MIN_TEMPERATURE = 1e-5  # as the torch sampler: keeps logits / t finite
BLOCK = 2048


# The seed changes every step: specialised on its value (divisible by 16 or not, equal to 1), it
# would compile new variants in the middle of a run.
@triton.jit(do_not_specialize=["seed"])
def _gumbel_argmax_kernel(
    logits_ptr,
    stride_row,
    temperatures_ptr,
    out_ptr,
    vocab_size,
    seed,
    row_seeds_ptr,
    MIN_T: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_ROW_SEEDS: tl.constexpr,
):
    row = tl.program_id(0)
    t = tl.load(temperatures_ptr + row)
    greedy = t <= 0.0
    inv_t = tl.where(greedy, 1.0, 1.0 / tl.maximum(t, MIN_T))
    noise_scale = tl.where(greedy, 0.0, 1.0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    best = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.full((), 0, tl.int32)
    noise_seed = seed
    noise_base = row * vocab_size
    if HAS_ROW_SEEDS:
        own = tl.load(row_seeds_ptr + row)  # int64; -1: the batch seed
        noise_seed = tl.where(own >= 0, own, seed).to(tl.int32)
        noise_base = tl.where(own >= 0, 0, noise_base)
    for start in range(0, vocab_size, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < vocab_size
        logits = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        u = tl.rand(noise_seed, noise_base + offs)  # uniform in [0, 1)
        gumbel = -tl.log(-tl.log(u + 1e-20) + 1e-20)
        score = tl.where(mask, logits * inv_t + noise_scale * gumbel, float("-inf"))
        block_best = tl.max(score, axis=0)
        block_idx = tl.argmax(score, axis=0).to(tl.int32) + start
        better = block_best > best
        best_idx = tl.where(better, block_idx, best_idx)
        best = tl.where(better, block_best, best)
    tl.store(out_ptr + row, best_idx.to(tl.int64))


def gumbel_argmax(
    logits: torch.Tensor,
    temperatures: torch.Tensor,
    seed: int,
    row_seeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [num_rows, vocab] (last dim contiguous), temperatures [num_rows] float32 ->
    token ids [num_rows] int64. ``seed`` is a host int in [0, 2**31); ``row_seeds`` [num_rows]
    int64 (optional) gives rows their own seed in [0, 2**31), -1 where the batch seed applies."""
    num_rows, vocab_size = logits.shape
    assert logits.stride(1) == 1, "the vocabulary dimension must be contiguous"
    out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows:
        _gumbel_argmax_kernel[(num_rows,)](
            logits,
            logits.stride(0),
            temperatures,
            out,
            vocab_size,
            seed,
            row_seeds if row_seeds is not None else temperatures,  # unread without row seeds
            MIN_T=MIN_TEMPERATURE,
            BLOCK=BLOCK,
            HAS_ROW_SEEDS=row_seeds is not None,
        )
    return out
