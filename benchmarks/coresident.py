"""Attention next to GEMMs, dependency-free: the best case any Attention/FFN overlap could reach.

Green partitions give each stage its own SMs, so each keeps only its share of them
(``partition_bw.py``: every split lost, 0.66-0.98x). The other way to overlap a memory-bound and a
compute-bound kernel is to let both run on every SM: a GEMM whose programs leave room on each SM
(registers, shared memory, warp slots) for decode-attention programs next to them. Then the GEMM
keeps every tensor core, and attention streams the KV cache through every SM's load units; each
needs little of what the other is short of. NanoFlow's shipped Llama-3-8B configuration does this:
its decode-attention kernel runs on all of the A100's SMs next to its GEMMs (``gemv_num_blocks``).

This script times, at the Qwen3-8B shape, with no dependencies between the two:

- ``gemm``: one micro-batch's four layer GEMMs (QKV, O, gate/up, down at ``--m`` rows, weights
  rotated over ``--layers`` layers to defeat L2; ``--single-gemm``: the same FLOPs and weight bytes
  as one launch, so its programs never leave their SMs) with the persistent Triton GEMM
  (``kernels/triton_gemm.py``, one program per SM it runs on) at each ``--gemm-configs``
  (BM,BN,warps,stages, or ``auto``: its own plan);
- ``attention``: the paged decode-attention kernel over ``--batch`` sequences of ``--ctx`` tokens,
  one call per layer (block_n,warps,stages), or a streaming read of the same bytes without the
  math (``stream,...``: the traffic alone, a stand-in for a much faster attention kernel);
- ``both``: the two issued together, either on every SM (``--attention-sms 0``, two streams,
  ``--priority``: which stream the block scheduler serves first) or each on its own green
  partition (``--attention-sms N``), against the faster of cuBLAS and this GEMM plus the fastest
  decode-attention kernel, one after the other on the whole GPU ("serial"), and against the two
  kernels of the row back to back ("own serial").

It also prints each kernel's registers per thread and shared memory per program: what decides
how many programs of each fit on one SM together.

    python benchmarks/coresident.py --json OUT
    python benchmarks/coresident.py --single-gemm --attention-sms 0 16 32 \\
        --attention-configs 64,4,2 stream,32,8,2
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import PagedDecodeCase, concurrent_ms, environment, write_json  # noqa: E402
from benchmarks.gemm_partition import SHAPES_8B  # noqa: E402
from benchmarks.sm_bandwidth import stream_kernel  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--m", type=int, default=512, help="GEMM rows (one micro-batch)")
    p.add_argument("--batch", type=int, default=512, help="attention sequences")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument(
        "--gemm-configs", nargs="+", default=["auto", "128,128,4,3", "128,128,4,4", "128,128,8,3"]
    )
    p.add_argument(
        "--attention-sms",
        type=int,
        nargs="+",
        default=[0],
        help="0: both kernels on every SM (co-resident); N: attention alone on an N-SM green "
        "partition and the GEMM on the rest (the pipeline's placement)",
    )
    p.add_argument(
        "--attention-configs",
        nargs="+",
        default=["64,4,3", "64,4,2", "32,4,2"],
        help="decode attention as block_n,warps,stages, or stream,tile_kb,warps,programs_per_sm: "
        "a streaming read of the same bytes, no math (a stand-in for a much faster kernel)",
    )
    p.add_argument(
        "--priority", nargs="+", choices=("none", "gemm", "attention"), default=["none", "gemm"]
    )
    p.add_argument(
        "--single-gemm",
        action="store_true",
        help="one gate/up-shaped GEMM over every layer's weights instead of a launch per layer "
        "GEMM: its programs hold their SMs for the whole attention run (no kernel boundaries)",
    )
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--json", metavar="OUT")
    return p.parse_args(argv)


def kernel_resources(jit_fn) -> list[dict]:
    """Registers per thread and shared memory per program of every compiled variant of a Triton
    kernel (best effort: the cache layout is Triton's internal)."""
    out = []
    try:
        for cache in jit_fn.device_caches.values():
            for k in cache[0].values():
                out.append(
                    dict(regs=k.n_regs, spills=k.n_spills, shared=k.metadata.shared,
                         warps=k.metadata.num_warps)
                )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        out.append(dict(error=repr(e)))
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    import green_ctx
    from nanovllm.kernels import triton_attention, triton_gemm
    from nanovllm.kernels.triton_attention import DecodeConfig

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    dtype, m = torch.bfloat16, args.m
    kv_bytes = 2 * args.batch * args.ctx * 8 * 128 * 2
    case = PagedDecodeCase(dev, args.batch, args.ctx, args.layers * kv_bytes)
    flat = torch.randn(case.nbytes // 2, dtype=dtype, device=dev)  # the stream proxy's bytes
    partial = torch.empty(64 * sms, dtype=torch.float32, device=dev)
    read = stream_kernel()
    shapes = SHAPES_8B
    if args.single_gemm:  # the layers' FLOPs as one launch: N = their total over K = 4096
        shapes = (("all", sum(n * k for _, n, k in SHAPES_8B) * args.layers // 4096, 4096),)
    weights = [
        [torch.randn(n, k, dtype=dtype, device=dev) / k**0.5 for _, n, k in shapes]
        for _ in range(1 if args.single_gemm else args.layers)
    ]
    xs = {k: torch.randn(m, k, dtype=dtype, device=dev) for _, _, k in shapes}
    outs = {n: torch.empty(m, n, dtype=dtype, device=dev) for _, n, _ in shapes}

    def cublas():
        for layer in weights:
            for w in layer:
                torch.mm(xs[w.shape[1]], w.t(), out=outs[w.shape[0]])

    def gemm(config: str, programs: int):
        """Every GEMM on ``programs`` programs (one per SM where the GEMM runs)."""
        cfg = None if config == "auto" else tuple(int(v) for v in config.split(","))
        launchers = [
            triton_gemm.prepare(xs[w.shape[1]], w, outs[w.shape[0]], programs, config=cfg,
                                splits=None if cfg is None else 1)
            for layer in weights
            for w in layer
        ]  # fmt: skip
        return lambda: [launch() for launch in launchers]

    def attention(spec: str, num_sms: int):
        """Decode attention ("block_n,warps,stages") or the streaming read of the same bytes
        ("stream,tile_kb,warps,programs_per_sm") on ``num_sms`` SMs."""
        parts = spec.split(",")
        if parts[0] == "stream":  # sm_bandwidth.py's persistent read of 32 KB tiles
            tile_kb, warps, per_sm = (int(v) for v in parts[1:])
            return lambda: read(flat, partial, tile_kb, warps, 1, num_sms * per_sm)
        cfg = DecodeConfig(*(int(v) for v in parts))
        return lambda: case.run(cfg, None if num_sms == sms else num_sms)

    default = torch.cuda.current_stream()
    priority = {"none": (0, 0), "gemm": (-1, 0), "attention": (0, -1)}  # -1 is served first

    def alone(fn, stream=default) -> float:
        return concurrent_ms({"x": (stream, fn)}, args.reps)[0]

    cublas_ms = alone(cublas)
    gemm_ms = {c: alone(gemm(c, sms)) for c in args.gemm_configs}
    attn_ms = {spec: alone(attention(spec, sms)) for spec in args.attention_configs}
    real = [ms for spec, ms in attn_ms.items() if not spec.startswith("stream")]
    serial = min(cublas_ms, *gemm_ms.values()) + min(real or attn_ms.values())
    flops = 2 * m * sum(n * k for _, n, k in SHAPES_8B) * args.layers
    print(f"{torch.cuda.get_device_name(dev)}, {sms} SMs; GEMM M={m}, attention batch "
          f"{args.batch} x ctx {args.ctx}, {args.layers} layers")  # fmt: skip
    print(f"cuBLAS {cublas_ms:.3f} ms ({flops / cublas_ms / 1e9:.0f} TFLOP/s)")
    for key, ms in gemm_ms.items():
        print(f"triton {key}: {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s)")
    for spec, ms in attn_ms.items():
        print(f"attention {spec}: {ms:.3f} ms ({case.nbytes / ms / 1e6:.0f} GB/s)")
    print(f"serial reference (fastest GEMM + fastest attention kernel): {serial:.3f} ms")
    resources = dict(
        gemm=kernel_resources(triton_gemm._kernels()[0]),
        attention=kernel_resources(triton_attention._decode_split_kernel),
    )
    print("resources:", resources)
    rows = []
    for a_sms in args.attention_sms:
        split = green_ctx.create_green_split(dev, a_sms) if a_sms else None
        try:
            placements = (
                [(p, torch.cuda.Stream(priority=priority[p][1]),
                  torch.cuda.Stream(priority=priority[p][0]), sms, sms) for p in args.priority]
                if split is None
                else [("-", split.first.stream, split.second.stream, split.first.sm_count,
                       split.second.sm_count)]
            )  # fmt: skip
            for prio, sa, sg, n_attn, n_gemm in placements:
                for gkey, akey in itertools.product(args.gemm_configs, args.attention_configs):
                    gfn, afn = gemm(gkey, n_gemm), attention(akey, n_attn)
                    g_alone, a_alone = alone(gfn, sg), alone(afn, sa)
                    both, per = concurrent_ms({"g": (sg, gfn), "a": (sa, afn)}, args.reps)
                    row = dict(
                        attention_sms=a_sms, gemm_sms=n_gemm, gemm=gkey, attention=akey,
                        priority=prio, both_ms=both, gemm_in_overlap_ms=per["g"],
                        attention_in_overlap_ms=per["a"], gemm_alone_ms=g_alone,
                        attention_alone_ms=a_alone, speedup_vs_serial=serial / both,
                        speedup_vs_own_serial=(gemm_ms[gkey] + attn_ms[akey]) / both,
                    )  # fmt: skip
                    rows.append(row)
                    where = f"{a_sms}/{n_gemm}" if a_sms else f"same SMs, prio {prio}"
                    print(
                        f"{where:>21} | gemm {gkey:>11} | attn {akey:>14}: alone here "
                        f"{g_alone:.3f}/{a_alone:.3f}; both {both:.3f} ms (gemm {per['g']:.3f}, "
                        f"attn {per['a']:.3f}) -> {serial / both:.3f}x of serial, "
                        f"{row['speedup_vs_own_serial']:.3f}x of these two back to back"
                    )
        finally:
            if split is not None:
                split.close()
    best = max(rows, key=lambda r: r["speedup_vs_serial"])
    print("best:", best)
    payload = dict(
        script="benchmarks/coresident.py", environment=environment(dev), args=vars(args),
        cublas_ms=cublas_ms, gemm_ms=gemm_ms, attention_ms=attn_ms, serial_ms=serial,
        resources=resources, rows=rows,
    )  # fmt: skip
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
