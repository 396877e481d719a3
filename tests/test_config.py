"""Config (and LLM's option handling): defaults, invalid values, missing folders, unknown
options, the pipeline fields."""

import dataclasses
import math

import pytest
import torch

from nanovllm import LLM
from nanovllm.config import Config


def test_defaults(tiny_model):
    c = Config(tiny_model)
    assert c.model == tiny_model
    assert c.max_num_batched_tokens == 16384 and c.max_num_seqs == 512
    assert c.max_model_len == 4096 and c.gpu_memory_utilization == 0.9
    assert c.tensor_parallel_size == 1 and c.enforce_eager is False
    assert c.kvcache_block_size == 256 and c.num_kvcache_blocks is None
    assert c.enable_prefix_caching is True
    assert (c.device, c.dtype, c.attention_backend, c.load_format) == ("auto",) * 4
    assert c.seed == 0
    assert c.enable_pipeline is False
    assert c.pipeline_attention_sm_count is None and c.pipeline_ffn_sm_count is None
    assert c.pipeline_num_microbatches == 2 and c.pipeline_enable_profiling is False
    assert c.pipeline_policy == "auto" and c.pipeline_attention_kernel == "triton"
    assert c.pipeline_ffn_gemm == "triton"
    assert c.kv_cache_dtype == "auto"
    assert c.prefill_admission_batch is None and c.resolved_prefill_admission_batch() == 64
    assert c.async_scheduling is True and c.enable_mixed_steps is False


def test_the_batch_cap_scales_with_the_ranks_and_the_cache_unless_given(tiny_model):
    two = Config(tiny_model, tensor_parallel_size=2)
    assert two.max_num_seqs == 1024 and two.resolved_prefill_admission_batch() == 128
    assert Config(tiny_model, tensor_parallel_size=2, max_num_seqs=300).max_num_seqs == 300
    assert Config(tiny_model, kv_cache_dtype="fp8").max_num_seqs == 1024
    fp8_tp2 = Config(tiny_model, kv_cache_dtype="fp8_e4m3", tensor_parallel_size=2)
    assert fp8_tp2.max_num_seqs == 2048


def test_async_scheduling_is_on_unless_turned_off(tiny_model):
    assert Config(tiny_model).async_scheduling is True
    assert Config(tiny_model, tensor_parallel_size=2).async_scheduling is True
    assert Config(tiny_model, async_scheduling=False).async_scheduling is False


def test_valid_non_defaults(tiny_model):
    c = Config(
        tiny_model,
        kvcache_block_size=16,
        num_kvcache_blocks=3,
        device="cpu",
        dtype="bfloat16",
        attention_backend="torch",
        load_format="dummy",
        gpu_memory_utilization=1.0,
        pipeline_attention_sm_count=16,
        pipeline_ffn_sm_count=116,
        pipeline_num_microbatches=4,
        pipeline_ffn_gemm="cublas",
    )
    assert c.num_kvcache_blocks == 3 and c.pipeline_ffn_sm_count == 116


INVALID = [
    ("pipeline_policy", "sometimes"),
    ("pipeline_attention_kernel", "auto"),
    ("pipeline_ffn_gemm", "cutlass"),
    ("max_num_batched_tokens", 0),
    ("max_num_batched_tokens", -1),
    ("max_num_batched_tokens", 1.5),
    ("max_num_batched_tokens", True),
    ("max_num_seqs", 0),
    ("max_num_seqs", "8"),
    ("max_model_len", 0),
    ("prefill_admission_batch", 0),
    ("prefill_admission_batch", 513),
    ("prefill_admission_batch", 2.0),
    ("async_scheduling", 1),
    ("enable_mixed_steps", "yes"),
    ("max_model_len", 1024.0),
    ("tensor_parallel_size", 0),
    ("gpu_memory_utilization", 0),
    ("gpu_memory_utilization", 1.5),
    ("gpu_memory_utilization", -0.2),
    ("gpu_memory_utilization", math.nan),
    ("gpu_memory_utilization", "0.9"),
    ("kvcache_block_size", 0),
    ("kvcache_block_size", 8),
    ("kvcache_block_size", 24),
    ("kvcache_block_size", 16.0),
    ("num_kvcache_blocks", 0),
    ("num_kvcache_blocks", -4),
    ("device", "tpu"),
    ("device", "cuda:0"),
    ("dtype", "int8"),
    ("dtype", torch.float16),
    ("attention_backend", "xformers"),
    ("load_format", "pt"),
    ("tensor_parallel_all_reduce", "custom"),
    ("tensor_parallel_all_reduce", None),
    ("kv_cache_dtype", "fp16"),
    ("kv_cache_dtype", "int8"),
    ("kv_cache_dtype", "fp8_e5m2"),
    ("kv_cache_dtype", torch.float8_e4m3fn),
    ("seed", "0"),
    ("seed", 1.5),
    ("enforce_eager", "no"),
    ("enable_prefix_caching", None),
    ("enable_pipeline", 1),
    ("pipeline_enable_profiling", "yes"),
    ("pipeline_num_microbatches", 1),
    ("pipeline_num_microbatches", 0),
    ("pipeline_num_microbatches", 2.5),
]


