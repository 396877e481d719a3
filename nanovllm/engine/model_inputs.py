"""Turn a scheduled batch into model inputs and attention metadata (host -> device).

Two phases: ``plan_step`` flattens the batch into a ``StepPlan`` of plain Python lists (no
``Sequence`` objects, no tensors), and ``to_model_inputs`` makes the device tensors. Under tensor
parallelism rank 0 plans once and sends the same plan to every rank, so all ranks run the same
step (prefill or decode, the same rows) by construction.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from nanovllm.attention import AttentionBackend, AttentionMetadata
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.layers.sampler import SamplingTensors, row_seed
from nanovllm.utils.tensors import to_device

_DEFAULT_BACKEND = AttentionBackend()


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    # Rows of the final hidden states to compute logits for (one per sampling sequence).
    logits_indices: torch.Tensor
    sampling_rows: list[int]  # which batch entries sample a token this step


@dataclass
class StepPlan:
    """One step's model inputs as plain data (picklable, cheap to send to other ranks)."""

    is_prefill: bool
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    sampling_rows: list[int]
    logits_indices: list[int] | None = None  # None: every row (decode)
    # prefill
    cu_seqlens_q: list[int] | None = None
    cu_seqlens_k: list[int] | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    # decode; prefill too when some sequence continues after cached or computed tokens
    context_lens: list[int] | None = None
    block_tables: list[list[int]] | None = None  # rows padded with -1
    # A decode step scheduled ahead: row i's input token is row prev_rows[i] of the tokens the
    # previous step sampled (still on the device; input_ids holds placeholders), whose
    # prev_num_rows rows every rank gets from rank 0 (see ModelRunner.execute).
    prev_rows: list[int] | None = None
    prev_num_rows: int = 0
    # A mixed step (is_prefill True): rows and tokens [0, num_decode_rows) are decodes, one
    # token each, described by context_lens and the first block_tables rows; the prefill
    # fields describe the tokens after them (cu_seqlens from 0 at the first prefill token),
    # and block_tables holds their rows too when one has a cached or computed prefix.
    num_decode_rows: int = 0


def _block_table_rows(batch: ScheduledBatch) -> list[list[int]]:
    width = max(len(seq.block_table) for seq in batch.seqs)
    return [seq.block_table + [-1] * (width - len(seq.block_table)) for seq in batch.seqs]


def plan_prefill(batch: ScheduledBatch, block_size: int) -> StepPlan:
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
    return StepPlan(
        is_prefill=True,
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        sampling_rows=sampling_rows,
        logits_indices=logits_indices,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        block_tables=_block_table_rows(batch) if has_prefix else None,
    )


