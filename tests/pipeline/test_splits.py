"""Per-bucket splits on the CPU: the pipeline runs a bucket on the split its policy names, with
that split's green contexts (stand-ins without streams here), and closes the extra splits when
the current one changes. The same on a GPU, with real partitions: test_pipeline.py."""

import torch

from nanovllm import LLM
from nanovllm.pipeline import policy as pp
from tests.helpers import load_test_module

sched = load_test_module("pipeline/test_decoder.py")


class SplitGreen(sched.RecordingGreen):
    """A stand-in split that records every FFN stage issued on it, and can be unavailable."""

    available, reason = True, ""

    def __init__(self, attention_sms=40, ffn_sms=92, available=True):
        super().__init__()
        self.attention_sms, self.ffn_sms, self.available = attention_sms, ffn_sms, available
        self.reason = "" if available else "too few SMs"
        self.stages = 0
        self.closed = False

    def cublas_sm_budget(self, stage):
        self.stages += 1
        return super().cublas_sm_budget(stage)

    def close(self):
        self.closed = True


def entry(mode, split, ms=1.0):
    return {"mode": mode, "sequential_ms": 2.0, "pipelined_ms": ms, "split": split}


def two_split_policy():
    """Buckets 2 and up on the current split 40/92, 4 and up on 24/108."""
    measured = {2: entry("pipelined", "40/92"), 4: entry("pipelined", "24/108")}
    searched = {
        "40/92": {2: measured[2], 4: {**measured[4], "split": "40/92", "pipelined_ms": 1.5}},
        "24/108": {2: entry("pipelined", "24/108", 1.5), 4: measured[4]},
    }
    return pp.PipelinePolicy(measured, searched)


def pipeline(tiny_model, made):
    llm = LLM(tiny_model, device="cpu", kvcache_block_size=16, max_num_seqs=8)
    pipe = sched.pipeline_of(llm, SplitGreen())

    def make_green(device, attention, ffn):
        made.append(SplitGreen(attention, ffn, available=made_available[0]))
        return made[-1]

    made_available = [True]
    pipe.make_green = make_green
    return llm, pipe, made_available


@torch.inference_mode()
def test_each_bucket_runs_on_its_split(tiny_model):
    made = []
    llm, pipe, _ = pipeline(tiny_model, made)
    pipe.policy = two_split_policy()
    pipe.open_splits(pipe.policy)
    assert [(g.attention_sms, g.ffn_sms) for g in made] == [(24, 108)]
    layers = llm.runtime.hf_config.num_hidden_layers
    per_step = (layers + 1) * 2  # FFN stages per step: layers + 1, per micro-batch
    small = sched.decode_batch(llm, [3, 4])  # bucket 2: the current split
    big = sched.decode_batch(llm, [3, 4, 5, 6, 7])  # 5 rows: calibrated bucket 4, 24/108
    out_small = pipe.run(small)
    assert pipe.green.stages == per_step and made[0].stages == 0
    out_big = pipe.run(big)
    assert pipe.green.stages == per_step and made[0].stages == per_step
    assert out_small.shape[0] == 2 and out_big.shape[0] == 5
    stats = pipe.statistics()
    assert stats["bucket_splits"] == {2: "40/92", 4: "24/108"} and stats["steps"] == 2
    # re-partitioning the current split closes the others: the policy is re-measured
    pipe.repartition(40, 92)
    assert made[0].closed and not pipe.splits.splits
    pipe.close()


@torch.inference_mode()
def test_an_unavailable_split_hands_its_buckets_back(tiny_model):
    made = []
    llm, pipe, available = pipeline(tiny_model, made)
    available[0] = False
    pipe.policy = two_split_policy()
    pipe.open_splits(pipe.policy)
    assert made[0].closed and not pipe.splits.splits
    # bucket 4 now follows 40/92's own measurement of it
    assert pipe.policy.split(4) == (40, 92) and pipe.policy.measured[4]["pipelined_ms"] == 1.5
    pipe.run(sched.decode_batch(llm, [3, 4, 5, 6, 7]))
    assert pipe.green.stages > 0 and made[0].stages == 0
