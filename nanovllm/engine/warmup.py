"""Start-up passes of the model runner on CUDA: what they make happen before the first request."""

from __future__ import annotations

import torch

from nanovllm.attention import AttentionMetadata


@torch.inference_mode()
def warmup_max_prefill(
    model, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int, device
) -> None:
    """One maximal prefill without a KV cache, so the allocator's peak counts activations."""
    seq_len = min(max_num_batched_tokens, max_model_len)
    num_seqs = max(1, min(max_num_batched_tokens // seq_len, max_num_seqs))
    cu = torch.arange(0, (num_seqs + 1) * seq_len, seq_len, dtype=torch.int32)
    n = num_seqs * seq_len
    meta = AttentionMetadata(
        is_prefill=True,
        slot_mapping=torch.full((n,), -1, dtype=torch.int32, device=device),
        cu_seqlens_q=cu.to(device),
        cu_seqlens_k=cu.to(device),
        max_seqlen_q=seq_len,
        max_seqlen_k=seq_len,
    )
    ids = torch.zeros(n, dtype=torch.int64, device=device)
    pos = torch.arange(seq_len, device=device).repeat(num_seqs)
    hidden = model(ids, pos, meta)
    model.compute_logits(hidden[cu[1:].to(device).long() - 1])
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@torch.inference_mode()
def warmup_paged_prefill(model, device) -> None:
    """A one-token prefill after a one-token cached prefix, the path of chunked prefill and
    prefix-cache hits: its kernels compile now, not inside the first request that takes it
    (seconds per Triton kernel). Writes nothing (slot -1)."""
    i32 = dict(dtype=torch.int32, device=device)
    meta = AttentionMetadata(
        is_prefill=True,
        slot_mapping=torch.full((1,), -1, **i32),
        cu_seqlens_q=torch.tensor([0, 1], **i32),
        cu_seqlens_k=torch.tensor([0, 2], **i32),
        max_seqlen_q=1,
        max_seqlen_k=2,
        block_tables=torch.zeros(1, 1, **i32),
    )
    ids = torch.zeros(1, dtype=torch.int64, device=device)
    model(ids, torch.ones_like(ids), meta)
    torch.cuda.synchronize()
