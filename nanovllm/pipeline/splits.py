"""Per-bucket SM splits: buckets whose fastest split is not the pipeline's current one.

The split search measures every candidate split at every calibrated batch bucket. The engine's
current split is the one that saves the most step time over all buckets; a bucket that another
split pipelines measurably faster (``policy.assign_buckets``) runs on that split. Each such split
owns its own green contexts, its stage kernels, and its own CUDA graphs for exactly its buckets,
captured on its streams (a graph's kernels keep the partition of the stream they were captured
on). Only one step runs at a time, so the splits may share SMs and the graphs share the
pipeline's memory pool. Any change of the current split closes the extra splits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanovllm.engine.cuda_graph import DecodeGraphRunner
from nanovllm.engine.model_inputs import ModelInputs
from nanovllm.pipeline.kernels import StageKernels
from nanovllm.pipeline.policy import PipelinePolicy, Split, split_name

logger = logging.getLogger(__name__)


@dataclass
class SplitRunner:
    """One extra split: its green contexts, stage kernels, and graphs (None: eager), and the
    eager step to run without graphs."""

    green: object
    kernels: StageKernels
    graphs: DecodeGraphRunner | None
    step: Callable[[ModelInputs], torch.Tensor]

    def run(self, inputs: ModelInputs) -> torch.Tensor:
        return self.graphs.run(inputs) if self.graphs is not None else self.step(inputs)

    def close(self) -> None:
        if self.graphs is not None:
            self.graphs.reset()
        self.green.close()


# (split, its buckets) -> the split's runner, or the reason it cannot be opened
OpenSplit = Callable[[Split, list[int]], "SplitRunner | str"]


class BucketSplits:
    def __init__(self):
        self.splits: dict[Split, SplitRunner] = {}

    def open(
        self, policy: PipelinePolicy, current: Split, buckets: list[int], make: OpenSplit
    ) -> None:
        """Open every split ``policy`` names for some of ``buckets`` other than ``current``. A
        split that cannot be opened hands its buckets back to ``current``'s own decision."""
        self.close()
        wanted: dict[Split, list[int]] = {}
        for b in buckets:
            split = policy.split(b)
            if split is not None and split != current:
                wanted.setdefault(split, []).append(b)
        for split, own in wanted.items():
            runner = make(split, own)
            if isinstance(runner, str):
                logger.warning(
                    "decode pipeline: split %s for buckets %s unavailable (%s); those buckets "
                    "follow split %s",
                    split_name(split),
                    own,
                    runner,
                    split_name(current),
                )
                policy.fall_back(split, current)
                continue
            self.splits[split] = runner
            logger.info(
                "decode pipeline: buckets %s on their own split, attention %d / FFN %d SMs",
                own,
                *split,
            )

    def get(self, split: Split | None) -> SplitRunner | None:
        return self.splits.get(split) if split is not None else None

    def close(self) -> None:
        if not self.splits:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        for runner in self.splits.values():
            runner.close()
        self.splits.clear()
