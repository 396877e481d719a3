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
    """Greedy tokens against transformers, teacher-forced: at every step our token must be
    transformers' argmax or within bf16 noise of it (a random model has many near-ties, so
    free-running sequences may part after a tie and that is not an error), and the first step
    must agree exactly."""
    prompts = mixed_prompts(6, seed=2)
    outs = llm.generate(prompts, greedy_params(), use_tqdm=False)
    assert_teacher_forced(hf_model(gpu_model_06b), prompts, outs)


def assert_teacher_forced(hf, prompts, outs):
    """See test_greedy_tokens_match_transformers."""
    exact = 0
    for ids, out in zip(prompts, outs):
        ours = out["token_ids"]
        with torch.inference_mode():
            logits = hf(torch.tensor([ids + ours], device="cuda")).logits[0].float()
        steps = logits[len(ids) - 1 : len(ids) - 1 + len(ours)]  # [STEPS, vocab]
        best = steps.max(dim=-1).values
        chosen = steps[torch.arange(len(ours)), torch.tensor(ours, device="cuda")]
        tol = 0.02 * steps.abs().max()
        assert ours[0] == int(steps[0].argmax())
        assert bool((chosen >= best - tol).all()), (best - chosen).max()
        exact += bool(steps.argmax(-1).tolist() == ours)
    assert exact >= len(prompts) // 2


@torch.inference_mode()
def test_cuda_graph_decode_equals_eager(llm):
    """One decode step of 13 sequences (a padded bucket) through the captured graph and
    eagerly: the same hidden states within bf16 rounding (the padded bucket's GEMMs have
    another shape, so cuBLAS may round differently)."""
    from nanovllm.engine.model_inputs import prepare_decode
    from nanovllm.engine.scheduler import ScheduledBatch
    from nanovllm.engine.sequence import Sequence

    runner = llm.model_runner
    assert llm.runtime.cuda_graphs and runner.graph_runner is not None
    bs = llm.config.kvcache_block_size
    batch = ScheduledBatch(is_prefill=False)
    for n in [5, 300, 17, 1, 700, 33, 64, 2, 129, 256, 257, 90, 11]:
        seq = Sequence(list(range(1, n + 1)), greedy_params(), bs)
        llm.scheduler.block_manager.allocate(seq)
        batch.seqs.append(seq)
        batch.num_new_tokens.append(1)
    inputs = prepare_decode(batch, bs, runner.device)
    graph = runner.graph_runner.run(inputs).clone()
    eager = runner.model(inputs.input_ids, inputs.positions, inputs.meta)
    diff = (graph.float() - eager.float()).norm(dim=-1) / eager.float().norm(dim=-1)
    # bf16 rounding differences, amplified over 28 layers of a random model: small per row.
    assert float(diff.max()) < 0.06 and float(diff.mean()) < 0.01, diff
    for seq in batch.seqs:
        llm.scheduler.block_manager.deallocate(seq)


def test_async_scheduling_equals_the_synchronous_engine(llm, gpu_model_06b):
    """Decode steps issued ahead (the default) take their input tokens from the step before's
    samples on the device and hand their tokens back through a pinned buffer. Requests end on
    their lengths here, which the look-ahead leaves out, so both engines run the same batches
    through the same graphs: greedy and seeded tokens must be equal exactly."""
    assert llm.config.async_scheduling and llm.runtime.cuda_graphs
    sync = LLM(
        gpu_model_06b,
        gpu_memory_utilization=0.4,
        max_num_seqs=64,
        max_model_len=1024,
        async_scheduling=False,
    )
    try:
        prompts = mixed_prompts(40, seed=5, hi=200)
        ahead_steps = []
        real = llm.scheduler.schedule_ahead
        llm.scheduler.schedule_ahead = lambda prev: (
            ahead_steps.append(real(prev)) or ahead_steps[-1]
        )
        for params in (
            [
                SamplingParams(temperature=0, max_tokens=4 + i % 29, ignore_eos=True)
                for i in range(40)
            ],
            [
                SamplingParams(temperature=0.8, seed=i, max_tokens=3 + i % 17, ignore_eos=True)
                for i in range(40)
            ],
        ):
            ours = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
            ref = [o["token_ids"] for o in sync.generate(prompts, params, use_tqdm=False)]
            assert ours == ref
        assert sum(s is not None for s in ahead_steps) > 20
    finally:
        del llm.scheduler.schedule_ahead
        sync.exit()


def test_mixed_steps_greedy_tokens_match_transformers(gpu_model_06b):
    """Mixed steps (decode rows and prefill chunks in one eager step, attention in two
    launches): greedy tokens against transformers as above. Few slots and a small token budget
    make new prompts start, in chunks, beside running decodes."""
    mixed = LLM(
        gpu_model_06b,
        gpu_memory_utilization=0.3,
        max_num_seqs=4,
        max_model_len=1024,
        max_num_batched_tokens=256,
        enable_mixed_steps=True,
    )
    try:
        real = mixed.scheduler.schedule
        batches = []
        mixed.scheduler.schedule = lambda: batches.append(real()) or batches[-1]
        prompts = mixed_prompts(10, seed=6)
        outs = mixed.generate(prompts, greedy_params(), use_tqdm=False)
        assert sum(b.num_decode_rows > 0 for b in batches) >= 3
        assert_teacher_forced(hf_model(gpu_model_06b), prompts, outs)
    finally:
        mixed.exit()
