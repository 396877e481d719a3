"""One engine option, several values: ``bench.py``'s workload once per value of ``--option``,
in one process, on the same requests. How does throughput scale from one GPU to two
(``tensor_parallel_size``)? Does admitting new requests in batches pay
(``prefill_admission_batch``)? Does a larger batch cap pay where the KV cache holds more
(``max_num_seqs``)? Does issuing the next decode step before reading the tokens
(``async_scheduling``, values 0 and 1) pay? Do mixed prefill/decode steps
(``enable_mixed_steps``, 0 and 1) pay? Does the symmetric-memory all-reduce pay
(``tensor_parallel_all_reduce``, values nccl and symm_mem, with ``--tensor-parallel-size 2``)?

Each value's engine is built, warmed up, timed and freed before the next; ``--rounds 2`` runs
every value twice, the order reversed in the second round, and compares medians. Throughput
ratios are against the first value. ``--num-seqs`` may list several request counts: each is a
sweep of its own, all in one result file. Every other option is ``bench.py``'s. Symmetric
memory serves one tensor-parallel engine per process, so on GPUs a sweep that would build more
than one engine using it (``tensor_parallel_all_reduce`` auto or symm_mem) is refused.

    python benchmarks/option_sweep.py --shape 8b --option tensor_parallel_size --values 1 2 \
        --num-seqs 1024 --json OUT
    python benchmarks/option_sweep.py --shape 8b --option prefill_admission_batch --values 1 64
    python benchmarks/option_sweep.py --shape 8b --tensor-parallel-size 2 \
        --option max_num_seqs --values 512 1024 --json OUT
    python benchmarks/option_sweep.py --shape 8b --option async_scheduling --values 0 1 --rounds 2
    python benchmarks/option_sweep.py --shape 8b --option enable_mixed_steps --values 0 1 --rounds 2
    python benchmarks/option_sweep.py --shape 8b --tensor-parallel-size 2 \
        --option tensor_parallel_all_reduce --values nccl symm_mem --json OUT
    python benchmarks/option_sweep.py --quick --device cpu --values 1 4
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
from nanovllm.config import TP_ALL_REDUCES  # noqa: E402

# The swept LLM options (bench.py's arguments of the same names); a flag's values are 0 and 1.
OPTIONS = (
    "tensor_parallel_size",
    "prefill_admission_batch",
    "max_num_seqs",
    "max_num_batched_tokens",
    "async_scheduling",
    "enable_mixed_steps",
    "tensor_parallel_all_reduce",
)
FLAGS = ("async_scheduling", "enable_mixed_steps")
CHOICES = {"tensor_parallel_all_reduce": TP_ALL_REDUCES}  # options whose values are names


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, str, list, list]:
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    p.add_argument("--option", choices=OPTIONS, default="prefill_admission_batch")
    p.add_argument("--num-seqs", type=int, nargs="+", help="request counts (default: bench.py's)")
    p.add_argument("--values", nargs="+", default=["1", "64"], help="the option's values")
    p.add_argument("--rounds", type=int, default=1, help="rounds; the order reverses each round")
    ours, rest = p.parse_known_args(argv)
    swept = "--" + ours.option.replace("_", "-")
    for bad in ("--compare-pipeline", "--hf-baseline", swept):
        if any(a == bad or a.startswith(bad + "=") for a in rest):
            p.error(f"{bad}: option_sweep.py sets {ours.option} from --values")
    if ours.rounds < 1:
        p.error(f"--rounds {ours.rounds}: run at least 1 round")
    if ours.option in CHOICES:
        if any(v not in CHOICES[ours.option] for v in ours.values):
            p.error(f"--values {ours.values}: {ours.option} takes {CHOICES[ours.option]}")
    elif not all(v.lstrip("-").isdigit() for v in ours.values):
        p.error(f"--values {ours.values}: {ours.option} takes integers")
    else:
        ours.values = [int(v) for v in ours.values]
    if ours.option in FLAGS and any(v not in (0, 1) for v in ours.values):
        p.error(f"--values {ours.values}: {ours.option} is a flag: use 0 and 1")
    if ours.option not in (*FLAGS, *CHOICES) and any(v < 1 for v in ours.values):
        p.error(f"--values {ours.values}: each value must be >= 1")
    if ours.num_seqs and any(n < 1 for n in ours.num_seqs):
        p.error(f"--num-seqs {ours.num_seqs}: each count must be >= 1")
    args = bench.parse_args(rest)
    args.rounds = ours.rounds
    counts = ours.num_seqs or [args.num_seqs]
    wanting = symmetric_memory_engines(args, ours.option, ours.values, len(counts) * ours.rounds)
    if wanting > 1 and resolve_device(args.device).type == "cuda":
        p.error(
            f"this sweep builds {wanting} tensor-parallel engines that would use symmetric memory "
            "in one process, which serves one (the later ones would sum over NCCL): run one "
            "request count and one round per process, or pass --tensor-parallel-all-reduce nccl"
        )
    return args, ours.option, ours.values, counts


def symmetric_memory_engines(args, option: str, values: list, repeats: int) -> int:
    """How many of the sweep's engines have more than one rank and an all-reduce that would
    take symmetric memory (``symm_mem``, or ``auto`` on GPUs with peer access)."""
    wanting = 0
    for value in values:
        tp = value if option == "tensor_parallel_size" else args.tensor_parallel_size
        all_reduce = (
            value if option == "tensor_parallel_all_reduce" else args.tensor_parallel_all_reduce
        )
        wanting += tp > 1 and (all_reduce or "auto") != "nccl"
    return wanting * repeats


def sweep(args, option: str, values: list, path: str, device, vocab: int) -> dict:
    """Every value of ``option`` (rounds included) on ``args.num_seqs`` requests."""
    prompts, params = bench.workload(args, vocab)
    print(f"{args.model or args.shape}; {len(prompts)} requests")
    order = [v for r in range(args.rounds) for v in (values if r % 2 == 0 else values[::-1])]
    results = []
    for value in order:
        print(f"{option}={value}")
        setattr(args, option, value)
        result, llm = bench.run_variant(args, path, device, False, prompts, params)
        results.append(result)
        release_engine(llm)
        llm = None
        free_memory()
    medians = {
        v: statistics.median(r["throughput_tok_s"] for r in results if r[option] == v)
        for v in values
    }
    ratios = {v: medians[v] / medians[values[0]] for v in values}
    for v in values[1:]:
        print(f"{len(prompts)} requests: {option} {v} / {values[0]}: {ratios[v]:.3f} (medians)")
    return dict(num_seqs=len(prompts), results=results, median_tok_s=medians, ratio=ratios)


def main(argv: list[str] | None = None) -> dict:
    args, option, values, counts = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    device = resolve_device(args.device)
    env = environment(device)
    path = args.model or model_path(args.shape)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).vocab_size
    print(f"card: {env['card']}")
    sweeps = []
    for n in counts:
        args.num_seqs = n
        sweeps.append(sweep(args, option, values, path, device, vocab))
    setattr(args, option, {"tensor_parallel_size": 1}.get(option))  # bench.py's defaults
    args.num_seqs = counts
    payload = {"script": "benchmarks/option_sweep.py", "environment": env, "args": vars(args)}
    payload.update(option=option, values=values, sweeps=sweeps)
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
