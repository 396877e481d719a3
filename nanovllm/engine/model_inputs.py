"""Turn a scheduled batch into model inputs and attention metadata (host -> device)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanovllm.attention.metadata import AttentionMetadata
from nanovllm.engine.scheduler import ScheduledBatch


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    # Rows of the final hidden states to compute logits for (one per sampling sequence).
    logits_indices: torch.Tensor
    sampling_rows: list[int]  # which batch entries sample a token this step


def _tensor(data, dtype, device) -> torch.Tensor:
    pin = device.type == "cuda"
    return torch.tensor(data, dtype=dtype, pin_memory=pin).to(device, non_blocking=True)


def block_table_tensor(batch: ScheduledBatch, device: torch.device, width: int | None = None):
    width = width or max(len(seq.block_table) for seq in batch.seqs)
    rows = [seq.block_table + [-1] * (width - len(seq.block_table)) for seq in batch.seqs]
    return _tensor(rows, torch.int32, device)


def prepare_prefill(batch: ScheduledBatch, block_size: int, device: torch.device) -> ModelInputs:
    input_ids, positions, slot_mapping = [], [], []
    cu_q, cu_k, logits_indices, sampling_rows = [0], [0], [], []
    max_q = max_k = 0
    has_prefix = False
    for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        input_ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        for pos in range(start, end):
            slot_mapping.append(seq.block_table[pos // block_size] * block_size + pos % block_size)
        cu_q.append(cu_q[-1] + n)
        cu_k.append(cu_k[-1] + end)
        max_q, max_k = max(max_q, n), max(max_k, end)
        has_prefix |= start > 0
        if batch.samples(i):
            logits_indices.append(cu_q[-1] - 1)
            sampling_rows.append(i)
    meta = AttentionMetadata(
        is_prefill=True,
        slot_mapping=_tensor(slot_mapping, torch.int32, device),
        cu_seqlens_q=_tensor(cu_q, torch.int32, device),
        cu_seqlens_k=_tensor(cu_k, torch.int32, device),
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        block_tables=block_table_tensor(batch, device) if has_prefix else None,
    )
    return ModelInputs(
        input_ids=_tensor(input_ids, torch.int64, device),
        positions=_tensor(positions, torch.int64, device),
        meta=meta,
        logits_indices=_tensor(logits_indices, torch.int64, device),
        sampling_rows=sampling_rows,
    )


def prepare_decode(batch: ScheduledBatch, block_size: int, device: torch.device) -> ModelInputs:
    input_ids, positions, slot_mapping, context_lens = [], [], [], []
    for seq in batch.seqs:
        pos = len(seq) - 1
        input_ids.append(seq.last_token)
        positions.append(pos)
        slot_mapping.append(seq.block_table[pos // block_size] * block_size + pos % block_size)
        context_lens.append(len(seq))
    meta = AttentionMetadata(
        is_prefill=False,
        slot_mapping=_tensor(slot_mapping, torch.int32, device),
        context_lens=_tensor(context_lens, torch.int32, device),
        block_tables=block_table_tensor(batch, device),
    )
    n = len(batch.seqs)
    return ModelInputs(
        input_ids=_tensor(input_ids, torch.int64, device),
        positions=_tensor(positions, torch.int64, device),
        meta=meta,
        logits_indices=torch.arange(n, device=device),
        sampling_rows=list(range(n)),
    )


def prepare_sampling(batch: ScheduledBatch, rows: list[int], device: torch.device):
    """Per-row sampling parameters: temperatures [n] float, top_ks [n] int, top_ps [n] float."""
    params = [batch.seqs[i].params for i in rows]
    temperatures = _tensor([p.temperature for p in params], torch.float32, device)
    top_ks = _tensor([p.top_k for p in params], torch.int64, device)
    top_ps = _tensor([p.top_p for p in params], torch.float32, device)
    return temperatures, top_ks, top_ps
