"""Decode strategies: what ``ModelRunner`` calls for a pure-decode step.

``make_decode_strategy`` returns the ``PipelineScheduler`` where the pipeline can run, else a
``SequentialDecode`` that says why not. Both count every decode step and answer the same
statistics and trace calls, so the runner never asks which one it holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from nanovllm.attention import AttentionBackend
from nanovllm.engine.cuda_graph import DecodeBuffers, DecodeGraphRunner
from nanovllm.engine.model_inputs import ModelInputs
from nanovllm.models.staged import StagedDecoder
from nanovllm.pipeline.report import format_table
from nanovllm.pipeline.stats import PipelineStats

logger = logging.getLogger(__name__)

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


class SequentialDecode:
    """The whole-GPU decode step: graph replay where captured, else eager. As a strategy of its
    own (the pipeline disabled or unavailable) it counts its steps and reports ``reason``."""

    enabled = False

    def __init__(self, model: StagedDecoder, graphs: DecodeGraphRunner | None, reason: str = ""):
        self.model, self.graphs, self.reason = model, graphs, reason
        self.stats = PipelineStats(profiling=False)

    @property
    def sequential(self) -> SequentialDecode:
        """The whole-GPU step (this one), as ``PipelineScheduler.sequential`` names its own."""
        return self

    def bucket(self, num_rows: int) -> int:
        return self.graphs.bucket(num_rows) if self.graphs is not None else num_rows

    def step(self, inputs: ModelInputs) -> torch.Tensor:
        """One uncounted step (the pipeline's sequential buckets and its calibration)."""
        if self.graphs is not None:
            return self.graphs.run(inputs)
        return self.model(inputs.input_ids, inputs.positions, inputs.meta)

    def run(self, inputs: ModelInputs) -> torch.Tensor:
        n = inputs.input_ids.shape[0]
        self.stats.record_sequential(self.bucket(n), n)
        return self.step(inputs)

    def statistics(self) -> dict:
        stats = {
            "enabled": False,
            "reason": self.reason,
            "attention_sms": 0,
            "ffn_sms": 0,
            "total_sms": 0,
            "num_microbatches": 0,
            "cuda_graphs": self.graphs is not None,
            "policy": "none",
        }
        stats.update(self.stats.as_dict())
        stats["mode"] = "sequential"  # every decode step, past and future
        return stats

    def print_statistics(self) -> None:
        print(format_table(self.statistics()))

    def export_trace(self, path: str) -> None:
        raise RuntimeError(
            f"no pipelined steps to trace: the decode pipeline is not running ({self.reason})"
        )

    def adjust_sm_allocation(self, attention_sm_count: int, ffn_sm_count: int):
        raise RuntimeError(f"the decode pipeline is not active: {self.reason}")

    def close(self) -> None:
        """Destroy the graphs (idempotent); the strategy decodes eagerly after."""
        if self.graphs is not None:
            self.graphs.reset()
            self.graphs = None


def unavailable_reason(config, device: torch.device) -> str:
    """Why the pipeline cannot run with ``config`` on ``device`` before trying green contexts,
    or ""."""
    if not config.enable_pipeline:
        return "enable_pipeline=False"
    if config.tensor_parallel_size > 1:
        return (
            f"tensor_parallel_size={config.tensor_parallel_size}: the pipeline runs on "
            "single-GPU engines only (its stages would have to own the all-reduces); every "
            "rank decodes sequentially"
        )
    if device.type != "cuda":
        return f"Green Contexts need a CUDA GPU; running on {device.type}"
    return ""


def make_decode_strategy(config, setup: DecodeSetup):
    """The ``PipelineScheduler`` if the pipeline can run, else ``SequentialDecode`` with the
    reason (logged once)."""
    sequential = SequentialDecode(setup.model, setup.graphs)
    why = unavailable_reason(config, setup.device)
    if not why:
        from nanovllm.pipeline.green import GreenContextManager
        from nanovllm.pipeline.scheduler import PipelineOptions, PipelineScheduler

        green = GreenContextManager(
            setup.device, config.pipeline_attention_sm_count, config.pipeline_ffn_sm_count
        )
        if green.available:
            options = PipelineOptions.from_config(config, setup.identity(config))
            return PipelineScheduler(setup, options, green, sequential)
        why = green.reason
        green.close()
    if config.enable_pipeline:
        logger.warning("decode pipeline unavailable, decoding sequentially: %s", why)
    sequential.reason = why
    return sequential
