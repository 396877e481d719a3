import torch
from torch import nn

from nanovllm.utils.compile import fusable


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@fusable
def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor):
    """Neox-style rotation of q [num_tokens, num_heads, d] and k [num_tokens, num_kv_heads, d]."""
    cos, sin = cos_sin[:, positions].unsqueeze(2).to(q.dtype)  # [num_tokens, 1, d] each
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rope_theta_of(hf_config) -> float:
    """rope_theta from either config style: transformers 5 keeps it in ``rope_parameters``
    (a dict, never to be hashed), older configs at the top level."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    for source in (params, scaling):
        kind = source.get("rope_type", source.get("type", "default"))
        if kind not in (None, "default"):
            raise ValueError(
                f"rope type {kind!r} in config.json is not supported; only default RoPE is"
            )
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError("config.json has no rope_theta (nor rope_parameters.rope_theta)")
    return float(theta)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding with a precomputed cos/sin table [max_position, head_dim]."""

    def __init__(self, head_dim: int, max_position: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        t = torch.arange(max_position, dtype=torch.float)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_sin", torch.stack([emb.cos(), emb.sin()]), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions [num_tokens]; q [num_tokens, num_heads, d]; k [num_tokens, num_kv_heads, d]."""
        return apply_rotary(q, k, positions, self.cos_sin)
