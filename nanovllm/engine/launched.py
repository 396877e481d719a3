"""A step whose forward and sampling are issued but whose tokens the host has not read yet.

``ModelRunner.launch`` returns a ``LaunchedStep``; ``ModelRunner.collect`` turns it into the
token list. In between the host may schedule and issue the next step (async scheduling): the
sampled ids go to the host through a pinned buffer and a non-blocking copy, and the host waits
on that copy's event alone, not on the device as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanovllm.engine.model_inputs import StepPlan
from nanovllm.engine.scheduler import ScheduledBatch


class TokenCopies:
    """Pinned host buffers for sampled ids, used in turn: with at most two steps in flight
    (one collected while the next runs) no buffer is rewritten before it is read."""

    def __init__(self, max_rows: int, device: torch.device, count: int = 2):
        pin = device.type == "cuda"
        self._buffers = [
            torch.empty(max_rows, dtype=torch.int64, pin_memory=pin) for _ in range(count)
        ]
        self._next = 0
        self._cuda = pin

    def start(self, sampled: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Copy ``sampled`` [rows] int64 to the host without waiting; returns (view, event)."""
        buf = self._buffers[self._next][: sampled.shape[0]]
        self._next = (self._next + 1) % len(self._buffers)
        if not self._cuda:
            buf.copy_(sampled)
            return buf, None
        buf.copy_(sampled, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return buf, event


@dataclass
class LaunchedStep:
    batch: ScheduledBatch
    plan: StepPlan
    sampled: torch.Tensor | None  # [len(plan.sampling_rows)] int64 on the device, or None
    host: torch.Tensor | None  # its host copy (valid once ``event`` completed); None: no copy
    event: torch.cuda.Event | None

    def tokens(self) -> list[int | None]:
        """One entry per scheduled sequence: its sampled token, or None (a chunked prefill that
        continues). Waits for this step's copy only."""
        tokens: list[int | None] = [None] * len(self.batch.seqs)
        if self.sampled is None:
            return tokens
        if self.host is None:  # read at once: the device-to-host read waits for the step
            values = self.sampled.tolist()
        else:
            if self.event is not None:
                self.event.synchronize()
            values = self.host.tolist()
        for row, token in zip(self.plan.sampling_rows, values):
            tokens[row] = token
        return tokens
