"""GPU: after start-up and one short request, no request compiles a Triton kernel.

Triton keeps compiled kernels per process: run this file in a process of its own (kernels that
earlier tests compiled would not be seen compiling here)."""

import pytest

from conftest import mixed_prompts
from nanovllm import LLM, SamplingParams

pytestmark = pytest.mark.gpu


def test_no_triton_compile_after_the_first_request(gpu_model_06b):
    knobs = pytest.importorskip("triton").knobs
    llm = LLM(
        gpu_model_06b,
        gpu_memory_utilization=0.3,
        max_num_seqs=16,
        max_model_len=1024,
        max_num_batched_tokens=256,  # prompts of up to 600 tokens: chunked prefill
    )
    try:
        llm.generate(["Warm-up"], SamplingParams(max_tokens=4), use_tqdm=False)  # as bench.py
        prompts = mixed_prompts(8, seed=3, lo=20, hi=600)
        prompts.append(prompts[0])  # a prefix-cache hit
        compiled = []
        previous = knobs.runtime.jit_post_compile_hook
        knobs.runtime.jit_post_compile_hook = lambda *a, **kw: compiled.append(kw.get("repr"))
        try:
            outs = llm.generate(
                prompts,
                SamplingParams(temperature=0.6, max_tokens=40, ignore_eos=True),
                use_tqdm=False,
            )
        finally:
            knobs.runtime.jit_post_compile_hook = previous
        assert [len(o["token_ids"]) for o in outs] == [40] * len(prompts)
        assert compiled == [], f"kernels compiled inside a request: {compiled}"
    finally:
        llm.exit()
