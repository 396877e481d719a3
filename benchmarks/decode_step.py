"""Decode-step microbenchmark: the CUDA-graph decode step against its physical floor.

For each shape, batch and context, an engine (random weights, ``load_format="dummy"``) replays
its decode graph on synthetic sequences of ``ctx`` tokens (``runner.graph_runner.run(inputs)``;
CUDA events, median of ``--reps`` after warm-up). Each step is compared with the floor
``max(bytes / bandwidth, flops / peak)``, where bandwidth is a 1 GiB device-to-device clone and
peak an 8192^3 bf16 matmul, both measured in the same run; bytes are the decoder weights once
(lm_head excluded: logits are computed outside the graph) plus the KV cache the batch reads.
Beside the floor (reads and math perfectly overlapped), the serial bound ``bytes / bandwidth +
flops / peak`` (each at its own roofline, one after the other) and ``step / serial``: above 1 the
step is slower than even a non-overlapped run at both rooflines. Combinations whose KV cache
does not fit in memory are skipped and listed.

    python benchmarks/decode_step.py --json benchmarks/results/decode_step_h100.json
    python benchmarks/decode_step.py --shape 8b --batches 64 256 --ctxs 1024 4096
    python benchmarks/decode_step.py --quick --device cpu        # control-flow smoke test
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    add_decode_sweep_args,
    build_decode_engine,
    decode_step_fn,
    environment,
    format_table,
    free_memory,
    measure_and_print_card,
    plan_decode,
    release_engine,
    resolve_device,
    sweep_models,
    synthetic_decode_inputs,
    time_fns,
    write_json,
)

COLUMNS = [
    ("shape", "shape", ""),
    ("batch", "batch", "d"),
    ("ctx", "ctx", "d"),
    ("ms", "step ms", ".3f"),
    ("gbytes", "GB", ".2f"),
    ("gbs", "GB/s", ".0f"),
    ("bw_frac", "of copy bw", ".2f"),
    ("tflops", "TFLOP/s", ".1f"),
    ("floor_ms", "floor ms", ".3f"),
    ("bound", "bound", ""),
    ("floor_frac", "floor/step", ".2f"),
    ("serial_ms", "serial ms", ".3f"),
    ("step_over_serial", "step/serial", ".2f"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batches", type=int, nargs="+", help="default: 1 8 32 64 128 256 512")
    p.add_argument("--ctxs", type=int, nargs="+", help="tokens per sequence; default: 512 2048")
    p.add_argument(
        "--kv-cache-dtype",
        choices=("auto", "fp8"),
        default="auto",
        help="LLM(kv_cache_dtype=...): the cache the step reads (fp8: half the KV bytes)",
    )
    add_decode_sweep_args(p, reps=30, warmup=5, reserve_gib=4.0)
    args = p.parse_args(argv)
    if args.model and args.shape:
        p.error("--model and --shape are exclusive: --model replaces the random-weight shapes")
    q = args.quick
    args.shape = args.shape or (["tiny"] if q else ["0.6b", "8b"])
    args.batches = args.batches or ([1, 4] if q else [1, 8, 32, 64, 128, 256, 512])
    args.ctxs = args.ctxs or ([64, 300] if q else [512, 2048])
    args.reps = args.reps or (3 if q else 30)
    return args


def bench_model(args, name: str, path: str, dummy: bool, device, card: dict) -> dict:
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(path)
    cost, fit, skipped = plan_decode(name, hf, device, args)
    out = {"shape": name, "skipped": skipped, "rows": []}
    if not fit:
        return out
    llm = build_decode_engine(path, dummy, device, fit, args)
    runner, num_blocks = llm.model_runner, llm.runtime.num_kvcache_blocks
    out["mode"] = "cuda graph" if runner.graph_runner is not None else "eager"
    out["attention_backend"] = llm.runtime.attention_backend
    out["dtype"] = str(llm.runtime.dtype)
    out["kv_cache_dtype"] = str(llm.runtime.kv_cache_dtype)
    print(f"{name}: {out['mode']}, attention {out['attention_backend']}, {num_blocks} KV blocks")
    with torch.inference_mode():
        for b, c in fit:
            inputs = synthetic_decode_inputs(b, c, num_blocks, hf.vocab_size, device)
            ms = time_fns({"step": decode_step_fn(runner, inputs)}, args.reps, args.warmup, device)
            ms = ms["step"]
            nbytes, flops = cost.step_bytes(b, c), cost.step_flops(b, c)
            floor_ms, bound = cost.floor(b, c, card)
            serial_ms = cost.serial(b, c, card)
            row = dict(shape=name, batch=b, ctx=c, ms=ms, bytes=nbytes, flops=flops)
            row.update(
                gbytes=nbytes / 1e9,
                gbs=nbytes / (ms * 1e-3) / 1e9,
                tflops=flops / (ms * 1e-3) / 1e12,
                floor_ms=floor_ms,
                bound=bound,
                floor_frac=floor_ms / ms,
                serial_ms=serial_ms,
                step_over_serial=ms / serial_ms,
            )
            row["bw_frac"] = row["gbs"] / card["copy_gbs"]
            out["rows"].append(row)
            print(format_table([row], COLUMNS).splitlines()[1], flush=True)
    release_engine(llm)
    del llm, runner
    free_memory()
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    device = resolve_device(args.device)
    env = environment(device)
    card = measure_and_print_card(device, env, args.quick)
    print(format_table([], COLUMNS))
    results = [
        bench_model(args, name, path, dummy, device, card)
        for name, path, dummy in sweep_models(args)
    ]
    print()
    print(format_table([r for m in results for r in m["rows"]], COLUMNS))
    payload = {
        "script": "benchmarks/decode_step.py",
        "environment": env,
        "args": vars(args),
        "card": card,
        "models": results,
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
