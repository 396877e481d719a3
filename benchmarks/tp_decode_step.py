"""Tensor-parallel decode step: its time at each size, and how much hiding its all-reduces could
give at most.

For each tensor-parallel size, batch and context, an engine (random weights) runs synthetic
decode steps through ``ModelRunner.execute`` as the engine does: rank 0 sends the step's plan,
every rank builds its inputs and replays its CUDA graph, the LM head's logits are gathered
(nothing is sampled). ``--reps`` steps are issued back to back and the device synchronised once,
so a step's time is the GPU's wherever the GPU takes longer than the host's work per step; the
median of ``--trials`` such runs is reported.

For each size above 1 a second engine is built with every rank's all-reduces (the row-parallel
layers' and the vocab-parallel embedding's) replaced by the identity before its graphs are
captured: wrong values, the same kernels otherwise. ``step / no-comm`` is then the most that
hiding the all-reduces behind compute (one micro-batch's all-reduces under another's compute, as
a pipeline on every rank would) could gain, before the compute loses SMs to the communication
kernels; ``tp1 / step`` is the scaling of the step itself. ``--all-reduce`` names the
``tensor_parallel_all_reduce`` values to build a size-above-1 engine with (each its own engine).

    python benchmarks/tp_decode_step.py --shape 8b --sizes 1 2 --json OUT.json
    python benchmarks/tp_decode_step.py --shape 8b --all-reduce nccl symm_mem --json OUT.json
    python benchmarks/tp_decode_step.py --quick --device cpu     # control flow, over gloo
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    BLOCK_SIZE,
    add_common_args,
    build_engine,
    environment,
    format_table,
    free_memory,
    model_path,
    release_engine,
    resolve_device,
    synthetic_decode_plan,
    write_json,
)
from nanovllm.config import TP_ALL_REDUCES  # noqa: E402
from nanovllm.engine import tp_workers  # noqa: E402
from nanovllm.engine.model_inputs import StepPlan  # noqa: E402

# Taken at import: the worker imports this module afresh and must run the real one.
REAL_WORKER_MAIN = tp_workers._worker_main

COLUMNS = [
    ("tp", "tp", "d"),
    ("all_reduce", "all-reduce", "s"),
    ("batch", "batch", "d"),
    ("ctx", "ctx", "d"),
    ("ms", "step ms", ".3f"),
    ("no_comm_ms", "no-comm ms", ".3f"),
    ("comm_ms", "comm ms", ".3f"),
    ("overlap_ceiling", "step/no-comm", ".3f"),
    ("scaling", "tp1/step", ".3f"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", choices=("tiny", "0.6b", "8b"), help="default: 8b (quick: tiny)")
    p.add_argument("--sizes", type=int, nargs="+", help="tensor-parallel sizes (default: 1 2)")
    p.add_argument("--batches", type=int, nargs="+", help="default: 128 256 512")
    p.add_argument("--ctxs", type=int, nargs="+", help="tokens per sequence; default: 512 1024")
    p.add_argument("--reps", type=int, help="steps issued back to back per trial (default 20)")
    p.add_argument("--trials", type=int, default=3, help="timed runs per point, median")
    p.add_argument(
        "--all-reduce",
        nargs="+",
        choices=TP_ALL_REDUCES,
        default=["nccl"],
        help="tensor_parallel_all_reduce of the size-above-1 engines, one engine each",
    )
    add_common_args(p)
    args = p.parse_args(argv)
    q = args.quick
    args.shape = args.shape or ("tiny" if q else "8b")
    args.sizes = args.sizes or [1, 2]
    args.batches = args.batches or ([2, 4] if q else [128, 256, 512])
    args.ctxs = args.ctxs or ([40] if q else [512, 1024])
    args.reps = args.reps or (2 if q else 20)
    for name in ("sizes", "batches", "ctxs"):
        if any(v < 1 for v in getattr(args, name)):
            p.error(f"--{name} {getattr(args, name)}: each value must be >= 1")
    if args.reps < 1 or args.trials < 1:
        p.error("--reps and --trials must be >= 1")
    if args.enforce_eager:
        p.error("--enforce-eager: the all-reduces are dropped from the captured graphs only")
    return args


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def drop_all_reduces() -> list[tuple[object, str, object]]:
    """Replace the layers' all-reduce by the identity in this process; returns what to restore."""
    from nanovllm.layers import embed_head, linear

    saved = [(m, "all_reduce", m.all_reduce) for m in (linear, embed_head)]
    for module, name, _ in saved:
        setattr(module, name, _identity)
    return saved


