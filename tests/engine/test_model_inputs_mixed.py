"""Planning a mixed step (issue 15): one varlen ``StepPlan`` whose decode rows have query length
1 and read their keys through their block-table rows; a pure-decode step keeps the decode plan;
the plan stays plain data (it is sent to every tensor-parallel rank)."""

import pickle

import torch

from nanovllm.attention import AttentionBackend
from nanovllm.engine.model_inputs import plan_decode, plan_step, to_model_inputs
from tests.helpers import load_test_module

base = load_test_module("engine/test_scheduler.py")
BS, FAKE = base.BS, base.FAKE


def slot(seq, pos):
    return seq.block_table[pos // BS] * BS + pos % BS


def mixed_batch():
    """a (20 tokens) and b (5) decode; c's 40-token prompt gets the other 30 of 32 tokens."""
    sched = base.make_scheduler(max_num_batched_tokens=32)
    a, b = base.make_seq(19), base.make_seq(4, start=100)
    sched.add(a)
    sched.add(b)
    base.step(sched)
    c = base.make_seq(40, start=200)
    sched.add(c)
    return sched, sched.schedule(), (a, b, c)


def test_mixed_plan_rows():
    _, batch, (a, b, c) = mixed_batch()
    assert batch.is_mixed and batch.num_new_tokens == [1, 1, 30]
    plan = plan_step(batch, BS)
    assert plan.is_prefill
    assert plan.input_ids == [FAKE, FAKE, *c.token_ids[:30]]
    assert plan.positions == [19, 4, *range(30)]
    assert plan.slot_mapping == [slot(a, 19), slot(b, 4), *(slot(c, p) for p in range(30))]
    # decode rows: query length 1, keys = the whole context (the new token included)
    assert plan.cu_seqlens_q == [0, 1, 2, 32]
    assert plan.cu_seqlens_k == [0, 20, 25, 55]
    assert plan.max_seqlen_q == 30 and plan.max_seqlen_k == 30
    width = max(len(s.block_table) for s in (a, b, c))
    assert plan.block_tables == [
        s.block_table + [-1] * (width - len(s.block_table)) for s in (a, b, c)
    ]
    # the decode rows sample; c's chunk stops short of the prompt's end
    assert plan.sampling_rows == [0, 1] and plan.logits_indices == [0, 1]
    assert pickle.loads(pickle.dumps(plan)) == plan


def test_mixed_plan_decode_rows_match_the_decode_plan():
    _, batch, (a, b, _) = mixed_batch()
    mixed = plan_step(batch, BS)
    batch.seqs, batch.num_new_tokens = batch.seqs[:2], [1, 1]
    decode = plan_decode(batch, BS)
    assert mixed.input_ids[:2] == decode.input_ids and mixed.positions[:2] == decode.positions
    assert mixed.slot_mapping[:2] == decode.slot_mapping
    assert [mixed.cu_seqlens_k[i + 1] - mixed.cu_seqlens_k[i] for i in (0, 1)] == (
        decode.context_lens
    )


def test_last_chunk_samples_beside_the_decodes():
    sched, batch, (a, b, c) = mixed_batch()
    sched.postprocess(batch, [FAKE, FAKE, None])
    batch = sched.schedule()
    assert batch.num_new_tokens == [1, 1, 10]
    plan = plan_step(batch, BS)
    assert plan.sampling_rows == [0, 1, 2] and plan.logits_indices == [0, 1, 11]
    assert plan.positions[2:] == list(range(30, 40))
    sched.postprocess(batch, [FAKE] * 3)
    batch = sched.schedule()  # every row decodes: the decode plan (CUDA graphs)
    plan = plan_step(batch, BS)
    assert not batch.is_prefill and not plan.is_prefill and plan.logits_indices is None
    assert plan.context_lens == [len(a), len(b), len(c)] == [22, 7, 41]


def test_mixed_metadata_and_inputs():
    _, batch, _ = mixed_batch()
    inputs = to_model_inputs(plan_step(batch, BS), torch.device("cpu"), AttentionBackend())
    meta = inputs.meta
    assert meta.is_prefill and meta.block_tables is not None and meta.context_lens is None
    assert meta.block_tables.dtype == torch.int32 and meta.block_tables.shape[0] == 3
    assert meta.cu_seqlens_q.tolist() == [0, 1, 2, 32]
    assert inputs.input_ids.shape == inputs.positions.shape == (32,)
    assert inputs.logits_indices.tolist() == [0, 1] and inputs.sampling_rows == [0, 1]
