"""Per-bucket SM splits: buckets whose fastest split is not the pipeline's current one.

The split search measures every candidate split at every calibrated batch bucket. The engine's
current split is the one that saves the most step time over all buckets; a bucket that another
split pipelines measurably faster (``pipeline_policy.assign_buckets``) runs on that split. Each
such split owns its own green contexts and streams, and its own CUDA graphs for exactly its
buckets, captured on its streams (a graph's kernels keep the partition of the stream they were
captured on). Only one step runs at a time, so the splits may share SMs and the graphs share
the pipeline's memory pool.

Any change of the current split (``adjust_sm_allocation``, ``rebalance``) closes the extra
splits: the policy is then re-measured on the one split the user chose.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import torch

from nanovllm.engine import pipeline_policy as policy_lib
from nanovllm.engine.cuda_graph import DecodeGraphRunner, graph_buckets
from nanovllm.engine.model_inputs import ModelInputs

logger = logging.getLogger(__name__)


def _green_contexts(device: torch.device, attention_sms: int, ffn_sms: int):
    from nanovllm.engine.green_manager import GreenContextManager

    return GreenContextManager(device, attention_sms, ffn_sms)


class _Split:
    def __init__(self, green, tma: bool, graphs: DecodeGraphRunner | None):
        self.green, self.tma, self.graphs = green, tma, graphs


class BucketSplits:
    """The extra splits of one pipeline. ``make_green(device, attention, ffn)`` creates a
    green-context manager (a stand-in in CPU tests)."""

    def __init__(self, pipe, make_green: Callable = _green_contexts):
        self.pipe, self.make_green = pipe, make_green
        self.splits: dict[tuple[int, int], _Split] = {}

    def open(self, policy: policy_lib.PipelinePolicy) -> None:
        """Create the green contexts and graphs of every split ``policy`` names other than the
        pipeline's current one. A split whose green contexts cannot be created hands its buckets
        back to the current split's own decision."""
        self.close()
        pipe, runner = self.pipe, self.pipe.runner
        current = (pipe.green.attention_sms, pipe.green.ffn_sms)
        buckets = graph_buckets(runner.config.max_num_seqs)
        wanted: dict[tuple[int, int], list[int]] = {}
        for b in buckets:
            split = policy.split(b)
            if split is not None and split != current:
                wanted.setdefault(split, []).append(b)
        for split, own in wanted.items():
            green = self.make_green(runner.device, *split)
            if not green.available:
                logger.warning(
                    "decode pipeline: split %s for buckets %s unavailable (%s); those buckets "
                    "follow split %s",
                    policy_lib.split_name(split),
                    own,
                    green.reason,
                    policy_lib.split_name(current),
                )
                green.close()
                policy.fall_back(split, current)
                continue
            tma = policy_lib.use_tma_attention(pipe, green)
            graphs = None
            if pipe.graph_runner is not None:
                graphs = DecodeGraphRunner(
                    partial(pipe.step, green=green, attention_tma=tma),
                    runner.decode_buffers,
                    runner.config.max_num_seqs,
                    f"pipelined {policy_lib.split_name(split)}",
                    buckets=own,
                    pool=pipe.graph_runner.pool,
                )
                graphs.capture()
            self.splits[split] = _Split(green, tma, graphs)
            logger.info(
                "decode pipeline: buckets %s on their own split, attention %d / FFN %d SMs",
                own,
                green.attention_sms,
                green.ffn_sms,
            )

    def has(self, split: tuple[int, int] | None) -> bool:
        return split in self.splits

    def run(self, split: tuple[int, int], inputs: ModelInputs) -> torch.Tensor:
        s = self.splits[split]
        if s.graphs is not None:
            return s.graphs.run(inputs)
        return self.pipe.step(
            inputs.input_ids, inputs.positions, inputs.meta, green=s.green, attention_tma=s.tma
        )

    def close(self) -> None:
        if not self.splits:
            return
        if self.pipe.runner.device.type == "cuda":
            torch.cuda.synchronize()
        for s in self.splits.values():
            if s.graphs is not None:
                s.graphs.reset()
            s.green.close()
        self.splits.clear()
