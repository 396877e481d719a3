import torch
from torch import nn

from nanovllm.attention.metadata import AttentionMetadata


class Attention(nn.Module):
    """Writes the new tokens' K/V into this layer's paged cache, then attends through the
    backend chosen at start-up (set by the model runner). The cache tensors are assigned by the
    KV allocator: [num_blocks, block_size, num_kv_heads, head_dim] each."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self.k_cache = self.v_cache = torch.tensor([])
        self.backend = None

    def forward(self, q, k, v, meta: AttentionMetadata, backend=None) -> torch.Tensor:
        """q [num_tokens, num_heads, d], k/v [num_tokens, num_kv_heads, d] -> [num_tokens, H*d].
        ``backend`` overrides the engine's (the pipeline's kernel for its attention partition)."""
        backend = backend or self.backend
        if self.k_cache.numel():  # empty during the warm-up pass that runs before allocation
            backend.store_kvcache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        if meta.is_prefill:
            o = backend.prefill(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        else:
            o = backend.decode(q, self.k_cache, self.v_cache, meta, self.scale)
        return o.flatten(1, 2)
