"""Attention and GEMMs on the same SMs at once: what co-residence gives without any partition.

Green partitions give each stage its own SMs, so each keeps only its share of them
(``partition_bw.py``: every split lost, 0.66-0.98x). The other way to overlap a memory-bound and a
compute-bound kernel is to let both run on every SM: a GEMM whose programs leave room on each SM
(registers, shared memory, warp slots) for decode-attention programs next to them. Then the GEMM
keeps every tensor core, and attention streams the KV cache through every SM's load units; each
needs little of what the other is short of. NanoFlow's shipped Llama-3-8B configuration does this:
its decode-attention kernel runs on all of the A100's SMs next to its GEMMs (``gemv_num_blocks``).

This script times, at the Qwen3-8B shape and dependency-free (the best case for a pipeline):

- ``gemm``: one micro-batch's four layer GEMMs (QKV, O, gate/up, down at ``--m`` rows, weights
  rotated over ``--layers`` layers to defeat L2) with the persistent Triton GEMM
  (``kernels/triton_gemm.py``) at each ``--gemm-configs`` (BM,BN,warps,stages; ``auto``: its own
  plan) and ``--gemm-programs`` (``sms``: one program per SM, ``tiles``: one per output tile);
- ``attention``: the paged decode-attention kernel (Triton) over ``--batch`` sequences of
  ``--ctx`` tokens, one call per layer, at each ``--attention-configs`` (block_n,warps,stages);
- ``both``: the two issued together on two streams of the whole GPU (``--priority``: which stream
  the block scheduler serves first, or none), against the faster of cuBLAS and this GEMM plus the
  attention run one after the other.

It also prints each kernel's registers per thread and shared memory per program: what decides
how many programs of each fit on one SM together.

    python benchmarks/coresident.py --json OUT
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--m", type=int, default=512, help="GEMM rows (one micro-batch)")
    p.add_argument("--batch", type=int, default=512, help="attention sequences")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument(
        "--gemm-configs", nargs="+", default=["auto", "128,128,4,3", "128,128,4,4", "128,128,8,3"]
    )
    p.add_argument("--gemm-programs", nargs="+", choices=("sms", "tiles"), default=["sms", "tiles"])
    p.add_argument("--attention-configs", nargs="+", default=["64,4,3", "64,4,2", "32,4,2"])
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
    from nanovllm.kernels import triton_attention, triton_gemm
    from nanovllm.kernels.triton_attention import DecodeConfig

    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    dtype, m = torch.bfloat16, args.m
    kv_bytes = 2 * args.batch * args.ctx * 8 * 128 * 2
    case = PagedDecodeCase(dev, args.batch, args.ctx, args.layers * kv_bytes)
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

    def bounded(config: str, programs: str):
        cfg = None if config == "auto" else tuple(int(v) for v in config.split(","))
        launchers = []
        for layer in weights:
            for w in layer:
                n, k = w.shape
                bm, bn = (cfg or triton_gemm.plan(m, n, k, sms)[0])[:2]
                grid = sms if programs == "sms" else -(-m // bm) * (n // bn)
                splits = None if cfg is None else 1
                launchers.append(
                    triton_gemm.prepare(xs[k], w, outs[n], grid, config=cfg, splits=splits)
                )
        return lambda: [launch() for launch in launchers]

    def attention(spec: str):
        block_n, warps, stages = (int(v) for v in spec.split(","))
        cfg = DecodeConfig(block_n, warps, stages)
        return lambda: case.run(cfg)

    default = torch.cuda.current_stream()
    streams = {
        "none": (torch.cuda.Stream(), torch.cuda.Stream()),
        # (gemm stream, attention stream); priority -1 is served first by the block scheduler
        "gemm": (torch.cuda.Stream(priority=-1), torch.cuda.Stream(priority=0)),
        "attention": (torch.cuda.Stream(priority=0), torch.cuda.Stream(priority=-1)),
    }

    def alone(fn) -> float:
        return concurrent_ms({"x": (default, fn)}, args.reps)[0]

    cublas_ms = alone(cublas)
    variants = itertools.product(args.gemm_configs, args.gemm_programs)
    gemms = {(c, p): bounded(c, p) for c, p in variants}
    gemm_ms = {key: alone(fn) for key, fn in gemms.items()}
    attns = {spec: attention(spec) for spec in args.attention_configs}
    attn_ms = {spec: alone(fn) for spec, fn in attns.items()}
    serial = min(cublas_ms, *gemm_ms.values()) + min(attn_ms.values())
    flops = 2 * m * sum(n * k for _, n, k in SHAPES_8B) * args.layers
    print(f"{torch.cuda.get_device_name(dev)}, {sms} SMs; GEMM M={m}, attention batch "
          f"{args.batch} x ctx {args.ctx}, {args.layers} layers")  # fmt: skip
    print(f"cuBLAS {cublas_ms:.3f} ms ({flops / cublas_ms / 1e9:.0f} TFLOP/s)")
    for key, ms in gemm_ms.items():
        print(f"triton {key}: {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s)")
    for spec, ms in attn_ms.items():
        print(f"attention {spec}: {ms:.3f} ms ({case.nbytes / ms / 1e6:.0f} GB/s)")
    print(f"serial reference (fastest GEMM + fastest attention): {serial:.3f} ms")
    resources = dict(
        gemm=kernel_resources(triton_gemm._kernels()[0]),
        attention=kernel_resources(triton_attention._decode_split_kernel),
    )
    print("resources:", resources)
    rows = []
    for (gkey, gfn), (akey, afn), prio in itertools.product(
        gemms.items(), attns.items(), args.priority
    ):
        sg, sa = streams[prio]
        both, per = concurrent_ms({"g": (sg, gfn), "a": (sa, afn)}, args.reps)
        row = dict(
            gemm=list(gkey), attention=akey, priority=prio, both_ms=both,
            gemm_in_overlap_ms=per["g"], attention_in_overlap_ms=per["a"],
            gemm_alone_ms=gemm_ms[gkey], attention_alone_ms=attn_ms[akey],
            speedup_vs_serial=serial / both,
            speedup_vs_own_serial=(gemm_ms[gkey] + attn_ms[akey]) / both,
        )  # fmt: skip
        rows.append(row)
        print(
            f"gemm {gkey[0]:>12} {gkey[1]:>5} | attn {akey:>7} | prio {prio:>9}: both "
            f"{both:.3f} ms (gemm {per['g']:.3f}, attn {per['a']:.3f}) -> {serial / both:.3f}x "
            f"of serial ({row['speedup_vs_own_serial']:.3f}x of these two back to back)"
        )
    best = max(rows, key=lambda r: r["speedup_vs_serial"])
    print("best:", best)
    payload = dict(
        script="benchmarks/coresident.py", environment=environment(dev), args=vars(args),
        cublas_ms=cublas_ms, gemm_ms={"/".join(k): v for k, v in gemm_ms.items()},
        attention_ms=attn_ms, serial_ms=serial, resources=resources, rows=rows,
    )  # fmt: skip
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
