"""Scheduler + BlockManager driven directly with fake sampled tokens (no model): chunked prefill,
max_num_seqs, preemption by recompute, the KV-full end of a lone sequence, finish reasons."""

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence, SequenceStatus
from nanovllm.sampling_params import SamplingParams

BS = 16
EOS = 0
FAKE = 7  # the token every step "samples" unless a test says otherwise


def make_scheduler(
    num_blocks=64,
    max_num_seqs=8,
    max_num_batched_tokens=1024,
    max_model_len=4096,
    bs=BS,
    **kw,
):
    return Scheduler(
        BlockManager(num_blocks, bs),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        eos_token_ids={EOS},
        **kw,
    )


def make_seq(n, start=1, bs=BS, **params):
    params.setdefault("max_tokens", 1000)
    params.setdefault("temperature", 0)
    return Sequence(list(range(start, start + n)), SamplingParams(**params), bs)


def step(sched: Scheduler, token=FAKE):
    """One engine step with a fake model: every sequence that reaches its end samples ``token``."""
    batch = sched.schedule()
    tokens = [token if batch.samples(i) else None for i in range(len(batch.seqs))]
    sched.postprocess(batch, tokens)
    return batch


def run_prefill(sched: Scheduler, seq: Sequence, token=FAKE):
    sched.add(seq)
    batch = step(sched, token)
    assert batch.is_prefill and batch.seqs == [seq]
    return batch


def test_chunked_prefill_respects_budget_and_continues_partial_first():
    sched = make_scheduler(max_num_batched_tokens=32)
    a, b = make_seq(70), make_seq(25, start=100)
    sched.add(a)
    sched.add(b)
    batches = []
    while a.num_completion_tokens == 0 or b.num_completion_tokens == 0:
        batches.append(step(sched))
        assert len(batches) < 10
    for batch in batches:
        assert batch.is_prefill
        assert batch.num_tokens <= 32
        assert all(n >= 1 for n in batch.num_new_tokens)
    # 70 tokens in chunks of 32, 32, 6; b joins the third step with the remaining budget
    assert [(s.seq_id, n) for s, n in zip(batches[0].seqs, batches[0].num_new_tokens)] == [
        (a.seq_id, 32)
    ]
    assert batches[1].seqs == [a] and batches[1].num_new_tokens == [32]
    assert batches[2].seqs == [a, b] and batches[2].num_new_tokens == [6, 25]
    assert len(batches) == 3
    assert a.num_computed_tokens == 70 and b.num_computed_tokens == 25
    assert a.completion_token_ids == [FAKE] and b.completion_token_ids == [FAKE]


def test_partial_prefill_goes_before_new_arrivals():
    sched = make_scheduler(max_num_batched_tokens=16)
    a = make_seq(40)
    sched.add(a)
    first = step(sched)
    assert first.seqs == [a] and first.num_new_tokens == [16]
    assert not first.samples(0) and a.num_completion_tokens == 0
    late = make_seq(3, start=200)
    sched.add(late)  # arrives while a is half prefilled
    second = step(sched)
    assert second.seqs == [a] and second.num_new_tokens == [16]
    third = step(sched)
    assert third.seqs == [a, late] and third.num_new_tokens == [8, 3]


def test_max_num_seqs():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(5, start=10 * i + 1) for i in range(5)]
    for s in seqs:
        sched.add(s)
    batch = step(sched)
    assert batch.is_prefill and batch.seqs == seqs[:2]
    assert len(sched.running) == 2 and list(sched.waiting) == seqs[2:]
    for _ in range(5):
        batch = step(sched)
        assert not batch.is_prefill and batch.seqs == seqs[:2]
        assert len(sched.running) <= 2
    # finishing one admits the next waiting sequence
    sched.finish(seqs[0], "stop")
    batch = step(sched)
    assert batch.is_prefill and batch.seqs == [seqs[2]]
    assert list(sched.running) == [seqs[1], seqs[2]]


def test_decode_preempts_most_recent_and_requeues_it_first():
    # 3 blocks of 16. a and b each take one block for 16 prompt tokens; after their first token
    # each needs a second block: only one is free.
    sched = make_scheduler(num_blocks=3, max_num_seqs=2, headroom_steps=0)  # admit both
    a, b, c = make_seq(16), make_seq(16, start=100), make_seq(4, start=200)
    for s in (a, b, c):
        sched.add(s)
    batch = step(sched)
    assert batch.seqs == [a, b] and list(sched.waiting) == [c]  # max_num_seqs=2
    assert len(a) == len(b) == 17
    batch = step(sched)
    assert not batch.is_prefill and batch.seqs == [a]
    assert b.status == SequenceStatus.WAITING and b.block_table == []
    assert b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert list(sched.waiting) == [b, c]  # at the front, ahead of c
    assert list(sched.running) == [a] and sched.num_preemptions == 1
    assert len(a.block_table) == 2
    # b keeps its generated token and is recomputed (prompt + output) when it is readmitted
    assert b.completion_token_ids == [FAKE]


