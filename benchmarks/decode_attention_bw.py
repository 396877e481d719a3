"""Bandwidth of the Triton paged decode-attention kernel, against a device-to-device copy.

For each (block_size, batch, context) the decode call is captured in a CUDA graph (several calls
per graph, each on its own KV blocks so that repeated calls do not hit L2), replayed, and timed
with CUDA events (median over replays). Bytes = K+V cache bytes the sequences touch + q + o (the
block tables and the split partials are not counted). The copy reference is a clone of a 1 GiB
tensor: (read + written bytes) / time.

    python benchmarks/decode_attention_bw.py --out benchmarks/results/decode_bw.json
    python benchmarks/decode_attention_bw.py --batches 8 64 --ctxs 2048 --sweep   # tile tuning
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanovllm.attention.metadata import AttentionMetadata  # noqa: E402
from nanovllm.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from nanovllm.kernels.triton_attention import (  # noqa: E402
    DecodeConfig,
    choose_num_splits,
    default_decode_config,
    device_sm_count,
    paged_decode_attention,
)

# The KV cache's dtype; with fp8 (e4m3, scale 1.0) the queries and outputs stay bf16.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}


def query_dtype(cache_dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if cache_dtype.itemsize == 1 else cache_dtype


L2_DEFEAT_BYTES = 512 << 20  # KV bytes cycled through per graph, well above H100's 50 MB L2


def time_ms(fn, reps: int) -> float:
    """Median of ``reps`` timings of ``fn`` with CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def copy_bandwidth_gbs(reps: int) -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    ms = time_ms(lambda: x.clone(), reps)
    return 2 * x.numel() / (ms * 1e-3) / 1e9


def make_tables(num_sets: int, batch: int, blocks_per_seq: int, gen) -> torch.Tensor:
    """[num_sets, batch, blocks_per_seq] int32: disjoint, shuffled physical blocks."""
    total = num_sets * batch * blocks_per_seq
    perm = torch.randperm(total, generator=gen).to(torch.int32)
    return perm.view(num_sets, batch, blocks_per_seq)


def bench_shape(args, batch: int, ctx: int, block_size: int, configs, calls: int) -> list[dict]:
    dtype = DTYPES[args.dtype]
    h, kvh, d = args.num_heads, args.num_kv_heads, args.head_dim
    itemsize = torch.empty((), dtype=dtype).element_size()
    blocks_per_seq = math.ceil(ctx / block_size)
    kv_bytes = 2 * batch * ctx * kvh * d * itemsize
    num_sets = max(1, min(calls, math.ceil(L2_DEFEAT_BYTES / kv_bytes)))
    gen = torch.Generator().manual_seed(batch * 7919 + ctx)
    num_blocks = num_sets * batch * blocks_per_seq
    cache_shape = (num_blocks, block_size, kvh, d)
    k_cache = torch.randn(cache_shape, dtype=torch.bfloat16, device="cuda").to(dtype)
    v_cache = torch.randn(cache_shape, dtype=torch.bfloat16, device="cuda").to(dtype)
    tables = make_tables(num_sets, batch, blocks_per_seq, gen).cuda()
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, h, d, dtype=query_dtype(dtype), device="cuda")
    scale = d**-0.5
    bytes_moved = kv_bytes + 2 * batch * h * d * q.element_size()

    rows = []
    for cfg in configs:

        def step(cfg=cfg):
            for i in range(calls):
                table = tables[i % num_sets]
                paged_decode_attention(
                    q, k_cache, v_cache, table, lens, scale, num_splits=args.num_splits, config=cfg
                )

        try:
            step()  # compile outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            ms = time_ms(graph.replay, args.reps) / calls
        except Exception as e:  # e.g. a sweep config over the shared-memory limit
            rows.append({"config": vars_of(cfg), "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        gbs = bytes_moved / (ms * 1e-3) / 1e9
        splits = args.num_splits or choose_num_splits(
            batch, kvh, blocks_per_seq * block_size, device_sm_count(q.device)
        )
        rows.append(
            {
                "config": vars_of(cfg),
                "num_splits": splits,
                "us": ms * 1e3,
                "bytes": bytes_moved,
                "gbs": gbs,
                "ratio_to_copy": gbs / args.copy_gbs,
            }
        )
    return rows


def vars_of(cfg: DecodeConfig) -> dict:
    return {
        "block_n": cfg.block_n,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "prefetch_table": cfg.prefetch_table,
        "tile_in_block": cfg.tile_in_block,
    }


def check_correctness(args, cfg: DecodeConfig) -> float:
    """Max abs error against the torch reference on a small shuffled-table case."""
    dtype = DTYPES[args.dtype]
    h, kvh, d, bs = args.num_heads, args.num_kv_heads, args.head_dim, 16
    lens = [1000, 0, 37, 512]
    gen = torch.Generator().manual_seed(0)
    need = [math.ceil(n / bs) for n in lens]
    num_blocks = sum(need) + 2
    k_cache = torch.randn(num_blocks, bs, kvh, d, generator=gen).to("cuda", dtype)
    v_cache = torch.randn(num_blocks, bs, kvh, d, generator=gen).to("cuda", dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(lens), max(need)), -1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used : used + n].to(torch.int32)
        used += n
    meta = AttentionMetadata(
        is_prefill=False,
        slot_mapping=torch.zeros(len(lens), dtype=torch.int32, device="cuda"),
        context_lens=torch.tensor(lens, dtype=torch.int32, device="cuda"),
        block_tables=tables.cuda(),
    )
    q = torch.randn(len(lens), h, d, generator=gen).to("cuda", query_dtype(dtype))
    ref = TorchAttentionBackend().decode(q, k_cache, v_cache, meta, d**-0.5)
    errs = []
    for splits in (1, 4):
        out = paged_decode_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.context_lens,
            d**-0.5,
            num_splits=splits,
            config=cfg,
        )
        errs.append((out.float() - ref.float()).abs().max().item())
    return max(errs)


