"""Calibration: time the sequential and the pipelined decode step per batch bucket.

A function of what it measures: two step callables, the inputs per bucket, a timer. Every
bucket is warmed up first; then rounds interleave the buckets and alternate which step goes
first, so clock ramps, warm-up and thermal drift hit both steps alike. A bucket's figure is the
median over rounds; its spread (the interquartile ranges of both steps, added) bounds the noise
a decision must beat. Synthetic steps write no K/V (slot -1) and read arbitrary cache blocks,
so calibration never changes the cache.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable

import torch

from nanovllm.attention.metadata import AttentionMetadata
from nanovllm.engine.model_inputs import ModelInputs
from nanovllm.pipeline.policy import decide

logger = logging.getLogger(__name__)

CALIBRATION_CONTEXT = 1024  # tokens per synthetic sequence (at most max_model_len / 2)
WARMUP = 2
ROUNDS = 7

Step = Callable[[ModelInputs], object]
Timer = Callable[[Callable[[], object]], float]


def calibration_context(max_model_len: int) -> int:
    return min(max_model_len // 2, CALIBRATION_CONTEXT)


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


def cuda_time_ms(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _iqr(values: list[float]) -> float:
    if len(values) < 4:
        return max(values) - min(values)
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


@torch.inference_mode()
def calibrate(
    sequential: Step,
    pipelined: Step,
    inputs: dict[int, ModelInputs],
    timer: Timer = cuda_time_ms,
    rounds: int = ROUNDS,
) -> dict[int, dict]:
    """bucket -> {"mode", "sequential_ms", "pipelined_ms", "spread_ms"} for every bucket of
    ``inputs`` (bucket -> synthetic inputs of that many rows)."""
    buckets = sorted(inputs)
    for b in buckets:
        for _ in range(WARMUP):
            sequential(inputs[b]), pipelined(inputs[b])
    seq: dict[int, list[float]] = {b: [] for b in buckets}
    pipe: dict[int, list[float]] = {b: [] for b in buckets}
    for r in range(rounds):
        for b in buckets if r % 2 == 0 else reversed(buckets):
            pair = ((seq, sequential), (pipe, pipelined))
            for times, step in pair if (r + b) % 2 == 0 else reversed(pair):
                times[b].append(timer(lambda step=step, b=b: step(inputs[b])))
    measured = {}
    for b in buckets:
        seq_ms, pipe_ms = statistics.median(seq[b]), statistics.median(pipe[b])
        spread = _iqr(seq[b]) + _iqr(pipe[b])
        measured[b] = {
            "mode": decide(seq_ms, pipe_ms, spread),
            "sequential_ms": seq_ms,
            "pipelined_ms": pipe_ms,
            "spread_ms": spread,
        }
    _warn_if_not_monotonic(measured)
    return measured


def _warn_if_not_monotonic(measured: dict[int, dict]) -> None:
    """A sequential step that got clearly faster with more rows is noise (clocks, warm-up):
    say so, since decisions near it are suspect."""
    previous = None
    for b, v in sorted(measured.items()):
        if previous is not None and v["sequential_ms"] < 0.8 * previous[1]:
            logger.warning(
                "pipeline calibration: sequential step of bucket %d (%.3f ms) is much faster than "
                "bucket %d's (%.3f ms): the timings are noisy",
                b,
                v["sequential_ms"],
                previous[0],
                previous[1],
            )
        previous = (b, v["sequential_ms"])


def search_split(
    current: tuple[int, int],
    candidates: list[tuple[int, int]],
    cached: Callable[[tuple[int, int]], dict | None],
    measure_on: Callable[[tuple[int, int]], tuple[tuple[int, int], dict]],
):
    """Calibrate every candidate split (``current`` first) and choose.

    ``cached(split)``: a split's stored timings or None; ``measure_on(split)``: re-partition to
    ``split`` if needed, measure and store, returning the split the driver granted and its
    timings. Returns (policy, best split): the split whose pipelined buckets save the most step
    time (``current`` when none saves any), and per bucket the split to run it on."""
    from nanovllm.pipeline.policy import (
        PipelinePolicy,
        assign_buckets,
        choose_split,
        split_name,
    )

    order = [current] + [c for c in candidates if c != current]
    results: dict[tuple[int, int], dict[int, dict]] = {}
    for split in order:
        measured = cached(split)
        if measured is None:
            split, measured = measure_on(split)
        results[split] = measured
    best = choose_split(results, current)
    searched = {split_name(s): m for s, m in results.items()}
    return PipelinePolicy(assign_buckets(results, best), searched), best
