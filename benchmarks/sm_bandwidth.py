"""How many bytes per second can N SMs pull from HBM? The pipeline's attention partition, bounded.

The pipeline pays only if decode attention keeps most of the HBM bandwidth on a small green
partition (``PIPELINE_README.md``). This script asks what a partition of N SMs can read at all,
with kernels of increasing sophistication, each alone on the partition:

- ``torch``: ``x.sum()`` (PyTorch's reduction);
- ``stream``: a Triton streaming read, persistent grid of ``programs_per_sm`` programs per SM,
  each reading tiles of ``tile_kb`` KiB (``--stream`` as tile_kb,num_warps,num_stages,progs);
- ``bulk``: a CUDA kernel whose one thread per block keeps ``stages`` bulk copies
  (``cp.async.bulk``, the Hopper copy engine) of ``chunk_kb`` KiB in flight into shared memory,
  waiting on mbarriers (``--bulk`` as chunk_kb,stages,blocks_per_sm; needs CuPy and sm_90);
- ``attn``: the engine's paged decode-attention kernel on Qwen3-8B shapes with the cache laid out
  NHD ([blocks, block_size, kv_heads, head_dim], the engine's) or HND ([blocks, kv_heads,
  block_size, head_dim]: each KV head's keys contiguous); ``--attn`` as
  layout,block_n,num_warps,num_stages[,token|loads|tma] (``token``: per-token block ids, the
  kernel before one block id per tile; ``loads``: the same loads with no math, the load path's
  own limit; ``tma``: the copy-engine kernel ``kernels/tma_decode.py``, either layout, with
  num_stages tiles in flight and the other tile knobs ignored).

Every figure is GB/s of bytes read (each read once, 1 GiB or more so L2 cannot hold it), and
GB/s per SM of the partition.

    python benchmarks/sm_bandwidth.py --json OUT
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import PagedDecodeCase, concurrent_ms, environment, write_json  # noqa: E402

BULK_SOURCE = r"""
extern "C" __global__ void bulk_read(const char* __restrict__ src, unsigned long long num_chunks,
                                     unsigned int chunk_bytes, int stages, float* out) {
    // One thread per block issues the bulk copies; `stages` chunks are in flight at any time.
    extern __shared__ __align__(128) char smem[];
    __shared__ __align__(8) unsigned long long bars[16];
    const unsigned long long first = blockIdx.x, step = gridDim.x;
    if (first >= num_chunks) return;
    const int n_local = (int)((num_chunks - first + step - 1) / step);
    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; ++s) {
            unsigned a = (unsigned)__cvta_generic_to_shared(&bars[s]);
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(a));
        }
        asm volatile("fence.proxy.async.shared::cta;");
    }
    __syncthreads();
    auto issue = [&](int s, unsigned long long chunk) {
        unsigned bar = (unsigned)__cvta_generic_to_shared(&bars[s]);
        unsigned dst = (unsigned)__cvta_generic_to_shared(smem + (size_t)s * chunk_bytes);
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                     :: "r"(bar), "r"(chunk_bytes) : "memory");
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
            " [%0], [%1], %2, [%3];"
            :: "r"(dst), "l"(src + chunk * chunk_bytes), "r"(chunk_bytes), "r"(bar) : "memory");
    };
    if (threadIdx.x == 0)
        for (int k = 0; k < stages && k < n_local; ++k) issue(k, first + k * step);
    float acc = 0.f;
    for (int k = 0; k < n_local; ++k) {
        const int s = k % stages;
        const unsigned phase = (k / stages) & 1;
        unsigned bar = (unsigned)__cvta_generic_to_shared(&bars[s]);
        asm volatile(
            "{\n .reg .pred P1;\n WAIT:\n"
            " mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
            " @P1 bra DONE;\n bra WAIT;\n DONE:\n}" :: "r"(bar), "r"(phase) : "memory");
        acc += ((const float*)(smem + (size_t)s * chunk_bytes))[threadIdx.x];
        __syncthreads();
        if (threadIdx.x == 0 && k + stages < n_local) issue(s, first + (k + stages) * step);
    }
    if (acc == 1234.5f) out[blockIdx.x] = acc;  // keeps the reads alive
}
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sms", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--gib", type=float, default=1.0, help="bytes read per measurement")
    p.add_argument("--stream", nargs="*", default=["32,8,1,2", "32,8,1,4", "64,8,1,2", "32,4,3,2"])
    p.add_argument("--bulk", nargs="*", default=["32,4,1", "16,8,1", "32,6,1", "16,4,2"])
    p.add_argument(
        "--attn", nargs="*", default=["nhd,64,4,3", "hnd,64,4,3", "hnd,64,4,4", "hnd,128,8,3"]
    )
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--json", metavar="OUT")
    return p.parse_args(argv)


def stream_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _stream_sum(x_ptr, out_ptr, num_tiles, TILE: tl.constexpr):
        pid = tl.program_id(0)
        acc = tl.zeros([TILE], dtype=tl.float32)
        for t in range(pid, num_tiles, tl.num_programs(0)):
            acc += tl.load(x_ptr + t.to(tl.int64) * TILE + tl.arange(0, TILE)).to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(acc))

    def run(x, out, tile_kb, warps, stages, progs):
        tile = tile_kb * 1024 // x.element_size()
        _stream_sum[(progs,)](
            x, out, x.numel() // tile, TILE=tile, num_warps=warps, num_stages=stages
        )

    return run


