"""Pipeline decode-step sweep: pipelined vs sequential CUDA-graph decode step, same engine.

One engine per shape (random weights, ``enable_pipeline=True``). For every SM split
(``pipeline.adjust_sm_allocation(a, f)``) and micro-batch count, the pipelined graphs are
re-captured; then, for every batch and context, the sequential graph
(``runner.graph_runner``: whole GPU, default stream) and the pipelined graph
(``runner.decode.graph_runner``: green-context partitions) are replayed on the same
synthetic sequences, interleaved, CUDA events, medians. The floor is decode_step's
``max(bytes / copy bandwidth, flops / matmul peak)`` (weights read once; ``floor_m`` reads them
once per micro-batch, as the pipeline does). Combinations whose KV cache does not fit are skipped
and listed.

    python bench_pipeline.py --json benchmarks/results/bench_pipeline_h100.json   # ~4 min
    python bench_pipeline.py --grid full --shape 8b
    python bench_pipeline.py --quick --device cpu       # control flow only: no pipeline on CPU
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace

import torch

from benchmarks.common import (
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

GRIDS = {
    "default": dict(
        batches=[64, 256, 512], ctxs=[512, 2048], splits=["32,96", "48,80", "64,64"], mbs=[2]
    ),
    "full": dict(
        batches=[32, 64, 128, 256, 512, 1024],
        ctxs=[512, 1024, 2048, 4096],
        splits=["16,116", "32,96", "48,80", "64,64", "80,48"],
        mbs=[2, 3],
    ),
    "quick": dict(batches=[4, 16], ctxs=[64, 300], splits=["16,16", "32,32"], mbs=[2, 3]),
}
COLUMNS = [
    ("shape", "shape", ""),
    ("batch", "batch", "d"),
    ("ctx", "ctx", "d"),
    ("attention_sms", "attn SMs", "d"),
    ("ffn_sms", "FFN SMs", "d"),
    ("microbatches", "m", "d"),
    ("ffn_gemm", "FFN GEMM", ""),
    ("sequential_ms", "seq ms", ".3f"),
    ("pipelined_ms", "pipe ms", ".3f"),
    ("speedup", "speedup", ".3f"),
    ("floor_ms", "floor ms", ".3f"),
    ("floor_m_ms", "floor(m) ms", ".3f"),
]


def split_arg(text: str) -> tuple[int, int]:
    a, f = (int(x) for x in text.split(","))
    return a, f


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--grid", choices=("default", "full"), default="default")
    p.add_argument("--batches", type=int, nargs="+", help="override the grid's batches")
    p.add_argument("--ctxs", type=int, nargs="+", help="override the grid's contexts")
    p.add_argument("--splits", nargs="+", help="attention,ffn SM counts, e.g. 32,96 48,80")
    p.add_argument(
        "--attention-kernel",
        choices=("triton", "tma"),
        default="triton",
        help="the pipeline's decode-attention kernel (Config.pipeline_attention_kernel)",
    )
    p.add_argument("--microbatches", type=int, nargs="+", help="micro-batch counts, e.g. 2 3")
    p.add_argument(
        "--ffn-gemm",
        nargs="+",
        choices=("triton", "cublas"),
        default=["triton"],
        help="the FFN stage's GEMMs (Config.pipeline_ffn_gemm); several: each in turn, same engine",
    )
    add_decode_sweep_args(p, reps=20, warmup=3, reserve_gib=5.0)
    args = p.parse_args(argv)
    grid = GRIDS["quick" if args.quick else args.grid]
    args.shape = args.shape or (["tiny"] if args.quick else ["0.6b", "8b"])
    args.batches = args.batches or grid["batches"]
    args.ctxs = args.ctxs or grid["ctxs"]
    args.splits = [split_arg(s) for s in (args.splits or grid["splits"])]
    args.microbatches = args.microbatches or grid["mbs"]
    args.reps = args.reps or (3 if args.quick else 20)
    if min(args.microbatches) < 2:
        p.error("--microbatches: use 2 or more")
    return args


def configure_pipeline(
    pipe, split: tuple[int, int] | None, m: int, ffn_gemm: str
) -> tuple[int, int]:
    """Re-partition the SMs (unless ``split`` is None), set the micro-batch count and the FFN
    stage's GEMMs, and re-capture
    the pipelined graphs (timed below with ``pipe.graph_runner.run``, not ``pipe.run``). The
    engine was built with the largest ``m``: its per-(layer, micro-batch) events cover every
    smaller count. Returns the granted (attention, FFN) SMs."""
    if split is not None:
        pipe.adjust_sm_allocation(*split)
    pipe.num_microbatches = m
    pipe.kernels = replace(pipe.kernels, ffn_gemm=ffn_gemm)
    if pipe.graph_runner is not None:
        pipe.graph_runner.reset()
        pipe.graph_runner.capture()
    stats = pipe.statistics()
    return stats["attention_sms"], stats["ffn_sms"]


def bench_model(args, name: str, path: str, dummy: bool, device, card: dict) -> dict:
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(path)
    cost, fit, skipped = plan_decode(name, hf, device, args)
    out = {"shape": name, "skipped": skipped, "rows": []}
    if not fit:
        return out
    first = args.splits[0]
    llm = build_decode_engine(
        path,
        dummy,
        device,
        fit,
        args,
        enable_pipeline=True,
        pipeline_attention_sm_count=first[0],
        pipeline_ffn_sm_count=first[1],
        pipeline_num_microbatches=max(args.microbatches),
        pipeline_attention_kernel=args.attention_kernel,
        pipeline_ffn_gemm=args.ffn_gemm[0],
    )
    runner, num_blocks = llm.model_runner, llm.runtime.num_kvcache_blocks
    pipe = runner.decode
    reason = "" if pipe.enabled else pipe.reason
    out["pipeline"] = {"enabled": pipe.enabled, "reason": reason}
    print(f"{name}: pipeline {'enabled' if pipe.enabled else 'unavailable: ' + reason}")
    inputs = {
        (b, c): synthetic_decode_inputs(b, c, num_blocks, hf.vocab_size, device) for b, c in fit
    }
    current = first  # the split the engine was built with
    configs = [(s, m, g) for s in args.splits for m in args.microbatches for g in args.ffn_gemm]
    configs = configs if pipe.enabled else [None]
    with torch.inference_mode():
        for config in configs:
            row0 = dict(shape=name)
            if config is not None:
                (a, f), m, gemm = config
                try:
                    got_a, got_f = configure_pipeline(
                        pipe, None if current == (a, f) else (a, f), m, gemm
                    )
                    current = (a, f)
                except (ValueError, RuntimeError) as e:  # e.g. a split this card cannot make
                    print(f"skip split {a},{f} m={m}: {type(e).__name__}: {e}")
                    out.setdefault("failed", []).append([a, f, m, str(e)])
                    continue
                row0.update(requested_split=[a, f], attention_sms=got_a, ffn_sms=got_f)
                row0["attention_kernel"] = pipe.kernels.attention_kernel
                row0["microbatches"], row0["ffn_gemm"] = m, gemm
            for (b, c), inp in inputs.items():
                fns = {"sequential": decode_step_fn(runner, inp)}
                if config is not None:
                    fns["pipelined"] = decode_step_fn(runner, inp, pipelined=True)
                ms = time_fns(fns, args.reps, args.warmup, device)
                row = dict(row0, batch=b, ctx=c, sequential_ms=ms["sequential"])
                row["floor_ms"] = cost.floor(b, c, card)[0]
                if config is not None:
                    row.update(pipelined_ms=ms["pipelined"])
                    row["speedup"] = ms["sequential"] / ms["pipelined"]
                    row["floor_m_ms"] = cost.floor(b, c, card, weight_reads=m)[0]
                out["rows"].append(row)
                print(format_table([row], COLUMNS).splitlines()[1], flush=True)
    out["pipeline_statistics"] = runner.get_pipeline_statistics()
    release_engine(llm)
    del llm, runner, pipe
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
    rows = [r for m in results for r in m["rows"]]
    print("\n" + format_table(rows, COLUMNS))
    payload = {
        "script": "bench_pipeline.py",
        "environment": env,
        "args": vars(args),
        "card": card,
        "models": results,
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
