"""Pipeline statistics: counters always; per-stage CUDA-event timings when profiling.

Timing events are recorded as external event nodes so they also time CUDA-graph replays. Each
step's events are read at the start of the next step (or when statistics are asked for), after
the host has synchronised for sampling anyway: profiling adds no synchronisation of its own to
the step.
"""

from __future__ import annotations

import statistics as st

import torch


def _timing_event() -> torch.cuda.Event:
    try:
        return torch.cuda.Event(enable_timing=True, external=True)
    except TypeError:  # torch without external events: timing only outside graphs
        return torch.cuda.Event(enable_timing=True)


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

    def read(self) -> tuple[float, float, float]:
        """(attention busy ms, FFN busy ms, step ms) of the last recorded step."""
        attention = sum(s.elapsed_time(e) for row in self.attention for s, e in row)
        ffn = sum(s.elapsed_time(e) for row in self.ffn for s, e in row)
        return attention, ffn, self.step[0].elapsed_time(self.step[1])


def _summary(values: list[float]) -> dict:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"mean": st.fmean(values), "p50": st.median(values), "p99": p99}


class PipelineStats:
    def __init__(self, profiling: bool):
        self.profiling = profiling
        self.steps = self.tokens = self.sequential_steps = 0
        self.attention_ms: list[float] = []
        self.ffn_ms: list[float] = []
        self.step_ms: list[float] = []
        self._pending: StageTimers | None = None

    def record(self, num_tokens: int, timers: StageTimers | None) -> None:
        self.collect()
        self.steps += 1
        self.tokens += num_tokens
        self._pending = timers

    def collect(self) -> None:
        if self._pending is None:
            return
        self._pending.step[1].synchronize()
        a, f, s = self._pending.read()
        self.attention_ms.append(a)
        self.ffn_ms.append(f)
        self.step_ms.append(s)
        self._pending = None

    def as_dict(self) -> dict:
        self.collect()
        out = {
            "steps": self.steps,
            "tokens": self.tokens,
            "sequential_steps": self.sequential_steps,
        }
        if self.profiling:
            a, f, s = _summary(self.attention_ms), _summary(self.ffn_ms), _summary(self.step_ms)
            shorter = min(a["mean"], f["mean"])
            # Share of the shorter stage hidden under the longer one: 0 = serial, 1 = perfect.
            hidden = (a["mean"] + f["mean"] - s["mean"]) / shorter if shorter > 0 else 0.0
            out.update(
                attention_stage_ms=a,
                ffn_stage_ms=f,
                step_ms=s,
                overlap=max(0.0, min(1.0, hidden)),
            )
        return out


def describe(pipe) -> dict:
    """``get_pipeline_statistics()`` of a PipelineScheduler: its mode and split, the policy's
    choice per calibrated bucket (and the split it runs on), and the step counters."""
    g, policy = pipe.green, pipe.policy
    stats = {
        "enabled": pipe.active,
        "mode": "pipelined" if pipe.active else pipe.mode,
        "reason": pipe.reason,
        "attention_sms": g.attention_sms if pipe.active else 0,
        "ffn_sms": g.ffn_sms if pipe.active else 0,
        "total_sms": g.total_sms if pipe.active else 0,
        "num_microbatches": pipe.num_microbatches,
        "cuda_graphs": pipe.graph_runner is not None,
        "policy": pipe.policy_mode,
    }
    if policy is not None:
        measured = policy.measured
        stats["buckets"] = {b: v["mode"] for b, v in measured.items()}
        stats["bucket_splits"] = {
            b: v["split"] for b, v in measured.items() if v["mode"] == "pipelined"
        }
        stats["calibration_ms"] = {
            b: (v["sequential_ms"], v["pipelined_ms"]) for b, v in measured.items()
        }
        if policy.searched:
            stats["split_search_ms"] = {
                split: {b: (v["sequential_ms"], v["pipelined_ms"]) for b, v in m.items()}
                for split, m in policy.searched.items()
            }
    stats.update(pipe.stats.as_dict())
    return stats


def format_table(stats: dict) -> str:
    lines = ["Pipeline statistics", "-" * 52]
    keys = (
        "enabled",
        "mode",
        "reason",
        "attention_sms",
        "ffn_sms",
        "num_microbatches",
        "steps",
        "sequential_steps",
        "tokens",
    )
    for key in keys:
        if key in stats:
            lines.append(f"{key:<20}{stats[key]}")
    if "split_search_ms" in stats:
        lines.append(f"{'splits tried':<20}{', '.join(stats['split_search_ms'])}")
    if "buckets" in stats:
        modes = ", ".join(f"{bs}:{m}" for bs, m in sorted(stats["buckets"].items()))
        lines.append(f"{'bucket modes':<20}{modes}")
    if stats.get("bucket_splits"):
        splits = ", ".join(f"{bs}:{s}" for bs, s in sorted(stats["bucket_splits"].items()))
        lines.append(f"{'bucket splits':<20}{splits}")
    if "step_ms" in stats:
        lines.append(f"{'(ms)':<20}{'mean':>10}{'p50':>10}{'p99':>10}")
        for key, label in (
            ("attention_stage_ms", "attention stage"),
            ("ffn_stage_ms", "FFN stage (GEMMs)"),
            ("step_ms", "step"),
        ):
            v = stats[key]
            lines.append(f"{label:<20}{v['mean']:>10.3f}{v['p50']:>10.3f}{v['p99']:>10.3f}")
        lines.append(f"{'overlap':<20}{stats['overlap']:.0%} of the shorter stage hidden")
    return "\n".join(lines)
