"""All-reduce time per call for decode-step messages: NCCL against the symmetric-memory one-shot
and two-shot kernels (``nanovllm/utils/symm_all_reduce.py``), one process per GPU.

For each row count, a ``[rows, hidden]`` tensor is summed ``--calls`` times in a row (a decode
step of the 8B shape makes 73 such calls) inside one CUDA graph, which is replayed ``--reps``
times; the median over ``--trials`` of the time per call is reported, with each method's
largest difference from NCCL's sum.

    python benchmarks/all_reduce_bw.py --json OUT.json
    python benchmarks/all_reduce_bw.py --quick --device cpu     # control flow, gloo only
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    format_table,
    graph_replay_ms,
    ranks_environment,
    run_ranks,
    write_json,
)

METHODS = ("nccl", "one_shot", "two_shot")
COLUMNS = [
    ("rows", "rows", "d"),
    ("mib", "MiB", ".2f"),
    ("nccl_us", "nccl us", ".1f"),
    ("one_shot_us", "one-shot us", ".1f"),
    ("two_shot_us", "two-shot us", ".1f"),
    ("one_shot_speedup", "nccl/one-shot", ".2f"),
    ("two_shot_speedup", "nccl/two-shot", ".2f"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, nargs="+", help="default: 8 32 64 128 256 512 1024")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size (8B: 4096)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--calls", type=int, default=73, help="all-reduces per graph")
    p.add_argument("--reps", type=int, default=20, help="graph replays per trial")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--quick", action="store_true", help="smoke mode: small sizes")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    args.rows = args.rows or ([2, 8] if args.quick else [8, 32, 64, 128, 256, 512, 1024])
    if args.quick:
        args.hidden, args.calls, args.reps, args.trials = 64, 3, 2, 1
    for name in ("rows", "hidden", "world_size", "calls", "reps", "trials"):
        v = getattr(args, name)
        if any(x < 1 for x in (v if isinstance(v, list) else [v])):
            p.error(f"--{name.replace('_', '-')} {v}: use values >= 1")
    if args.world_size < 2:
        p.error("--world-size: an all-reduce needs 2 or more ranks")
    return args


def _rank_main(rank: int, device: torch.device, args: argparse.Namespace) -> tuple:
    def per_call_us(fn) -> float:
        return graph_replay_ms(fn, device, args.reps, args.trials) * 1e3 / args.calls

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    symmetric, why = None, None
    if device.type == "cuda":
        from nanovllm.utils.symm_all_reduce import build_symmetric_all_reduce

        max_bytes = max(args.rows) * args.hidden * dtype.itemsize
        symmetric = build_symmetric_all_reduce(device, dtype, max_bytes)
    else:
        why = "symmetric memory needs CUDA GPUs: only the process group is timed"
    rows_out = []
    for rows in args.rows:
        gen = torch.Generator(device).manual_seed(rank * 1000 + rows)
        x = torch.randn(rows, args.hidden, device=device, dtype=dtype, generator=gen)
        ref = x.clone()
        dist.all_reduce(ref)
        row = dict(rows=rows, mib=x.numel() * x.element_size() / 2**20)
        for method in METHODS:
            if method == "nccl":
                buf = x.clone()

                def fn(buf=buf):
                    for _ in range(args.calls):
                        dist.all_reduce(buf)  # grows by world_size per call; timing only

                row["nccl_us"] = per_call_us(fn)
                continue
            if symmetric is None:
                continue
            got = symmetric(x, method)
            row[f"{method}_max_diff"] = (got.float() - ref.float()).abs().max().item()

            def fn(method=method, x=x):
                for _ in range(args.calls):
                    symmetric(x, method)

            row[f"{method}_us"] = per_call_us(fn)
            row[f"{method}_speedup"] = row["nccl_us"] / row[f"{method}_us"]
        rows_out.append(row)
    if symmetric is not None:
        symmetric.close()
    return rows_out, why


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    env = ranks_environment(args.device, args.world_size)
    print(f"card: {env['card']} x {args.world_size}")
    rows, why = run_ranks(_rank_main, args.world_size, args.device, args)
    if why:
        print(why)
    print(format_table(rows, COLUMNS))
    payload = {
        "script": "benchmarks/all_reduce_bw.py",
        "environment": env,
        "args": vars(args),
        "note": why,
        "rows": rows,
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
