"""CUDA graphs for decode: one graph per batch-size bucket over static input buffers.

The captured function is any decode step ``fn(input_ids, positions, meta) -> hidden`` : the
model's plain forward, or the pipelined step (whose graph spans the green-context streams).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from nanovllm.attention import AttentionMetadata, DecodeMetadataBuffers
from nanovllm.engine.model_inputs import ModelInputs

logger = logging.getLogger(__name__)

StepFn = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def graph_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16, and always max_num_seqs itself."""
    sizes = {b for b in (1, 2, 4, 8) if b <= max_num_seqs}
    sizes |= set(range(16, max_num_seqs + 1, 16)) | {max_num_seqs}
    return sorted(sizes)


class DecodeBuffers:
    """Static decode inputs for up to ``max_num_seqs`` rows: token ids, positions and the output
    hidden states here; the attention metadata in buffers the attention backend owns
    (``attention``). Rows past the live batch are padding."""

    @torch.inference_mode()
    def __init__(
        self,
        max_num_seqs: int,
        hidden_size: int,
        dtype,
        device,
        attention: DecodeMetadataBuffers,
    ):
        self.input_ids = torch.zeros(max_num_seqs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_num_seqs, dtype=torch.int64, device=device)
        self.hidden = torch.zeros(max_num_seqs, hidden_size, dtype=dtype, device=device)
        self.attention = attention

    def meta(self, bs: int) -> AttentionMetadata:
        return self.attention.meta(bs)

    def load(self, inputs: ModelInputs, bs: int) -> None:
        n = inputs.input_ids.shape[0]
        self.input_ids[:n] = inputs.input_ids
        self.positions[:n] = inputs.positions
        self.attention.load(inputs.meta, n, bs)


class DecodeGraphRunner:
    """``buckets``: the batch buckets to capture (default: all of ``graph_buckets``; a subset
    must only be asked for its own buckets). ``pool``: a memory pool to share with graphs that
    are never replayed at the same time."""

    def __init__(
        self,
        fn: StepFn,
        buffers: DecodeBuffers,
        max_num_seqs: int,
        name: str,
        buckets: list[int] | None = None,
        pool=None,
    ):
        self.fn, self.buffers, self.name = fn, buffers, name
        self.buckets = sorted(buckets) if buckets else graph_buckets(max_num_seqs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = self.shared_pool = pool

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    @torch.inference_mode()
    def capture(self) -> None:
        buf = self.buffers
        for bs in reversed(self.buckets):  # largest first: later graphs reuse its pool
            args = (buf.input_ids[:bs], buf.positions[:bs], buf.meta(bs))
            buf.hidden[:bs] = self.fn(*args)  # warm-up: autotuning and lazy init outside capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, self.pool):
                buf.hidden[:bs] = self.fn(*args)
            self.pool = self.pool or graph.pool()
            self.graphs[bs] = graph
            torch.cuda.synchronize()
        logger.info(
            "captured %d %s decode CUDA graphs (batch buckets %s)",
            len(self.graphs),
            self.name,
            self.buckets,
        )

    def reset(self) -> None:
        self.graphs.clear()
        self.pool = self.shared_pool

    def run(self, inputs: ModelInputs) -> torch.Tensor:
        n = inputs.input_ids.shape[0]
        bs = self.bucket(n)
        self.buffers.load(inputs, bs)
        self.graphs[bs].replay()
        return self.buffers.hidden[:n]
