"""When to pipeline: a short start-up calibration per decode batch bucket, cached on disk.

The pipelined step reads every weight once per micro-batch and pays for event hand-offs; it only
wins where the FFN GEMMs are compute-bound and attention is comparable in time (DESIGN.md,
section 4). Rather than guess, the scheduler times both captured steps on synthetic sequences
and pipelines a bucket only where that is measurably faster. Synthetic steps write no K/V
(slot -1) and read arbitrary cache blocks, so calibration never changes the cache.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable

import torch

from nanovllm.attention.metadata import AttentionMetadata
from nanovllm.engine.cuda_graph import graph_buckets
from nanovllm.engine.model_inputs import ModelInputs
from nanovllm.engine.pipeline_cache import cache_key, load_cached, store_cached

logger = logging.getLogger(__name__)

CALIBRATION_CONTEXT = 1024  # tokens per synthetic sequence (at most max_model_len / 2)
MARGIN = 0.02  # pipeline only when at least 2% faster: noise must not flip a bucket
REPS = 5


def calibration_buckets(buckets: list[int]) -> list[int]:
    """Powers of two and the largest bucket; other buckets follow the nearest smaller one."""
    chosen = [b for b in buckets if b >= 2 and b & (b - 1) == 0]
    return sorted(set(chosen) | {buckets[-1]} if buckets[-1] >= 2 else set(chosen))


def synthetic_decode(rows: int, context: int, block_size: int, num_blocks: int, device):
    """Decode inputs for ``rows`` sequences of ``context`` tokens over distinct cache blocks
    (wrapping around when the cache is smaller)."""
    per_seq = -(-context // block_size)
    table = torch.arange(rows * per_seq, device=device, dtype=torch.int32) % num_blocks
    meta = AttentionMetadata(
        is_prefill=False,
        slot_mapping=torch.full((rows,), -1, dtype=torch.int32, device=device),
        context_lens=torch.full((rows,), context, dtype=torch.int32, device=device),
        block_tables=table.view(rows, per_seq),
    )
    return ModelInputs(
        input_ids=torch.zeros(rows, dtype=torch.int64, device=device),
        positions=torch.full((rows,), context - 1, dtype=torch.int64, device=device),
        meta=meta,
        logits_indices=torch.arange(rows, device=device),
        sampling_rows=list(range(rows)),
    )


def _time(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def measure(
    sequential: Callable[[ModelInputs], object],
    pipelined: Callable[[ModelInputs], object],
    inputs: ModelInputs,
) -> tuple[float, float]:
    """Median ms of both steps on the same inputs, interleaved after a warm-up."""
    sequential(inputs), pipelined(inputs)
    seq, pipe = [], []
    for _ in range(REPS):
        seq.append(_time(lambda: sequential(inputs)))
        pipe.append(_time(lambda: pipelined(inputs)))
    return statistics.median(seq), statistics.median(pipe)


class PipelinePolicy:
    """Maps a batch bucket to "pipelined" or "sequential" and a pipelined bucket to its split.

    ``measured``: calibrated bucket -> {"mode", "sequential_ms", "pipelined_ms", "split"}, the
    timings of the split ("attention/ffn") the bucket runs on; other buckets follow the nearest
    smaller calibrated one. ``searched``: every split the calibration tried -> its per-bucket
    measurements."""

    def __init__(self, measured: dict[int, dict], searched: dict[str, dict] | None = None):
        self.measured = dict(sorted(measured.items()))
        self.searched = searched or {}

    def _entry(self, bucket: int) -> dict | None:
        below = [b for b in self.measured if b <= bucket]
        return self.measured[below[-1]] if below else None

    def mode(self, bucket: int) -> str:
        entry = self._entry(bucket)
        return entry["mode"] if entry else "sequential"

    def modes(self, buckets: list[int]) -> dict[int, str]:
        return {b: self.mode(b) for b in buckets}

    def split(self, bucket: int) -> tuple[int, int] | None:
        """(attention SMs, FFN SMs) of a pipelined bucket; None for a sequential one."""
        entry = self._entry(bucket)
        if entry is None or entry["mode"] != "pipelined":
            return None
        attention, ffn = entry["split"].split("/")
        return int(attention), int(ffn)

    def fall_back(self, split: tuple[int, int], primary: tuple[int, int]) -> None:
        """The buckets assigned to ``split`` take ``primary``'s own timings and decision (when
        ``split``'s green contexts cannot be created)."""
        name, primary_name = split_name(split), split_name(primary)
        for bucket, entry in self.measured.items():
            if entry["mode"] == "pipelined" and entry["split"] == name:
                self.measured[bucket] = {
                    **self.searched[primary_name][bucket],
                    "split": primary_name,
                }