def plan_decode(batch: ScheduledBatch, block_size: int, prev_num_rows: int = 0) -> StepPlan:
    input_ids, positions, slot_mapping, context_lens = [], [], [], []
    ahead = batch.lookahead  # 1: the input token is the previous step's, not yet appended
    for seq in batch.seqs:
        ids = seq.token_ids
        n = len(ids) + ahead
        pos = n - 1
        input_ids.append(0 if ahead else ids[-1])
        positions.append(pos)
        slot_mapping.append(seq.block_table[pos // block_size] * block_size + pos % block_size)
        context_lens.append(n)
    return StepPlan(
        is_prefill=False,
        input_ids=input_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        sampling_rows=list(range(len(batch.seqs))),
        context_lens=context_lens,
        block_tables=_block_table_rows(batch),
        prev_rows=batch.prev_rows,
        prev_num_rows=prev_num_rows if batch.prev_rows is not None else 0,
    )


def plan_mixed(batch: ScheduledBatch, block_size: int) -> StepPlan:
    """A mixed step: its decode rows planned as a decode step, its prefill rows as a prefill
    step, concatenated (decodes first)."""
    d = batch.num_decode_rows
    decode = plan_decode(_rows(batch, 0, d, is_prefill=False), block_size)
    prefill = plan_prefill(_rows(batch, d, len(batch.seqs), is_prefill=True), block_size)
    tables = decode.block_tables
    if prefill.block_tables is not None:
        width = max(len(tables[0]), len(prefill.block_tables[0]))
        tables = [row + [-1] * (width - len(row)) for row in tables + prefill.block_tables]
    return StepPlan(
        is_prefill=True,
        input_ids=decode.input_ids + prefill.input_ids,
        positions=decode.positions + prefill.positions,
        slot_mapping=decode.slot_mapping + prefill.slot_mapping,
        sampling_rows=decode.sampling_rows + [d + r for r in prefill.sampling_rows],
        logits_indices=list(range(d)) + [d + t for t in prefill.logits_indices],
        cu_seqlens_q=prefill.cu_seqlens_q,
        cu_seqlens_k=prefill.cu_seqlens_k,
        max_seqlen_q=prefill.max_seqlen_q,
        max_seqlen_k=prefill.max_seqlen_k,
        context_lens=decode.context_lens,
        block_tables=tables,
        num_decode_rows=d,
    )


def _rows(batch: ScheduledBatch, start: int, end: int, is_prefill: bool) -> ScheduledBatch:
    return ScheduledBatch(
        is_prefill=is_prefill,
        seqs=batch.seqs[start:end],
        num_new_tokens=batch.num_new_tokens[start:end],
    )


def plan_step(batch: ScheduledBatch, block_size: int, prev_num_rows: int = 0) -> StepPlan:
    if batch.num_decode_rows:
        return plan_mixed(batch, block_size)
    if batch.is_prefill:
        return plan_prefill(batch, block_size)
    return plan_decode(batch, block_size, prev_num_rows)


def to_model_inputs(
    plan: StepPlan, device: torch.device, backend: AttentionBackend | None = None
) -> ModelInputs:
    """The device tensors of ``plan``; the attention metadata is built by ``backend`` (the
    engine's attention backend; default: the paged layout every built-in backend reads)."""
    meta = (backend or _DEFAULT_BACKEND).build_metadata(plan, device)
    if plan.logits_indices is None:
        logits_indices = torch.arange(len(plan.input_ids), device=device)
    else:
        logits_indices = to_device(plan.logits_indices, torch.int64, device)
    return ModelInputs(
        input_ids=to_device(plan.input_ids, torch.int64, device),
        positions=to_device(plan.positions, torch.int64, device),
        meta=meta,
        logits_indices=logits_indices,
        sampling_rows=plan.sampling_rows,
    )


def prepare_prefill(batch: ScheduledBatch, block_size: int, device: torch.device) -> ModelInputs:
    return to_model_inputs(plan_prefill(batch, block_size), device)


def prepare_decode(batch: ScheduledBatch, block_size: int, device: torch.device) -> ModelInputs:
    return to_model_inputs(plan_decode(batch, block_size), device)


def prepare_sampling(
    batch: ScheduledBatch,
    rows: list[int],
    device: torch.device,
    eos_token_ids: Collection[int] = (),
) -> SamplingTensors:
    """The sampling parameters of the rows that sample this step: per-request seeds keyed by
    the token's index, and the EOS / stop ids a row may not sample before its ``min_tokens``."""
    seqs = [batch.seqs[i] for i in rows]
    params = [seq.params for seq in seqs]
    seeds, banned = [], []
    for j, (seq, p) in enumerate(zip(seqs, params)):
        if p.seed is None and not p.min_tokens:
            seeds.append(-1)  # the common case: no per-token state to compute
            continue
        step = seq.num_completion_tokens + batch.lookahead
        seeds.append(-1 if p.seed is None else row_seed(p.seed, step))
        if step < p.min_tokens:
            ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            banned.append((j, sorted(ids)))
    return SamplingTensors.build(
        [p.temperature for p in params],
        [p.top_k for p in params],
        [p.top_p for p in params],
        device,
        row_seeds=seeds,
        banned=banned,
    )
