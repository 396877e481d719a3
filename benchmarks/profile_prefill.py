"""Where a prefill step's time goes (GPU), against the bf16 matmul peak measured in the same run.

For each ``NSEQxLEN`` point (``NSEQ`` prompts of ``LEN`` tokens, no cached prefix), on a
random-weight model: the host's planning of the step (``plan_step`` + ``to_model_inputs``),
the forward plus the logits of the sampled rows timed with CUDA events (medians), and a
torch.profiler kernel-time breakdown of the same (``benchmarks.common.KERNEL_CATEGORIES``).
The GEMM share is then expressed as TFLOP/s of the GEMM kernels alone and of the whole forward;
the gap between the forward's wall time and its summed kernel time is the device idling on the
host (launches).

    python benchmarks/profile_prefill.py --shape 8b --points 3x512 8x1024 16x1024 --json OUT
    python benchmarks/profile_prefill.py --quick --device cpu   # control flow only
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    ModelCost,
    add_common_args,
    build_engine,
    environment,
    kernel_breakdown,
    measure_card,
    model_path,
    release_engine,
    resolve_device,
    time_fns,
    write_json,
)


def prefill_batch(num_seqs: int, length: int, vocab: int, block_size: int, seed: int = 0):
    """A ScheduledBatch of ``num_seqs`` fresh prompts of ``length`` tokens on consecutive blocks."""
    from nanovllm import SamplingParams
    from nanovllm.engine.scheduler import ScheduledBatch
    from nanovllm.engine.sequence import Sequence

    gen = torch.Generator().manual_seed(seed)
    per_seq = -(-length // block_size)
    seqs = []
    for i in range(num_seqs):
        ids = torch.randint(0, vocab, (length,), generator=gen).tolist()
        seq = Sequence(ids, SamplingParams(max_tokens=1), block_size)
        seq.block_table = list(range(i * per_seq, (i + 1) * per_seq))
        seqs.append(seq)
    return ScheduledBatch(is_prefill=True, seqs=seqs, num_new_tokens=[length] * num_seqs)


def host_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def profile_point(runner, num_seqs: int, length: int, cost: ModelCost, card, reps: int) -> dict:
    from nanovllm.engine.model_inputs import plan_step, to_model_inputs

    device = runner.device
    batch = prefill_batch(num_seqs, length, runner.runtime.hf_config.vocab_size, runner.block_size)
    plan = plan_step(batch, runner.block_size)
    inputs = to_model_inputs(plan, device, runner.backend)
    tokens = num_seqs * length

    def forward():
        hidden = runner.model(inputs.input_ids, inputs.positions, inputs.meta)
        return runner.model.compute_logits(hidden[inputs.logits_indices])

    row = {
        "num_seqs": num_seqs,
        "length": length,
        "tokens": tokens,
        "host_plan_ms": host_ms(lambda: plan_step(batch, runner.block_size), reps),
        "host_inputs_ms": host_ms(lambda: to_model_inputs(plan, device, runner.backend), reps),
    }
    row["forward_ms"] = time_fns({"forward": forward}, reps, 2, device)["forward"]
    gemm_flops = 2 * cost.matmul_params * tokens
    row["gemm_flops"] = gemm_flops
    row["forward_gemm_tflops"] = gemm_flops / (row["forward_ms"] * 1e-3) / 1e12
    if device.type == "cuda":
        kernels = kernel_breakdown(forward, steps=max(2, reps // 2))
        row["kernel_ms"] = kernels
        row["kernel_total_ms"] = sum(kernels.values())
        row["idle_ms"] = row["forward_ms"] - row["kernel_total_ms"]
        if kernels.get("gemm"):
            row["gemm_kernel_tflops"] = gemm_flops / (kernels["gemm"] * 1e-3) / 1e12
        row["forward_over_peak"] = row["forward_gemm_tflops"] / card["peak_tflops"]
    return row


def print_row(row: dict, card: dict) -> None:
    print(
        f"\n{row['num_seqs']} x {row['length']} = {row['tokens']} tokens: forward+logits "
        f"{row['forward_ms']:.2f} ms, GEMM flops over the forward {row['forward_gemm_tflops']:.0f} "
        f"TFLOP/s; host plan {row['host_plan_ms']:.2f} ms + inputs {row['host_inputs_ms']:.2f} ms"
    )
    if "kernel_ms" in row:
        ranked = sorted(row["kernel_ms"].items(), key=lambda kv: -kv[1])
        print("  kernels (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in ranked))
        print(
            f"  kernels sum {row['kernel_total_ms']:.2f} ms, device idle {row['idle_ms']:.2f} ms; "
            f"GEMM kernels {row.get('gemm_kernel_tflops', 0):.0f} TFLOP/s; the forward at "
            f"{row['forward_over_peak']:.0%} of the {card['peak_tflops']:.0f} TFLOP/s peak"
        )


def parse_points(p, specs: list[str], option: str = "--points") -> list[tuple[int, int]]:
    points = []
    for s in specs:
        try:
            n, length = (int(x) for x in s.lower().split("x"))
        except ValueError:
            p.error(f"{option} {s!r}: write NSEQxLEN, e.g. 3x512")
        if n < 1 or length < 1:
            p.error(f"{option} {s!r}: both numbers must be >= 1")
        points.append((n, length))
    return points


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="8b", choices=("tiny", "0.6b", "8b"))
    p.add_argument("--points", nargs="+", default=["3x512", "8x1024", "16x1024"], help="NSEQxLEN")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--max-model-len", type=int, default=4096)
    add_common_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.shape, args.points, args.reps = "tiny", ["2x32"], 2
    points = parse_points(p, args.points)
    device = resolve_device(args.device)
    tokens = max(n * length for n, length in points)
    llm = build_engine(
        model_path(args.shape),
        device,
        True,
        max_model_len=args.max_model_len,
        max_num_batched_tokens=max(tokens, 16384),
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=True,  # no decode graphs: this profiles prefill only
    )
    runner = llm.model_runner
    blocks = max(n * -(-length // runner.block_size) for n, length in points)
    if blocks > runner.runtime.num_kvcache_blocks:
        raise SystemExit(f"the points need {blocks} KV blocks; the cache has fewer")
    cost = ModelCost.from_config(runner.runtime.hf_config, runner.dtype.itemsize)
    card = measure_card(device, runner.dtype, quick=args.quick or device.type != "cuda")
    env = environment(device)
    print(f"card: {env['card']}; {args.shape}; matmul peak {card['peak_tflops']:.0f} TFLOP/s")
    rows = []
    for n, length in points:
        rows.append(profile_point(runner, n, length, cost, card, args.reps))
        print_row(rows[-1], card)
    payload = {"script": "benchmarks/profile_prefill.py", "environment": env, "args": vars(args)}
    payload.update(card=card, results=rows)
    write_json(args.json, payload)
    release_engine(llm)
    return payload


if __name__ == "__main__":
    main()
