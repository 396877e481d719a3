"""Tensor-parallel scaling: ``bench.py``'s workload at TP=1 and TP=N in one process, per request
count, and the ratio TP=N / TP=1 (issue 17's measurement).

For each ``--num-seqs`` value, the engines run one after the other in the order given by
``--tensor-parallel-sizes`` (each built, warmed up, timed and freed before the next), on the same
requests; ``--rounds 2`` runs every size twice with the order reversed in the second round and
compares medians. Every other option is ``bench.py``'s and acts the same way.

    python benchmarks/tp_scaling.py --shape 8b --num-seqs 512 1024 --json OUT
    python benchmarks/tp_scaling.py --quick --device cpu --tensor-parallel-sizes 1 2
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench  # noqa: E402
from benchmarks.common import (  # noqa: E402
    environment,
    free_memory,
    model_path,
    release_engine,
    resolve_device,
    write_json,
)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[int], list[int]]:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    p.add_argument("--num-seqs", type=int, nargs="+", help="request counts (default 512 1024)")
    p.add_argument("--tensor-parallel-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=1, help="rounds; the order reverses each round")
    ours, rest = p.parse_known_args(argv)
    for bad in ("--compare-pipeline", "--hf-baseline", "--tensor-parallel-size", "--rounds"):
        if any(a == bad or a.startswith(bad + "=") for a in rest):
            p.error(f"{bad} is not a tp_scaling option (it compares tensor-parallel sizes)")
    if ours.rounds < 1:
        p.error(f"--rounds {ours.rounds}: run at least 1 round")
    if any(n < 1 for n in ours.tensor_parallel_sizes):
        p.error(f"--tensor-parallel-sizes {ours.tensor_parallel_sizes}: sizes must be >= 1")
    args = bench.parse_args(rest)
    args.rounds = ours.rounds
    counts = ours.num_seqs or ([args.num_seqs] if args.quick else [512, 1024])
    return args, counts, ours.tensor_parallel_sizes


def main(argv: list[str] | None = None) -> dict:
    args, counts, sizes = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    device = resolve_device(args.device)
    env = environment(device)
    path = args.model or model_path(args.shape)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).vocab_size
    rows = []
    for n in counts:
        args.num_seqs = n
        prompts, params = bench.workload(args, vocab)
        print(f"card: {env['card']}; {args.model or args.shape}; {n} requests")
        order = [s for r in range(args.rounds) for s in (sizes if r % 2 == 0 else sizes[::-1])]
        results = []
        for size in order:
            args.tensor_parallel_size = size
            result, llm = bench.run_variant(args, path, device, False, prompts, params)
            result["tensor_parallel_size"] = size
            results.append(result)
            release_engine(llm)
            llm = None
            free_memory()
        medians = {
            s: statistics.median(
                r["throughput_tok_s"] for r in results if r["tensor_parallel_size"] == s
            )
            for s in sizes
        }
        base = medians[sizes[0]]
        ratios = {s: medians[s] / base for s in sizes}
        for s in sizes[1:]:
            print(f"{n} requests: TP={s} / TP={sizes[0]} = {ratios[s]:.3f} (medians)")
        rows.append(dict(num_seqs=n, results=results, median_tok_s=medians, ratio=ratios))
    payload = {"script": "benchmarks/tp_scaling.py", "environment": env, "args": vars(args)}
    payload["scaling"] = rows
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
