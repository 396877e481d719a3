"""Does admitting new requests in batches pay? ``bench.py``'s workload once per
``prefill_admission_batch`` value, in one process, on the same requests (issue 15's prefill
question: the bench workload's prefill came in hundreds of steps of one to three prompts).

Each value's engine is built, warmed up, timed and freed before the next; ``--rounds 2`` runs
every value twice, the order reversed in the second round, and compares medians. Throughput
ratios are against the first value. Every other option is ``bench.py``'s.

    python benchmarks/admission_batch.py --shape 8b --values 1 64 128 --json OUT
    python benchmarks/admission_batch.py --quick --device cpu --values 1 4
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


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[int]]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--values", type=int, nargs="+", default=[1, 64], help="admission batches")
    p.add_argument("--rounds", type=int, default=1, help="rounds; the order reverses each round")
    ours, rest = p.parse_known_args(argv)
    for bad in ("--compare-pipeline", "--hf-baseline", "--prefill-admission-batch", "--rounds"):
        if any(a == bad or a.startswith(bad + "=") for a in rest):
            p.error(f"{bad} is not an admission_batch option (it compares --values)")
    if ours.rounds < 1:
        p.error(f"--rounds {ours.rounds}: run at least 1 round")
    if any(v < 1 for v in ours.values):
        p.error(f"--values {ours.values}: each value must be >= 1")
    args = bench.parse_args(rest)
    args.rounds = ours.rounds
    return args, ours.values


def main(argv: list[str] | None = None) -> dict:
    args, values = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    device = resolve_device(args.device)
    env = environment(device)
    path = args.model or model_path(args.shape)
    from transformers import AutoConfig

    prompts, params = bench.workload(args, AutoConfig.from_pretrained(path).vocab_size)
    print(f"card: {env['card']}; {args.model or args.shape}; {len(prompts)} requests")
    order = [v for r in range(args.rounds) for v in (values if r % 2 == 0 else values[::-1])]
    results = []
    for value in order:
        print(f"prefill_admission_batch={value}")
        args.prefill_admission_batch = value
        result, llm = bench.run_variant(args, path, device, False, prompts, params)
        results.append(result)
        release_engine(llm)
        llm = None
        free_memory()
    medians = {
        v: statistics.median(
            r["throughput_tok_s"] for r in results if r["prefill_admission_batch"] == v
        )
        for v in values
    }
    ratios = {v: medians[v] / medians[values[0]] for v in values}
    for v in values[1:]:
        print(f"prefill_admission_batch {v} / {values[0]}: {ratios[v]:.3f} (medians)")
    args.prefill_admission_batch = None
    payload = {"script": "benchmarks/admission_batch.py", "environment": env, "args": vars(args)}
    payload.update(values=values, results=results, median_tok_s=medians, ratio=ratios)
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