def test_preemption_victim_is_the_last_admitted_even_when_the_first_needs_room():
    sched = make_scheduler(num_blocks=2, headroom_steps=0)
    a, b = make_seq(16), make_seq(10, start=100)  # one block each
    sched.add(a)
    sched.add(b)
    step(sched)
    assert len(a) == 17 and len(b) == 11
    batch = step(sched)  # a needs a second block: b (admitted last) makes room
    assert batch.seqs == [a] and not batch.is_prefill
    assert list(sched.waiting) == [b] and b.num_preemptions == 1
    assert sched.block_manager.num_free_blocks == 0


def test_preempted_sequences_finish_with_all_their_tokens():
    sched = make_scheduler(num_blocks=4, max_num_seqs=4)
    seqs = [make_seq(12, start=50 * i + 1, max_tokens=10) for i in range(3)]
    for s in seqs:
        sched.add(s)
    for _ in range(200):
        if sched.is_finished():
            break
        step(sched)
    assert sched.is_finished()
    assert sched.num_preemptions > 0
    for s in seqs:
        assert s.finish_reason == "length" and s.completion_token_ids == [FAKE] * 10
    assert sched.block_manager.num_free_blocks == 4


def test_lone_sequence_that_cannot_grow_is_aborted_not_cut_as_length():
    sched = make_scheduler(num_blocks=1)
    seq = make_seq(10, max_tokens=100, ignore_eos=True)
    sched.add(seq)
    for _ in range(50):
        if sched.is_finished():
            break
        step(sched)
    assert sched.is_finished(), "a sequence that cannot fit must end, not hang"
    # never "length": that would pass for a complete answer (the engine refuses such requests)
    assert seq.finish_reason == "abort"
    # 16 tokens of K/V fit; the 17th (sampled last) needs a block that does not exist
    assert len(seq) == BS + 1
    assert seq.num_preemptions == 0
    assert sched.block_manager.num_free_blocks == 1 and seq.block_table == []


def test_postprocess_eos_finishes_with_stop():
    sched = make_scheduler()
    seq = make_seq(5)
    run_prefill(sched, seq)
    step(sched, EOS)
    assert seq.is_finished and seq.finish_reason == "stop"
    assert seq.completion_token_ids == [FAKE, EOS]
    assert sched.is_finished() and sched.block_manager.num_free_blocks == 64


def test_postprocess_ignore_eos():
    sched = make_scheduler()
    seq = make_seq(5, ignore_eos=True, max_tokens=3)
    run_prefill(sched, seq, EOS)
    assert not seq.is_finished
    step(sched, EOS)
    assert not seq.is_finished
    step(sched, EOS)
    assert seq.finish_reason == "length" and seq.completion_token_ids == [EOS] * 3


def test_postprocess_stop_token_ids():
    sched = make_scheduler()
    seq = make_seq(5, stop_token_ids=[42], ignore_eos=True)
    run_prefill(sched, seq)
    step(sched, 41)
    assert not seq.is_finished
    step(sched, 42)
    assert seq.finish_reason == "stop" and seq.completion_token_ids == [FAKE, 41, 42]


def test_postprocess_max_tokens():
    sched = make_scheduler()
    seq = make_seq(5, max_tokens=1)
    run_prefill(sched, seq)
    assert seq.finish_reason == "length" and seq.completion_token_ids == [FAKE]
    assert not sched.running and sched.block_manager.num_free_blocks == 64


def test_postprocess_max_model_len():
    sched = make_scheduler(max_model_len=8)
    seq = make_seq(5, max_tokens=100)
    run_prefill(sched, seq)
    step(sched)
    assert not seq.is_finished
    step(sched)
    assert seq.finish_reason == "length" and len(seq) == 8


def test_fully_cached_prompt_is_decoded_not_prefilled():
    sched = make_scheduler(max_num_batched_tokens=64)
    first = make_seq(33)  # two full blocks + 1
    run_prefill(sched, first)
    sched.finish(first, "stop")
    again = make_seq(33)
    sched.add(again)
    batch = step(sched)
    # 32 tokens come from the cache; one token is left to compute, and it samples
    assert again.num_cached_tokens == 32
    assert not batch.is_prefill and batch.seqs == [again] and batch.num_new_tokens == [1]
    assert again.completion_token_ids == [FAKE]


def test_admission_keeps_headroom_for_the_running_sequences():
    # a's next 32 tokens need 2 more blocks; admitting b would leave none for them
    sched = make_scheduler(num_blocks=4, headroom_steps=32)
    a, b = make_seq(16), make_seq(16, start=100)
    sched.add(a)
    sched.add(b)
    batch = step(sched)
    assert batch.seqs == [a] and list(sched.waiting) == [b]
    # with nothing running a sequence is always admitted (progress), headroom or not
    lone = make_scheduler(num_blocks=1, headroom_steps=32)
    c = make_seq(10)
    lone.add(c)
    assert step(lone).seqs == [c]


