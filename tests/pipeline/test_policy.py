"""The pipelining policy's pure parts: decisions, bucket mapping, the split search, and the
calibration's measurement schedule."""

import json
from types import SimpleNamespace

import torch

from nanovllm.pipeline import cache as pipeline_cache
from nanovllm.pipeline import calibration as cal
from nanovllm.pipeline import policy as pp
from nanovllm.pipeline.kernels import choose_stage_kernels


def test_decide_needs_a_clear_win():
    assert pp.decide(10.0, 9.0) == "pipelined"
    assert pp.decide(10.0, 9.9) == "sequential"  # within the noise margin
    assert pp.decide(10.0, 12.0) == "sequential"
    # a win smaller than the measured spread is noise, whatever the margin says
    assert pp.decide(10.0, 9.0, spread_ms=0.5) == "pipelined"
    assert pp.decide(10.0, 9.0, spread_ms=1.5) == "sequential"


def test_calibration_interleaves_repeats_and_reports_the_spread():
    """Both steps are timed in every round, buckets interleaved; the figure is the median and a
    noisy pipelined step loses its bucket even though its median wins."""
    order = []
    noisy = iter([0.5, 9.0, 0.5, 9.0, 0.5, 9.0, 0.5] * 2)

    def timer(fn):
        return fn()

    def sequential(inputs):
        order.append(("seq", inputs))
        return 10.0 if inputs == 8 else 1.0

    def pipelined(inputs):
        order.append(("pipe", inputs))
        return 5.0 if inputs == 8 else next(noisy)

    out = cal.calibrate(sequential, pipelined, {2: 2, 8: 8}, timer=timer, rounds=7)
    timed = order[2 * cal.WARMUP * 2 :]  # after the warm-up of both buckets
    assert len(timed) == 2 * 2 * 7
    assert {b for _, b in timed[:4]} == {2, 8}  # one round covers every bucket
    assert out[8] == {
        "mode": "pipelined",
        "sequential_ms": 10.0,
        "pipelined_ms": 5.0,
        "spread_ms": 0.0,
    }
    # bucket 2: median 0.5 beats 1.0, but the pipelined times spread over 8.5 ms
    assert out[2]["pipelined_ms"] == 0.5 and out[2]["spread_ms"] == 8.5
    assert out[2]["mode"] == "sequential"


def test_calibration_warns_about_times_that_fall_with_the_batch(caplog):
    def timer(fn):
        return fn()

    ms = {2: 0.8, 4: 0.8, 8: 0.3}
    cal.calibrate(lambda b: ms[b], lambda b: 1.0, {b: b for b in ms}, timer=timer, rounds=3)
    assert "timings are noisy" in caplog.text and "bucket 8" in caplog.text


def test_policy_names_the_split_of_each_pipelined_bucket():
    policy = pp.PipelinePolicy(
        {
            2: {"mode": "sequential", "split": "40/92"},
            8: {"mode": "pipelined", "split": "24/108", "pipelined_ms": 1.0},
            64: {"mode": "pipelined", "split": "40/92", "pipelined_ms": 2.0},
        },
        searched={"40/92": {8: {"mode": "sequential", "pipelined_ms": 3.0}}},
    )
    assert policy.split(1) is None and policy.split(4) is None  # sequential buckets
    assert policy.split(8) == policy.split(48) == (24, 108)
    assert policy.split(64) == policy.split(512) == (40, 92)
    # 24/108 cannot be opened: its buckets take 40/92's own measurement and decision
    policy.fall_back((24, 108), (40, 92))
    assert policy.mode(8) == "sequential" and policy.split(8) is None
    assert policy.measured[8] == {"mode": "sequential", "pipelined_ms": 3.0, "split": "40/92"}
    assert policy.split(64) == (40, 92)


