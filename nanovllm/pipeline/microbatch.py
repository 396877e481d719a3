"""Micro-batches of a decode step and the events between their stages.

Row ranges that split a batch for the pipeline, and the CUDA events (or, when a test emulates
the schedule serially on the CPU, stand-ins) that order one micro-batch's stages across streams.
"""

from __future__ import annotations

import torch


class _NoEvent:
    """Stands in for CUDA events when the schedule is emulated serially (CPU tests)."""

    def record(self, stream=None) -> None:
        pass


def event(device: torch.device):
    """A CUDA event on a GPU; a stand-in that records nothing elsewhere."""
    return torch.cuda.Event() if device.type == "cuda" else _NoEvent()


def wait(stream, done) -> None:
    """``stream`` waits for the event ``done`` (nothing to wait for without a stream)."""
    if stream is not None:
        stream.wait_event(done)


def microbatch_bounds(num_rows: int, num_microbatches: int) -> list[tuple[int, int]]:
    """Row ranges of the micro-batches: near-equal, multiples of 8 rows when there are enough
    (GEMM tiles), never empty."""
    m = max(1, min(num_microbatches, num_rows))
    unit = 8 if num_rows >= 8 * m else 1
    units = -(-num_rows // unit)
    bounds, lo = [], 0
    for i in range(m):
        hi = min(num_rows, lo + unit * (units // m + (i < units % m)))
        bounds.append((lo, hi))
        lo = hi
    return bounds
