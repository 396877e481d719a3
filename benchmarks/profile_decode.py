"""Where a decode step's time goes (GPU).

For each (batch, context) point of a random-weight model: the sequential CUDA-graph step time,
and a torch.profiler kernel-time breakdown of the same step run eagerly (GEMMs, attention, KV
store, fused element-wise kernels, other), so that graph time minus summed kernel time shows the
idle gaps. Then the pipelined step at the same points with per-stage CUDA-event timings: how long
the attention stage and the FFN stage kept their partitions busy, against the same kernels on the
whole GPU.

    python benchmarks/profile_decode.py --shape 8b --points 256x512 1024x256 --json OUT
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    add_common_args,
    build_decode_engine,
    decode_step_fn,
    environment,
    kernel_breakdown,
    model_path,
    release_engine,
    resolve_device,
    synthetic_decode_inputs,
    time_fns,
    write_json,
)


@torch.inference_mode()  # the engine's decode buffers are inference tensors
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="8b", choices=("0.6b", "8b"))
    p.add_argument("--points", nargs="+", default=["256x512", "1024x256"], help="BATCHxCTX")
    p.add_argument("--attention-sms", type=int, default=40)
    p.add_argument("--ffn-sms", type=int, default=92)
    p.add_argument("--attention-kernel", choices=("triton", "tma"), default="triton")
    p.add_argument("--ffn-gemm", choices=("triton", "cublas"), default="triton")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto")
    add_common_args(p)
    args = p.parse_args()
    device = resolve_device(args.device)
    if device.type != "cuda":
        raise SystemExit("profile_decode.py needs a CUDA GPU")
    points = [tuple(int(x) for x in s.split("x")) for s in args.points]
    llm = build_decode_engine(
        model_path(args.shape),
        True,
        device,
        points,
        args,
        enable_pipeline=True,
        pipeline_policy="always",
        pipeline_enable_profiling=True,
        pipeline_attention_sm_count=args.attention_sms,
        pipeline_ffn_sm_count=args.ffn_sms,
        pipeline_attention_kernel=args.attention_kernel,
        pipeline_ffn_gemm=args.ffn_gemm,
    )
    runner = llm.model_runner
    pipe = runner.decode
    rows = []
    for batch, ctx in points:
        inputs = synthetic_decode_inputs(
            batch,
            ctx,
            runner.runtime.num_kvcache_blocks,
            runner.runtime.hf_config.vocab_size,
            device,
        )
        times = time_fns(
            {
                "sequential": decode_step_fn(runner, inputs),
                "pipelined": decode_step_fn(runner, inputs, pipelined=True),
            },
            reps=args.reps,
            warmup=3,
            device=device,
        )
        eager = kernel_breakdown(lambda x=inputs: runner.model(x.input_ids, x.positions, x.meta))
        # The same kernels issued by the pipelined step (eagerly, both partitions busy): how
        # long each category runs next to the other stage.
        piped = kernel_breakdown(lambda x=inputs: pipe.step(x.input_ids, x.positions, x.meta))
        pipe.stats = type(pipe.stats)(profiling=True)  # stage timings of this point only
        for _ in range(args.reps):
            pipe.run(inputs)
        stats = pipe.statistics()
        row = {
            "batch": batch,
            "ctx": ctx,
            "sequential_graph_ms": times["sequential"],
            "pipelined_graph_ms": times["pipelined"],
            "eager_kernel_ms": eager,
            "eager_kernel_total_ms": sum(eager.values()),
            "pipelined_kernel_ms": piped,
            "pipeline": {
                k: stats.get(k)
                for k in (
                    "attention_sms",
                    "ffn_sms",
                    "attention_stage_ms",
                    "ffn_stage_ms",
                    "step_ms",
                    "overlap",
                )
            },
        }
        rows.append(row)
        print(
            f"\n{args.shape} batch {batch} ctx {ctx}: sequential graph "
            f"{times['sequential']:.3f} ms, pipelined graph {times['pipelined']:.3f} ms"
        )
        print(
            "  kernels of one sequential step (full GPU, ms): "
            + ", ".join(f"{k} {v:.3f}" for k, v in sorted(eager.items(), key=lambda kv: -kv[1]))
        )
        print(
            "  kernels of one pipelined step (on the partitions, ms): "
            + ", ".join(f"{k} {v:.3f}" for k, v in sorted(piped.items(), key=lambda kv: -kv[1]))
        )
        print(
            f"  sum of kernels {row['eager_kernel_total_ms']:.3f} ms -> idle in the graph "
            f"{times['sequential'] - row['eager_kernel_total_ms']:.3f} ms"
        )
        a, f, s = (stats[k]["p50"] for k in ("attention_stage_ms", "ffn_stage_ms", "step_ms"))
        print(
            f"  pipelined ({stats['attention_sms']}/{stats['ffn_sms']} SMs): attention stage busy "
            f"{a:.3f} ms, FFN stage busy {f:.3f} ms, step {s:.3f} ms, overlap "
            f"{stats['overlap']:.0%}"
        )
    write_json(
        args.json,
        {
            "script": "benchmarks/profile_decode.py",
            "environment": environment(device),
            "args": vars(args),
            "results": rows,
        },
    )
    release_engine(llm)


if __name__ == "__main__":
    main()
