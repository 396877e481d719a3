"""Export the stage intervals of recent pipelined steps as a Chrome / Perfetto trace.

One process, two threads (the attention and the FFN stream); one complete event ("ph": "X")
per stage of each micro-batch, named ``attention L{layer} mb{i}`` / ``ffn L{layer} mb{i}``, and
one per step on a third thread. Steps are placed at their host launch times; within a step,
stage times come from CUDA events. Open the file at ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import json

from nanovllm.pipeline.stats import StepIntervals

_TIDS = {"step": 0, "ffn": 1, "attention": 2}


def chrome_trace(steps: list[StepIntervals]) -> dict:
    events = [
        {"ph": "M", "name": "thread_name", "pid": 0, "tid": tid, "args": {"name": name}}
        for name, tid in _TIDS.items()
    ]
    if not steps:
        return {"traceEvents": events, "displayTimeUnit": "ms"}
    t0 = steps[0].host_start
    for n, step in enumerate(steps):
        base_us = (step.host_start - t0) * 1e6
        events.append(
            {
                "ph": "X",
                "name": f"step {n} (bucket {step.bucket})",
                "pid": 0,
                "tid": _TIDS["step"],
                "ts": base_us,
                "dur": step.step_ms * 1e3,
            }
        )
        for stage, layer, mb, start, end in step.intervals:
            events.append(
                {
                    "ph": "X",
                    "name": f"{stage} L{layer} mb{mb}",
                    "pid": 0,
                    "tid": _TIDS[stage],
                    "ts": base_us + start * 1e3,
                    "dur": (end - start) * 1e3,
                    "args": {"step": n, "layer": layer, "microbatch": mb, "bucket": step.bucket},
                }
            )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def export_chrome_trace(steps: list[StepIntervals], path: str) -> None:
    with open(path, "w") as f:
        json.dump(chrome_trace(steps), f)


def stages_overlap(step: StepIntervals) -> float:
    """Milliseconds during which an attention interval and an FFN interval of the step both
    ran (0 when the stages never overlapped)."""
    attention = [(s, e) for stage, _, _, s, e in step.intervals if stage == "attention"]
    ffn = [(s, e) for stage, _, _, s, e in step.intervals if stage == "ffn"]
    total = 0.0
    for a0, a1 in attention:
        for f0, f1 in ffn:
            total += max(0.0, min(a1, f1) - max(a0, f0))
    return total