def no_comm_worker_main(rank, world_size, port, config, runtime, conn, log_level) -> None:
    """``tp_workers._worker_main`` with this rank's all-reduces dropped before it builds."""
    drop_all_reduces()
    REAL_WORKER_MAIN(rank, world_size, port, config, runtime, conn, log_level)


def time_steps(runner, plan: StepPlan, reps: int, trials: int, device) -> float:
    """Median over ``trials`` of (``reps`` steps issued back to back, one sync) / reps, in ms."""

    def run(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(n):
            if runner.workers is not None:
                runner.workers.send(plan)
            runner.execute(plan)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t) * 1e3 / n

    run(2)  # warm-up
    return statistics.median(run(reps) for _ in range(trials))


def bench_engine(
    args, path: str, device, vocab: int, tp: int, no_comm: bool, all_reduce: str = "nccl"
) -> dict[tuple, float]:
    """Step ms per (batch, ctx) for one engine."""
    points = [(b, c) for c in args.ctxs for b in args.batches]
    blocks = max(b * math.ceil(c / BLOCK_SIZE) for b, c in points)
    saved = []
    if no_comm:  # for the engine's whole life: on CPU (no graphs) the forward runs eagerly
        saved = drop_all_reduces()
        tp_workers._worker_main = no_comm_worker_main  # spawn pickles it by name
    out = {}
    try:
        llm = build_engine(
            path,
            device,
            True,
            tensor_parallel_size=tp,
            tensor_parallel_all_reduce=all_reduce,
            max_num_seqs=max(args.batches),
            max_model_len=max(args.ctxs),
            kvcache_block_size=BLOCK_SIZE,
            num_kvcache_blocks=blocks,
            gpu_memory_utilization=args.gpu_memory_utilization,
        )
        try:
            for b, c in points:
                plan = synthetic_decode_plan(b, c, blocks, vocab)
                out[(b, c)] = time_steps(llm.model_runner, plan, args.reps, args.trials, device)
                what = "no-comm" if no_comm else f"step ({all_reduce})"
                print(f"tp {tp} batch {b} ctx {c}: {what} {out[(b, c)]:.3f} ms", flush=True)
        finally:
            release_engine(llm)
            del llm
            free_memory()
    finally:
        tp_workers._worker_main = REAL_WORKER_MAIN
        for module, name, value in saved:
            setattr(module, name, value)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    device = resolve_device(args.device)
    env = environment(device)
    print(f"card: {env['card']}")
    path = model_path(args.shape)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).vocab_size
    # (tp, all-reduce) -> step ms per point; size 1 has no all-reduce.
    engines = [(tp, ar) for tp in args.sizes for ar in (args.all_reduce if tp > 1 else [None])]
    steps = {
        (tp, ar): bench_engine(args, path, device, vocab, tp, False, ar or "nccl")
        for tp, ar in engines
    }
    no_comm = {tp: bench_engine(args, path, device, vocab, tp, True) for tp in args.sizes if tp > 1}
    rows = []
    for tp, ar in engines:
        for (b, c), ms in steps[(tp, ar)].items():
            row = dict(tp=tp, all_reduce=ar, batch=b, ctx=c, ms=ms)
            if tp in no_comm:
                free = no_comm[tp][(b, c)]
                row.update(no_comm_ms=free, comm_ms=ms - free, overlap_ceiling=ms / free)
            if (1, None) in steps:
                row["scaling"] = steps[(1, None)][(b, c)] / ms
            rows.append(row)
    print()
    print(format_table(rows, COLUMNS))
    payload = {
        "script": "benchmarks/tp_decode_step.py",
        "environment": env,
        "args": vars(args),
        "rows": rows,
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
