"""Paged decode attention that streams K/V with the Hopper copy engine (TMA), for few-SM partitions.

Why: on a green partition of few SMs the Triton decode kernel is limited per SM: it spends more
instructions per byte (addresses, masks, layout conversions) than the SMs can issue while keeping
enough loads in flight. The copy engine moves a whole [64 keys x 64 dims] box per instruction
into shared memory, so a few SMs keep many more bytes in flight. Here a producer warp keeps
``stages`` K+V tiles in flight with TMA on full/empty mbarriers, and four warps do the math
with ``mma.sync`` on tiles the copy engine
wrote with the 128-byte swizzle (conflict-free ``ldmatrix``), each with its own online softmax
over its 16 keys of every tile, merged at the end.

It reads more per SM than the Triton kernel on small partitions but not inside the pipeline
(figures: benchmarks/RESEARCH.md), so it is opt-in (``Config.pipeline_attention_kernel="tma"``).

Same contract as ``triton_attention.paged_decode_attention`` (and the same split-KV partials, so
the Triton merge kernel finishes multi-split calls). Supported: CUDA sm_90+, bf16/fp16,
head_dim 128, GQA group <= 8, block_size a multiple of 64, a bf16/fp16 (not fp8) KV cache, either
contiguous [num_blocks, block_size, kv_heads, head_dim] (the engine's) or a view of a contiguous
[num_blocks, kv_heads, block_size, head_dim]. ``supported()`` says whether a call qualifies.

Compiled at first use with NVRTC (``torch.cuda._compile_kernel``); the tensor maps are created
with the CUDA driver through cuda-python (``pip install cuda-python``), one per cache tensor.
Both happen on the first call, so a CUDA graph must be captured after a warm-up call (the
engine's graph runner does one).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BLOCK_N = 64  # keys per tile: one 64-row TMA box per half of head_dim, for K and for V
HEAD_DIM = 128
STAGES = 3  # default tiles in flight per program (32 KB each)
# Programs per SM the compiler must fit (registers) for a stage count: shared memory allows
# 3 programs with 2 stages, 2 with 3, 1 with 4 or more.
MIN_PROGRAMS = {2: 3, 3: 2}
THREADS = 160  # 4 compute warps (warp w owns keys [16 w, 16 w + 16) of every tile) + 1 producer


def smem_bytes(stages: int) -> int:
    return stages * 4 * BLOCK_N * 128 + 1024  # + slack to align the swizzled tiles to 1 KB


# The CUDA source lives beside this file (package data); compiled per (dtype, stages).
_SOURCE_PATH = Path(__file__).with_suffix(".cu")


def supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    """None when this kernel can run the call, else the reason it cannot. Cached per shapes,
    strides, dtypes and device: decode calls it on every step."""
    return _why_not(
        q.device,
        q.dtype,
        tuple(q.shape[1:]),
        q.stride(2),
        k_cache.dtype,
        tuple(k_cache.shape),
        k_cache.stride(),
        v_cache.stride(),
    )


@functools.lru_cache(maxsize=64)
def _why_not(device, dtype, q_shape, q_stride_d, kv_dtype, kv_shape, k_stride, v_stride):
    if kv_dtype == torch.float8_e4m3fn:
        return "an fp8 KV cache (kv_cache_dtype='fp8'): this kernel reads bf16/fp16 caches only"
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        return "needs a CUDA GPU of compute capability 9.0 or newer (TMA)"
    if dtype not in (torch.bfloat16, torch.float16) or kv_dtype != dtype:
        return f"dtype {dtype} (bf16/fp16 only)"
    num_heads, head_dim = q_shape
    _, block_size, num_kv_heads, _ = kv_shape
    if head_dim != HEAD_DIM:
        return f"head_dim {head_dim} (128 only)"
    if num_heads // num_kv_heads > 8:
        return f"GQA group {num_heads // num_kv_heads} (8 at most)"
    if block_size % BLOCK_N:
        return f"KV block size {block_size} (a multiple of {BLOCK_N})"
    layouts = {_layout_of(kv_shape, k_stride), _layout_of(kv_shape, v_stride)}
    if None in layouts or len(layouts) > 1:
        return (
            "the KV cache must be contiguous [num_blocks, block_size, kv_heads, head_dim] (NHD) "
            "or a view of a contiguous [num_blocks, kv_heads, block_size, head_dim] (HND)"
        )
    if q_stride_d != 1:
        return "q needs a contiguous head_dim"
    return None


def _layout(cache: torch.Tensor) -> str | None:
    return _layout_of(tuple(cache.shape), cache.stride())


def _layout_of(shape: tuple, stride: tuple) -> str | None:
    """The layout ("nhd", "hnd" or None) of a logical [blocks, block_size, kv_heads, head_dim]
    cache, from its strides."""
    _, block_size, num_kv_heads, head_dim = shape
    if stride == (block_size * num_kv_heads * head_dim, num_kv_heads * head_dim, head_dim, 1):
        return "nhd"
    if stride == (block_size * num_kv_heads * head_dim, head_dim, block_size * head_dim, 1):
        return "hnd"
    return None


@functools.cache
def _kernel(dtype: torch.dtype, stages: int):
    options = [f"-DSTAGES={stages}", f"-DMIN_PROGRAMS={MIN_PROGRAMS.get(stages, 1)}"]
    options.append("--std=c++17")
    if dtype == torch.float16:
        options.append("-DNANOVLLM_FP16")
    source = _SOURCE_PATH.read_text()
    kernel = torch.cuda._compile_kernel(source, "decode_tma", nvcc_options=options)
    kernel.set_shared_memory_config(smem_bytes(stages))
    logger.info("compiled the TMA decode-attention kernel (%s, %d stages)", dtype, stages)
    return kernel


# Descriptors by (address, shape, dtype, device, layout): a cache re-allocated at the same address
# with the same shape has the same descriptor, so entries never go stale; a few per engine.
_maps: dict[tuple, torch.Tensor] = {}


def _tensor_map(cache: torch.Tensor) -> torch.Tensor:
    """The TMA descriptor (128 bytes, in device memory) of ``cache`` as a 2-D tensor (NHD:
    [num_blocks * block_size, num_kv_heads * head_dim]; HND: [num_blocks * num_kv_heads *
    block_size, head_dim]), boxes of [64 rows, 64 columns] with the 128-byte swizzle. Cached per
    (address, shape, layout)."""
    layout = _layout(cache)
    key = (cache.data_ptr(), tuple(cache.shape), cache.dtype, cache.device.index, layout)
    desc = _maps.get(key)
    if desc is not None:
        return desc
    import green_ctx

    drv = green_ctx.load_driver()
    cols = cache.shape[3] if layout == "hnd" else cache.shape[2] * cache.shape[3]
    rows = cache.numel() // cols
    dtype = (
        drv.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
        if cache.dtype == torch.bfloat16
        else drv.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT16
    )
    tmap = green_ctx.check(
        drv.cuTensorMapEncodeTiled(
            dtype,
            drv.cuuint32_t(2),
            cache.data_ptr(),
            [drv.cuuint64_t(cols), drv.cuuint64_t(rows)],  # innermost dimension first
            [drv.cuuint64_t(cols * cache.element_size())],  # bytes between rows
            [drv.cuuint32_t(64), drv.cuuint32_t(BLOCK_N)],  # a box: 64 columns x BLOCK_N rows
            [drv.cuuint32_t(1), drv.cuuint32_t(1)],
            drv.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
            drv.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
            drv.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            drv.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        ),
        "cuTensorMapEncodeTiled",
    )
    raw = ctypes.string_at(tmap.getPtr(), 128)
    desc = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(cache.device)
    _maps[key] = desc
    return desc


def decode_stage1(
    q: torch.Tensor,  # [num_seqs, num_heads, 128]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, 128], contiguous
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    context_lens: torch.Tensor,  # [num_seqs] int32
    out: torch.Tensor,  # [num_seqs, num_heads, 128] (written when num_splits == 1)
    part_o: torch.Tensor,  # [num_seqs, num_heads, num_splits, 128] fp32 (num_splits > 1)
    part_lse: torch.Tensor,  # [num_seqs, num_heads, num_splits] fp32
    scale_log2e: float,
    num_splits: int,
    stages: int = STAGES,
) -> None:
    """Split-KV stage 1 on the copy engine: the same outputs as the Triton stage 1."""
    num_seqs, num_heads, _ = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    _kernel(q.dtype, stages)(
        grid=(num_seqs, num_kv_heads, num_splits),
        block=(THREADS, 1, 1),
        args=[
            q,
            _tensor_map(k_cache),
            _tensor_map(v_cache),
            block_tables,
            context_lens,
            out,
            part_o,
            part_lse,
            float(scale_log2e),
            q.stride(0),
            q.stride(1),
            block_tables.stride(0),
            out.stride(0),
            out.stride(1),
            num_heads,
            num_heads // num_kv_heads,
            block_size,
            num_splits,
            num_kv_heads,
            int(_layout(k_cache) == "hnd"),
        ],
        shared_mem=smem_bytes(stages),
    )
