"""The pipelined decode step, its schedule emulated serially on the CPU (no streams): every
micro-batch's rows equal the model's plain forward on those rows, bit for bit, KV cache too."""

import contextlib
from dataclasses import replace

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.model_inputs import prepare_decode
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.pipeline.microbatch import microbatch_bounds
from nanovllm.pipeline.scheduler import PipelineScheduler
from nanovllm.pipeline.sequential import SequentialDecode
from nanovllm.pipeline.setup import PipelineOptions


class SerialGreen:
    """A GreenContextManager stand-in without streams: the step runs in issue order."""

    attention_stream = ffn_stream = None
    attention_sms = ffn_sms = total_sms = 0
    generation = 0
    available, reason = True, ""

    def cublas_sm_budget(self, stage):
        return contextlib.nullcontext()

    def close(self):
        pass


def pipeline_of(llm, green, **options):
    """A PipelineScheduler over ``llm``'s model on ``green``, as ``make_decode_strategy`` builds
    it on a GPU."""
    runner = llm.model_runner
    setup = runner._decode_setup()
    sequential = SequentialDecode(setup.model, setup.graphs)
    opts = PipelineOptions(
        num_microbatches=llm.config.pipeline_num_microbatches, search_split=False, **options
    )
    return PipelineScheduler(setup, opts, green, sequential)


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
    pipe = pipeline_of(llm, SerialGreen())
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
    pipe = pipeline_of(llm, SerialGreen())
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
    pipe = pipeline_of(llm, green)
    pipe.stats.profiling = True
    pipe.stats.attention_ms, pipe.stats.ffn_ms, pipe.stats.step_ms = [3.0], [1.0], [3.2]
    assert pipe.rebalance() == (48, 84)  # attention took longer: it gets 8 more SMs
    pipe.stats.attention_ms, pipe.stats.ffn_ms = [1.0], [3.0]
    assert pipe.rebalance() == (40, 92)
    pipe.stats.attention_ms, pipe.stats.ffn_ms = [1.0], [1.05]
    assert pipe.rebalance() == (40, 92) and len(green.calls) == 2  # balanced: no change


@torch.inference_mode()
def test_attention_stage_runs_the_kernel_chosen_for_its_partition(tiny_model, monkeypatch):
    """Each micro-batch's attention call goes to the backend chosen for the attention
    partition; the plain forward keeps the engine's backend."""
    llm = LLM(tiny_model, device="cpu", kvcache_block_size=16)
    runner = llm.model_runner

    class Green24(SerialGreen):
        attention_sms = 24

    pipe = pipeline_of(llm, Green24(), attention_kernel="tma")
    # CPU: the copy-engine kernel needs the Triton backend and an sm_90 GPU
    assert pipe.kernels.attention is runner.backend and pipe.kernels.attention_kernel == "torch"
    assert pipe.statistics()["kernels"] == {"attention_stage": "torch", "ffn_stage_gemm": "triton"}
    seen = []

    class Partition(type(runner.backend)):
        def decode(self, q, k, v, meta, scale):
            seen.append("partition")
            return super().decode(q, k, v, meta, scale)

    pipe.kernels = replace(pipe.kernels, attention=Partition(), attention_kernel="tma")
    inputs = decode_batch(llm, [5, 17, 33])
    pipe.step(inputs.input_ids, inputs.positions, inputs.meta)
    assert len(seen) == 2 * llm.runtime.hf_config.num_hidden_layers  # 2 micro-batches per layer
    seen.clear()
    runner.model(inputs.input_ids, inputs.positions, inputs.meta)
    assert seen == []


class FakeTimingEvent:
    """A CUDA timing event stand-in: records a counter, so intervals have increasing times."""

    clock = 0

    def record(self, stream=None):
        FakeTimingEvent.clock += 1
        self.t = float(FakeTimingEvent.clock)

    def elapsed_time(self, end):
        return end.t - self.t

    def synchronize(self):
        pass


@torch.inference_mode()
def test_profiling_records_stage_intervals_per_bucket(tiny_model, monkeypatch, tmp_path):
    """With profiling, a step records every stage's interval (CUDA events on a GPU, stand-ins
    here): per-bucket stage times, the step count and the trace export follow from them."""
    import json

    from nanovllm.pipeline import stats as stats_mod

    monkeypatch.setattr(stats_mod, "_timing_event", FakeTimingEvent)
    llm = LLM(tiny_model, device="cpu", kvcache_block_size=16)
    pipe = pipeline_of(llm, SerialGreen(), profiling=True)
    inputs = decode_batch(llm, [3, 4, 5, 6])
    pipe.run(inputs)
    pipe.run(inputs)
    stats = pipe.statistics()
    layers = llm.runtime.hf_config.num_hidden_layers
    bucket = stats["per_bucket"][4]
    assert stats["steps"] == 2 and bucket["steps"] == 2 and stats["mode"] == "pipelined"
    # every event records one tick: each stage interval is 1, the step spans all records
    assert bucket["attention_ms"] == 2 * layers and bucket["ffn_ms"] == 2 * (layers + 1)
    assert bucket["step_ms"] > bucket["ffn_ms"]
    path = tmp_path / "trace.json"
    pipe.export_trace(str(path))
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e["ph"] == "X"]
    assert len(events) == 2 * (1 + 2 * layers + 2 * (layers + 1))


def test_microbatch_count_stays_within_what_the_engine_was_built_for(tiny_model):
    llm = LLM(tiny_model, device="cpu", kvcache_block_size=16, pipeline_num_microbatches=3)
    pipe = pipeline_of(llm, SerialGreen())
    pipe.num_microbatches = 2
    assert pipe.stepper.num_microbatches == 2
    with pytest.raises(ValueError, match="num_microbatches=4: use 2 to 3"):
        pipe.num_microbatches = 4
