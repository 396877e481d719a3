"""End to end: generate with ``kv_cache_dtype="fp8"`` against the model-dtype cache.

The logits of each greedy step are recorded (``benchmarks/kv_fp8_accuracy.py``'s helpers) and
compared while both runs have produced the same tokens, so that both steps see the same inputs.

CPU bound (tiny random Qwen3, float32, torch backend, chunked prefill so that later chunks read
earlier ones from the cache): e4m3 keeps 3 mantissa bits, 2^-4 relative error per K/V element at
most; through 4 layers the logits moved by under 2% of the largest logit (measured 1.1-1.9% on
three random models, mean absolute error 0.002 on logits of magnitude up to about 1.5). The test
allows 5% of the largest logit and a mean of 0.006, about three times the measured values, and
90% greedy token agreement (measured 100%).
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.kv_fp8_accuracy import compare, greedy_with_logits
from conftest import mixed_prompts
from nanovllm import LLM

STEPS = 8


def greedy_runs(path, kv, prompts, **options):
    llm = LLM(path, kv_cache_dtype=kv, **options)
    try:
        runs = [greedy_with_logits(llm, p, STEPS) for p in prompts]
        return runs, llm.runtime.num_kvcache_blocks, llm.model_runner.kv_cache.dtype
    finally:
        llm.exit()


def test_fp8_generate_close_to_float32_cache_cpu(tiny_model):
    prompts = mixed_prompts(8, seed=0)
    options = dict(device="cpu", kvcache_block_size=16, max_num_batched_tokens=128)
    ref, ref_blocks, ref_dtype = greedy_runs(tiny_model, "auto", prompts, **options)
    out, blocks, dtype = greedy_runs(tiny_model, "fp8", prompts, **options)
    assert ref_dtype == torch.float32 and dtype == torch.float8_e4m3fn
    assert blocks == 4 * ref_blocks  # 1-byte elements instead of 4, the same memory
    acc = compare(ref, out)
    first, agreeing = acc["first_decode_step"], acc["agreeing_steps"]
    assert first["max_abs_over_max_logit"] <= 0.05, acc
    assert agreeing["max_abs_over_max_logit"] <= 0.05, acc
    assert agreeing["mean_abs"] <= 0.006, acc
    assert acc["prefill_last_position_max_abs"] <= 0.05, acc  # chunked prompts read the cache
    assert acc["token_agreement"] >= 0.9, acc


def test_fp8_alias_and_same_tokens_as_fp8_cpu(tiny_model):
    prompts = mixed_prompts(2, seed=3)
    a, _, _ = greedy_runs(tiny_model, "fp8", prompts, device="cpu")
    b, _, dtype = greedy_runs(tiny_model, "fp8_e4m3", prompts, device="cpu")
    assert dtype == torch.float8_e4m3fn
    assert [t for t, _ in a] == [t for t, _ in b]


@pytest.mark.gpu
def test_fp8_generate_close_to_bf16_cache_gpu(gpu_model_06b):
    """Qwen3-0.6B shape, bf16, Triton backend with CUDA graphs: logit error and greedy agreement
    of the fp8 cache against the bf16 cache (bounds about three times the CPU measurements'
    relative error, as random weights give near-flat logits where small changes flip ties)."""
    prompts = mixed_prompts(8, seed=1)
    options = dict(
        attention_backend="triton", gpu_memory_utilization=0.4, max_num_seqs=16, max_model_len=1024
    )
    ref, ref_blocks, _ = greedy_runs(gpu_model_06b, "auto", prompts, **options)
    out, blocks, dtype = greedy_runs(gpu_model_06b, "fp8", prompts, **options)
    assert dtype == torch.float8_e4m3fn
    assert blocks >= 1.9 * ref_blocks  # same budget, half the bytes per block
    acc = compare(ref, out)
    # a fresh prefill does not read the cache: equal up to run-to-run noise, below fp8's error
    assert acc["prefill_last_position_max_abs"] <= acc["first_decode_step"]["max_abs"], acc
    assert acc["first_decode_step"]["max_abs_over_max_logit"] <= 0.1, acc
    assert acc["agreeing_steps"]["max_abs_over_max_logit"] <= 0.1, acc
    assert acc["token_agreement"] >= 0.75, acc


def test_accuracy_benchmark_smoke_cpu(tmp_path):
    import json

    from benchmarks import kv_fp8_accuracy

    out = tmp_path / "fp8.json"
    argv = ["--shape", "tiny", "--device", "cpu", "--num-prompts", "2", "--steps", "4"]
    payload = kv_fp8_accuracy.main([*argv, "--throughput-seqs", "2", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["argv"] == [*argv, "--throughput-seqs", "2", "--json", str(out)]
    assert saved["card"] and "git_commit" in saved
    auto, fp8 = payload["results"]["auto"], payload["results"]["fp8"]
    assert fp8["kv_cache_torch_dtype"] == "torch.float8_e4m3fn"
    assert fp8["num_kvcache_blocks"] == 4 * auto["num_kvcache_blocks"]  # float32 on CPU
    assert auto["throughput_tok_s"] > 0 and fp8["throughput_tok_s"] > 0
    acc = payload["accuracy"]
    assert acc["prompts"] == 2 and acc["first_decode_step"]["steps"] == 2
    assert acc["prefill_last_position_max_abs"] == 0.0  # fresh prefill does not read the cache
    with pytest.raises(SystemExit):
        kv_fp8_accuracy.parse_args(["--model", "/x", "--shape", "8b"])
    with pytest.raises(SystemExit):
        kv_fp8_accuracy.parse_args(["--steps", "1"])
