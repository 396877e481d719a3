"""What the pipeline reports: the mode the recent steps ran in, per-bucket counters and stage
times, the statistics table, and the trace of stage intervals."""

import json

import pytest

from nanovllm.pipeline import report
from nanovllm.pipeline.policy import PipelinePolicy
from nanovllm.pipeline.stats import PipelineStats, StepIntervals
from nanovllm.pipeline.trace import chrome_trace, export_chrome_trace, stages_overlap


def step(bucket=16, host_start=0.0):
    # two micro-batches, one layer: F(0,0) F(0,1) | A(0,0) A(0,1) | F(1,0) F(1,1)
    return StepIntervals(
        bucket,
        host_start,
        1.0,
        [
            ("ffn", 0, 0, 0.0, 0.2),
            ("ffn", 0, 1, 0.2, 0.4),
            ("attention", 0, 0, 0.25, 0.5),  # overlaps F(0,1) by 0.15 and F(1,0) by 0.0
            ("attention", 0, 1, 0.5, 0.8),
            ("ffn", 1, 0, 0.5, 0.7),  # overlaps A(0,1) by 0.2
            ("ffn", 1, 1, 0.8, 1.0),
        ],
    )


def test_mode_is_what_the_recent_steps_did():
    stats = PipelineStats(profiling=False)
    assert stats.mode() == "none"
    stats.record_sequential(1, 1)
    assert stats.mode() == "sequential"
    stats.record_pipelined(16, 12, None)
    assert stats.mode() == "mixed"
    for _ in range(100):  # the window forgets old steps
        stats.record_pipelined(16, 12, None)
    out = stats.as_dict()
    assert out["mode"] == "pipelined" and out["steps"] == 101 and out["sequential_steps"] == 1
    assert out["per_bucket"] == {
        1: {"steps": 0, "sequential_steps": 1},
        16: {"steps": 101, "sequential_steps": 0},
    }
    assert out["tokens"] == 1 + 101 * 12


def test_stage_overlap_of_a_step():
    assert stages_overlap(step()) == pytest.approx(0.15 + 0.2)
    serial = StepIntervals(2, 0.0, 1.0, [("ffn", 0, 0, 0.0, 0.5), ("attention", 0, 0, 0.5, 1.0)])
    assert stages_overlap(serial) == 0.0


def test_chrome_trace_has_one_event_per_stage_and_step(tmp_path):
    trace = chrome_trace([step(host_start=10.0), step(bucket=32, host_start=10.002)])
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(complete) == 2 * (1 + 6)
    second = [e for e in complete if e.get("args", {}).get("step") == 1]
    assert min(e["ts"] for e in second) == pytest.approx(2000.0)  # 2 ms later, in us
    a = next(e for e in complete if e["name"] == "attention L0 mb1")
    assert a["dur"] == pytest.approx(300.0) and a["args"]["bucket"] == 16
    path = tmp_path / "t.json"
    export_chrome_trace([step()], str(path))
    assert json.loads(path.read_text())["traceEvents"]


def test_table_shows_each_bucket_decision_split_timings_and_steps():
    policy = PipelinePolicy(
        {
            2: {
                "mode": "sequential",
                "sequential_ms": 0.8,
                "pipelined_ms": 1.2,
                "spread_ms": 0.01,
                "split": "40/92",
            },
            64: {
                "mode": "pipelined",
                "sequential_ms": 3.0,
                "pipelined_ms": 2.5,
                "spread_ms": 0.05,
                "split": "24/108",
            },
        }
    )
    stats = {
        "enabled": True,
        "mode": "mixed",
        "reason": "calibration pipelines only batch buckets [64] (see calibration_ms)",
        "policy": "auto",
        "steps": 3,
        "sequential_steps": 5,
        "tokens": 200,
        "kernels": {"attention_stage": "triton", "ffn_stage_gemm": "triton"},
        "per_bucket": {
            2: {"steps": 0, "sequential_steps": 5},
            64: {
                "steps": 3,
                "sequential_steps": 0,
                "attention_ms": 1.0,
                "ffn_ms": 2.0,
                "step_ms": 2.4,
            },
        },
        **report.policy_report(policy),
    }
    rows = report.bucket_rows(stats)
    assert rows[0][:8] == ["2", "sequential", "-", "0.800", "1.200", "0.010", "0", "5"]
    assert rows[1] == [
        "64",
        "pipelined",
        "24/108",
        "3.000",
        "2.500",
        "0.050",
        "3",
        "0",
        "1.000",
        "2.000",
        "2.400",
    ]
    table = report.format_table(stats)
    assert "3 pipelined, 5 sequential" in table and "attention stage: triton" in table
