"""What the decode strategies run on: the model runner's parts (``DecodeSetup``) and the
pipeline's options (``PipelineOptions``), plain data."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanovllm.attention import AttentionBackend
from nanovllm.engine.cuda_graph import DecodeBuffers, DecodeGraphRunner
from nanovllm.models.staged import StagedDecoder

CALIBRATION_VERSION = "v2"  # bump when the calibration's method changes: old entries are stale


@dataclass
class DecodeSetup:
    """What a decode strategy runs on, handed over by the model runner."""

    model: StagedDecoder
    backend: AttentionBackend
    device: torch.device
    dtype: torch.dtype
    max_num_seqs: int
    block_size: int
    num_kvcache_blocks: int
    max_model_len: int
    k_cache: torch.Tensor  # one layer's cache: which kernels can read it
    v_cache: torch.Tensor
    graphs: DecodeGraphRunner | None  # the sequential decode graphs; None: eager decode
    buffers: DecodeBuffers | None  # their static inputs, shared with the pipelined graphs

    def identity(self, config) -> list[str]:
        """What changes a calibration's timings, for its cache key."""
        hf = getattr(self.model, "config", None)
        shape = [
            str(getattr(hf, k, None))
            for k in (
                "num_hidden_layers",
                "hidden_size",
                "intermediate_size",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
            )
        ]
        return [
            CALIBRATION_VERSION,
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            torch.__version__,
            self.backend.name,
            str(self.dtype),
            *shape,
            f"graphs={self.graphs is not None}",
            f"max_num_seqs={self.max_num_seqs}",
            f"attention_kernel={config.pipeline_attention_kernel}",
            f"ffn_gemm={config.pipeline_ffn_gemm}",
            f"kv={getattr(config, 'kv_cache_dtype', 'auto')}",
        ]


@dataclass(frozen=True)
class PipelineOptions:
    num_microbatches: int = 2
    policy: str = "auto"  # "auto": calibrate per bucket; "always": pipeline every bucket
    attention_kernel: str = "triton"
    ffn_gemm: str = "triton"
    profiling: bool = False
    search_split: bool = True  # automatic SM counts: the first calibration chooses the split
    identity: tuple[str, ...] = ()  # what changes the timings (calibration cache key)

    @classmethod
    def from_config(cls, config, identity: list[str]) -> PipelineOptions:
        return cls(
            num_microbatches=config.pipeline_num_microbatches,
            policy=config.pipeline_policy,
            attention_kernel=config.pipeline_attention_kernel,
            ffn_gemm=config.pipeline_ffn_gemm,
            profiling=config.pipeline_enable_profiling,
            search_split=config.pipeline_attention_sm_count is None,
            identity=tuple(identity),
        )
