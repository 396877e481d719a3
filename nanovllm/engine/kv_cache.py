"""Size and allocate the paged KV cache, and bind each layer's slice to its Attention module.

The cache is stored in the model dtype (``kv_cache_dtype="auto"``) or in float8 e4m3
(``"fp8"``), which halves the bytes per token against bf16, so the same memory holds twice the
tokens.

FP8 scales: one scalar per layer for K and one for V (``Attention.k_scale`` / ``v_scale``,
default 1.0), stored as ``k / k_scale`` clamped to +-448 (the e4m3 range) and read back as
``fp8 * k_scale``. Why not finer: e4m3 has a constant relative precision (3 mantissa bits, about
3% per element on average and at most 6.25%) over [2^-6, 448], so a scale only has to keep the
values inside that range, not fit them tightly. Qwen3's K comes out of a per-head RMSNorm and its
V out of a projection of a normalised hidden state, so both are O(0.1)-O(10), far inside the
range with a scale of 1.0 (vLLM's default, k_scale = v_scale = 1.0); elements below 2^-6 only lose
absolute precision (down to 2^-9), negligible next to the O(1) elements of the same head vector.
A per-token-per-head dynamic scale would adapt to any magnitude but costs 4 more bytes per
(token, head) and a reduction in every store; a per-layer scalar costs nothing per token, folds
into the softmax scale (K) and the output (V) inside the kernels, and can later take calibrated
values from a checkpoint. Out-of-range values saturate (clamped) instead of becoming NaN.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from nanovllm.config import FP8_KV_DTYPE
from nanovllm.layers.attention import Attention

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 256 << 20  # the bounded default on CPU
GRAPH_AND_WORKSPACE_HEADROOM = 2 << 30


def block_bytes(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across every layer, K and V, stored as ``dtype`` (the KV cache's
    element type: 1 byte for fp8)."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    per_token = sum(2 * m.num_kv_heads * m.head_dim for m in layers)
    return per_token * block_size * dtype.itemsize


def gpu_kv_budget(device: torch.device, utilization: float, baseline_reserved: int) -> int:
    """Bytes this engine may give its KV cache.

    The engine's own share is ``utilization`` of the card minus its own peak (weights plus the
    warm-up's activations; earlier engines of this process, ``baseline_reserved``, are not
    ours). It never exceeds what is actually free now, keeping room for the activation peak:
    memory held by other processes counts as unavailable.
    """
    free, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_reserved(device)
    own_peak = peak - baseline_reserved
    activations = peak - torch.cuda.memory_reserved(device)
    headroom = GRAPH_AND_WORKSPACE_HEADROOM  # CUDA graphs and library workspaces come later
    return min(int(total * utilization) - own_peak, free - activations - headroom)


def num_blocks_for(
    config, model: nn.Module, dtype: torch.dtype, device: torch.device, baseline_reserved: int
) -> int:
    """KV blocks for the cache stored as ``dtype`` (the resolved ``kv_cache_dtype``): the
    memory budget divided by the bytes of one block, so an fp8 cache gets twice the blocks of a
    bf16 one."""
    per_block = block_bytes(model, config.kvcache_block_size, dtype)
    if config.num_kvcache_blocks is not None:
        num_blocks = config.num_kvcache_blocks
        how = "set by num_kvcache_blocks"
    elif device.type == "cuda":
        budget = gpu_kv_budget(device, config.gpu_memory_utilization, baseline_reserved)
        num_blocks = budget // per_block
        how = f"from gpu_memory_utilization={config.gpu_memory_utilization}"
        if num_blocks < 1:
            raise ValueError(
                f"no GPU memory is left for the KV cache (budget {budget / 2**30:.2f} GiB with "
                f"gpu_memory_utilization={config.gpu_memory_utilization}): raise "
                "gpu_memory_utilization, lower max_num_batched_tokens, or free the GPU"
            )
    else:
        needed = config.max_num_seqs * config.max_model_len // config.kvcache_block_size + 1
        num_blocks = max(1, min(needed, CPU_KV_CACHE_BYTES // per_block))
        how = f"CPU default, at most {CPU_KV_CACHE_BYTES >> 20} MiB"
    logger.info(
        "KV cache: %d blocks of %d tokens, %s (%.2f GiB, %s)",
        num_blocks,
        config.kvcache_block_size,
        str(dtype).removeprefix("torch."),
        num_blocks * per_block / 2**30,
        how,
    )
    return num_blocks


def allocate_kv_cache(
    model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """One tensor [2, num_layers, num_blocks, block_size, num_kv_heads, head_dim] of ``dtype``
    (the model dtype, or fp8); layer l's Attention gets views of [0, l] (K) and [1, l] (V). An
    fp8 cache needs backends that read it (``check_kv_cache_support``)."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    check_kv_cache_support(layers, dtype, device)
    kv_heads, head_dim = layers[0].num_kv_heads, layers[0].head_dim
    # zeros, not empty: masked-out slots must not hold NaN (0 * NaN poisons the torch reference)
    cache = torch.zeros(
        2, len(layers), num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device
    )
    for i, layer in enumerate(layers):
        layer.k_cache, layer.v_cache = cache[0, i], cache[1, i]
    return cache


def check_kv_cache_support(layers: list[Attention], dtype: torch.dtype, device: torch.device):
    """Refuse an fp8 cache (``ValueError``) that a layer's attention backend cannot read."""
    if dtype != FP8_KV_DTYPE:
        return
    backends = {id(layer.backend): layer.backend for layer in layers if layer.backend is not None}
    for backend in backends.values():
        name = backend.name
        if not getattr(backend, "fp8_kv_cache", False):
            raise ValueError(
                f"Config.kv_cache_dtype='fp8' is not supported by the {name} attention backend "
                "(it reads bf16/fp16 caches only): use attention_backend='triton' (GPU) or "
                "'torch', or kv_cache_dtype='auto'"
            )
        if name == "triton" and device.type == "cuda":
            cap = torch.cuda.get_device_capability(device)
            if cap < (8, 9):
                raise ValueError(
                    f"Config.kv_cache_dtype='fp8' with the triton backend needs a GPU of compute "
                    f"capability 8.9 or newer (Triton's float8e4nv); this one is "
                    f"{cap[0]}.{cap[1]}: use kv_cache_dtype='auto' or attention_backend='torch'"
                )