def test_assign_buckets_moves_a_bucket_only_for_a_clear_win():
    results = {
        (40, 92): timings(b2=(1.0, 1.5), b8=(10.0, 8.0), b64=(20.0, 15.0), b128=(30.0, 29.0)),
        (24, 108): timings(b2=(1.0, 0.9), b8=(10.0, 7.9), b64=(20.0, 12.0), b128=(30.0, 31.0)),
        (64, 68): timings(b2=(1.0, 0.8), b8=(10.0, 9.0), b64=(20.0, 13.0), b128=(30.0, 28.6)),
    }
    out = pp.assign_buckets(results, (40, 92))
    assert out[2] == {**results[(64, 68)][2], "split": "64/68"}  # 40/92 does not pipeline it
    assert out[8]["split"] == "40/92"  # 7.9 vs 8.0: within the margin, stays
    assert out[64]["split"] == "24/108" and out[64]["pipelined_ms"] == 12.0
    assert out[128] == {**results[(40, 92)][128], "split": "40/92"}  # 28.6: within the margin
    assert out[128]["mode"] == "pipelined"
    nothing = {s: timings(b2=(1.0, 1.5)) for s in results}
    assert pp.assign_buckets(nothing, (40, 92))[2]["mode"] == "sequential"


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


def test_synthetic_decode_writes_nothing_and_wraps_blocks():
    inputs = cal.synthetic_decode(rows=4, context=40, block_size=16, num_blocks=5, device="cpu")
    meta = inputs.meta
    assert bool((meta.slot_mapping == -1).all())
    assert meta.block_tables.shape == (4, 3) and int(meta.block_tables.max()) < 5
    assert meta.context_lens.tolist() == [40] * 4
    assert torch.equal(inputs.positions, torch.full((4,), 39))


def timings(**modes_ms):
    """{bucket: entry} from b<bucket>=(sequential_ms, pipelined_ms), decided as calibrate does."""
    out = {}
    for name, (seq, pipe) in modes_ms.items():
        out[int(name[1:])] = {
            "mode": pp.decide(seq, pipe),
            "sequential_ms": seq,
            "pipelined_ms": pipe,
        }
    return out


def test_choose_split_keeps_the_default_unless_a_split_saves_time():
    losing = {(24, 108): timings(b2=(1.0, 1.5)), (40, 92): timings(b2=(1.0, 1.2))}
    assert pp.choose_split(losing, (40, 92)) == (40, 92)
    winning = {
        (24, 108): timings(b2=(1.0, 1.5), b64=(10.0, 9.0)),  # saves 1 ms
        (40, 92): timings(b2=(1.0, 1.2), b64=(10.0, 8.0)),  # saves 2 ms
        (64, 68): timings(b2=(1.0, 0.9), b64=(10.0, 9.9)),  # 0.1 ms (9.9: within the margin)
    }
    assert pp.saved_ms(winning[(40, 92)]) == 2.0
    assert abs(pp.saved_ms(winning[(64, 68)]) - 0.1) < 1e-9  # only bucket 2 was pipelined
    assert pp.choose_split(winning, (24, 108)) == (40, 92)


class FakePartitions:
    """What search_split is handed: a cache (a dict), and a measure_on that re-partitions to a
    split (recorded) and "times" it with fixed figures per attention SM count."""

    def __init__(self, cache: dict, pipelined_ms: dict):
        self.cache, self.pipelined_ms = cache, pipelined_ms
        self.current = (40, 92)
        self.repartitions = []

    def repartition(self, split):
        if split != self.current:
            self.repartitions.append(split)
            self.current = split

    def measure_on(self, split):
        self.repartition(split)
        ms = self.pipelined_ms[split[0]]  # one figure, or one per bucket
        measured = {}
        for b in (2, 4, 8):
            pipe = ms[b] if isinstance(ms, dict) else ms
            measured[b] = {
                "mode": pp.decide(10.0, pipe),
                "sequential_ms": 10.0,
                "pipelined_ms": pipe,
            }
        self.cache[split] = measured
        return split, measured


def search(cache, pipelined_ms):
    parts = FakePartitions(cache, pipelined_ms)
    policy, best = cal.search_split(
        parts.current, [(24, 108), (40, 92), (64, 68)], cache.get, parts.measure_on
    )
    parts.repartition(best)  # as the scheduler does with the winner
    return parts, policy


