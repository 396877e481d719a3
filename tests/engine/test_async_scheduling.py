"""Async scheduling (``LLM(async_scheduling=True)``, the default): decode step n+1 is
scheduled and issued before step n's tokens are read. Outputs, finish reasons and stop
conditions must be those of the synchronous engine; the scheduler's look-ahead is checked on
its own too."""

import pytest

from conftest import mixed_prompts, random_engine_options, random_workload
from nanovllm import LLM, SamplingParams
from tests.helpers import load_test_module

sched_tests = load_test_module("engine/test_scheduler.py")
api_tests = load_test_module("test_llm_api.py")
make_scheduler, make_seq, step = sched_tests.make_scheduler, sched_tests.make_seq, sched_tests.step


def outputs(llm, prompts, params):
    return [
        (o["token_ids"], o["finish_reason"], o.get("stop_reason"))
        for o in llm.generate(prompts, params, use_tqdm=False)
    ]


def engines(path, **kw):
    """A synchronous and an async engine; the async one counts the steps it ran ahead."""
    kw = dict(device="cpu", kvcache_block_size=16, **kw)
    sync, ahead = LLM(path, async_scheduling=False, **kw), LLM(path, async_scheduling=True, **kw)
    real = ahead.scheduler.schedule_ahead
    ahead.steps_ahead = 0

    def counted(prev):
        out = real(prev)
        ahead.steps_ahead += out is not None
        return out

    ahead.scheduler.schedule_ahead = counted
    return sync, ahead


@pytest.fixture(scope="module")
def prompts():
    return mixed_prompts(7, seed=3, lo=5, hi=40)


def test_greedy_outputs_and_early_stops_equal_the_synchronous_engine(tiny_model, prompts):
    sync, ahead = engines(tiny_model, max_num_seqs=4)
    free = [SamplingParams(temperature=0, max_tokens=4 + 3 * i) for i in range(len(prompts))]
    first = outputs(sync, prompts, free)
    # Stop each request on a token it samples mid-way: it then ends on a sampled token while
    # the next step, already issued, computes its discarded row.
    params = []
    for i, (ids, _, _) in enumerate(first):
        stop = [ids[len(ids) // 2]] if i % 2 and len(ids) > 2 else []
        params.append(SamplingParams(temperature=0, max_tokens=len(ids), stop_token_ids=stop))
    expected = outputs(sync, prompts, params)
    assert any(r == "stop" for _, r, _ in expected)
    assert outputs(ahead, prompts, params) == expected
    assert ahead.steps_ahead > 10
    assert outputs(ahead, prompts, free) == first
    assert ahead.is_finished() and ahead._in_flight is None


def test_min_tokens_seeds_and_stop_strings_equal_the_synchronous_engine(tiny_model, prompts):
    sync, ahead = engines(tiny_model)
    prompts = [api_tests.ids(6, 5), *prompts[1:]]  # a prompt whose output decodes to text
    once = SamplingParams(temperature=0, max_tokens=24)
    text = sync.generate(prompts[:1], once, use_tqdm=False)[0]["text"]
    stop_text = text[8:11]
    params = [
        SamplingParams(temperature=0.8, seed=7 + i, max_tokens=10, min_tokens=i % 3)
        for i in range(len(prompts))
    ]
    params[0] = SamplingParams(temperature=0, max_tokens=24, stop=[stop_text])
    expected = outputs(sync, prompts, params)
    assert expected[0][1] == "stop" and expected[0][2] == stop_text, text
    assert outputs(ahead, prompts, params) == expected and ahead.steps_ahead > 5


def test_logprobs_and_unseeded_sampling(tiny_model, prompts):
    sync, ahead = engines(tiny_model)
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=2)
    want = sync.generate(prompts, params, use_tqdm=False)
    got = ahead.generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in want]
    assert all(len(o["logprobs"]) == 6 for o in got)
    # Without a seed the draws come from the engine's generator, which discarded rows also
    # advance: lengths and finish reasons match, the tokens need not.
    params = SamplingParams(temperature=1.0, max_tokens=9, ignore_eos=True)
    got = ahead.generate(prompts, params, use_tqdm=False)
    assert [(len(o["token_ids"]), o["finish_reason"]) for o in got] == [(9, "length")] * 7


