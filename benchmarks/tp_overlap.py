"""Does overlapping one micro-batch's all-reduces with another's compute pay at TP=2? The
question before building the decode pipeline on every rank, measured without it.

On every rank (one process per GPU) the decoder stack of ``--shape`` (random weights, this
rank's shard, the engine's layers and attention backend) runs one synthetic decode step per
batch and context, captured in a CUDA graph and replayed, four ways:

- ``seq``: the whole batch on one stream, as the engine's sequential step;
- ``overlap``: the batch split into two halves, each on a stream of its own with a
  communicator of its own (``all_reduce_through``), issued one after the other and left to the
  GPU to interleave: one half's all-reduces can run under the other's compute;
- ``seq_nocomm`` / ``overlap_nocomm``: the same with every all-reduce replaced by the identity
  (wrong values, the same kernels otherwise).

``seq / overlap`` is what the overlap gains; ``seq / seq_nocomm`` the most any hiding could
gain; ``overlap_nocomm / seq_nocomm`` what splitting the batch costs by itself (weights read
once per half, attention and GEMMs at half the rows); ``seq / overlap_nocomm`` the most a
two-micro-batch pipeline could gain, were every all-reduce hidden. The small element-wise ops
are fused as in the engine (``enable_fusion``). The LM head and its all-gather are not run.
``--all-reduce symm_mem`` gives each half a symmetric-memory buffer of its own, ``nccl`` a
process group of its own.

``--prefill NSEQxLEN ...`` measures prefill steps instead: NSEQ fresh prompts of LEN tokens,
split into two halves of NSEQ/2 prompts, run eagerly as the engine runs prefill, their
all-reduces over NCCL (larger than the engine's symmetric buffer). Prefill is bound by FLOPs,
not by reading the weights, so a split should cost little there.

    python benchmarks/tp_overlap.py --shape 8b --all-reduce symm_mem --json OUT.json
    python benchmarks/tp_overlap.py --shape 8b --prefill 16x1024 32x512 --json OUT.json
    python benchmarks/tp_overlap.py --quick --device cpu     # control flow, over gloo, eager
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    BLOCK_SIZE,
    format_table,
    graph_replay_ms,
    model_path,
    ranks_environment,
    resolve_device,
    run_ranks,
    synthetic_decode_inputs,
    write_json,
)
from benchmarks.profile_prefill import parse_points  # noqa: E402
from nanovllm.config import TP_ALL_REDUCES  # noqa: E402
from nanovllm.utils.distributed import all_reduce_through  # noqa: E402

VARIANTS = ("seq", "overlap", "seq_nocomm", "overlap_nocomm")
COLUMNS = [
    ("kind", "step", ""),
    ("batch", "batch", "d"),
    ("ctx", "ctx", "d"),
    ("seq_ms", "seq ms", ".3f"),
    ("overlap_ms", "overlap ms", ".3f"),
    ("seq_nocomm_ms", "seq no-comm", ".3f"),
    ("overlap_nocomm_ms", "ovl no-comm", ".3f"),
    ("speedup", "seq/overlap", ".3f"),
    ("ceiling", "seq/no-comm", ".3f"),
    ("split_cost", "split cost", ".3f"),
    ("bound", "seq/ovl no-comm", ".3f"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", choices=("tiny", "0.6b", "8b"), help="default: 8b (quick: tiny)")
    p.add_argument("--batches", type=int, nargs="+", help="default: 128 256 512")
    p.add_argument("--ctxs", type=int, nargs="+", help="tokens per sequence; default: 512 1024")
    p.add_argument(
        "--prefill",
        nargs="+",
        metavar="NSEQxLEN",
        help="prefill steps instead of decode, e.g. 16x1024 (NSEQ even)",
    )
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument(
        "--all-reduce",
        choices=[a for a in TP_ALL_REDUCES if a != "auto"],
        help="default: symm_mem on GPUs, nccl (gloo) on CPU",
    )
    p.add_argument("--reps", type=int, help="graph replays per trial (default 20)")
    p.add_argument("--trials", type=int, default=3, help="timed runs per variant, median")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny shape and sizes")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    q = args.quick
    args.shape = args.shape or ("tiny" if q else "8b")
    if args.prefill:
        _check_prefill_args(p, args)
    else:
        _check_decode_args(p, args)
    if args.world_size < 2 or args.reps < 1 or args.trials < 1:
        p.error("--world-size must be >= 2, --reps and --trials >= 1")
    return args


def _check_prefill_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.batches or args.ctxs:
        p.error("--prefill: --batches and --ctxs are decode's; give NSEQxLEN points only")
    if args.all_reduce == "symm_mem":
        p.error(
            "--prefill with --all-reduce symm_mem: prefill's messages exceed the engine's "
            "symmetric buffer, so the engine sums them over NCCL: use --all-reduce nccl"
        )
    args.prefill = parse_points(p, args.prefill, "--prefill")
    if any(n < 2 or n % 2 for n, _ in args.prefill):
        p.error(f"--prefill {args.prefill}: an even NSEQ of 2 or more (the prompts split)")
    args.all_reduce = "nccl"
    args.reps = args.reps or (2 if args.quick else 5)


def _check_decode_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    q = args.quick
    args.batches = args.batches or ([4] if q else [128, 256, 512])
    args.ctxs = args.ctxs or ([40] if q else [512, 1024])
    args.reps = args.reps or (2 if q else 20)
    for name in ("batches", "ctxs"):
        if any(v < 1 for v in getattr(args, name)):
            p.error(f"--{name} {getattr(args, name)}: each value must be >= 1")
    if any(b < 2 or b % 2 for b in args.batches):
        p.error(f"--batches {args.batches}: even sizes of 2 or more (the batch splits in two)")
    on_gpu = resolve_device(args.device).type == "cuda"
    args.all_reduce = args.all_reduce or ("symm_mem" if on_gpu else "nccl")
    if args.all_reduce == "symm_mem" and not on_gpu:
        p.error("--all-reduce symm_mem: symmetric memory needs CUDA GPUs")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _communicators(args, device, dtype, hidden: int) -> tuple:
    """One all-reduce per half (the first also serves ``seq``): symmetric-memory buffers of
    their own, or process groups of their own."""
    if args.all_reduce == "symm_mem":
        from nanovllm.utils.symm_all_reduce import SymmetricAllReduce

        max_bytes = max(args.batches) * hidden * dtype.itemsize
        return tuple(
            SymmetricAllReduce(dist.group.WORLD, device, dtype, max_bytes) for _ in range(2)
        )
    second = dist.new_group(list(range(args.world_size)))

    def through(group):
        def fn(x: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(x, group=group)
            return x

        return fn

    return through(None), through(second)


def _build(args, rank: int, device, dtype, path: str):
    """This rank's decoder stack (random weights) with the engine's attention backend."""
    from transformers import AutoConfig

    from nanovllm.attention import select_attention_backend
    from nanovllm.layers.attention import Attention
    from nanovllm.models import model_class
    from nanovllm.utils.compile import enable_fusion
    from nanovllm.utils.distributed import tensor_parallel
    from nanovllm.utils.loader import init_dummy_weights
    from nanovllm.utils.tensors import default_dtype

    enable_fusion(device)  # as the model runner does: RMSNorm, SiLU-and-mul, rotary fused
    hf = AutoConfig.from_pretrained(path)
    with default_dtype(dtype), device, tensor_parallel(rank, args.world_size):
        model = model_class(hf)(hf)
    init_dummy_weights(model, seed=0)
    backend = select_attention_backend("auto", device)
    for module in model.modules():
        if isinstance(module, Attention):
            module.backend = backend
    return model.eval(), hf, backend


def _decode_parts(batch: int, ctx: int, vocab: int, device) -> tuple:
    """A decode step of ``batch`` sequences at context ``ctx`` (the engine's inputs), its two
    halves (views of it), and the KV blocks it needs."""
    blocks = batch * math.ceil(ctx / BLOCK_SIZE)
    inputs = synthetic_decode_inputs(batch, ctx, blocks, vocab, device)
    ids, positions, meta = inputs.input_ids, inputs.positions, inputs.meta
    h = batch // 2
    halves = [
        (ids[lo:hi], positions[lo:hi], meta.decode_slice(lo, hi)) for lo, hi in ((0, h), (h, batch))
    ]
    return (ids, positions, meta), halves, blocks


def _prefill_parts(num_seqs: int, length: int, vocab: int, device, backend) -> tuple:
    """A prefill step of ``num_seqs`` fresh prompts of ``length`` tokens, its two halves (the
    first and last ``num_seqs / 2`` prompts, planned as steps of their own on the same blocks),
    and the KV blocks it needs."""
    from benchmarks.profile_prefill import prefill_batch
    from nanovllm.engine.model_inputs import plan_step, to_model_inputs
    from nanovllm.engine.scheduler import ScheduledBatch

    seqs = prefill_batch(num_seqs, length, vocab, BLOCK_SIZE).seqs

    def step(part: list) -> tuple:
        batch = ScheduledBatch(is_prefill=True, seqs=part, num_new_tokens=[length] * len(part))
        inputs = to_model_inputs(plan_step(batch, BLOCK_SIZE), device, backend)
        return inputs.input_ids, inputs.positions, inputs.meta

    h = num_seqs // 2
    return step(seqs), [step(seqs[:h]), step(seqs[h:])], num_seqs * math.ceil(length / BLOCK_SIZE)


def _step_fn(model, whole: tuple, halves: list, variant: str, comms, device, out: list):
    """One step of ``variant`` (inputs: ``whole`` or its two ``halves``, each (input_ids,
    positions, metadata)), issued on the current stream (halves forked off it); its final
    hidden states go to ``out`` (one tensor per half)."""
    nocomm = variant.endswith("nocomm")
    if variant.startswith("seq"):
        reduce = _identity if nocomm else comms[0]

        def fn():
            with all_reduce_through(reduce):
                out[:] = [model(*whole)]

        return fn
    on_gpu = device.type == "cuda"
    streams = [torch.cuda.Stream(device) for _ in halves] if on_gpu else [None] * len(halves)

    def fn():
        main = torch.cuda.current_stream(device) if on_gpu else None
        out.clear()
        for part, stream, comm in zip(halves, streams, comms):
            reduce = _identity if nocomm else comm
            ctx = torch.cuda.stream(stream) if on_gpu else contextlib.nullcontext()
            if on_gpu:
                stream.wait_stream(main)  # fork: the step's inputs are ready on main
            with ctx, all_reduce_through(reduce):
                out.append(model(*part))
        if on_gpu:
            for stream in streams:
                main.wait_stream(stream)  # join: the step ends when both halves do

    return fn


def _rank_main(rank: int, device: torch.device, args: argparse.Namespace, path: str) -> tuple:
    from nanovllm.engine.kv_cache import allocate_kv_cache

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, hf, backend = _build(args, rank, device, dtype, path)
    comms = _communicators(args, device, dtype, hf.hidden_size)
    prefill = bool(args.prefill)
    if prefill:
        points = args.prefill
    else:
        points = [(batch, ctx) for ctx in args.ctxs for batch in args.batches]
    rows = []
    for batch, ctx in points:
        if prefill:
            whole, halves, blocks = _prefill_parts(batch, ctx, hf.vocab_size, device, backend)
        else:
            whole, halves, blocks = _decode_parts(batch, ctx, hf.vocab_size, device)
        cache = allocate_kv_cache(model, blocks, BLOCK_SIZE, dtype, device)
        cache.normal_(0, 1)
        row = dict(kind="prefill" if prefill else "decode", batch=batch, ctx=ctx)
        with torch.inference_mode():
            # The halves, each with its own communicator, compute what the whole does.
            results = {}
            for variant in ("seq", "overlap"):
                results[variant] = []
                _step_fn(model, whole, halves, variant, comms, device, results[variant])()
            one, two = results["seq"][0], torch.cat(results["overlap"])
            row["overlap_max_diff"] = (one.float() - two.float()).abs().max().item()
            for variant in VARIANTS:
                fn = _step_fn(model, whole, halves, variant, comms, device, [])
                # Prefill runs eagerly in the engine, decode from CUDA graphs.
                row[f"{variant}_ms"] = graph_replay_ms(
                    fn, device, args.reps, args.trials, capture=not prefill
                )
        row["speedup"] = row["seq_ms"] / row["overlap_ms"]
        row["ceiling"] = row["seq_ms"] / row["seq_nocomm_ms"]
        row["split_cost"] = row["overlap_nocomm_ms"] / row["seq_nocomm_ms"]
        row["bound"] = row["seq_ms"] / row["overlap_nocomm_ms"]
        if rank == 0:
            print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
        rows.append(row)
        del cache
    return rows, backend.name


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    env = ranks_environment(args.device, args.world_size)
    print(f"card: {env['card']} x {args.world_size}; all-reduce: {args.all_reduce}")
    path = model_path(args.shape)
    print(format_table([], COLUMNS))
    rows, backend = run_ranks(_rank_main, args.world_size, args.device, args, path)
    payload = {
        "script": "benchmarks/tp_overlap.py",
        "environment": env,
        "args": vars(args),
        "attention_backend": backend,
        "rows": rows,
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
