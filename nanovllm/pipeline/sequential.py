"""The whole-GPU decode step as a decode strategy: graph replay where captured, else eager."""

from __future__ import annotations

import torch

from nanovllm.engine.cuda_graph import DecodeGraphRunner
from nanovllm.engine.model_inputs import ModelInputs
from nanovllm.models.staged import StagedDecoder
from nanovllm.pipeline.report import format_table
from nanovllm.pipeline.stats import PipelineStats


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