def split_name(split: tuple[int, int]) -> str:
    return f"{split[0]}/{split[1]}"


def with_split(measured: dict[int, dict], split: tuple[int, int]) -> dict[int, dict]:
    return {b: {**v, "split": split_name(split)} for b, v in measured.items()}


def assign_buckets(
    results: dict[tuple[int, int], dict[int, dict]], primary: tuple[int, int]
) -> dict[int, dict]:
    """Per calibrated bucket, the split to pipeline it on: ``primary`` when it pipelines the
    bucket and no other split is faster by more than the margin, else the fastest split that
    pipelines it; sequential, with ``primary``'s timings, where no split does."""
    out = {}
    for bucket in results[primary]:
        best = primary
        for split, measured in results.items():
            entry, current = measured.get(bucket), results[best][bucket]
            if entry is None or entry["mode"] != "pipelined":
                continue
            limit = current["pipelined_ms"] * (1 - MARGIN)
            if current["mode"] != "pipelined" or entry["pipelined_ms"] < limit:
                best = split
        out[bucket] = {**results[best][bucket], "split": split_name(best)}
    return out


def use_tma_attention(pipe, green=None) -> bool:
    """Whether the attention stage on ``green``'s partition (default: the pipeline's current
    one) runs decode attention on the copy-engine kernel: asked for
    with ``pipeline_attention_kernel="tma"`` and possible for the backend, GPU and model shapes.
    Logged once per partition size.

    Not the default: alone on a partition of 8-32 SMs it reads 13-35% more per SM than the
    Triton kernel (benchmarks/sm_bandwidth.py), but inside the pipeline, next to the FFN stage,
    it measured no faster and once 8% slower (bench_pipeline.py, PIPELINE_README.md)."""
    choice = pipe.runner.config.pipeline_attention_kernel
    sms = (green or pipe.green).attention_sms
    if choice == "triton":
        why = 'pipeline_attention_kernel="triton"'
    elif pipe.runner.backend.name != "triton":
        why = f"the {pipe.runner.backend.name} attention backend"
    else:
        from nanovllm.kernels import tma_decode

        attn = pipe.model.model.layers[0].self_attn.attn
        why = tma_decode.supported(pipe.q, attn.k_cache, attn.v_cache)
    if sms not in pipe.logged_kernel_choice:
        pipe.logged_kernel_choice.add(sms)
        if why is None:
            logger.info("decode pipeline: copy-engine (TMA) attention on %d SMs", sms)
        else:
            logger.info("decode pipeline: Triton attention on %d SMs: not TMA, %s", sms, why)
    return why is None


def decide(seq_ms: float, pipe_ms: float) -> str:
    return "pipelined" if pipe_ms < seq_ms * (1 - MARGIN) else "sequential"


def saved_ms(measured: dict[int, dict]) -> float:
    """Step time the pipelined buckets of one split save, summed over the calibrated buckets."""
    piped = [v for v in measured.values() if v["mode"] == "pipelined"]
    return sum(v["sequential_ms"] - v["pipelined_ms"] for v in piped)


def choose_split(results: dict[tuple[int, int], dict[int, dict]], default: tuple[int, int]):
    """The split whose pipelined buckets save the most; ``default`` when none saves anything."""
    best = max(results, key=lambda split: saved_ms(results[split]))
    return best if saved_ms(results[best]) > 0 else default


