"""Qwen3 for causal LM, module names following the Hugging Face checkpoint.

Besides ``forward`` each decoder layer exposes its stages, for a scheduler that runs them on
separate streams:

- ``forward_attention``: input RMSNorm (+ residual add), QKV, q/k norm, rotary, KV store,
  attention, o_proj;
- ``forward_ffn``: post-attention RMSNorm (+ residual add), gate/up, SiLU-and-mul, down;
- the finer cut the pipeline uses: ``forward_qkv`` (norm, QKV, rotary), ``forward_attention_core``
  (KV store, attention: the memory-bound part) and ``forward_post_attention`` (o_proj + FFN).

``Qwen3ForCausalLM`` implements the staged-decoder interface (``models/staged.py``) over them.

``forward()`` is exactly the composition of the stages: over the same rows both give bitwise
identical results (micro-batches change GEMM row counts, hence rounding, not the math).
"""

from __future__ import annotations

import torch
from torch import nn

from nanovllm.attention.metadata import AttentionMetadata
from nanovllm.layers.activation import SiluAndMul
from nanovllm.layers.attention import Attention
from nanovllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.layernorm import RMSNorm
from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from nanovllm.layers.rotary_embedding import RotaryEmbedding, rope_theta_of
from nanovllm.models.staged import AttentionShape, Hidden
from nanovllm.utils.distributed import tp_world_size


class Qwen3Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        tp = tp_world_size()
        self.head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        self.num_heads = config.num_attention_heads // tp
        self.num_kv_heads = config.num_key_value_heads // tp
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=bias,
        )
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=bias
        )
        self.rotary_emb = RotaryEmbedding(
            self.head_dim, config.max_position_embeddings, rope_theta_of(config)
        )
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def project_qkv(self, positions, hidden_states):
        """-> q [num_tokens, num_heads, d], k and v [num_tokens, num_kv_heads, d]."""
        qkv = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.view(-1, self.num_heads, self.head_dim))
        k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim))
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rotary_emb(positions, q, k)
        return q, k, v

    def forward(self, positions, hidden_states, meta: AttentionMetadata) -> torch.Tensor:
        return self.o_proj(self.attn(*self.project_qkv(positions, hidden_states), meta))


class Qwen3MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2
        )
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = Qwen3Attention(config)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def _input_norm(self, hidden_states, residual) -> Hidden:
        """``residual`` is None for the first layer: the embedding is the residual."""
        if residual is None:
            return self.input_layernorm(hidden_states), hidden_states
        return self.input_layernorm(hidden_states, residual)

    def forward_attention(self, positions, hidden_states, residual, meta) -> Hidden:
        """Stage 1: input norm, QKV, attention, o_proj."""
        hidden_states, residual = self._input_norm(hidden_states, residual)
        return self.self_attn(positions, hidden_states, meta), residual

    # The pipeline's finer cut: only the KV store and the attention kernel (memory-bound) on
    # the attention partition; every GEMM (QKV, o_proj, FFN) on the other.
    def forward_qkv(self, positions, hidden_states, residual):
        """Input norm and QKV projection -> (q, k, v, residual)."""
        hidden_states, residual = self._input_norm(hidden_states, residual)
        return (*self.self_attn.project_qkv(positions, hidden_states), residual)

    def forward_attention_core(self, q, k, v, meta, backend=None) -> torch.Tensor:
        """KV store and attention -> [num_tokens, num_heads * d] (before o_proj)."""
        return self.self_attn.attn(q, k, v, meta, backend)

    def forward_post_attention(self, attn_out, residual) -> Hidden:
        """o_proj, then the FFN stage."""
        return self.forward_ffn(self.self_attn.o_proj(attn_out), residual)

    def forward_ffn(self, hidden_states, residual) -> Hidden:
        """Stage 2: needs only this micro-batch's own rows, no attention metadata."""
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual

    def forward(self, positions, hidden_states, residual, meta) -> Hidden:
        return self.forward_ffn(*self.forward_attention(positions, hidden_states, residual, meta))


class Qwen3Model(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [Qwen3DecoderLayer(config) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def final_norm(self, hidden_states, residual) -> torch.Tensor:
        return self.norm(hidden_states, residual)[0]

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        hidden_states, residual = self.embed(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual, meta)
        return self.final_norm(hidden_states, residual)


class Qwen3ForCausalLM(nn.Module):
    # Hugging Face tensor name fragment -> (packed module fragment, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # -- the staged-decoder interface (models/staged.py) ------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.model.layers)

    def attention_shape(self) -> AttentionShape:
        attn = self.model.layers[0].self_attn
        return AttentionShape(
            attn.num_heads, attn.num_kv_heads, attn.head_dim, self.config.hidden_size
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(input_ids)

    def qkv(self, layer: int, positions, hidden_states, residual):
        return self.model.layers[layer].forward_qkv(positions, hidden_states, residual)

    def attend(self, layer: int, q, k, v, meta: AttentionMetadata, backend=None) -> torch.Tensor:
        return self.model.layers[layer].forward_attention_core(q, k, v, meta, backend)

    def post_attention(self, layer: int, attn_out, residual) -> Hidden:
        return self.model.layers[layer].forward_post_attention(attn_out, residual)

    def final_norm(self, hidden_states, residual) -> torch.Tensor:
        return self.model.final_norm(hidden_states, residual)

    # The block-level split (attention block, FFN block) of layer ``layer``.
    def forward_attention(self, layer: int, positions, hidden_states, residual, meta) -> Hidden:
        return self.model.layers[layer].forward_attention(positions, hidden_states, residual, meta)

    def forward_ffn(self, layer: int, hidden_states, residual) -> Hidden:
        return self.model.layers[layer].forward_ffn(hidden_states, residual)

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids/positions [num_tokens] -> final hidden states [num_tokens, hidden]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)
