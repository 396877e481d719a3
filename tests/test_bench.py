"""bench.py's control flow (the timing itself runs on a GPU: benchmarks/results/RUNS.md)."""

import pytest

import bench


def test_compare_rounds_alternate_the_order():
    args = bench.parse_args(["--compare-pipeline", "--rounds", "3"])
    assert bench.variant_order(args) == [False, True, True, False, False, True]


def test_single_variant_without_compare():
    assert bench.variant_order(bench.parse_args([])) == [False]
    assert bench.variant_order(bench.parse_args(["--pipeline"])) == [True]


def test_rounds_must_be_positive():
    with pytest.raises(ValueError, match="rounds=0"):
        bench.variant_order(bench.parse_args(["--compare-pipeline", "--rounds", "0"]))


def test_medians_per_variant():
    results = [
        {"variant": "sequential", "throughput_tok_s": 100.0},
        {"variant": "pipelined", "throughput_tok_s": 90.0},
        {"variant": "pipelined", "throughput_tok_s": 110.0},
        {"variant": "sequential", "throughput_tok_s": 104.0},
    ]
    assert bench.median_throughput(results, "sequential") == 102.0
    assert bench.median_throughput(results, "pipelined") == 100.0


def test_triton_compiles_collects_and_restores_the_hook():
    knobs = pytest.importorskip("triton").knobs
    before = knobs.runtime.jit_post_compile_hook
    with bench.triton_compiles() as compiled:
        knobs.runtime.jit_post_compile_hook(key=None, repr="_kernel[num_warps=4](x: i32)")
    assert compiled == ["_kernel[num_warps=4](x: i32)"]
    assert knobs.runtime.jit_post_compile_hook is before
