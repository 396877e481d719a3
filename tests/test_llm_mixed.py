"""Mixed steps end to end on the CPU (issue 15): greedy tokens equal transformers' greedy tokens
(float32) across prompt mixes, chunked prefill, forced preemption and prefix caching, on the
torch backend and (Triton interpreter) the Triton backend; pure-decode steps go to the decode
strategy, mixed steps to the eager forward; the step counts and the tok/s bar report both
kinds of tokens."""

import pytest

from conftest import hf_greedy
from nanovllm import SamplingParams
from tests.helpers import load_test_module

base = load_test_module("test_llm.py")
LLM, prompts_of, MAX_NEW = base.LLM, base.prompts_of, base.MAX_NEW

PROMPT_LENGTHS = [5, 17, 40, 1, 64, 33, 3, 90]


@pytest.fixture(scope="module")
def reference(tiny_model):
    prompts = prompts_of(PROMPT_LENGTHS, seed=11)
    return prompts, hf_greedy(tiny_model, prompts, MAX_NEW)


def greedy(max_tokens=MAX_NEW):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


class StepKinds:
    """Counts the engine's steps by kind, and the calls that reach the decode strategy."""

    def __init__(self, llm):
        self.kinds = {"prefill": 0, "decode": 0, "mixed": 0}
        self.decode_strategy_calls = 0
        schedule, decode_run = llm.scheduler.schedule, llm.model_runner.decode.run

        def recorded_schedule():
            batch = schedule()
            if batch.seqs:
                kind = "mixed" if batch.is_mixed else "prefill" if batch.is_prefill else "decode"
                self.kinds[kind] += 1
            return batch

        def recorded_decode(inputs):
            self.decode_strategy_calls += 1
            return decode_run(inputs)

        llm.scheduler.schedule = recorded_schedule
        llm.model_runner.decode.run = recorded_decode


def generate(llm, prompts, params):
    kinds = StepKinds(llm)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert kinds.decode_strategy_calls == kinds.kinds["decode"]  # and never a mixed step
    return [o["token_ids"] for o in outs], kinds.kinds


CASES = {
    # prompts longer than the budget are chunked while the short ones decode
    "chunked": dict(max_num_batched_tokens=32),
    # admissions wait for a free slot: each new prompt joins the running decodes
    "max_num_seqs": dict(max_num_seqs=3, max_num_batched_tokens=48),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mixed_steps_greedy_equal_transformers(tiny_model, reference, case):
    prompts, expected = reference
    llm = LLM(tiny_model, kvcache_block_size=16, **CASES[case])
    # different lengths: sequences finish at different steps and others are admitted then
    lengths = [MAX_NEW - (i % 4) * 3 for i in range(len(prompts))]
    tokens, kinds = generate(llm, prompts, [greedy(n) for n in lengths])
    assert tokens == [e[:n] for e, n in zip(expected, lengths)]
    assert kinds["mixed"] > 0 and kinds["decode"] > 0, kinds
    assert llm.scheduler.block_manager.num_free_blocks == llm.runtime.num_kvcache_blocks


def test_mixed_steps_with_forced_preemption(tiny_model):
    """10 blocks of 16 cannot hold these sequences as they grow: decode preempts (recompute)."""
    prompts = prompts_of([14, 30, 15, 31, 9, 20, 45, 2], seed=12)
    lengths = [24 - (i % 3) * 6 for i in range(len(prompts))]
    expected = hf_greedy(tiny_model, prompts, max(lengths))
    llm = LLM(tiny_model, kvcache_block_size=16, num_kvcache_blocks=10, max_num_batched_tokens=32)
    llm.scheduler.headroom_steps = 0  # admit greedily, so that decode must preempt
    tokens, kinds = generate(llm, prompts, [greedy(n) for n in lengths])
    assert tokens == [e[:n] for e, n in zip(expected, lengths)]
    assert llm.scheduler.num_preemptions > 0 and kinds["mixed"] > 0, kinds
    assert llm.scheduler.block_manager.num_free_blocks == 10


def test_mixed_steps_with_prefix_cache_hits(tiny_model, reference):
    prompts, expected = reference
    base_prompt = prompts_of([48], seed=3)[0]  # exactly 3 blocks of 16
    shared = [base_prompt + [7, 8, 9], base_prompt[:32] + [11] * 5, base_prompt[:32]]
    shared_expected = hf_greedy(tiny_model, shared, MAX_NEW)
    llm = LLM(tiny_model, kvcache_block_size=16, max_num_batched_tokens=32)
    first, _ = generate(llm, [base_prompt, *prompts[:3]], greedy())
    assert first[1:] == expected[:3]
    hashed = len(llm.scheduler.block_manager.hash_to_block_id)
    tokens, kinds = generate(llm, prompts[:3] + shared, greedy())
    assert tokens == expected[:3] + shared_expected
    assert kinds["mixed"] > 0
    assert len(llm.scheduler.block_manager.hash_to_block_id) >= hashed


def test_mixed_steps_off_gives_the_same_tokens_without_mixed_steps(tiny_model, reference):
    prompts, expected = reference
    llm = LLM(
        tiny_model, kvcache_block_size=16, max_num_batched_tokens=32, enable_mixed_steps=False
    )
    tokens, kinds = generate(llm, prompts, greedy())
    assert tokens == expected and kinds["mixed"] == 0


def test_triton_backend_mixed_steps_cpu(tiny_model, reference):
    """The Triton kernels (interpreter) through mixed steps: a few short prompts."""
    pytest.importorskip("triton")
    prompts, expected = reference
    llm = LLM(
        tiny_model, kvcache_block_size=16, max_num_batched_tokens=16, attention_backend="triton"
    )
    assert llm.runtime.attention_backend == "triton"
    tokens, kinds = generate(llm, prompts[:4], greedy(4))
    assert tokens == [e[:4] for e in expected[:4]]
    assert kinds["mixed"] > 0


def test_step_reports_prefill_and_decode_tokens(tiny_model):
    a, c = prompts_of([6, 40], seed=2)
    llm = LLM(tiny_model, kvcache_block_size=16, max_num_batched_tokens=16)
    llm.add_request(a, greedy())
    assert llm.step()[1] == 6 and llm.last_step_tokens == (6, 0)  # prefill
    assert llm.step()[1] == -1 and llm.last_step_tokens == (0, 1)  # decode
    llm.add_request(c, greedy())
    # mixed: a's decode row, then 15 tokens of c; nano-vllm's number is the prefill count
    assert llm.step()[1] == 15 and llm.last_step_tokens == (15, 1)
    while not llm.is_finished():
        llm.step()


def test_progress_bar_reports_both_rates_on_mixed_steps(tiny_model, monkeypatch):
    from nanovllm.engine import llm_engine

    postfixes = []

    class Bar:
        def __init__(self, *args, **kwargs):
            pass

        def set_postfix(self, **kw):
            postfixes.append(kw)

        def update(self, n):
            pass

        def close(self):
            pass

    monkeypatch.setattr(llm_engine, "tqdm", Bar)
    llm = LLM(tiny_model, kvcache_block_size=16, max_num_batched_tokens=16)
    kinds = StepKinds(llm)
    llm.generate(prompts_of([3, 40], seed=4), greedy(), use_tqdm=True)
    assert kinds.kinds["mixed"] > 0
    # the first step is a prefill (no decode rate yet); from the first mixed step on both move
    assert postfixes[0]["decode"] == "0tok/s" and postfixes[0]["prefill"] != "0tok/s"
    assert all(p["decode"] != "0tok/s" for p in postfixes[1:])