def _context(runner) -> int:
    return min(runner.runtime.max_model_len // 2, CALIBRATION_CONTEXT)


def _cached_split(pipe, attention_sms: int, ffn_sms: int) -> dict[int, dict] | None:
    """The cached timings of a split, looked up without re-partitioning to it."""
    runner = pipe.runner
    key, _ = cache_key(runner, attention_sms, ffn_sms, pipe.num_microbatches, _context(runner))
    return load_cached(key)


def _measure_split(pipe) -> tuple[dict[int, dict], str, int]:
    """Per-bucket timings of ``pipe``'s current split: (measured, "cached"|"measured", context)."""
    runner, g = pipe.runner, pipe.green
    context = _context(runner)
    key, parts = cache_key(runner, g.attention_sms, g.ffn_sms, pipe.num_microbatches, context)
    measured = load_cached(key)
    if measured is not None:
        return measured, "cached", context
    measured = {}
    for bucket in calibration_buckets(graph_buckets(runner.config.max_num_seqs)):
        inputs = synthetic_decode(
            bucket, context, runner.block_size, runner.runtime.num_kvcache_blocks, runner.device
        )
        seq_ms, pipe_ms = measure(pipe._sequential, pipe._pipelined, inputs)
        mode = decide(seq_ms, pipe_ms)
        measured[bucket] = {"mode": mode, "sequential_ms": seq_ms, "pipelined_ms": pipe_ms}
    store_cached(key, parts, measured)
    return measured, "measured", context


def _log_policy(policy: PipelinePolicy, source: str, context: int, split: str) -> None:
    piped = [b for b, v in policy.measured.items() if v["mode"] == "pipelined"]
    logger.info(
        "pipeline policy (%s, context %d, split %s): pipelined from buckets %s, sequential "
        "elsewhere (sequential/pipelined ms per bucket: %s)",
        source,
        context,
        split,
        piped or "none",
        {
            b: (round(v["sequential_ms"], 3), round(v["pipelined_ms"], 3))
            for b, v in policy.measured.items()
        },
    )


@torch.inference_mode()
def calibrate(pipe) -> PipelinePolicy:
    """Time ``pipe``'s sequential and pipelined steps per bucket on its current split, or load
    the cached result."""
    measured, source, context = _measure_split(pipe)
    split = (pipe.green.attention_sms, pipe.green.ffn_sms)
    policy = PipelinePolicy(with_split(measured, split))
    _log_policy(policy, source, context, split_name(split))
    return policy


@torch.inference_mode()
def search_split(pipe) -> PipelinePolicy:
    """Calibrate every candidate split (the current one first), keep the one whose pipelined
    buckets save the most step time, or the current one when no split saves any. Each split is
    cached on disk on its own and looked up before re-partitioning to it, so a later engine
    re-partitions (and re-captures) only to a winning split other than the current one."""
    g = pipe.green
    default = (g.attention_sms, g.ffn_sms)
    order = [default] + [c for c in g.split_candidates() if c != default]
    results: dict[tuple[int, int], dict[int, dict]] = {}
    sources = set()
    context = _context(pipe.runner)
    for attention, ffn in order:
        cached = _cached_split(pipe, attention, ffn)
        if cached is not None:
            results[(attention, ffn)] = cached
            sources.add("cached")
            continue
        if (attention, ffn) != (g.attention_sms, g.ffn_sms):
            pipe.repartition(attention, ffn)
        measured, source, context = _measure_split(pipe)
        results[(g.attention_sms, g.ffn_sms)] = measured  # the counts the driver granted
        sources.add(source)
    best = choose_split(results, default)
    if best != (g.attention_sms, g.ffn_sms):
        pipe.repartition(*best)
    searched = {split_name(split): m for split, m in results.items()}
    policy = PipelinePolicy(assign_buckets(results, best), searched)
    elsewhere = {
        b: v["split"]
        for b, v in policy.measured.items()
        if v["mode"] == "pipelined" and v["split"] != split_name(best)
    }
    logger.info(
        "pipeline split search: step time saved per split %s; keeping %d/%d%s",
        {name: round(saved_ms(m), 3) for name, m in searched.items()},
        *best,
        f", buckets on their own split: {elsewhere}" if elsewhere else "",
    )
    _log_policy(policy, "/".join(sorted(sources)), context, split_name(best))
    return policy
