"""What one green-context partition can do: the pipeline's physics, measured directly.

For each attention partition size N (the rest of the GPU is the FFN partition), on Qwen3-8B
decode shapes:

- ``attn``: the paged decode-attention kernel alone on the N-SM partition: GB/s of KV read,
  as a fraction of the same kernel on the whole GPU;
- ``gemm``: a gate/up-shaped GEMM ([M, 4096] x [4096, 24576], bf16) alone on the other partition
  (cuBLAS told its SM count): TFLOP/s, as a fraction of the whole GPU;
- ``both``: the two at once, each on its own partition (the pipeline's overlap), the time until
  both finish against running them one after the other on the whole GPU: the best case for a
  two-stage pipeline with these two kernels and no dependencies between them.

Attention tile configurations can be swept (``--configs``) to find one that keeps HBM busy from
few SMs.

    python benchmarks/partition_bw.py --json OUT
    python benchmarks/partition_bw.py --attention-sms 16 32 48 --gemm-m 256 512 1024
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import environment, write_json  # noqa: E402

L2_DEFEAT_BYTES = 512 << 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--attention-sms", type=int, nargs="+", default=[16, 24, 32, 48, 64])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--gemm-m", type=int, nargs="+", default=[512, 2048])
    p.add_argument(
        "--configs",
        nargs="+",
        default=["64,4,3", "64,4,4", "128,8,3", "32,4,4"],
        help="attention tiles as block_n,num_warps,num_stages (the first is the default)",
    )
    p.add_argument("--reps", type=int, default=20)
    p.add_argument(
        "--blas",
        choices=("default", "cublaslt"),
        default="default",
        help="torch.backends.cuda.preferred_blas_library for the GEMM (cuBLASLt honours the SM "
        "budget)",
    )
    p.add_argument("--no-sm-budget", action="store_true", help="do not tell cuBLAS its SM count")
    p.add_argument("--json", metavar="OUT")
    return p.parse_args(argv)


def events_ms(fn_by_stream: dict, reps: int) -> tuple[float, dict]:
    """Median wall ms until every stream's work is done, and the median per stream."""
    total, per = [], {name: [] for name in fn_by_stream}
    for _ in range(reps + 1):
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        ends = {}
        for name, (stream, fn) in fn_by_stream.items():
            stream.wait_event(start)
            with torch.cuda.stream(stream):
                fn()
                ends[name] = torch.cuda.Event(enable_timing=True)
                ends[name].record()
        torch.cuda.synchronize()
        per_rep = {name: start.elapsed_time(e) for name, e in ends.items()}
        total.append(max(per_rep.values()))
        for name, ms in per_rep.items():
            per[name].append(ms)
    # the first repetition compiles and warms up
    return statistics.median(total[1:]), {k: statistics.median(v[1:]) for k, v in per.items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import green_ctx
    from nanovllm.engine.green_manager import set_cublas_sm_budget
    from nanovllm.kernels.triton_attention import DecodeConfig, paged_decode_attention

    dev = torch.device("cuda")
    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    total_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    heads, kv_heads, d, bs, dtype = 32, 8, 128, 256, torch.bfloat16
    batch, ctx = args.batch, args.ctx
    blocks_per_seq = math.ceil(ctx / bs)
    kv_bytes = 2 * batch * ctx * kv_heads * d * 2
    calls = max(1, math.ceil(L2_DEFEAT_BYTES / kv_bytes))
    num_blocks = calls * batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, bs, kv_heads, d, dtype=dtype, device=dev)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device=dev, dtype=torch.int32).view(calls, batch, -1)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(batch, heads, d, dtype=dtype, device=dev)
    configs = [DecodeConfig(*map(int, c.split(","))) for c in args.configs]

    def attention(cfg, num_sms):
        def run():
            for i in range(calls):
                paged_decode_attention(
                    q, k_cache, v_cache, tables[i], lens, d**-0.5, num_sms=num_sms, config=cfg
                )

        return run

    w = torch.randn(4096, 24576, dtype=dtype, device=dev)
    xs = {m: torch.randn(m, 4096, dtype=dtype, device=dev) for m in args.gemm_m}

    def gemm(m, sms):
        def run():
            with set_cublas_sm_budget(None if args.no_sm_budget else sms, total_sms):
                for _ in range(4):
                    torch.matmul(xs[m], w)

        return run

    def gbs(ms):
        return calls * kv_bytes / (ms * 1e-3) / 1e9

    def tflops(m, ms):
        return 4 * 2 * m * 4096 * 24576 / (ms * 1e-3) / 1e12

    default = torch.cuda.current_stream()
    whole_attn = {}
    for cfg in configs:
        ms, _ = events_ms({"a": (default, attention(cfg, None))}, args.reps)
        whole_attn[cfg] = ms
    whole_gemm = {m: events_ms({"g": (default, gemm(m, None))}, args.reps)[0] for m in xs}
    best_whole = min(whole_attn.values())
    print(f"{torch.cuda.get_device_name(dev)}, {total_sms} SMs; batch {batch}, ctx {ctx}")
    print(
        f"whole GPU: attention {gbs(best_whole):.0f} GB/s (best config); "
        + ", ".join(f"GEMM M={m} {tflops(m, ms):.0f} TFLOP/s" for m, ms in whole_gemm.items())
    )
    rows = []
    for n in args.attention_sms:
        split = green_ctx.create_green_split(dev, n)
        try:
            a_sms, f_sms = split.first.sm_count, split.second.sm_count
            sa, sf = split.first.stream, split.second.stream
            for cfg in configs:
                a_ms, _ = events_ms({"a": (sa, attention(cfg, a_sms))}, args.reps)
                row = dict(
                    attention_sms=a_sms,
                    ffn_sms=f_sms,
                    config=vars(cfg),
                    attn_alone_gbs=gbs(a_ms),
                    attn_alone_vs_whole=best_whole / a_ms,
                )
                for m in xs:
                    g_ms, _ = events_ms({"g": (sf, gemm(m, f_sms))}, args.reps)
                    both_ms, per = events_ms(
                        {"a": (sa, attention(cfg, a_sms)), "g": (sf, gemm(m, f_sms))}, args.reps
                    )
                    serial = best_whole + whole_gemm[m]
                    row[f"m{m}"] = dict(
                        gemm_alone_tflops=tflops(m, g_ms),
                        gemm_alone_vs_whole=whole_gemm[m] / g_ms,
                        both_ms=both_ms,
                        attn_in_overlap_gbs=gbs(per["a"]),
                        gemm_in_overlap_tflops=tflops(m, per["g"]),
                        serial_whole_ms=serial,
                        overlap_speedup=serial / both_ms,
                    )
                rows.append(row)
                cells = "  ".join(
                    f"M={m}: gemm {row[f'm{m}']['gemm_alone_vs_whole']:.2f}, overlap "
                    f"{row[f'm{m}']['overlap_speedup']:.2f}x (attn "
                    f"{row[f'm{m}']['attn_in_overlap_gbs']:.0f} GB/s)"
                    for m in xs
                )
                print(
                    f"{a_sms:>3}/{f_sms:<3} {args.configs[configs.index(cfg)]:>8}: attention "
                    f"{row['attn_alone_gbs']:.0f} GB/s ({row['attn_alone_vs_whole']:.2f} of "
                    f"whole)  {cells}"
                )
        finally:
            split.close()
    payload = dict(
        script="benchmarks/partition_bw.py",
        environment=environment(dev),
        args=vars(args),
        whole=dict(
            attention_gbs={c: gbs(ms) for c, ms in zip(args.configs, whole_attn.values())},
            gemm_tflops={m: tflops(m, ms) for m, ms in whole_gemm.items()},
        ),
        rows=rows,
    )
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