@pytest.mark.parametrize("field,value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_raises_value_error_naming_field_and_value(tiny_model, field, value):
    with pytest.raises(ValueError) as info:
        Config(tiny_model, **{field: value})
    msg = str(info.value)
    assert f"Config.{field}" in msg
    assert repr(value) in msg
    assert ":" in msg.split(repr(value), 1)[1]  # followed by what to do instead


@pytest.mark.parametrize(
    "attn,ffn,bad_field,bad_value",
    [
        (0, 100, "pipeline_attention_sm_count", 0),
        (16, -1, "pipeline_ffn_sm_count", -1),
        (16.5, 100, "pipeline_attention_sm_count", 16.5),
        (True, 100, "pipeline_attention_sm_count", True),
    ],
)
def test_pipeline_sm_counts_must_be_positive_ints(tiny_model, attn, ffn, bad_field, bad_value):
    with pytest.raises(ValueError) as info:
        Config(tiny_model, pipeline_attention_sm_count=attn, pipeline_ffn_sm_count=ffn)
    assert f"Config.{bad_field}={bad_value!r}" in str(info.value)


@pytest.mark.parametrize(
    "attn,ffn,missing",
    [(16, None, "pipeline_ffn_sm_count"), (None, 100, "pipeline_attention_sm_count")],
)
def test_pipeline_sm_counts_both_or_neither(tiny_model, attn, ffn, missing):
    with pytest.raises(ValueError) as info:
        Config(tiny_model, pipeline_attention_sm_count=attn, pipeline_ffn_sm_count=ffn)
    msg = str(info.value)
    assert f"Config.{missing}=None" in msg
    assert "pipeline_attention_sm_count" in msg and "pipeline_ffn_sm_count" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_device_cuda_without_gpu(tiny_model):
    with pytest.raises(ValueError, match=r"Config\.device='cuda'.*device=\"cpu\""):
        Config(tiny_model, device="cuda")


def test_missing_model_folder(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        Config(missing)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        LLM(missing)


def test_model_path_that_is_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Config(str(f))


def test_unknown_llm_options_are_named(tiny_model):
    with pytest.raises(ValueError) as info:
        LLM(tiny_model, max_num_seq=4, gpu_mem_util=0.5)
    msg = str(info.value)
    assert "gpu_mem_util" in msg and "max_num_seq'" in msg
    assert "max_num_seqs" in msg  # the valid options are listed


def test_llm_validates_config_before_loading(tiny_model):
    with pytest.raises(ValueError, match=r"Config\.kvcache_block_size=10"):
        LLM(tiny_model, kvcache_block_size=10)


def test_field_names_cover_every_field():
    assert Config.field_names() == {f.name for f in dataclasses.fields(Config)}
    assert "model" in Config.field_names()


@pytest.mark.parametrize("value", ["auto", "fp8", "fp8_e4m3"])
def test_kv_cache_dtype_choices(tiny_model, value):
    assert Config(tiny_model, kv_cache_dtype=value).kv_cache_dtype == value


def test_kv_cache_dtype_error_lists_the_choices(tiny_model):
    with pytest.raises(ValueError, match=r"kv_cache_dtype='int4'.*'auto', 'fp8', 'fp8_e4m3'"):
        Config(tiny_model, kv_cache_dtype="int4")


def test_fp8_kv_cache_refused_with_forced_flash_attn(tiny_model):
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8'.*flash_attn.*'triton'"):
        Config(tiny_model, kv_cache_dtype="fp8", attention_backend="flash_attn")
    Config(tiny_model, kv_cache_dtype="auto", attention_backend="flash_attn")  # fine


def test_kv_cache_torch_dtype():
    from nanovllm.config import kv_cache_torch_dtype

    assert kv_cache_torch_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert kv_cache_torch_dtype("fp8", torch.bfloat16) == torch.float8_e4m3fn
    assert kv_cache_torch_dtype("fp8_e4m3", torch.float32) == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="kv_cache_dtype='e5m2'"):
        kv_cache_torch_dtype("e5m2", torch.bfloat16)


def test_automatic_choices_are_logged_and_given_ones_are_not(tiny_model, caplog):
    from nanovllm.config import log_automatic_choices

    with caplog.at_level("INFO", logger="nanovllm"):
        log_automatic_choices(Config(tiny_model), given={})
        text = caplog.text
        assert "max_num_seqs=512" in text
        assert "prefill_admission_batch=64" in text
        caplog.clear()
        given = dict(max_num_seqs=8, async_scheduling=False, prefill_admission_batch=2)
        log_automatic_choices(Config(tiny_model, **given), given=given)
        assert caplog.text == ""
