"""End to end on CPU (also on GPU machines): greedy tokens equal transformers' generate in
float32."""

import random

import pytest

from conftest import hf_greedy
from nanovllm import LLM as _LLM
from nanovllm import SamplingParams

MAX_NEW = 12


def LLM(path, **kw):  # noqa: N802 - the engine, pinned to the CPU for exact float32 parity
    return _LLM(path, device="cpu", **kw)


def prompts_of(lengths, seed=0, vocab=400):
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def reference(tiny_model):
    prompts = prompts_of([5, 17, 40, 1, 64, 33])
    return prompts, hf_greedy(tiny_model, prompts, MAX_NEW)


def greedy(**kw):
    return SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, **kw)


def test_greedy_matches_transformers(tiny_model, reference):
    prompts, expected = reference
    llm = LLM(tiny_model, kvcache_block_size=16)
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    assert [o["token_ids"] for o in outs] == expected
    assert all(o["finish_reason"] == "length" for o in outs)
    assert all(isinstance(o["text"], str) for o in outs)


def test_preemption_under_tiny_kv_cache(tiny_model, reference):
    prompts, expected = reference
    # 12 blocks of 16 tokens cannot hold all six sequences at once: decode must preempt.
    llm = LLM(tiny_model, kvcache_block_size=16, num_kvcache_blocks=12)
    llm.scheduler.headroom_steps = 0  # admit greedily, so that decode must preempt
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    assert [o["token_ids"] for o in outs] == expected
    assert llm.scheduler.num_preemptions > 0


def test_prefix_cache_hits(tiny_model, reference):
    prompts, expected = reference
    llm = LLM(tiny_model, kvcache_block_size=16)
    first = llm.generate(prompts, greedy(), use_tqdm=False)
    # Same prompts again: full blocks come from the cache.
    second = llm.generate(prompts, greedy(), use_tqdm=False)
    assert [o["token_ids"] for o in first] == expected
    assert [o["token_ids"] for o in second] == expected
    assert llm.scheduler.block_manager.hash_to_block_id


def test_prefix_cache_shared_prefix_and_fully_cached_prompt(tiny_model):
    base = prompts_of([48], seed=3)[0]  # exactly 3 blocks of 16
    prompts = [base, base + [7, 8, 9], base[:32] + [11] * 5, base[:32]]
    expected = hf_greedy(tiny_model, prompts, MAX_NEW)
    llm = LLM(tiny_model, kvcache_block_size=16)
    llm.generate([base], greedy(), use_tqdm=False)  # fill the cache
    seqs_before = llm.scheduler.block_manager.num_free_blocks
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    assert [o["token_ids"] for o in outs] == expected
    assert llm.scheduler.block_manager.num_free_blocks == seqs_before


def test_chunked_prefill(tiny_model):
    prompts = prompts_of([70, 25, 100], seed=5)
    expected = hf_greedy(tiny_model, prompts, MAX_NEW)
    llm = LLM(tiny_model, kvcache_block_size=16, max_num_batched_tokens=32)
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    assert [o["token_ids"] for o in outs] == expected


@pytest.mark.parametrize("variant", ["hub", "sharded"])
def test_config_styles_and_shards(tiny_model_variants, variant):
    path = tiny_model_variants[variant]
    prompts = prompts_of([9, 30], seed=7)
    expected = hf_greedy(path, prompts, MAX_NEW)
    outs = LLM(path, kvcache_block_size=16).generate(prompts, greedy(), use_tqdm=False)
    assert [o["token_ids"] for o in outs] == expected


def test_top_k_1_equals_greedy(tiny_model, reference):
    prompts, expected = reference
    llm = LLM(tiny_model, kvcache_block_size=16)
    sp = SamplingParams(temperature=0.8, top_k=1, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == expected


def test_text_prompts_and_per_prompt_params(tiny_model):
    llm = LLM(tiny_model, kvcache_block_size=16)
    outs = llm.generate(
        ["Hello world", "The quick brown fox"],
        [greedy(), SamplingParams(temperature=1.0, top_p=0.9, max_tokens=3, ignore_eos=True)],
        use_tqdm=False,
    )
    assert len(outs[0]["token_ids"]) == MAX_NEW and len(outs[1]["token_ids"]) == 3
    ids = llm.tokenizer.encode("Hello world")
    assert outs[0]["token_ids"] == hf_greedy(tiny_model, [ids], MAX_NEW)[0]


def test_stop_token_ids_and_eos(tiny_model, reference):
    prompts, expected = reference
    llm = LLM(tiny_model, kvcache_block_size=16)
    stop = expected[0][3]
    out = llm.generate([prompts[0]], greedy(stop_token_ids=[stop]), use_tqdm=False)[0]
    cut = expected[0].index(stop)
    assert out["token_ids"] == expected[0][: cut + 1]
    assert out["finish_reason"] == "stop"
    # EOS ends a request unless ignore_eos: make the first generated token the EOS id.
    llm.scheduler.eos_token_ids = {expected[1][0]}
    sp = SamplingParams(temperature=0, max_tokens=MAX_NEW)
    out = llm.generate([prompts[1]], sp, use_tqdm=False)[0]
    assert out["token_ids"] == expected[1][:1] and out["finish_reason"] == "stop"
