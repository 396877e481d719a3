"""Mixed steps (issue 15), scheduler only, with fake sampled tokens: the running decodes first,
prefill chunks in the rest of ``max_num_batched_tokens``; chunks continue across mixed steps;
preemption, headroom and "nothing is lost" keep their meaning; ``mixed_steps=False`` keeps the
old prefill-only / decode-only steps."""

import random

from nanovllm.engine.sequence import SequenceStatus
from tests.helpers import load_test_module

base = load_test_module("engine/test_scheduler.py")
make_scheduler, make_seq, step, FAKE = base.make_scheduler, base.make_seq, base.step, base.FAKE


def rows(batch):
    return [(s.seq_id, n) for s, n in zip(batch.seqs, batch.num_new_tokens)]


def decoding(sched, *seqs):
    """Admit and prefill ``seqs`` (one prefill step), so that they decode next."""
    for seq in seqs:
        sched.add(seq)
    batch = step(sched)
    assert batch.is_prefill and not batch.is_mixed and batch.seqs == list(seqs)


def test_decodes_first_then_prefill_chunks_fill_the_budget():
    sched = make_scheduler(max_num_batched_tokens=32)
    a, b = make_seq(5), make_seq(6, start=50)
    decoding(sched, a, b)
    c = make_seq(40, start=100)
    sched.add(c)
    batch = sched.schedule()
    # two decode rows (one token each), then c's first chunk in the other 30 tokens
    assert rows(batch) == [(a.seq_id, 1), (b.seq_id, 1), (c.seq_id, 30)]
    assert batch.is_prefill and batch.is_mixed and batch.num_tokens == 32
    assert batch.num_decode_tokens == 2 and batch.num_prefill_tokens == 30
    assert [batch.samples(i) for i in range(3)] == [True, True, False]
    assert [batch.is_decode_row(i) for i in range(3)] == [True, True, False]
    sched.postprocess(batch, [FAKE, FAKE, None])
    assert len(a) == 7 and len(b) == 8 and c.num_computed_tokens == 30 and len(c) == 40


def test_a_chunked_prefill_continues_across_mixed_steps():
    sched = make_scheduler(max_num_batched_tokens=16)
    a = make_seq(5)
    decoding(sched, a)
    c = make_seq(40, start=100)
    sched.add(c)
    shapes = [rows(step(sched)) for _ in range(4)]
    assert shapes == [
        [(a.seq_id, 1), (c.seq_id, 15)],
        [(a.seq_id, 1), (c.seq_id, 15)],
        [(a.seq_id, 1), (c.seq_id, 10)],  # c's last chunk: it samples
        [(a.seq_id, 1), (c.seq_id, 1)],  # both decode: a pure-decode step
    ]
    assert c.num_computed_tokens == 41 and c.completion_token_ids == [FAKE, FAKE]
    assert a.completion_token_ids == [FAKE] * 5  # one token in every step: it never waited
    batch = step(sched)
    assert not batch.is_prefill and not batch.is_mixed and batch.num_decode_tokens == 2


def test_no_decode_waits_behind_a_prefill():
    """Prompts arrive while others decode: every step carries every decoding sequence."""
    rng = random.Random(0)
    sched = make_scheduler(num_blocks=256, max_num_batched_tokens=24)
    seqs = [make_seq(rng.randint(1, 70), start=100 * i + 1, max_tokens=8) for i in range(12)]
    pending = list(seqs)
    mixed = 0
    while not sched.is_finished() or pending:
        if pending and rng.random() < 0.5:
            sched.add(pending.pop(0))
        decoders = [s for s in sched.running if not s.needs_prefill]
        batch = step(sched)
        assert batch.seqs[: len(decoders)] == decoders
        assert batch.num_tokens <= 24
        mixed += batch.is_mixed
    assert mixed > 0
    assert all(s.completion_token_ids == [FAKE] * 8 for s in seqs)


def test_more_decodes_than_the_budget_is_a_pure_decode_step():
    sched = make_scheduler()
    seqs = [make_seq(3, start=10 * i + 1) for i in range(4)]
    decoding(sched, *seqs)
    sched.max_num_batched_tokens = 4
    waiting = make_seq(9, start=200)
    sched.add(waiting)
    batch = step(sched)  # four decodes use the whole budget; the waiting one is not admitted
    assert not batch.is_prefill and batch.seqs == seqs and list(sched.waiting) == [waiting]
    sched.finish(seqs[0], "stop")
    batch = step(sched)
    assert rows(batch) == [(s.seq_id, 1) for s in seqs[1:]] + [(waiting.seq_id, 1)]
    assert batch.is_mixed and not batch.samples(3)


