"""User configuration, validated once. Values derived at run time (the resolved device and
dtype, the KV block count, the SM split actually granted) live in ``RuntimeInfo``."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields

import torch

from nanovllm.attention import backend_names

logger = logging.getLogger(__name__)

# KV-cache storage: "auto" = the model dtype; "fp8" (alias "fp8_e4m3") = float8 e4m3 with a
# per-layer scale (engine/kv_cache.py says why), half the bytes of bf16 per token.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
FP8_KV_DTYPE = torch.float8_e4m3fn
# The default batch cap per GPU: a tensor-parallel engine holds each sequence's KV heads split
# over its ranks, so N ranks hold about N times the sequences, and its per-step costs (host
# work, collectives) are then shared by more rows. An fp8 cache holds twice the tokens of a
# 16-bit one, so it doubles the cap too.
MAX_NUM_SEQS_PER_GPU = 512
TP_ALL_REDUCES = ("nccl", "symm_mem", "auto")


def default_max_num_seqs(tensor_parallel_size: int, kv_cache_dtype: str) -> int:
    """``max_num_seqs`` when not given: MAX_NUM_SEQS_PER_GPU per rank, twice that on fp8."""
    per_gpu = MAX_NUM_SEQS_PER_GPU * (1 if kv_cache_dtype == "auto" else 2)
    return per_gpu * tensor_parallel_size


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The element type the KV cache is stored in, for ``Config.kv_cache_dtype``."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype in ("fp8", "fp8_e4m3"):
        return FP8_KV_DTYPE
    raise ValueError(
        f"Config.kv_cache_dtype={kv_cache_dtype!r} is invalid: use one of {KV_CACHE_DTYPES}"
    )


@dataclass
class Config:
    model: str
    max_num_batched_tokens: int = 16384
    # Sequences per step; None: MAX_NUM_SEQS_PER_GPU per tensor-parallel rank (x2, fp8 cache).
    max_num_seqs: int | None = None
    # While decodes run, new requests are admitted only once at least this many can be (or all
    # that wait): prefill then runs in fewer, larger steps. None: max_num_seqs // 8 (logged).
    prefill_admission_batch: int | None = None
    # Schedule and issue decode step n+1 before reading step n's tokens (engine/llm_engine.py),
    # so the host's work between decode steps overlaps the GPU's. False: every step synchronous.
    # With tensor parallelism rank 0 then waits for a step's tokens watching for worker failures
    # (engine/tp_workers.py), so a failed worker surfaces as it does synchronously.
    async_scheduling: bool = True
    # A step carries the running decodes first, then prefill chunks up to max_num_batched_tokens
    # (engine/mixed_scheduler.py); False: prefill runs in steps of its own, decodes waiting.
    enable_mixed_steps: bool = False
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    # How ranks sum the row-parallel layers' outputs: "nccl" sums all with NCCL; "symm_mem" sums
    # messages up to a decode step's with one- or two-shot kernels over NVLink (torch's
    # symmetric memory, one such engine per process), larger ones with NCCL; "auto": symm_mem
    # where every rank can use it (GPUs with peer access, the process's first such engine), else
    # nccl (logged). Ignored at tensor_parallel_size=1.
    tensor_parallel_all_reduce: str = "auto"
    enforce_eager: bool = False
    kvcache_block_size: int = 256
    num_kvcache_blocks: int | None = None
    enable_prefix_caching: bool = True
    device: str = "auto"
    dtype: str = "auto"
    attention_backend: str = "auto"
    kv_cache_dtype: str = "auto"
    load_format: str = "auto"
    seed: int = 0
    skip_tokenizer_init: bool = False
    enable_pipeline: bool = False
    pipeline_attention_sm_count: int | None = None
    pipeline_ffn_sm_count: int | None = None
    pipeline_enable_profiling: bool = False
    pipeline_num_microbatches: int = 2
    pipeline_policy: str = "auto"
    pipeline_attention_kernel: str = "triton"
    pipeline_ffn_gemm: str = "triton"

    def __post_init__(self):
        def bad(name, fix):
            raise ValueError(f"Config.{name}={getattr(self, name)!r} is invalid: {fix}")

        def positive_int(name):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "use an integer >= 1")

        if not os.path.isdir(self.model):
            raise FileNotFoundError(
                f"model folder {self.model!r} does not exist: pass the path of a Hugging Face "
                "Qwen3 checkpoint folder (config.json, *.safetensors, tokenizer files)"
            )
        positive_int("tensor_parallel_size")
        if self.max_num_seqs is None:
            self.max_num_seqs = default_max_num_seqs(self.tensor_parallel_size, self.kv_cache_dtype)
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len"):
            positive_int(name)
        if self.prefill_admission_batch is not None:
            positive_int("prefill_admission_batch")
            if self.prefill_admission_batch > self.max_num_seqs:
                bad(
                    "prefill_admission_batch",
                    f"use at most max_num_seqs={self.max_num_seqs}, 1 to admit each request as "
                    "soon as a slot frees, or None for max_num_seqs // 8",
                )
        u = self.gpu_memory_utilization
        if not isinstance(u, (int, float)) or isinstance(u, bool) or not 0 < u <= 1:
            bad("gpu_memory_utilization", "use a fraction in (0, 1], e.g. 0.9")
        positive_int("kvcache_block_size")
        if self.kvcache_block_size % 16:
            bad("kvcache_block_size", "use a multiple of 16 (e.g. 16, 32, 256)")
        if self.num_kvcache_blocks is not None:
            positive_int("num_kvcache_blocks")
        if self.device not in ("auto", "cuda", "cpu"):
            bad("device", 'use "auto", "cuda" or "cpu"')
        if self.device == "cuda" and not torch.cuda.is_available():
            bad("device", 'no CUDA GPU is visible to torch: use device="cpu" or "auto"')
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            bad("dtype", 'use "auto", "float32", "float16" or "bfloat16"')
        if self.attention_backend not in ("auto", *backend_names()):
            bad("attention_backend", f"use one of {('auto', *backend_names())}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            bad(
                "kv_cache_dtype",
                f'use one of {KV_CACHE_DTYPES}: "auto" stores K/V in the model dtype, "fp8" '
                '(or "fp8_e4m3") as float8 e4m3, twice the tokens of a bf16 cache',
            )
        if self.kv_cache_dtype != "auto" and self.attention_backend == "flash_attn":
            raise ValueError(
                f"Config.kv_cache_dtype={self.kv_cache_dtype!r} is invalid with "
                "attention_backend='flash_attn': the flash-attn backend reads bf16/fp16 caches "
                "only; use attention_backend='triton' (GPU) or 'torch', or kv_cache_dtype='auto'"
            )
        if self.tensor_parallel_all_reduce not in TP_ALL_REDUCES:
            bad(
                "tensor_parallel_all_reduce",
                f"use one of {TP_ALL_REDUCES}: 'symm_mem' sums decode-sized messages over "
                "NVLink through torch's symmetric memory, 'nccl' sums all of them with NCCL, "
                "'auto' takes symm_mem where the GPUs allow it",
            )
        if self.load_format not in ("auto", "dummy"):
            bad("load_format", 'use "auto" (safetensors) or "dummy" (random weights)')
        for name in ("pipeline_attention_sm_count", "pipeline_ffn_sm_count"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                bad(name, "use a positive number of SMs, or None for the automatic split")
        if (self.pipeline_attention_sm_count is None) != (self.pipeline_ffn_sm_count is None):
            missing = (
                "pipeline_ffn_sm_count"
                if self.pipeline_ffn_sm_count is None
                else "pipeline_attention_sm_count"
            )
            raise ValueError(
                f"Config.{missing}=None while the other SM count is set: give both "
                "pipeline_attention_sm_count and pipeline_ffn_sm_count, or neither (automatic)"
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            bad("seed", "use an integer")
        for name in (
            "async_scheduling",
            "enable_mixed_steps",
            "enforce_eager",
            "enable_prefix_caching",
            "skip_tokenizer_init",
            "enable_pipeline",
            "pipeline_enable_profiling",
        ):
            if not isinstance(getattr(self, name), bool):
                bad(name, "use True or False")
        if self.pipeline_policy not in ("auto", "always"):
            bad(
                "pipeline_policy",
                'use "auto" (pipeline only the batch sizes where calibration shows it pays) or '
                '"always"',
            )
        if self.pipeline_attention_kernel not in ("triton", "tma"):
            bad(
                "pipeline_attention_kernel",
                'use "triton" or "tma" (the copy-engine kernel on the attention partition, where '
                "the GPU and the model's shapes allow it)",
            )
        if self.pipeline_ffn_gemm not in ("triton", "cublas"):
            bad(
                "pipeline_ffn_gemm",
                'use "triton" (a persistent GEMM with one program per SM of the FFN partition) or '
                '"cublas" (cuBLAS told the partition\'s SM count)',
            )
        positive_int("pipeline_num_microbatches")
        if self.pipeline_num_microbatches < 2:
            bad("pipeline_num_microbatches", "use 2 or more (the pipeline overlaps micro-batches)")

    def resolved_prefill_admission_batch(self) -> int:
        if self.prefill_admission_batch is not None:
            return self.prefill_admission_batch
        return max(1, self.max_num_seqs // 8)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


@dataclass
class RuntimeInfo:
    """What the engine resolved at start-up."""

    device: torch.device
    dtype: torch.dtype
    hf_config: object
    max_model_len: int
    eos_token_ids: set[int] = field(default_factory=set)
    num_kvcache_blocks: int = 0
    attention_backend: str = ""
    kv_cache_dtype: torch.dtype | None = None  # resolved element type of the KV cache
    cuda_graphs: bool = False
    tensor_parallel_all_reduce: str = "nccl"  # what sums decode steps' messages: symm_mem or nccl


def check_tensor_parallel(config: Config, hf_config, device: torch.device) -> None:
    """``tensor_parallel_size`` against the model's shapes and the devices present."""
    n = config.tensor_parallel_size
    if n == 1:
        return
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    if heads % n or kv_heads % n:
        divisors = [d for d in range(1, kv_heads + 1) if heads % d == 0 and kv_heads % d == 0]
        raise ValueError(
            f"Config.tensor_parallel_size={n} is invalid: the model has {heads} attention heads "
            f"and {kv_heads} KV heads, and each rank needs a whole share of both: use one of "
            f"{divisors}"
        )
    if hf_config.intermediate_size % n:
        raise ValueError(
            f"Config.tensor_parallel_size={n} is invalid: the model's intermediate_size "
            f"{hf_config.intermediate_size} is not divisible by it"
        )
    if device.type == "cuda" and n > torch.cuda.device_count():
        raise ValueError(
            f"Config.tensor_parallel_size={n} is invalid: only {torch.cuda.device_count()} CUDA "
            "GPU(s) are visible (one rank per GPU): lower tensor_parallel_size or make more GPUs "
            "visible (CUDA_VISIBLE_DEVICES)"
        )
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError(
            f"Config.tensor_parallel_size={n} is invalid: this torch build has no "
            "torch.distributed: use tensor_parallel_size=1"
        )
    if dist.is_initialized():
        raise ValueError(
            f"Config.tensor_parallel_size={n} cannot start: torch.distributed is already "
            "initialised in this process (another tensor-parallel LLM is alive?): call its "
            "exit() or delete it first; one tensor-parallel engine per process"
        )
    if config.tensor_parallel_all_reduce == "symm_mem":
        from nanovllm.utils.symm_all_reduce import refusal, unavailable_reason

        reason = unavailable_reason(device, n)
        if reason:
            raise ValueError(refusal(reason))


def log_automatic_choices(config: Config, given: dict) -> None:
    """Log once each option the engine chose because the user left it out of ``given``."""
    if given.get("max_num_seqs") is None:
        logger.info(
            "max_num_seqs=%d (%d per GPU, x2 on an fp8 KV cache; tensor_parallel_size=%d, "
            "kv_cache_dtype=%r)",
            config.max_num_seqs,
            MAX_NUM_SEQS_PER_GPU,
            config.tensor_parallel_size,
            config.kv_cache_dtype,
        )
    if config.prefill_admission_batch is None:
        n = config.resolved_prefill_admission_batch()
        logger.info(
            "prefill_admission_batch=%d (max_num_seqs // 8): while decodes run, new requests "
            "are admitted %d at a time",
            n,
            n,
        )
