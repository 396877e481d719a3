import torch
from torch import nn

from nanovllm.attention.metadata import AttentionMetadata

FP8 = torch.float8_e4m3fn


class Attention(nn.Module):
    """Writes the new tokens' K/V into this layer's paged cache, then attends through the
    backend chosen at start-up (set by the model runner). The cache tensors are assigned by the
    KV allocator: [num_blocks, block_size, num_kv_heads, head_dim] each, in the model dtype or
    float8 e4m3 (``kv_cache_dtype="fp8"``).

    ``k_scale`` / ``v_scale``: this layer's fp8 scales (stored value = K / k_scale, clamped to
    the e4m3 range; read back as stored * k_scale). 1.0 by default (engine/kv_cache.py says
    why); ignored by a cache in the model dtype."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale
        self.k_scale = self.v_scale = 1.0
        self.k_cache = self.v_cache = torch.tensor([])
        self.backend = None

    def forward(self, q, k, v, meta: AttentionMetadata, backend=None) -> torch.Tensor:
        """q [num_tokens, num_heads, d], k/v [num_tokens, num_kv_heads, d] -> [num_tokens, H*d].
        ``backend`` overrides the engine's (the pipeline's kernel for its attention partition)."""
        backend, kc, vc = backend or self.backend, self.k_cache, self.v_cache
        # The scales go to the backend with an fp8 cache only: for a model-dtype cache the calls
        # keep the plain interface (the scales would be 1.0 anyway).
        fp8 = {"k_scale": self.k_scale, "v_scale": self.v_scale} if kc.dtype == FP8 else {}
        if kc.numel():  # empty during the warm-up pass that runs before allocation
            backend.store_kvcache(k, v, kc, vc, meta.slot_mapping, **fp8)
        return backend.attend(q, k, v, kc, vc, meta, self.scale, **fp8).flatten(1, 2)