def test_headroom_stops_the_preempt_and_readmit_cycle():
    """Under KV pressure a preempted sequence used to be readmitted (and recomputed) at once,
    only to be preempted again: count the recomputed tokens with and without headroom."""

    def recomputed(headroom_steps):
        sched = make_scheduler(num_blocks=24, max_num_seqs=16, headroom_steps=headroom_steps)
        seqs = [make_seq(20 + 7 * i, start=100 * i + 1, max_tokens=60) for i in range(16)]
        for seq in seqs:
            sched.add(seq)
        prefill_tokens = 0
        while not sched.is_finished():
            batch = step(sched)
            prefill_tokens += batch.num_tokens if batch.is_prefill else 0
        assert all(s.completion_token_ids == [FAKE] * 60 for s in seqs)
        return prefill_tokens - sum(s.num_prompt_tokens for s in seqs), sched.num_preemptions

    without, preempted_without = recomputed(0)
    with_headroom, preempted_with = recomputed(16)
    assert preempted_without > 0 and without > 0
    assert preempted_with < preempted_without and with_headroom < without


def test_min_tokens_eos_and_stop_ids_do_not_end_early():
    sched = make_scheduler()
    seq = make_seq(5, min_tokens=2, stop_token_ids=[42])
    run_prefill(sched, seq, EOS)  # 1st token
    step(sched, 42)  # 2nd
    assert not seq.is_finished
    step(sched, EOS)  # 3rd: min_tokens reached, EOS now ends it
    assert seq.finish_reason == "stop" and seq.completion_token_ids == [EOS, 42, EOS]


def test_stop_checker_ends_a_sequence_with_stop():
    calls = []

    def checker(seq):
        calls.append(seq.seq_id)
        return "xy" if seq.last_token == 9 else None

    sched = make_scheduler(stop_checker=checker)
    plain, stopped = make_seq(5), make_seq(5, start=50, stop=["xy"])
    sched.add(plain)
    sched.add(stopped)
    step(sched)
    step(sched, 9)
    assert stopped.finish_reason == "stop" and stopped.stop_reason == "xy"
    assert not plain.is_finished and set(calls) == {stopped.seq_id}  # only for stop strings


def test_admission_waits_for_a_batch_of_free_slots_while_decodes_run():
    sched = make_scheduler(max_num_seqs=4, admission_batch=2)
    running = [make_seq(5, start=10 * i + 1, max_tokens=2 + i) for i in range(4)]
    for seq in running:
        sched.add(seq)
    assert step(sched).is_prefill  # nothing running: admitted at once
    late = [make_seq(5, start=100 + 10 * i) for i in range(2)]
    for seq in late:
        sched.add(seq)
    # running[0] finishes after this step: one slot free, fewer than 2 -> decode on.
    assert not step(sched).is_prefill
    assert running[0].is_finished and len(sched.running) == 3
    batch = step(sched)
    assert not batch.is_prefill and late[0] not in batch.seqs
    assert running[1].is_finished  # now two slots are free: both late requests come in together
    batch = step(sched)
    assert batch.is_prefill and batch.seqs == late


def test_admission_batch_never_holds_back_the_last_waiting_requests():
    sched = make_scheduler(max_num_seqs=4, admission_batch=3)
    first = [make_seq(5, start=10 * i + 1, max_tokens=1 + (i > 0) * 50) for i in range(4)]
    for seq in first:
        sched.add(seq)
    step(sched)  # prefill of all four; first[0] samples its only token and finishes
    assert first[0].is_finished
    last = make_seq(5, start=200)
    sched.add(last)
    # One slot free, one request waiting: min(3, 1) = 1 -> admitted now.
    batch = step(sched)
    assert batch.is_prefill and batch.seqs == [last]


def test_admission_batch_does_not_delay_a_chunked_prefill_in_flight():
    sched = make_scheduler(max_num_seqs=4, max_num_batched_tokens=16, admission_batch=4)
    a = make_seq(5, max_tokens=50)
    sched.add(a)
    step(sched)
    b = make_seq(40, start=100)
    c = make_seq(5, start=300)
    sched.add(b)
    sched.add(c)
    # 3 free slots < min(4, 2 waiting)? no: 3 >= 2 -> both admitted, b chunked.
    batch = step(sched)
    assert batch.is_prefill and b in batch.seqs
    sched.add(make_seq(5, start=500))
    sched.add(make_seq(5, start=600))
    # One free slot for two newcomers holds their admission back, but not b's prefill in
    # flight: its next chunk (the whole budget) runs now.
    batch = step(sched)
    assert batch.is_prefill and batch.seqs == [b] and batch.num_new_tokens == [16]


def test_postprocess_returns_the_sequences_it_ended_once():
    sched = make_scheduler()
    a, b = make_seq(5, max_tokens=2), make_seq(5, start=50)
    for seq in (a, b):
        sched.add(seq)
    step(sched)
    batch = sched.schedule()
    assert sched.postprocess(batch, [EOS, FAKE]) == [a]  # EOS after min_tokens: stop
    # A row of a sequence that already ended (a step issued ahead) is skipped, not re-reported.
    assert sched.postprocess(batch, [FAKE, FAKE]) == []
