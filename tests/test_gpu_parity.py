"""GPU: a bf16 random model of Qwen3-0.6B shape against transformers; CUDA graphs vs eager."""

import pytest
import torch

from conftest import mixed_prompts
from nanovllm import LLM, SamplingParams
from nanovllm.attention.metadata import AttentionMetadata

pytestmark = pytest.mark.gpu

STEPS = 8


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()


@torch.inference_mode()
def prefill_logits(llm, ids):
    """Our last-token logits for one prompt, through the engine's model and attention backend."""
    runner = llm.model_runner
    n = len(ids)
    cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    meta = AttentionMetadata(
        is_prefill=True,
        slot_mapping=torch.full((n,), -1, dtype=torch.int32, device="cuda"),
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
        max_seqlen_q=n,
        max_seqlen_k=n,
    )
    x = torch.tensor(ids, device="cuda")
    hidden = runner.model(x, torch.arange(n, device="cuda"), meta)
    return runner.model.compute_logits(hidden[-1:]).float()[0]


def greedy_params(n=STEPS):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(gpu_model_06b):
    engine = LLM(gpu_model_06b, gpu_memory_utilization=0.4, max_num_seqs=64, max_model_len=1024)
    yield engine
    engine.exit()


def test_logits_close_to_transformers(llm, gpu_model_06b):
    hf = hf_model(gpu_model_06b)
    for ids in mixed_prompts(4, seed=1):
        ours = prefill_logits(llm, ids)
        with torch.inference_mode():
            ref = hf(torch.tensor([ids], device="cuda")).logits[0, -1].float()
        scale = ref.abs().max()
        assert (ours - ref).abs().max() <= 0.05 * scale, "logits differ beyond bf16 tolerance"
        assert ours.argmax() == ref.argmax()


def test_greedy_tokens_match_transformers(llm, gpu_model_06b):
    hf = hf_model(gpu_model_06b)
    prompts = mixed_prompts(6, seed=2)
    outs = llm.generate(prompts, greedy_params(), use_tqdm=False)
    agree = 0
    for ids, out in zip(prompts, outs):
        with torch.inference_mode():
            ref = hf.generate(
                torch.tensor([ids], device="cuda"),
                do_sample=False,
                max_new_tokens=STEPS,
                min_new_tokens=STEPS,
                pad_token_id=0,
            )
        ref = ref[0, len(ids) :].tolist()
        # bf16 kernels differ from transformers': the first steps must agree exactly.
        assert out["token_ids"][:3] == ref[:3]
        agree += out["token_ids"] == ref
    assert agree >= len(prompts) - 1


def test_cuda_graph_decode_equals_eager(llm, gpu_model_06b):
    prompts = mixed_prompts(12, seed=3)
    graph = llm.generate(prompts, greedy_params(16), use_tqdm=False)
    assert llm.runtime.cuda_graphs
    eager = LLM(
        gpu_model_06b,
        gpu_memory_utilization=0.2,
        max_num_seqs=64,
        max_model_len=1024,
        enforce_eager=True,
    )
    out = eager.generate(prompts, greedy_params(16), use_tqdm=False)
    eager.exit()
    same = sum(a["token_ids"] == b["token_ids"] for a, b in zip(graph, out))
    assert same == len(prompts)
