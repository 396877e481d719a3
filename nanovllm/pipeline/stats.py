"""Decode statistics: what every decode step did, per batch bucket; per-stage CUDA-event timings
of pipelined steps when profiling.

Timing events are recorded as external event nodes so they also time CUDA-graph replays. Each
step's events are read at the start of the next step (or when statistics are asked for), after
the host has synchronised for sampling anyway: profiling adds no synchronisation of its own to
the step. The intervals of recent steps are kept for the trace export (``trace.py``).
"""

from __future__ import annotations

import statistics as st
import time
from collections import deque
from dataclasses import dataclass, field

import torch

RECENT_STEPS = 64  # window for ``mode`` and for the trace


def _timing_event() -> torch.cuda.Event:
    try:
        return torch.cuda.Event(enable_timing=True, external=True)
    except TypeError:  # torch without external events: timing only outside graphs
        return torch.cuda.Event(enable_timing=True)


@dataclass
class StepIntervals:
    """One pipelined step's stage intervals in ms from the step's start: (stage, layer,
    micro-batch, start, end), stage "attention" or "ffn"; ``host_start`` is the host clock (s)
    when the step was launched, to lay steps on one timeline."""

    bucket: int
    host_start: float
    step_ms: float
    intervals: list[tuple[str, int, int, float, float]]


class StageTimers:
    """Start/end events for every stage of one captured step shape, plus the whole step:
    ``num_layers`` attention stages and ``num_layers + 1`` FFN stages per micro-batch."""

    def __init__(self, num_layers: int, num_microbatches: int):
        def pairs(num_stages: int):
            return [
                [(_timing_event(), _timing_event()) for _ in range(num_microbatches)]
                for _ in range(num_stages)
            ]

        self.attention, self.ffn = pairs(num_layers), pairs(num_layers + 1)
        self.step = (_timing_event(), _timing_event())

    def read(self, bucket: int, host_start: float) -> StepIntervals:
        t0 = self.step[0]
        out = []
        for stage, rows in (("attention", self.attention), ("ffn", self.ffn)):
            for layer, row in enumerate(rows):
                for mb, (s, e) in enumerate(row):
                    out.append((stage, layer, mb, t0.elapsed_time(s), t0.elapsed_time(e)))
        return StepIntervals(bucket, host_start, t0.elapsed_time(self.step[1]), out)


def busy_ms(step: StepIntervals) -> tuple[float, float]:
    """(attention busy ms, FFN busy ms): the sum of each stage's intervals."""
    a = sum(e - s for stage, _, _, s, e in step.intervals if stage == "attention")
    f = sum(e - s for stage, _, _, s, e in step.intervals if stage == "ffn")
    return a, f


def _summary(values: list[float]) -> dict:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"mean": st.fmean(values), "p50": st.median(values), "p99": p99}


def overlap(attention_ms: float, ffn_ms: float, step_ms: float) -> float:
    """Share of the shorter stage hidden under the longer one: 0 = serial, 1 = perfect. Not
    clamped: a value outside [0, 1] means the timings are off (the step includes waits)."""
    shorter = min(attention_ms, ffn_ms)
    return (attention_ms + ffn_ms - step_ms) / shorter if shorter > 0 else 0.0


@dataclass
class BucketCounts:
    steps: int = 0  # pipelined
    sequential_steps: int = 0
    attention_ms: list[float] = field(default_factory=list)
    ffn_ms: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)


class PipelineStats:
    """Counters of every decode step, pipelined or sequential, per bucket."""

    def __init__(self, profiling: bool):
        self.profiling = profiling
        self.steps = self.tokens = self.sequential_steps = 0
        self.attention_ms: list[float] = []
        self.ffn_ms: list[float] = []
        self.step_ms: list[float] = []
        self.per_bucket: dict[int, BucketCounts] = {}
        self.recent_modes: deque[str] = deque(maxlen=RECENT_STEPS)
        self.recent_steps: deque[StepIntervals] = deque(maxlen=RECENT_STEPS)
        self._pending: tuple[StageTimers, int, float] | None = None

    def _bucket(self, bucket: int) -> BucketCounts:
        return self.per_bucket.setdefault(bucket, BucketCounts())

    def record_sequential(self, bucket: int, num_tokens: int) -> None:
        self.sequential_steps += 1
        self.tokens += num_tokens
        self._bucket(bucket).sequential_steps += 1
        self.recent_modes.append("sequential")

    def record_pipelined(self, bucket: int, num_tokens: int, timers: StageTimers | None) -> None:
        self.collect()
        self.steps += 1
        self.tokens += num_tokens
        self._bucket(bucket).steps += 1
        self.recent_modes.append("pipelined")
        if timers is not None:
            self._pending = (timers, bucket, time.perf_counter())

    def collect(self) -> None:
        if self._pending is None:
            return
        timers, bucket, host_start = self._pending
        self._pending = None
        timers.step[1].synchronize()
        step = timers.read(bucket, host_start)
        a, f = busy_ms(step)
        for values, v in ((self.attention_ms, a), (self.ffn_ms, f), (self.step_ms, step.step_ms)):
            values.append(v)
        counts = self._bucket(bucket)
        counts.attention_ms.append(a)
        counts.ffn_ms.append(f)
        counts.step_ms.append(step.step_ms)
        self.recent_steps.append(step)

    def mode(self) -> str:
        """What the recent decode steps did: "pipelined", "sequential", "mixed", or "none"."""
        seen = set(self.recent_modes)
        if not seen:
            return "none"
        return seen.pop() if len(seen) == 1 else "mixed"

    def as_dict(self) -> dict:
        self.collect()
        out = {
            "mode": self.mode(),
            "steps": self.steps,
            "tokens": self.tokens,
            "sequential_steps": self.sequential_steps,
        }
        per_bucket = {}
        for bucket, c in sorted(self.per_bucket.items()):
            entry = {"steps": c.steps, "sequential_steps": c.sequential_steps}
            if c.step_ms:
                a, f, s = st.fmean(c.attention_ms), st.fmean(c.ffn_ms), st.fmean(c.step_ms)
                entry.update(attention_ms=a, ffn_ms=f, step_ms=s, overlap=overlap(a, f, s))
            per_bucket[bucket] = entry
        out["per_bucket"] = per_bucket
        if self.profiling:
            a, f, s = _summary(self.attention_ms), _summary(self.ffn_ms), _summary(self.step_ms)
            out.update(
                attention_stage_ms=a,
                ffn_stage_ms=f,
                step_ms=s,
                overlap=overlap(a["mean"], f["mean"], s["mean"]),
            )
        return out
