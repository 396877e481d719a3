"""benchmarks/pipeline_timeline.py draws a trace's timeline and a sweep's regime map (CPU)."""

import json

from benchmarks import pipeline_timeline as pt
from nanovllm.pipeline.stats import StepIntervals
from nanovllm.pipeline.trace import chrome_trace


def test_plot_writes_the_timeline_and_the_regime_map(tmp_path):
    steps = [
        StepIntervals(16, t, 1.0, [("ffn", 0, 0, 0.0, 0.4), ("attention", 0, 0, 0.4, 0.9)])
        for t in (0.0, 0.01)
    ]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(chrome_trace(steps)))
    rows = [
        dict(shape="8b", batch=b, ctx=c, attention_sms=24, ffn_sms=108, speedup=0.9 + b / 1e4)
        for b in (256, 512)
        for c in (256, 512)
    ]
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"models": [{"rows": rows}], "environment": {"card": "test"}}))
    written = pt.main(
        ["plot", "--trace", str(trace), "--sweep", str(sweep), "--out-dir", str(tmp_path)]
    )
    assert [p.rsplit("/", 1)[1] for p in written] == ["trace.png", "sweep_regimes.png"]
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_collect_refuses_one_sequence():
    import pytest

    with pytest.raises(SystemExit):
        pt.parse_args(["collect", "--batch", "1", "--json", "x.json"])
