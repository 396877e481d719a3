"""Bad input through LLM.generate: a ValueError that names the index or field, the value and a
fix; nothing is left queued, and the same engine still generates correctly afterwards."""

import pytest

from conftest import hf_greedy
from nanovllm import LLM, SamplingParams

BS, NUM_BLOCKS, MAX_LEN, MAX_NEW = 16, 2, 48, 6
CACHE_TOKENS = BS * NUM_BLOCKS
GOOD = [5, 17, 200, 3, 99, 42, 7, 300, 11, 64]


@pytest.fixture(scope="module")
def llm(tiny_model):
    # On the CPU even on GPU machines: the float32 parity checks need exact float32 math.
    return LLM(
        tiny_model,
        device="cpu",
        kvcache_block_size=BS,
        num_kvcache_blocks=NUM_BLOCKS,
        max_model_len=MAX_LEN,
    )


@pytest.fixture(scope="module")
def expected(tiny_model):
    return hf_greedy(tiny_model, [GOOD], MAX_NEW)[0]


def greedy():
    return SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


def assert_clean_and_working(llm, expected):
    s = llm.scheduler
    assert not s.waiting and not s.running, "a rejected request left something queued"
    assert s.block_manager.num_free_blocks == NUM_BLOCKS
    out = llm.generate([GOOD], greedy(), use_tqdm=False)
    assert [o["token_ids"] for o in out] == [expected]
    assert not s.waiting and not s.running


# (bad prompt, fragments the message must contain: index, value, fix)
BAD_PROMPTS = {
    "empty_list": ([], ["prompts[1]", "empty", "at least one token"]),
    "empty_text": ("", ["prompts[1]", "empty", "at least one token"]),
    "id_equal_to_vocab": ([1, 436, 2], ["prompts[1]", "436", "[0, 436)", "tokenizer"]),
    "negative_id": ([1, -1], ["prompts[1]", "-1", "tokenizer"]),
    # the 2-block cache holds 32 tokens: max_model_len 48 is lowered to 32 at start-up
    "too_long": (
        list(range(1, CACHE_TOKENS + 1)),
        [
            "prompts[1]",
            f"{CACHE_TOKENS} tokens",
            f"max_model_len={CACHE_TOKENS} (lowered from {MAX_LEN}",
            "shorten the prompt",
        ],
    ),
    "more_kv_than_cache": (
        list(range(1, 31)),  # 30 tokens + max_tokens 6 = 36 > the cache's 32: never fits
        [
            "prompts[1]",
            "30 prompt tokens + max_tokens=6 need 36 tokens (3 KV blocks of 16)",
            f"only {NUM_BLOCKS} blocks ({CACHE_TOKENS} tokens)",
            "lower max_tokens",
            "num_kvcache_blocks",
        ],
    ),
    "float": (3.5, ["prompts[1]", "float", "str or a list of int"]),
    "none": (None, ["prompts[1]", "NoneType", "str or a list of int"]),
    "dict": ({"prompt": "hi"}, ["prompts[1]", "dict", "str or a list of int"]),
    "mixed_list": ([1, "a"], ["prompts[1]", "str or a list of int"]),
    "float_ids": ([1.0, 2.0], ["prompts[1]", "str or a list of int"]),
    "bool_ids": ([True, False], ["prompts[1]", "str or a list of int"]),
}


@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_bad_prompt_after_a_good_one(llm, expected, case):
    bad, fragments = BAD_PROMPTS[case]
    with pytest.raises(ValueError) as info:
        llm.generate([GOOD, bad], greedy(), use_tqdm=False)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    assert_clean_and_working(llm, expected)


def test_longest_prompt_that_fits_generates(llm):
    # max_model_len - 1 tokens leave room for exactly one new token
    prompt = list(range(1, 32))  # 31 tokens + 1 = 2 blocks: fits the 2-block cache exactly
    sp = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    assert len(out["token_ids"]) == 1 and out["finish_reason"] == "length"
    assert not llm.scheduler.waiting and not llm.scheduler.running


def test_request_that_can_never_fit_is_refused_not_cut_short(tiny_model, caplog):
    # The cache holds 32 tokens, max_model_len stays at its default 4096: a start-up warning.
    with caplog.at_level("WARNING", logger="nanovllm.engine.llm_engine"):
        small = LLM(tiny_model, device="cpu", kvcache_block_size=BS, num_kvcache_blocks=2)
    assert "cannot hold one max_model_len=4096" in caplog.text and "lowered to 32" in caplog.text
    assert small.runtime.max_model_len == CACHE_TOKENS
    prompt = list(range(1, 21))
    with pytest.raises(ValueError) as info:
        small.generate([prompt], SamplingParams(max_tokens=40, ignore_eos=True), use_tqdm=False)
    msg = str(info.value)
    assert "prompts[0] can never fit" in msg and "20 prompt tokens + max_tokens=40" in msg
    assert not small.scheduler.waiting and not small.scheduler.running
    # what does fit runs to its max_tokens, not to a cut
    out = small.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True), False)[0]
    assert len(out["token_ids"]) == 12 and out["finish_reason"] == "length"


@pytest.mark.parametrize("bad", [42, 3.5, None, {"prompt_token_ids": [1, 2]}])
def test_top_level_prompts_of_the_wrong_type(llm, expected, bad):
    with pytest.raises(ValueError) as info:
        llm.generate(bad, greedy(), use_tqdm=False)
    msg = str(info.value)
    assert "prompts" in msg and type(bad).__name__ in msg and "str" in msg
    assert_clean_and_working(llm, expected)


@pytest.mark.parametrize("num_params", [0, 1, 3])
def test_sampling_params_length_mismatch(llm, expected, num_params):
    params = [greedy()] * num_params
    with pytest.raises(ValueError) as info:
        llm.generate([GOOD, GOOD], params, use_tqdm=False)
    msg = str(info.value)
    assert f"sampling_params has {num_params} entries for 2 prompts" in msg
    assert "one per prompt" in msg
    assert_clean_and_working(llm, expected)


@pytest.mark.parametrize("bad", [None, {"temperature": 0}, 0.5])
def test_sampling_params_entry_of_the_wrong_type(llm, expected, bad):
    with pytest.raises(ValueError) as info:
        llm.generate([GOOD, GOOD], [greedy(), bad], use_tqdm=False)
    msg = str(info.value)
    assert "sampling_params[1]" in msg and type(bad).__name__ in msg
    assert "SamplingParams" in msg
    assert_clean_and_working(llm, expected)


def test_single_prompt_forms(llm, expected):
    # one list of ids, and a one-element list of lists, give the same single output
    assert [o["token_ids"] for o in llm.generate(GOOD, greedy(), use_tqdm=False)] == [expected]
    assert [o["token_ids"] for o in llm.generate((GOOD,), greedy(), use_tqdm=False)] == [expected]
    assert llm.generate([], greedy(), use_tqdm=False) == []
