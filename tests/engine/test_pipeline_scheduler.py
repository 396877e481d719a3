"""The pipelined decode step, its schedule emulated serially on the CPU (no streams): every
micro-batch's rows equal the model's plain forward on those rows, bit for bit, KV cache too."""

import contextlib

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.microbatch import microbatch_bounds
from nanovllm.engine.model_inputs import prepare_decode
from nanovllm.engine.pipeline_scheduler import PipelineScheduler
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence


class SerialGreen:
    """A GreenContextManager stand-in without streams: the step runs in issue order."""

    attention_stream = ffn_stream = None
    attention_sms = ffn_sms = total_sms = 0
    generation = 0

    def cublas_sm_budget(self, stage):
        return contextlib.nullcontext()

    def on_repartition(self, fn):
        return fn

    def close(self):
        pass


def decode_batch(llm, lengths):
    bs = llm.config.kvcache_block_size
    batch = ScheduledBatch(is_prefill=False)
    for n in lengths:
        seq = Sequence(list(range(1, n + 1)), SamplingParams(), bs)
        llm.scheduler.block_manager.allocate(seq)
        batch.seqs.append(seq)
        batch.num_new_tokens.append(1)
    return prepare_decode(batch, bs, llm.runtime.device)


@torch.inference_mode()
def test_pipelined_step_equals_forward_per_microbatch(tiny_model):
    llm = LLM(tiny_model, device="cpu", kvcache_block_size=16, pipeline_num_microbatches=3)
    runner = llm.model_runner
    pipe = PipelineScheduler(runner, "green", "", green=SerialGreen())
    inputs = decode_batch(llm, [5, 17, 33, 2, 64, 40, 9])
    # Give the cache real prefix contents so attention reads something.
    runner.kv_cache.normal_()
    reference_cache = runner.kv_cache.clone()
    out = pipe.step(inputs.input_ids, inputs.positions, inputs.meta).clone()
    piped_cache = runner.kv_cache.clone()

    runner.kv_cache.copy_(reference_cache)
    for lo, hi in microbatch_bounds(len(inputs.input_ids), 3):
        ref = runner.model(
            inputs.input_ids[lo:hi], inputs.positions[lo:hi], inputs.meta.decode_slice(lo, hi)
        )
        assert torch.equal(out[lo:hi], ref)
    assert torch.equal(runner.kv_cache, piped_cache)
    # And close to the whole-batch forward (other row counts round differently).
    whole = runner.model(inputs.input_ids, inputs.positions, inputs.meta)
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_profiling_counters_without_cuda(tiny_model):
    llm = LLM(tiny_model, device="cpu", kvcache_block_size=16)
    pipe = PipelineScheduler(llm.model_runner, "green", "", green=SerialGreen())
    inputs = decode_batch(llm, [3, 4, 5])
    hidden = pipe.run(inputs)
    assert hidden.shape == (3, llm.runtime.hf_config.hidden_size)
    stats = pipe.statistics()
    assert stats["enabled"] is True and stats["steps"] == 1 and stats["tokens"] == 3


class RecordingGreen(SerialGreen):
    attention_sms, ffn_sms = 40, 92

    def __init__(self):
        self.calls = []

    def adjust_sm_allocation(self, a, f):
        self.calls.append((a, f))
        self.attention_sms, self.ffn_sms = a, f
        self.generation += 1
        return a, f


def test_rebalance_moves_sms_towards_the_slower_stage(tiny_model):
    llm = LLM(tiny_model, device="cpu", kvcache_block_size=16)
    green = RecordingGreen()
    pipe = PipelineScheduler(llm.model_runner, "green", "", green=green)
    pipe.stats.profiling = True
    pipe.stats.attention_ms, pipe.stats.ffn_ms, pipe.stats.step_ms = [3.0], [1.0], [3.2]
    assert pipe.rebalance() == (48, 84)  # attention took longer: it gets 8 more SMs
    pipe.stats.attention_ms, pipe.stats.ffn_ms = [1.0], [3.0]
    assert pipe.rebalance() == (40, 92)
    pipe.stats.attention_ms, pipe.stats.ffn_ms = [1.0], [1.05]
    assert pipe.rebalance() == (40, 92) and len(green.calls) == 2  # balanced: no change


@torch.inference_mode()
def test_attention_stage_metadata_names_its_partition(tiny_model, monkeypatch):
    """Each micro-batch's attention call carries the kernel chosen for the attention partition;
    the plain forward never asks for the copy-engine kernel."""
    llm = LLM(tiny_model, device="cpu", kvcache_block_size=16)
    runner = llm.model_runner

    class Green24(SerialGreen):
        attention_sms = 24

    pipe = PipelineScheduler(runner, "green", "", green=Green24())
    assert pipe.attention_tma is False  # CPU: the copy-engine kernel needs an sm_90 GPU
    seen = []
    backend = runner.backend
    decode = backend.decode
    monkeypatch.setattr(
        backend,
        "decode",
        lambda q, k, v, meta, scale: seen.append(meta.decode_tma) or decode(q, k, v, meta, scale),
    )
    inputs = decode_batch(llm, [5, 17, 33])
    pipe.step(inputs.input_ids, inputs.positions, inputs.meta)
    assert len(seen) == 2 * llm.runtime.hf_config.num_hidden_layers  # 2 micro-batches per layer
    assert set(seen) == {False}
    pipe.attention_tma = True  # as chosen on an sm_90 GPU
    seen.clear()
    pipe.step(inputs.input_ids, inputs.positions, inputs.meta)
    assert set(seen) == {True}
    seen.clear()
    runner.model(inputs.input_ids, inputs.positions, inputs.meta)
    assert set(seen) == {False}
