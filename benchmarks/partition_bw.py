"""What one green-context partition can do: the pipeline's physics, measured directly.

For each attention partition size N (the rest of the GPU is the FFN partition), on Qwen3-8B
decode shapes:

- ``attn``: the paged decode-attention kernel alone on the N-SM partition: GB/s of KV read,
  as a fraction of the same kernel on the whole GPU;
- ``gemm``: a gate/up-shaped GEMM ([M, 4096] x [4096, 24576], bf16) alone on the other partition
  (cuBLAS told its SM count, or with ``--gemm-impl triton`` a persistent Triton GEMM with one
  program per SM of the partition): TFLOP/s, as a fraction of the same GEMM on the whole GPU;
- ``both``: the two at once, each on its own partition (the pipeline's overlap), the time until
  both finish against running them one after the other on the whole GPU (with the faster of this
  GEMM and cuBLAS): the best case for a two-stage pipeline with these two kernels and no
  dependencies between them.

Attention tile configurations can be swept (``--configs``) to find one that keeps HBM busy from
few SMs.

    python benchmarks/partition_bw.py --json OUT
    python benchmarks/partition_bw.py --attention-sms 16 32 48 --gemm-m 256 512 1024
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import PagedDecodeCase, concurrent_ms, environment, write_json  # noqa: E402

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
        help="attention tiles as block_n,num_warps,num_stages[,tma] (the first is the default; "
        "tma: the copy-engine kernel with num_stages tiles in flight)",
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
    p.add_argument(
        "--gemm-impl",
        choices=("cublas", "triton"),
        default="cublas",
        help="triton: a persistent Triton GEMM with one program per SM of its partition",
    )
    p.add_argument(
        "--gemm-tile",
        default="128,256,64,8,3",
        help="the Triton GEMM's block_m,block_n,block_k,num_warps,num_stages",
    )
    p.add_argument("--json", metavar="OUT")
    return p.parse_args(argv)


def persistent_matmul():
    """C = A @ B with one program per SM looping over output tiles (grouped along M so that
    programs running together share B tiles in L2). Shapes must be tile multiples."""
    import triton
    import triton.language as tl

    @triton.jit
    def _mm(
        a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):  # fmt: skip
        num_m = M // BLOCK_M
        num_n = N // BLOCK_N
        offs_k = tl.arange(0, BLOCK_K)
        for tile in range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
            group = tile // (GROUP_M * num_n)
            first_m = group * GROUP_M
            group_m = min(num_m - first_m, GROUP_M)
            pid_m = first_m + (tile % (GROUP_M * num_n)) % group_m
            pid_n = (tile % (GROUP_M * num_n)) // group_m
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            a = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
            b = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :]
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for _ in range(0, K, BLOCK_K):
                acc = tl.dot(tl.load(a), tl.load(b), acc)
                a += BLOCK_K
                b += BLOCK_K * stride_bk
            c = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
            tl.store(c, acc.to(c_ptr.dtype.element_ty))

    def run(x, w, out, programs, tile):
        bm, bn, bk, warps, stages = tile
        m, k = x.shape
        n = w.shape[1]
        assert m % bm == 0 and n % bn == 0 and k % bk == 0, "shapes must be tile multiples"
        _mm[(programs,)](
            x, w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
        )  # fmt: skip

    return run


def main(argv=None) -> dict:
    args = parse_args(argv)
    import green_ctx
    from nanovllm.kernels.triton_attention import DecodeConfig
    from nanovllm.pipeline.sm_budget import set_cublas_sm_budget

    dev = torch.device("cuda")
    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    total_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    dtype = torch.bfloat16
    batch, ctx = args.batch, args.ctx
    case = PagedDecodeCase(dev, batch, ctx, L2_DEFEAT_BYTES)

    def decode_config(spec: str) -> DecodeConfig:
        block_n, warps, stages, *tma = spec.split(",")
        return DecodeConfig(int(block_n), int(warps), int(stages), tma=tma == ["tma"])

    configs = [decode_config(c) for c in args.configs]

    def attention(cfg, num_sms):
        return lambda: case.run(cfg, num_sms)

    w = torch.randn(4096, 24576, dtype=dtype, device=dev)
    xs = {m: torch.randn(m, 4096, dtype=dtype, device=dev) for m in args.gemm_m}

    outs = {m: torch.empty(m, w.shape[1], dtype=dtype, device=dev) for m in args.gemm_m}
    mm = persistent_matmul() if args.gemm_impl == "triton" else None
    tile = tuple(int(v) for v in args.gemm_tile.split(","))

    def gemm(m, sms):
        def run():
            if mm is not None:
                for _ in range(4):
                    mm(xs[m], w, outs[m], sms or total_sms, tile)
                return
            with set_cublas_sm_budget(None if args.no_sm_budget else sms, total_sms):
                for _ in range(4):
                    torch.matmul(xs[m], w, out=outs[m])

        return run

    def gbs(ms):
        return case.nbytes / (ms * 1e-3) / 1e9

    def tflops(m, ms):
        return 4 * 2 * m * 4096 * 24576 / (ms * 1e-3) / 1e12

    default = torch.cuda.current_stream()
    whole_attn = {}
    for cfg in configs:
        ms, _ = concurrent_ms({"a": (default, attention(cfg, None))}, args.reps)
        whole_attn[cfg] = ms
    whole_gemm = {m: concurrent_ms({"g": (default, gemm(m, None))}, args.reps)[0] for m in xs}
    # The serial reference is always the faster GEMM on the whole GPU (cuBLAS or this one).
    whole_cublas = {
        m: concurrent_ms({"g": (default, lambda m=m: [torch.matmul(xs[m], w) for _ in range(4)])},
                     args.reps)[0]
        for m in xs
    }  # fmt: skip
    best_whole = min(whole_attn.values())
    print(f"{torch.cuda.get_device_name(dev)}, {total_sms} SMs; batch {batch}, ctx {ctx}")
    print(
        f"whole GPU: attention {gbs(best_whole):.0f} GB/s (best config); "
        + ", ".join(f"GEMM M={m} {tflops(m, ms):.0f} TFLOP/s" for m, ms in whole_gemm.items())
        + f" ({args.gemm_impl}); cuBLAS "
        + ", ".join(f"M={m} {tflops(m, ms):.0f}" for m, ms in whole_cublas.items())
    )
    rows = []
    for n in args.attention_sms:
        split = green_ctx.create_green_split(dev, n)
        try:
            a_sms, f_sms = split.first.sm_count, split.second.sm_count
            sa, sf = split.first.stream, split.second.stream
            for cfg in configs:
                a_ms, _ = concurrent_ms({"a": (sa, attention(cfg, a_sms))}, args.reps)
                row = dict(
                    attention_sms=a_sms,
                    ffn_sms=f_sms,
                    config=vars(cfg),
                    attn_alone_gbs=gbs(a_ms),
                    attn_alone_vs_whole=best_whole / a_ms,
                )
                for m in xs:
                    g_ms, _ = concurrent_ms({"g": (sf, gemm(m, f_sms))}, args.reps)
                    both_ms, per = concurrent_ms(
                        {"a": (sa, attention(cfg, a_sms)), "g": (sf, gemm(m, f_sms))}, args.reps
                    )
                    serial = best_whole + min(whole_gemm[m], whole_cublas[m])
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
            cublas_tflops={m: tflops(m, ms) for m, ms in whole_cublas.items()},
        ),
        rows=rows,
    )
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