def test_search_split_tries_every_candidate_and_keeps_the_fastest():
    cache = {}
    pipe, policy = search(cache, {24: 9.0, 40: 9.5, 64: 12.0})
    # the current split first, then the others; back to the winner at the end
    assert pipe.repartitions == [(24, 108), (64, 68), (24, 108)]
    assert pipe.current == (24, 108)
    assert set(policy.searched) == {"40/92", "24/108", "64/68"}
    assert policy.mode(8) == "pipelined" and policy.measured[8]["pipelined_ms"] == 9.0
    # a second search reads every split from the cache without re-partitioning to it: same
    # answer, one re-partition (to the winner)
    pipe2, policy2 = search(cache, {24: 99.0, 40: 99.0, 64: 99.0})
    assert pipe2.repartitions == [(24, 108)]
    assert policy2.searched == policy.searched and policy2.measured == policy.measured


def test_search_split_stays_on_the_default_when_nothing_wins():
    cache = {}
    pipe, policy = search(cache, {24: 11.0, 40: 10.0, 64: 12.0})
    assert pipe.repartitions == [(24, 108), (64, 68), (40, 92)]
    assert pipe.current == (40, 92)
    assert policy.mode(8) == "sequential" and len(policy.searched) == 3
    # with every split cached, the next engine stays where it is: no re-partition, no re-capture
    pipe2, policy2 = search(cache, {24: 99.0, 40: 99.0, 64: 99.0})
    assert pipe2.repartitions == []
    assert policy2.mode(8) == "sequential" and policy2.searched == policy.searched


def test_search_split_gives_a_bucket_its_own_split():
    # calibrated buckets 2, 4, 8: 24/108 saves the most overall, 64/68 is fastest at bucket 2
    pipe, policy = search(
        {}, {24: {2: 11.0, 4: 8.0, 8: 7.0}, 40: 10.5, 64: {2: 6.0, 4: 11.0, 8: 11.0}}
    )
    assert pipe.current == (24, 108)
    assert policy.split(2) == (64, 68) and policy.measured[2]["pipelined_ms"] == 6.0
    assert policy.split(4) == policy.split(8) == (24, 108)


def test_search_split_measures_only_what_the_cache_lacks():
    cache = {}
    search(cache, {24: 11.0, 40: 10.0, 64: 12.0})
    del cache[(64, 68)]  # one split never measured on this card
    pipe, policy = search(cache, {24: 11.0, 40: 10.0, 64: 8.0})
    # 40 and 24 come from the cache; 64 is measured (and now wins)
    assert pipe.repartitions == [(64, 68)]
    assert policy.mode(8) == "pipelined" and policy.measured[8]["pipelined_ms"] == 8.0


def test_calibration_cache_round_trips_per_split(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    key, parts = pipeline_cache.cache_key(["v2", "H200"], (24, 108), 2, 1024)
    pipeline_cache.store_cached(key, parts, {8: {"mode": "sequential"}})
    with open(pipeline_cache.cache_path()) as f:
        assert json.load(f)[key]["describes"] == parts
    assert pipeline_cache.load_cached(key) == {8: {"mode": "sequential"}}


def test_tma_attention_choice(monkeypatch):
    from nanovllm.attention.torch_backend import TorchAttentionBackend
    from nanovllm.kernels import tma_decode

    triton_backend = SimpleNamespace(name="triton")
    q = k = v = torch.zeros(1)

    def choose(kernel, backend=triton_backend, supported=None):
        monkeypatch.setattr(tma_decode, "supported", lambda q, k, v: supported)
        return choose_stage_kernels(backend, kernel, "triton", q, k, v)

    kernels, why = choose("tma")
    assert kernels.attention_kernel == "tma" and why == ""
    assert kernels.attention.decode_kernel == "tma"
    kernels, why = choose("triton")
    assert kernels.attention is triton_backend and kernels.attention_kernel == "triton"
    torch_backend = TorchAttentionBackend()
    kernels, why = choose("tma", backend=torch_backend)
    assert kernels.attention is torch_backend and why == "the torch attention backend"
    kernels, why = choose("tma", supported="head_dim 64 (128 only)")
    assert kernels.attention_kernel == "triton" and why == "head_dim 64 (128 only)"