def sweep_configs() -> list[DecodeConfig]:
    grid = itertools.product((32, 64, 128), (4, 8), (2, 3, 4, 5), (True, False))
    return [DecodeConfig(bn, w, s, p) for bn, w, s, p in grid]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64, 128, 256])
    ap.add_argument("--ctxs", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[256, 16])
    ap.add_argument("--num-heads", type=int, default=32)
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--num-splits", type=int, default=None, help="override the shape-based choice")
    ap.add_argument("--block-n", type=int, default=None)
    ap.add_argument("--num-warps", type=int, default=None)
    ap.add_argument("--num-stages", type=int, default=None)
    ap.add_argument("--no-prefetch-table", action="store_true")
    ap.add_argument(
        "--per-token-block-ids",
        action="store_true",
        help="block ids per key even when a tile lies in one cache block (the kernel before "
        "one id per tile; for A/B runs)",
    )
    ap.add_argument("--sweep", action="store_true", help="try a grid of tile configs per shape")
    ap.add_argument("--calls", type=int, default=10, help="decode calls per captured graph")
    ap.add_argument("--reps", type=int, default=30, help="timed graph replays (median)")
    ap.add_argument("--max-kv-gib", type=float, default=24.0, help="skip shapes needing more")
    ap.add_argument("--out", type=str, default=None, help="write results as JSON")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"

    base = default_decode_config(args.head_dim, is_gpu=True)
    cfg = DecodeConfig(
        block_n=args.block_n or base.block_n,
        num_warps=args.num_warps or base.num_warps,
        num_stages=args.num_stages or base.num_stages,
        prefetch_table=base.prefetch_table and not args.no_prefetch_table,
        tile_in_block=base.tile_in_block and not args.per_token_block_ids,
    )
    configs = sweep_configs() if args.sweep else [cfg]

    dev = torch.cuda.get_device_properties(0)
    args.copy_gbs = copy_bandwidth_gbs(args.reps)
    print(f"device: {dev.name}, {dev.multi_processor_count} SMs; torch {torch.__version__}")
    print(f"copy bandwidth (clone of 1 GiB, read + write): {args.copy_gbs:.0f} GB/s")
    checked = {}
    for c in configs:
        try:
            checked[c] = check_correctness(args, c)
        except Exception as e:
            checked[c] = f"{type(e).__name__}"
    bad = {c: e for c, e in checked.items() if isinstance(e, str) or e > 5e-2}
    if bad:
        print(f"configs failing the correctness check (skipped): {bad}")
    configs = [c for c in configs if c not in bad]
    print(f"default config: {cfg}")
    print(
        f"{'bs':>4} {'batch':>5} {'ctx':>5} {'splits':>6} {'us':>9} {'GB/s':>7} {'of copy':>7}"
        + ("  best config" if args.sweep else "")
    )

    results = []
    for bs, batch, ctx in itertools.product(args.block_sizes, args.batches, args.ctxs):
        kv_gib = 2 * batch * ctx * args.num_kv_heads * args.head_dim / 2**30
        kv_gib *= DTYPES[args.dtype].itemsize
        if kv_gib > args.max_kv_gib:
            print(f"{bs:>4} {batch:>5} {ctx:>5}  skipped: {kv_gib:.1f} GiB of KV")
            continue
        rows = bench_shape(args, batch, ctx, bs, configs, args.calls)
        torch.cuda.empty_cache()  # this shape's KV cache and graphs are gone
        ok = [r for r in rows if "error" not in r]
        best = max(ok, key=lambda r: r["gbs"]) if ok else None
        results.append({"block_size": bs, "batch": batch, "ctx": ctx, "runs": rows})
        if best is None:
            print(f"{bs:>4} {batch:>5} {ctx:>5}  all configs failed: {rows[0]['error']}")
            continue
        line = (
            f"{bs:>4} {batch:>5} {ctx:>5} {best['num_splits']:>6} {best['us']:>9.1f} "
            f"{best['gbs']:>7.0f} {best['ratio_to_copy']:>7.2f}"
        )
        if args.sweep:
            line += "  " + " ".join(f"{k}={v}" for k, v in best["config"].items())
        print(line)

    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(
                {
                    "device": dev.name,
                    "sm_count": dev.multi_processor_count,
                    "torch": torch.__version__,
                    "shape": {
                        "num_heads": args.num_heads,
                        "num_kv_heads": args.num_kv_heads,
                        "head_dim": args.head_dim,
                        "dtype": args.dtype,
                    },
                    "copy_gbs": args.copy_gbs,
                    "default_config": vars_of(cfg),
                    "correctness_max_abs_err": {str(vars_of(c)): e for c, e in checked.items()},
                    "results": results,
                },
                f,
                indent=1,
            )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
