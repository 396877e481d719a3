"""GPU: mixed steps (issue 15) change no greedy output against transformers (bf16 random model
of Qwen3-0.6B shape), and pure-decode steps still replay the CUDA graphs.

As in test_gpu_parity.py the check is teacher-forced: at every step our token must be
transformers' argmax or within bf16 noise of it (a random model has many near-ties), and the
first token must agree exactly. A small ``max_num_batched_tokens`` chunks the prompts while
earlier ones decode, so most prefill tokens run in mixed steps."""

import pytest
import torch

from conftest import mixed_prompts
from nanovllm import LLM, SamplingParams
from tests.helpers import load_test_module

pytestmark = pytest.mark.gpu

StepKinds = load_test_module("test_llm_mixed.py").StepKinds
hf_model = load_test_module("test_gpu_parity.py").hf_model

STEPS = 8


def assert_greedy_close_to_transformers(hf, prompts, outs):
    exact = 0
    for ids, out in zip(prompts, outs):
        ours = out["token_ids"]
        with torch.inference_mode():
            logits = hf(torch.tensor([ids + ours], device="cuda")).logits[0].float()
        steps = logits[len(ids) - 1 : len(ids) - 1 + len(ours)]  # [len(ours), vocab]
        best = steps.max(dim=-1).values
        chosen = steps[torch.arange(len(ours)), torch.tensor(ours, device="cuda")]
        tol = 0.02 * steps.abs().max()
        assert ours[0] == int(steps[0].argmax())
        assert bool((chosen >= best - tol).all()), (best - chosen).max()
        exact += bool(steps.argmax(-1).tolist() == ours)
    assert exact >= len(prompts) // 2


def run(path, prompts, params, **options):
    """Outputs, step counts by kind and decode-strategy calls of one engine (freed after)."""
    llm = LLM(path, gpu_memory_utilization=0.4, max_num_seqs=16, max_model_len=1024, **options)
    kinds = StepKinds(llm)
    try:
        assert llm.runtime.cuda_graphs and llm.model_runner.graph_runner is not None
        outs = llm.generate(prompts, params, use_tqdm=False)
        return outs, kinds
    finally:
        llm.exit()


@pytest.mark.parametrize("attention_backend", ["auto", "triton"])
def test_mixed_steps_greedy_match_transformers(gpu_model_06b, attention_backend):
    prompts = mixed_prompts(24, seed=5)
    params = [
        SamplingParams(temperature=0, max_tokens=STEPS - i % 3, ignore_eos=True)
        for i in range(len(prompts))
    ]
    options = dict(attention_backend=attention_backend, max_num_batched_tokens=256)
    outs, kinds = run(gpu_model_06b, prompts, params, **options)
    assert kinds.kinds["mixed"] > 0 and kinds.kinds["decode"] > 0, kinds.kinds
    # pure-decode steps (and only those) go to the decode strategy: the CUDA graphs
    assert kinds.decode_strategy_calls == kinds.kinds["decode"]
    hf = hf_model(gpu_model_06b)
    assert_greedy_close_to_transformers(hf, prompts, outs)
    # the same engine without mixed steps: the same check (bf16 near-ties may part the two)
    off, off_kinds = run(gpu_model_06b, prompts, params, enable_mixed_steps=False, **options)
    assert off_kinds.kinds["mixed"] == 0
    assert_greedy_close_to_transformers(hf, prompts, off)
    same = sum(a["token_ids"] == b["token_ids"] for a, b in zip(outs, off))
    assert same >= len(prompts) // 2
