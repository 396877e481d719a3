"""Mixed steps end to end (``LLM(enable_mixed_steps=True)``) on CPU: the same outputs as the
engine that prefills in steps of its own, with chunked prefill, prefix caching, preemption,
stop conditions and steps issued ahead; and the tokens report."""

import pytest

from conftest import mixed_prompts, random_engine_options, random_workload
from nanovllm import LLM, SamplingParams


def engines(path, **kw):
    """A prefill-first and a mixed engine; the mixed one counts the mixed steps it ran."""
    kw = dict(device="cpu", kvcache_block_size=16, **kw)
    plain, mixed = LLM(path, **kw), LLM(path, enable_mixed_steps=True, **kw)
    real = mixed.scheduler.schedule
    mixed.mixed_steps = 0

    def counted():
        batch = real()
        mixed.mixed_steps += batch.num_decode_rows > 0
        return batch

    mixed.scheduler.schedule = counted
    return plain, mixed


def outputs(llm, prompts, params):
    return [
        (o["token_ids"], o["finish_reason"]) for o in llm.generate(prompts, params, use_tqdm=False)
    ]


@pytest.mark.parametrize(
    "options",
    [
        dict(max_num_seqs=3, max_num_batched_tokens=48),  # chunked prefills beside decodes
        dict(max_num_seqs=6, num_kvcache_blocks=14, max_num_batched_tokens=64),  # preemption
        dict(max_num_seqs=4, async_scheduling=False),
    ],
)
def test_outputs_equal_the_prefill_first_engine(tiny_model, options):
    plain, mixed = engines(tiny_model, **options)
    if "num_kvcache_blocks" in options:  # admit greedily, so that decodes must preempt
        plain.scheduler.headroom_steps = mixed.scheduler.headroom_steps = 0
    prompts = mixed_prompts(10, seed=4, lo=5, hi=150)
    prompts[7] = prompts[2][:40] + prompts[7][:30]  # a shared prefix for the prefix cache
    first = outputs(plain, prompts, SamplingParams(temperature=0, max_tokens=12))
    params = [
        SamplingParams(
            temperature=0,
            max_tokens=3 + 2 * i,
            stop_token_ids=[first[i][0][len(first[i][0]) // 2]] if i % 3 == 0 else [],
        )
        for i in range(len(prompts))
    ]
    expected = outputs(plain, prompts, params)
    assert any(r == "stop" for _, r in expected)
    assert outputs(mixed, prompts, params) == expected
    assert mixed.mixed_steps > 3
    if "num_kvcache_blocks" in options:
        assert mixed.scheduler.num_preemptions > 0
    assert mixed.is_finished()
    s = mixed.scheduler
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_a_mixed_step_reports_its_prefill_tokens(tiny_model):
    _, mixed = engines(tiny_model, max_num_seqs=2, async_scheduling=False)
    params = SamplingParams(temperature=0, max_tokens=4)
    mixed.add_request([5, 6, 7], params)
    finished, n = mixed.step()
    assert n == 3  # a prefill step
    mixed.add_request(list(range(1, 21)), params)
    finished, n = mixed.step()
    assert mixed.mixed_steps == 1 and n == 20  # its one decode row is not counted as prefill
    while not mixed.is_finished():
        mixed.step()


def test_random_workloads_match_the_prefill_first_engine(tiny_model):
    """Shared prefixes, more requests than slots, a small cache (preemption), chunking, stop
    tokens sampled mid-way, seeded sampling, steps issued ahead on or off: six workloads,
    which between them exercise each of these."""
    import random

    seen = dict(stop=0, preempted=0, ahead=set(), mixed=0)
    for seed in range(6):
        rng = random.Random(seed)
        kw = random_engine_options(rng, batched_tokens=(32, 256))
        plain, mixed = engines(tiny_model, async_scheduling=rng.random() < 0.5, **kw)
        for llm in (plain, mixed):
            llm.scheduler.headroom_steps = 0  # admit greedily: decode must preempt
        prompts, params = random_workload(rng, max_suffix=60)
        expected = outputs(plain, prompts, params)
        assert outputs(mixed, prompts, params) == expected, seed
        seen["stop"] += sum(r == "stop" for _, r in expected)
        seen["preempted"] += mixed.scheduler.num_preemptions
        seen["ahead"].add(mixed.config.async_scheduling)
        seen["mixed"] += mixed.mixed_steps
    assert seen["stop"] and seen["preempted"] and seen["mixed"] and seen["ahead"] == {True, False}