def test_preemption_and_chunked_prefill_fall_back_to_synchronous_steps(tiny_model, prompts):
    kw = dict(num_kvcache_blocks=6, max_num_batched_tokens=32)
    sync, ahead = engines(tiny_model, **kw)
    for llm in (sync, ahead):
        llm.scheduler.headroom_steps = 0  # admit greedily, so that decode must preempt
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    expected = outputs(sync, prompts, params)
    assert sync.scheduler.num_preemptions > 0
    assert outputs(ahead, prompts, params) == expected
    assert ahead.scheduler.num_preemptions > 0 and ahead.steps_ahead > 0


# ----------------------------------------------------------------------- the scheduler alone
def decoding(sched, seqs):
    for seq in seqs:
        sched.add(seq)
    step(sched)  # prefill
    return sched.schedule()  # a decode batch, as if issued and not yet post-processed


def test_schedule_ahead_leaves_out_what_the_step_certainly_ends():
    sched = make_scheduler()
    a, b = make_seq(5, max_tokens=2), make_seq(5, start=50, max_tokens=10)
    batch = decoding(sched, [a, b])
    ahead = sched.schedule_ahead(batch)
    assert ahead.seqs == [b] and ahead.prev_rows == [1] and ahead.lookahead == 1
    # b's blocks now cover the token that ``batch`` samples and the one ``ahead`` samples.
    assert len(b.block_table) * 16 >= len(b) + 1


def test_schedule_ahead_yields_to_admission_prefill_and_full_caches():
    sched = make_scheduler(max_num_seqs=4)
    batch = decoding(sched, [make_seq(5), make_seq(5, start=40)])
    sched.add(make_seq(5, start=90))  # two free slots, one waiting: admission is due
    assert sched.schedule_ahead(batch) is None
    sched = make_scheduler(num_blocks=2, headroom_steps=0)
    seq = make_seq(15)  # 16 tokens after the prefill's: the next one needs a new block
    batch = decoding(sched, [seq, make_seq(15, start=40)])
    assert sched.block_manager.num_free_blocks == 0
    assert sched.schedule_ahead(batch) is None  # only the regular schedule may preempt
    sched = make_scheduler(max_num_batched_tokens=16)
    for s in (make_seq(5), make_seq(40, start=60)):
        sched.add(s)
    batch = sched.schedule()
    assert batch.is_prefill and sched.schedule_ahead(batch) is None


def test_an_error_mid_run_drops_the_step_in_flight_and_the_engine_goes_on(tiny_model, prompts):
    sync, ahead = engines(tiny_model)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = outputs(sync, prompts, params)
    real, calls = ahead.scheduler.postprocess, []

    def failing(batch, tokens):
        calls.append(1)
        if len(calls) == 4:  # a decode step is in flight now
            raise RuntimeError("boom")
        return real(batch, tokens)

    ahead.scheduler.postprocess = failing
    with pytest.raises(RuntimeError, match="boom"):
        ahead.generate(prompts, params, use_tqdm=False)
    assert ahead._in_flight is None and ahead.model_runner._in_flight == 0
    assert not ahead.scheduler.running and not ahead.scheduler.waiting
    ahead.scheduler.postprocess = real
    assert outputs(ahead, prompts, params) == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_workloads_match_the_synchronous_engine(tiny_model, seed):
    """Shared prefixes (prefix-cache hits), more requests than slots (admission while decodes
    run ahead), a small cache (preemption), stop tokens sampled mid-way and seeded sampling."""
    import random

    rng = random.Random(seed)
    sync, ahead = engines(tiny_model, **random_engine_options(rng))
    for llm in (sync, ahead):
        llm.scheduler.headroom_steps = 0  # admit greedily: decode must preempt in a small cache
    prompts, params = random_workload(rng)
    expected = outputs(sync, prompts, params)
    assert outputs(ahead, prompts, params) == expected
    assert ahead.steps_ahead > 0 and any(r == "stop" for _, r, _ in expected)
    if seed == 0:  # its 12-block cache preempts (4 times when written)
        assert sync.scheduler.num_preemptions > 0 and ahead.scheduler.num_preemptions > 0


def test_schedule_ahead_goes_on_while_the_headroom_holds_admission_back():
    sched = make_scheduler(num_blocks=6, max_num_seqs=4)  # headroom: 32 tokens per sequence
    batch = decoding(sched, [make_seq(5), make_seq(5, start=40)])
    waiting = make_seq(5, start=90)
    sched.add(waiting)  # a slot and a block are free, but not the running ones' headroom
    assert sched.block_manager.can_allocate(waiting)
    ahead = sched.schedule_ahead(batch)
    assert ahead is not None and len(ahead.seqs) == 2
    assert not sched.schedule().is_prefill  # the regular schedule agrees: no admission
