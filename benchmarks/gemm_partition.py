"""What the FFN stage's GEMMs keep of their speed on a green partition, and which kernels do.

The pipeline's FFN partition runs one micro-batch's GEMMs of every layer (QKV, O, gate/up, down
projections at the Qwen3-8B shapes, nn.Linear weights [N, K]) on what the attention partition
leaves. cuBLAS keeps only 0.59-0.67 of its whole-GPU speed there at M = 512
(``partition_bw.py``). This script times one layer's four GEMMs, each on its own weights with
enough layers in rotation to defeat L2, with

- ``cublas``: ``F.linear``, cuBLAS told the partition's SM count (``set_cublas_sm_budget``);
- ``triton``: the pipeline's persistent Triton GEMM (``nanovllm/kernels/triton_gemm.py``: TMA
  tensor descriptors, one program per SM of the partition) over ``--configs``: ``auto`` (its
  own tile and split-K plan, as the pipeline runs it) or BM,BN,warps,stages[,splits] (BK is 64);
  the best config per shape is kept, and every config's time is in the JSON,

on the whole GPU and alone on FFN partitions of 132 - ``--attention-sms`` SMs, and names the
kernels cuBLAS picks on the whole GPU and on the first partition (``torch.profiler``).
"Retention" is a partition's speed over the same implementation's whole-GPU speed; "vs cuBLAS"
over cuBLAS's whole-GPU speed: what the pipeline's FFN stage would run at.

    python benchmarks/gemm_partition.py --json OUT
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import LAYER_GEMMS_8B as SHAPES_8B  # noqa: E402
from benchmarks.common import concurrent_ms, environment, write_json  # noqa: E402

DEFAULT_CONFIGS = ("auto", "128,256,8,3", "128,128,4,4", "64,256,4,4", "128,128,4,4,3")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", default=[512, 1024], help="rows (micro-batch)")
    p.add_argument("--attention-sms", type=int, nargs="+", default=[16, 24, 32])
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    p.add_argument("--layers", type=int, default=6, help="weight sets in rotation (L2 defeat)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-profile", action="store_true", help="skip naming cuBLAS's kernels")
    p.add_argument("--json", metavar="OUT")
    return p.parse_args(argv)


def parse_config(spec: str) -> tuple:
    """ "auto" (the kernel's own tile and split-K plan, as the pipeline runs it), or
    BM,BN,warps,stages[,splits] (splits default 1)."""
    if spec == "auto":
        return ("auto",)
    values = tuple(int(v) for v in spec.split(","))
    if len(values) not in (4, 5):
        raise ValueError(f"config {spec!r}: auto or BM,BN,warps,stages[,splits]")
    return values[:4] + (values[4] if len(values) == 5 else 1,)


def cublas_kernels(fn, stream) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with torch.cuda.stream(stream):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    return sorted(set(names), key=names.index)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import green_ctx
    from nanovllm.pipeline.sm_budget import set_cublas_sm_budget

    dev = torch.device("cuda")
    total_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    dtype = torch.bfloat16
    torch.manual_seed(0)
    weights = {
        name: [torch.randn(n, k, dtype=dtype, device=dev) * 0.02 for _ in range(args.layers)]
        for name, n, k in SHAPES_8B
    }
    from nanovllm.kernels.triton_gemm import prepare

    configs = [parse_config(c) for c in args.configs]
    default = torch.cuda.current_stream()
    partitions = [("whole", total_sms, default, None)]
    splits = []
    for a in args.attention_sms:
        split = green_ctx.create_green_split(dev, a)
        splits.append(split)
        ffn = split.second
        partitions.append((f"{split.first.sm_count}/{ffn.sm_count}", ffn.sm_count, ffn.stream, ffn))
    result = {"env": environment(dev), "args": vars(args), "rows": [], "kernels": {}}
    print(f"{torch.cuda.get_device_name(dev)}, {total_sms} SMs")
    try:
        for m in args.m:
            x = {name: torch.randn(m, k, dtype=dtype, device=dev) for name, _, k in SHAPES_8B}
            out = {name: torch.empty(m, n, dtype=dtype, device=dev) for name, n, _ in SHAPES_8B}

            def cublas(name, sms, x=x, out=out):
                def run():
                    with set_cublas_sm_budget(None if sms == total_sms else sms, total_sms):
                        for w in weights[name]:
                            F.linear(x[name], w, out=out[name])

                return run

            runs = {}  # (name, config) -> run(programs) per weight set
            for name, _, _ in SHAPES_8B:
                for cfg in configs:
                    try:
                        fns = {
                            sms: [
                                prepare(x[name], w, out[name], sms)
                                if cfg == ("auto",)
                                else prepare(x[name], w, out[name], sms, cfg[:4], cfg[4])
                                for w in weights[name]
                            ]
                            for _, sms, _, _ in partitions
                        }
                    except Exception as e:  # noqa: BLE001 - a config this Triton cannot build
                        print(f"  skip {name} {cfg}: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    runs[(name, cfg)] = fns
            checked = set()
            for label, sms, stream, _ in partitions:
                row = {"m": m, "partition": label, "ffn_sms": sms, "shapes": {}}
                for name, n, k in SHAPES_8B:
                    flop = 2 * m * n * k * args.layers
                    c_ms, _ = concurrent_ms({"g": (stream, cublas(name, sms))}, args.reps)
                    ref = out[name].clone()
                    best, every = (float("inf"), None), {}
                    for (shape, cfg), fns in list(runs.items()):
                        if shape != name:
                            continue
                        try:
                            fn = lambda fns=fns[sms]: [f() for f in fns]  # noqa: E731
                            t_ms, _ = concurrent_ms({"g": (stream, fn)}, args.reps)
                        except Exception as e:  # noqa: BLE001
                            print(f"  {name} {cfg}: {type(e).__name__}: {str(e)[:120]}")
                            del runs[(shape, cfg)]  # never timed again
                            continue
                        if (name, cfg, label) not in checked:
                            diff = out[name].float() - ref.float()
                            err = (diff.norm() / ref.float().norm()).item()
                            assert err < 1e-2, f"{name} {cfg} on {label}: relative error {err}"
                            checked.add((name, cfg, label))
                        every[",".join(map(str, cfg))] = t_ms / args.layers
                        best = min(best, (t_ms, cfg))
                    row["shapes"][name] = {
                        "cublas_ms": c_ms / args.layers,
                        "cublas_tflops": flop / c_ms / 1e9,
                        "triton_ms": best[0] / args.layers,
                        "triton_tflops": flop / best[0] / 1e9,
                        "triton_config": best[1],
                        "triton_ms_per_config": every,
                    }
                for impl in ("cublas", "triton"):
                    row[f"{impl}_layer_ms"] = sum(v[f"{impl}_ms"] for v in row["shapes"].values())
                result["rows"].append(row)
                print(
                    f"M={m:5d} {label:>7}: layer GEMMs cuBLAS "
                    f"{row['cublas_layer_ms'] * 1e3:7.1f} us, Triton "
                    f"{row['triton_layer_ms'] * 1e3:7.1f} us  "
                    + " ".join(
                        f"{s}:{v['cublas_tflops']:.0f}/{v['triton_tflops']:.0f}"
                        for s, v in row["shapes"].items()
                    )
                )
            if not args.no_profile:
                for label, sms, stream, _ in partitions[:2]:
                    key = f"M={m} {label}"
                    result["kernels"][key] = {
                        name: cublas_kernels(cublas(name, sms), stream) for name, _, _ in SHAPES_8B
                    }
                    print(key, result["kernels"][key])
    finally:
        for split in splits:
            split.close()
    whole = {r["m"]: r for r in result["rows"] if r["partition"] == "whole"}
    print("\nretention (partition / whole, same implementation) and vs cuBLAS whole:")
    for r in result["rows"]:
        w = whole[r["m"]]
        c, t = r["cublas_layer_ms"], r["triton_layer_ms"]
        r["cublas_retention"] = w["cublas_layer_ms"] / c
        r["triton_retention"] = w["triton_layer_ms"] / t
        r["triton_vs_cublas_whole"] = w["cublas_layer_ms"] / t
        print(
            f"M={r['m']:5d} {r['partition']:>7} ({r['ffn_sms']} SMs, share "
            f"{r['ffn_sms'] / total_sms:.2f}): cuBLAS {r['cublas_retention']:.2f}, Triton "
            f"{r['triton_retention']:.2f}, Triton vs cuBLAS whole {r['triton_vs_cublas_whole']:.2f}"
        )
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
