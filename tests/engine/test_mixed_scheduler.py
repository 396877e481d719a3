"""MixedScheduler driven directly with fake sampled tokens (no model): the running decodes
first, then prefill chunks in the rest of the token budget; chunked prefill, admission
batching, preemption and "nothing is lost" as in the base scheduler."""

import random

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.mixed_scheduler import MixedScheduler
from nanovllm.engine.sequence import SequenceStatus
from tests.helpers import load_test_module

base = load_test_module("engine/test_scheduler.py")
BS, EOS, FAKE, make_seq, step = base.BS, base.EOS, base.FAKE, base.make_seq, base.step


def make_mixed(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64, **kw):
    return MixedScheduler(
        BlockManager(num_blocks, BS),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=4096,
        eos_token_ids={EOS},
        **kw,
    )


def decoding(sched, *lengths):
    """Sequences prefilled (one pure prefill step) and now decoding."""
    seqs = [make_seq(n, start=100 * i + 1) for i, n in enumerate(lengths)]
    for seq in seqs:
        sched.add(seq)
    batch = step(sched)
    assert batch.is_prefill and not batch.num_decode_rows and batch.seqs == seqs
    return seqs


def test_decodes_first_then_prefill_chunks_fill_the_budget():
    sched = make_mixed()
    a, b = decoding(sched, 10, 20)
    new = make_seq(100, start=500)
    sched.add(new)
    batch = step(sched)
    assert batch.is_prefill and batch.num_decode_rows == 2
    assert batch.seqs == [a, b, new] and batch.num_new_tokens == [1, 1, 62]
    assert [batch.samples(i) for i in range(3)] == [True, True, False]
    assert len(a) == 12 and len(b) == 22 and new.num_computed_tokens == 62
    batch = step(sched)  # the chunk continues beside the decodes, and ends the prompt
    assert batch.seqs == [a, b, new] and batch.num_new_tokens == [1, 1, 38]
    assert len(new) == 101
    batch = step(sched)  # nothing left to prefill: a pure decode step
    assert not batch.is_prefill and batch.seqs == [a, b, new] and not batch.num_decode_rows


def test_a_chunk_in_flight_continues_before_new_requests():
    sched = make_mixed(max_num_batched_tokens=40)
    (a,) = decoding(sched, 8)
    first, second = make_seq(60, start=300), make_seq(10, start=700)
    sched.add(first)
    step(sched)
    sched.add(second)
    batch = step(sched)
    assert batch.seqs == [a, first, second] and batch.num_new_tokens == [1, 21, 10]


def test_admission_batching_holds_new_requests_but_not_decodes():
    sched = make_mixed(max_num_seqs=4, admission_batch=2)
    a, b, c = decoding(sched, 8, 9, 10)
    sched.add(make_seq(12, start=400))
    sched.add(make_seq(12, start=500))
    batch = step(sched)  # one slot free, two waiting: decode on
    assert not batch.is_prefill and batch.seqs == [a, b, c]
    sched.finish(c, "stop")
    batch = step(sched)  # two free: both admitted beside the decodes
    assert batch.num_decode_rows == 2 and len(batch.seqs) == 4


def test_a_step_that_preempts_admits_nothing_new():
    # 6 blocks of 16; two sequences decode until a needs a block that only b's preemption frees.
    sched = make_mixed(num_blocks=6, max_num_batched_tokens=128, headroom_steps=0)
    a, b = decoding(sched, 31, 31)
    while sched.block_manager.num_free_blocks:
        step(sched)
    waiting = make_seq(10, start=900)
    sched.add(waiting)  # no block free: it waits
    while not sched.num_preemptions:
        batch = step(sched)
    # b's blocks were freed in that step, but it admitted nothing: a pure decode of a
    assert b.status == SequenceStatus.WAITING and not batch.is_prefill and batch.seqs == [a]
    assert list(sched.waiting) == [b, waiting]


def test_random_workloads_lose_nothing():
    rng = random.Random(0)
    mixed = preempted = 0
    for trial in range(20):
        sched = make_mixed(
            num_blocks=rng.randint(12, 40),
            max_num_seqs=rng.randint(1, 6),
            max_num_batched_tokens=rng.choice([16, 48, 200]),
            admission_batch=rng.randint(1, 3),
            headroom_steps=rng.choice([0, 32]),  # 0: admit greedily, preempt later
        )
        seqs = []
        for i in range(rng.randint(1, 10)):
            seq = make_seq(rng.randint(1, 120), start=1000 * i + 1, max_tokens=rng.randint(1, 30))
            seqs.append(seq)
            sched.add(seq)
        for _ in range(5000):
            if sched.is_finished():
                break
            batch = sched.schedule()
            assert batch.num_tokens <= sched.max_num_batched_tokens or not batch.is_prefill
            assert len(batch.seqs) <= sched.max_num_seqs
            d = batch.num_decode_rows
            mixed += d > 0
            assert all(not s.needs_prefill for s in batch.seqs[:d])
            assert all(n == 1 for n in batch.num_new_tokens[:d])
            assert all(s.needs_prefill for s in batch.seqs[d:]) or not batch.is_prefill
            tokens = [FAKE if batch.samples(i) else None for i in range(len(batch.seqs))]
            sched.postprocess(batch, tokens)
        assert sched.is_finished(), f"trial {trial}: not finished"
        for seq in seqs:
            assert seq.finish_reason == "length" and seq.num_completion_tokens == (
                seq.params.max_tokens
            ), trial
        assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
        preempted += sched.num_preemptions
    assert mixed > 20 and preempted > 0  # the workloads mixed steps and preempted
