"""Size and allocate the paged KV cache, and bind each layer's slice to its Attention module."""

from __future__ import annotations

import logging

import torch
from torch import nn

from nanovllm.layers.attention import Attention

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 256 << 20  # the bounded default on CPU
GRAPH_AND_WORKSPACE_HEADROOM = 2 << 30


def block_bytes(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across every layer, K and V."""
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
        "KV cache: %d blocks of %d tokens (%.2f GiB, %s)",
        num_blocks,
        config.kvcache_block_size,
        num_blocks * per_block / 2**30,
        how,
    )
    return num_blocks


def allocate_kv_cache(
    model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """One tensor [2, num_layers, num_blocks, block_size, num_kv_heads, head_dim]; layer l's
    Attention gets views of [0, l] (K) and [1, l] (V)."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    kv_heads, head_dim = layers[0].num_kv_heads, layers[0].head_dim
    # zeros, not empty: masked-out slots must not hold NaN (0 * NaN poisons the torch reference)
    cache = torch.zeros(
        2, len(layers), num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device
    )
    for i, layer in enumerate(layers):
        layer.k_cache, layer.v_cache = cache[0, i], cache[1, i]
    return cache