def test_kv_exhaustion_in_a_mixed_step_preempts_and_admits_nobody():
    # 3 blocks: a and b decode at 17 tokens (one block each) and need their second block now
    sched = make_scheduler(num_blocks=3, headroom_steps=0, max_num_batched_tokens=64)
    a, b = make_seq(16), make_seq(16, start=100)
    decoding(sched, a, b)
    c = make_seq(4, start=200)
    sched.add(c)
    batch = step(sched)
    # a takes the free block; b (admitted last) is preempted; c is not admitted in this step
    assert rows(batch) == [(a.seq_id, 1)] and not batch.is_prefill
    assert b.status == SequenceStatus.WAITING and b.num_preemptions == 1
    assert list(sched.waiting) == [b, c] and sched.num_preemptions == 1
    assert b.completion_token_ids == [FAKE]  # kept: recomputed when readmitted


def test_a_partial_prefill_is_the_preemption_victim():
    # a decodes; c is half prefilled (admitted last); a's next block preempts c
    sched = make_scheduler(num_blocks=4, headroom_steps=0, max_num_batched_tokens=17)
    a = make_seq(15)
    decoding(sched, a)  # 16 tokens, one block
    c = make_seq(48, start=100)
    sched.add(c)
    batch = step(sched)  # a's 16th token (its block is full) and c's first 16 tokens
    assert rows(batch) == [(a.seq_id, 1), (c.seq_id, 16)]
    assert sched.block_manager.num_free_blocks == 0
    batch = step(sched)  # a needs its second block: c gives its three back
    assert rows(batch) == [(a.seq_id, 1)]
    assert c.status == SequenceStatus.WAITING and c.num_computed_tokens == 0
    assert c.block_table == [] and c.num_preemptions == 1
    assert list(sched.waiting) == [c]


def test_fully_cached_prompt_decodes_beside_the_running_decodes():
    sched = make_scheduler(max_num_batched_tokens=64)
    first = make_seq(33)
    decoding(sched, first)
    sched.finish(first, "stop")
    a = make_seq(5, start=500)
    decoding(sched, a)
    again = make_seq(33)  # 32 tokens come from the cache
    sched.add(again)
    batch = step(sched)
    assert rows(batch) == [(a.seq_id, 1), (again.seq_id, 1)] and not batch.is_prefill
    assert again.num_cached_tokens == 32 and again.completion_token_ids == [FAKE]


def test_headroom_still_holds_admission_back():
    sched = make_scheduler(num_blocks=4, headroom_steps=32)
    a = make_seq(16)
    decoding(sched, a)
    b = make_seq(16, start=100)
    sched.add(b)
    batch = step(sched)  # a's next 32 tokens need every free block
    assert rows(batch) == [(a.seq_id, 1)] and list(sched.waiting) == [b]


def test_nothing_is_lost_under_kv_pressure():
    rng = random.Random(1)
    sched = make_scheduler(num_blocks=12, max_num_seqs=6, max_num_batched_tokens=20)
    seqs = [make_seq(rng.randint(1, 60), start=100 * i + 1, max_tokens=12) for i in range(10)]
    for s in seqs:
        sched.add(s)
    mixed = 0
    for _ in range(2000):
        if sched.is_finished():
            break
        mixed += step(sched).is_mixed
    assert sched.is_finished() and mixed > 0
    for s in seqs:
        assert s.finish_reason == "length" and s.completion_token_ids == [FAKE] * 12
    assert sched.block_manager.num_free_blocks == 12


def test_mixed_steps_off_keeps_prefill_only_and_decode_only_steps():
    sched = make_scheduler(max_num_batched_tokens=32, mixed_steps=False)
    a = make_seq(5)
    decoding(sched, a)
    c = make_seq(40, start=100)
    sched.add(c)
    assert rows(step(sched)) == [(c.seq_id, 32)]  # the decode waits behind the prefill
    assert rows(step(sched)) == [(c.seq_id, 8)]
    batch = step(sched)
    assert rows(batch) == [(a.seq_id, 1), (c.seq_id, 1)] and not batch.is_prefill
    assert len(a) == 7
