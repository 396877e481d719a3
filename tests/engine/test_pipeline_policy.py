"""The pipelining policy's pure parts: decisions, bucket mapping, the disk cache."""

import torch

from nanovllm.engine import pipeline_policy as pp


def test_decide_needs_a_clear_win():
    assert pp.decide(10.0, 9.0) == "pipelined"
    assert pp.decide(10.0, 9.9) == "sequential"  # within the noise margin
    assert pp.decide(10.0, 12.0) == "sequential"


def test_calibration_buckets_are_powers_of_two_and_the_largest():
    assert pp.calibration_buckets([1, 2, 4, 8, 16, 32, 48, 64, 80]) == [2, 4, 8, 16, 32, 64, 80]
    assert pp.calibration_buckets([1]) == []


def test_policy_maps_each_bucket_to_the_nearest_smaller_calibrated_one():
    policy = pp.PipelinePolicy(
        {2: {"mode": "sequential"}, 64: {"mode": "pipelined"}, 256: {"mode": "sequential"}}
    )
    assert policy.mode(1) == "sequential"
    assert policy.mode(48) == "sequential"
    assert policy.mode(64) == policy.mode(200) == "pipelined"
    assert policy.mode(512) == "sequential"


def test_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    assert pp.load_cached("k") is None
    buckets = {8: {"mode": "pipelined", "sequential_ms": 2.0, "pipelined_ms": 1.5}}
    pp.store_cached("k", ["H100", "8b"], buckets)
    pp.store_cached("other", ["H100", "0.6b"], {2: {"mode": "sequential"}})
    assert pp.load_cached("k") == buckets


def test_synthetic_decode_writes_nothing_and_wraps_blocks():
    inputs = pp.synthetic_decode(rows=4, context=40, block_size=16, num_blocks=5, device="cpu")
    meta = inputs.meta
    assert bool((meta.slot_mapping == -1).all())
    assert meta.block_tables.shape == (4, 3) and int(meta.block_tables.max()) < 5
    assert meta.context_lens.tolist() == [40] * 4
    assert torch.equal(inputs.positions, torch.full((4,), 39))