def bulk_kernel():
    import cupy

    mod = cupy.RawModule(code=BULK_SOURCE, options=("-std=c++17",))
    fn = mod.get_function("bulk_read")

    def run(x, out, chunk_kb, stages, blocks):
        chunk = chunk_kb * 1024
        fn.max_dynamic_shared_size_bytes = stages * chunk
        fn(
            (blocks,),
            (128,),
            (
                cupy.uint64(x.data_ptr()),
                cupy.uint64(x.numel() * x.element_size() // chunk),
                cupy.uint32(chunk),
                cupy.int32(stages),
                cupy.uint64(out.data_ptr()),
            ),
            shared_mem=stages * chunk,
            stream=cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream),
        )

    return run


def paged_stream_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _paged_stream(
        k_ptr, v_ptr, tables_ptr, out_ptr, ctx, stride_b, stride_s, stride_h, stride_bt,
        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr,
    ):  # fmt: skip
        # The decode kernel's loads (block table, K and V tiles of one KV head) with no math.
        seq = tl.program_id(0)
        kvh = tl.program_id(1)
        offs_t = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        acc = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        for n0 in range(0, ctx, BLOCK_N):
            offs_n = n0 + offs_t
            blk = tl.load(tables_ptr + seq * stride_bt + offs_n // KV_BLOCK_SIZE).to(tl.int64)
            row = blk * stride_b + (offs_n % KV_BLOCK_SIZE) * stride_s + kvh * stride_h
            k = tl.load(k_ptr + row[:, None] + offs_d[None, :])
            v = tl.load(v_ptr + row[:, None] + offs_d[None, :])
            acc += k.to(tl.float32) + v.to(tl.float32)
        tl.store(out_ptr + seq * tl.num_programs(1) + kvh, tl.sum(acc))

    return _paged_stream


def attention_case(dev, gib: float):
    """Decode attention over >= ``gib`` GiB of K+V at the Qwen3-8B shape (batch 256, context
    1024), in both cache layouts: run(layout, block_n, warps, stages, variant, num_sms)."""
    from nanovllm.kernels.triton_attention import DecodeConfig

    cases = {
        layout: PagedDecodeCase(dev, 256, 1024, int(gib * 2**30), layout)
        for layout in ("nhd", "hnd")
    }
    paged_stream = paged_stream_kernel()
    d, bs = PagedDecodeCase.HEAD_DIM, PagedDecodeCase.BLOCK
    out = torch.empty(256 * PagedDecodeCase.KV_HEADS, dtype=torch.float32, device=dev)

    def run(layout, block_n, warps, stages, variant, num_sms):
        case = cases[layout]
        if variant == "loads":
            k, v = case.k, case.v
            for tables in case.tables:
                paged_stream[(case.batch, PagedDecodeCase.KV_HEADS)](
                    k, v, tables, out, case.ctx, k.stride(0), k.stride(1), k.stride(2),
                    tables.stride(0), BLOCK_N=block_n, HEAD_DIM=d, KV_BLOCK_SIZE=bs,
                    num_warps=warps, num_stages=stages,
                )  # fmt: skip
            return
        cfg = DecodeConfig(
            block_n, warps, stages, tile_in_block=variant != "token", tma=variant == "tma"
        )
        case.run(cfg, num_sms)

    return run, cases["nhd"].nbytes


def main(argv=None) -> dict:
    args = parse_args(argv)
    import green_ctx

    dev = torch.device("cuda")
    total_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    x = torch.ones(int(args.gib * 2**30) // 2, dtype=torch.bfloat16, device=dev)
    nbytes = x.numel() * 2
    out = torch.empty(1 << 16, dtype=torch.float32, device=dev)
    stream = stream_kernel()
    try:
        bulk = bulk_kernel() if args.bulk else None
    except Exception as exc:  # noqa: BLE001 - CuPy missing or no sm_90: skip, say why
        print(f"bulk kernel unavailable: {exc!r}")
        bulk = None
    attn, attn_bytes = attention_case(dev, args.gib) if args.attn else (None, 0)

    def cases(sms: int):
        if not args.no_torch:
            yield "torch", lambda: x.sum(), nbytes
        for spec in args.stream:
            tile_kb, warps, stages, progs = map(int, spec.split(","))
            yield (
                f"stream {spec}",
                lambda a=(tile_kb, warps, stages, progs * sms): stream(x, out, *a),
                nbytes,
            )
        for spec in args.bulk if bulk else []:
            chunk_kb, stages, blocks = map(int, spec.split(","))
            yield (
                f"bulk {spec}",
                lambda a=(chunk_kb, stages, blocks * sms): bulk(x, out, *a),
                nbytes,
            )
        for spec in args.attn:
            layout, block_n, warps, stages, *variant = spec.split(",")
            attn_args = (layout, int(block_n), int(warps), int(stages), "".join(variant), sms)
            yield (
                f"attn {spec}",
                lambda a=attn_args: attn(*a),
                attn_bytes,
            )

    rows = []
    print(f"{torch.cuda.get_device_name(dev)}, {total_sms} SMs")
    for n in [*args.sms, total_sms]:
        split = green_ctx.create_green_split(dev, n) if n < total_sms else None
        try:
            s = split.first.stream if split else torch.cuda.current_stream()
            sms = split.first.sm_count if split else total_sms
            for name, fn, b in cases(sms):
                ms = concurrent_ms({name: (s, fn)}, args.reps)[0]
                gbs = b / (ms * 1e-3) / 1e9
                rows.append(dict(sms=sms, kernel=name, ms=ms, gbs=gbs, gbs_per_sm=gbs / sms))
                print(f"{sms:>4} SMs  {name:<22} {gbs:8.0f} GB/s  {gbs / sms:6.1f} GB/s/SM")
        finally:
            if split:
                split.close()
    payload = dict(
        script="benchmarks/sm_bandwidth.py",
        environment=environment(dev),
        args=vars(args),
        rows=rows,
    )
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
