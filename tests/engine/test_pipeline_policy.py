"""The pipelining policy's pure parts: decisions, bucket mapping, the split search."""

import json
from types import SimpleNamespace

import torch

from nanovllm.engine import pipeline_cache
from nanovllm.engine import pipeline_policy as pp


def test_decide_needs_a_clear_win():
    assert pp.decide(10.0, 9.0) == "pipelined"
    assert pp.decide(10.0, 9.9) == "sequential"  # within the noise margin
    assert pp.decide(10.0, 12.0) == "sequential"


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
    inputs = pp.synthetic_decode(rows=4, context=40, block_size=16, num_blocks=5, device="cpu")
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


class FakeGreen:
    total_sms = 132

    def __init__(self):
        self.attention_sms, self.ffn_sms = 40, 92

    def split_candidates(self):
        return [(24, 108), (40, 92), (64, 68)]


class FakePipe:
    """What search_split touches: the runner's sizes, the green split, two step functions
    and repartition (which the real scheduler follows with a graph re-capture)."""

    def __init__(self, pipelined_ms: dict[int, float]):
        self.green = FakeGreen()
        self.runner = SimpleNamespace(
            runtime=SimpleNamespace(max_model_len=512, num_kvcache_blocks=64),
            config=SimpleNamespace(max_num_seqs=8),
            block_size=16,
            device=torch.device("cpu"),
        )
        self.num_microbatches = 2
        self.pipelined_ms = pipelined_ms  # per attention SM count
        self.repartitions = []

    def repartition(self, attention, ffn):
        self.repartitions.append((attention, ffn))
        self.green.attention_sms, self.green.ffn_sms = attention, ffn

    def _sequential(self, inputs):
        return 10.0

    def _pipelined(self, inputs):
        ms = self.pipelined_ms[self.green.attention_sms]  # one figure, or one per bucket
        return ms[len(inputs.input_ids)] if isinstance(ms, dict) else ms


def search(monkeypatch, tmp_path, pipelined_ms):
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    pipe = FakePipe(pipelined_ms)

    def fake_key(runner, attention_sms, ffn_sms, m, context):
        return f"{attention_sms}-{ffn_sms}", [f"sms={attention_sms},{ffn_sms}"]

    monkeypatch.setattr(pp, "cache_key", fake_key)
    # "timing" a step = calling it: the fake steps return their milliseconds
    monkeypatch.setattr(pp, "measure", lambda seq, piped, inputs: (seq(inputs), piped(inputs)))
    return pipe, pp.search_split(pipe)


def test_search_split_tries_every_candidate_and_keeps_the_fastest(monkeypatch, tmp_path):
    pipe, policy = search(monkeypatch, tmp_path, {24: 9.0, 40: 9.5, 64: 12.0})
    # the current split first, then the others; back to the winner at the end
    assert pipe.repartitions == [(24, 108), (64, 68), (24, 108)]
    assert (pipe.green.attention_sms, pipe.green.ffn_sms) == (24, 108)
    assert set(policy.searched) == {"40/92", "24/108", "64/68"}
    assert policy.mode(8) == "pipelined" and policy.measured[8]["pipelined_ms"] == 9.0
    # a second search reads every split from the cache without re-partitioning to it: same
    # answer, one re-partition (to the winner)
    pipe2, policy2 = search(monkeypatch, tmp_path, {24: 99.0, 40: 99.0, 64: 99.0})
    assert pipe2.repartitions == [(24, 108)]
    assert policy2.searched == policy.searched and policy2.measured == policy.measured


def test_search_split_stays_on_the_default_when_nothing_wins(monkeypatch, tmp_path):
    pipe, policy = search(monkeypatch, tmp_path, {24: 11.0, 40: 10.0, 64: 12.0})
    assert pipe.repartitions == [(24, 108), (64, 68), (40, 92)]
    assert (pipe.green.attention_sms, pipe.green.ffn_sms) == (40, 92)
    assert policy.mode(8) == "sequential" and len(policy.searched) == 3
    # with every split cached, the next engine stays where it is: no re-partition, no re-capture
    pipe2, policy2 = search(monkeypatch, tmp_path, {24: 99.0, 40: 99.0, 64: 99.0})
    assert pipe2.repartitions == []
    assert policy2.mode(8) == "sequential" and policy2.searched == policy.searched


def test_search_split_gives_a_bucket_its_own_split(monkeypatch, tmp_path):
    # calibrated buckets 2, 4, 8: 24/108 saves the most overall, 64/68 is fastest at bucket 2
    pipe, policy = search(
        monkeypatch,
        tmp_path,
        {24: {2: 11.0, 4: 8.0, 8: 7.0}, 40: 10.5, 64: {2: 6.0, 4: 11.0, 8: 11.0}},
    )
    assert (pipe.green.attention_sms, pipe.green.ffn_sms) == (24, 108)
    assert policy.split(2) == (64, 68) and policy.measured[2]["pipelined_ms"] == 6.0
    assert policy.split(4) == policy.split(8) == (24, 108)


def test_search_split_measures_only_what_the_cache_lacks(monkeypatch, tmp_path):
    search(monkeypatch, tmp_path, {24: 11.0, 40: 10.0, 64: 12.0})
    with open(pipeline_cache.cache_path()) as f:
        table = json.load(f)
    del table["64-68"]  # one split never measured on this card
    with open(pipeline_cache.cache_path(), "w") as f:
        json.dump(table, f)
    pipe, policy = search(monkeypatch, tmp_path, {24: 11.0, 40: 10.0, 64: 8.0})
    # 40 and 24 come from the cache; 64 is measured (and now wins)
    assert pipe.repartitions == [(64, 68)]
    assert policy.mode(8) == "pipelined" and policy.measured[8]["pipelined_ms"] == 8.0


def _kernel_pipe(choice, attention_sms, backend="triton", supported=None, monkeypatch=None):
    from nanovllm.kernels import tma_decode

    if monkeypatch is not None:
        monkeypatch.setattr(tma_decode, "supported", lambda q, k, v: supported)
    attn = SimpleNamespace(k_cache=None, v_cache=None)
    layer = SimpleNamespace(self_attn=SimpleNamespace(attn=attn))
    return SimpleNamespace(
        runner=SimpleNamespace(
            config=SimpleNamespace(pipeline_attention_kernel=choice),
            backend=SimpleNamespace(name=backend),
        ),
        green=SimpleNamespace(attention_sms=attention_sms),
        model=SimpleNamespace(model=SimpleNamespace(layers=[layer])),
        q=None,
        logged_kernel_choice=set(),
    )


def test_tma_attention_choice(monkeypatch, caplog):
    caplog.set_level("INFO", logger="nanovllm.engine.pipeline_policy")
    ok = dict(monkeypatch=monkeypatch, supported=None)
    assert pp.use_tma_attention(_kernel_pipe("tma", 24, **ok)) is True
    assert pp.use_tma_attention(_kernel_pipe("tma", 64, **ok)) is True
    assert pp.use_tma_attention(_kernel_pipe("triton", 24, **ok)) is False
    assert pp.use_tma_attention(_kernel_pipe("tma", 24, backend="torch", **ok)) is False
    no = dict(monkeypatch=monkeypatch, supported="head_dim 64 (128 only)")
    assert pp.use_tma_attention(_kernel_pipe("tma", 24, **no)) is False
    assert "not TMA, head_dim 64" in caplog.text
    pipe = _kernel_pipe("tma", 24, **ok)
    pp.use_tma_attention(pipe)
    pp.use_tma_attention(pipe)
    assert pipe.logged_kernel_choice == {24}  # logged once per partition size
