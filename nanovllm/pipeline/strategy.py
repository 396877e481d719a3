"""Decode strategies: what ``ModelRunner`` calls for a pure-decode step.

``make_decode_strategy`` returns the ``PipelineScheduler`` where the pipeline can run, else a
``SequentialDecode`` that says why not. Both count every decode step and answer the same
statistics and trace calls, so the runner never asks which one it holds.
"""

from __future__ import annotations

import logging

import torch

from nanovllm.pipeline.scheduler import PipelineScheduler
from nanovllm.pipeline.sequential import SequentialDecode
from nanovllm.pipeline.setup import DecodeSetup, PipelineOptions

logger = logging.getLogger(__name__)


def unavailable_reason(config, device: torch.device) -> str:
    """Why the pipeline cannot run with ``config`` on ``device`` before trying green contexts,
    or ""."""
    if not config.enable_pipeline:
        return "enable_pipeline=False"
    if config.tensor_parallel_size > 1:
        return (
            f"tensor_parallel_size={config.tensor_parallel_size}: the pipeline runs on "
            "single-GPU engines only (split into micro-batches, a tensor-parallel step reads "
            "its weight shards once per micro-batch, which costs more than overlapping one "
            "micro-batch's all-reduces with the other's compute hides: "
            "benchmarks/tp_overlap.py); every rank decodes sequentially"
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
