"""Where ``bench.py``'s end-to-end time goes: per engine step, host and device phases.

Runs bench.py's workload (same arguments) once, timing each phase of every engine step:

- ``schedule``: the scheduler's decision (host);
- ``plan``: flattening the batch into model inputs (host);
- ``forward``: host-to-device copies, the forward (graph replay for decode) and the logits,
  timed to completion with a device synchronisation;
- ``sample``: sampling and the copy of the tokens back to the host;
- ``postprocess``: appending tokens, finishing requests (host).

The synchronisation after ``forward`` removes the little overlap the engine has (the host builds
the sampling parameters while the GPU runs), so the profiled run is slightly slower than bench.py.
The synchronisation also removes the overlap that ``async_scheduling`` exists for, so the
engine runs synchronously here unless ``--async-scheduling 1`` is given (then the phases are the
same work, issued ahead but timed to completion); measure that option's gain with
``benchmarks/option_sweep.py --option async_scheduling --values 0 1``.
Prints the totals by phase and by step kind, decode steps by batch size, prefill TFLOP/s,
preemptions and recomputed tokens.

With ``--tensor-parallel-size N`` every rank's side of each step is timed too
(``benchmarks/tp_profile.py``; the workers get their timers the way the tensor-parallel tests
inject faults, and send their records back at shut-down): per rank, the worker's wait for the
plan and its decoding, rank 0's sending of it, ``to_model_inputs``, the forward, the device
span (CUDA events), each all-reduce and all-gather (CUDA events; inside replayed CUDA graphs
they cannot be timed per call: ``--enforce-eager`` times them on every step), the estimated
wait for the other rank and the start lag between ranks, with the batch rows and KV blocks;
aggregated per step kind (prefill, decode by batch range) into a table per rank and the JSON
(``summary.tensor_parallel``, per-step rows included). The output says what was not measured.

    python benchmarks/profile_e2e.py --shape 8b --json OUT
    python benchmarks/profile_e2e.py --engines 2   # the first engine of a process vs the next
    python benchmarks/profile_e2e.py --quick --device cpu
    python benchmarks/profile_e2e.py --shape 8b --tensor-parallel-size 2 --json OUT
    python benchmarks/profile_e2e.py --shape 8b --tensor-parallel-size 2 --enforce-eager
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench  # noqa: E402
from benchmarks import tp_profile  # noqa: E402
from benchmarks.common import (  # noqa: E402
    build_engine,
    environment,
    format_gc_pauses,
    free_memory,
    gc_pauses,
    kernel_compiles,
    measure_card,
    model_path,
    release_engine,
    resolve_device,
    timed_generate,
    write_json,
)
from nanovllm import SamplingParams  # noqa: E402
from nanovllm.engine import model_runner as model_runner_module  # noqa: E402
from nanovllm.engine import tp_workers  # noqa: E402

PHASES = ("schedule", "plan", "forward", "sample", "postprocess")
# Step kinds: "mixed" steps (``--enable-mixed-steps 1``) carry decode rows and prefill chunks;
# their tokens are both, their time is not in the prefill TFLOP/s.
KINDS = ("prefill", "mixed", "decode")


class StepRecorder:
    """Wraps the engine's phase functions on this engine only (``plan_step`` module-wide, until
    ``restore``) and records one row per step."""

    def __init__(self, llm, device: torch.device):
        self.llm, self.device = llm, device
        self.steps: list[dict] = []
        self._current: dict = {}
        runner, scheduler = llm.model_runner, llm.scheduler
        self._plan_step = model_runner_module.plan_step
        self._wrap(scheduler, "schedule", "schedule")
        self._wrap(runner, "execute", "forward", sync=True)
        self._wrap(runner, "_sample", "sample")
        self._wrap(runner, "collect", "sample")  # the tokens' copy to the host
        self._wrap(scheduler, "postprocess", "postprocess")
        original_plan = self._plan_step

        def plan(batch, block_size, *args):
            t = time.perf_counter()
            out = original_plan(batch, block_size, *args)
            self._current["plan"] = time.perf_counter() - t
            self._current["context"] = sum(out.context_lens) if out.context_lens else 0
            self._current["decode_rows"] = out.num_decode_rows
            blocks = llm.scheduler.block_manager
            self._current["kv_used"] = blocks.num_blocks - blocks.num_free_blocks
            return out

        model_runner_module.plan_step = plan
        original_step = llm.step

        def step():
            self._current = dict.fromkeys(PHASES, 0.0)
            t = time.perf_counter()
            finished, n = original_step()
            if n:
                row = self._current
                mixed_rows = row.get("decode_rows", 0) if n > 0 else 0  # a mixed step's decodes
                kind = "decode" if n < 0 else "mixed" if mixed_rows else "prefill"
                row.update(kind=kind, n=abs(n) + mixed_rows)
                row["wall"] = time.perf_counter() - t
                self.steps.append(row)
            return finished, n

        llm.step = step

    def _wrap(self, obj, name: str, phase: str, sync: bool = False) -> None:
        original = getattr(obj, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = original(*args, **kwargs)
            if sync and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._current[phase] += time.perf_counter() - t
            return out

        setattr(obj, name, timed)

    def restore(self) -> None:
        model_runner_module.plan_step = self._plan_step


def bucket(n: int) -> str:
    hi = 1 << max(0, (n - 1).bit_length())
    lo = hi // 2 + 1
    return f"{lo}-{hi}" if lo < hi else str(hi)


def summarise(steps: list[dict], total_s: float, params_count: int, peak_tflops: float) -> dict:
    out: dict = {"total_s": total_s, "steps": len(steps)}
    for kind in KINDS:
        rows = [r for r in steps if r["kind"] == kind]
        kind_out = {"steps": len(rows), "tokens": sum(r["n"] for r in rows)}
        if kind == "mixed":
            kind_out["decode_rows"] = sum(r["decode_rows"] for r in rows)
        kind_out["wall_s"] = sum(r["wall"] for r in rows)
        for phase in PHASES:
            kind_out[f"{phase}_s"] = sum(r[phase] for r in rows)
        out[kind] = kind_out
    prefill = out["prefill"]
    if prefill["forward_s"] > 0:
        # 2 FLOPs per GEMM weight per token (attention FLOPs excluded)
        prefill["gemm_tflops"] = 2 * params_count * prefill["tokens"] / prefill["forward_s"] / 1e12
        prefill["of_peak"] = prefill["gemm_tflops"] / peak_tflops
    by_batch: dict[str, dict] = defaultdict(lambda: dict(steps=0, tokens=0, wall_s=0.0, fwd_s=0.0))
    for r in steps:
        if r["kind"] == "decode":
            b = by_batch[bucket(r["n"])]
            b["steps"] += 1
            b["tokens"] += r["n"]
            b["wall_s"] += r["wall"]
            b["fwd_s"] += r["forward"] + r["sample"]
            b["context_sum"] = b.get("context_sum", 0) + r.get("context", 0)
    for b in by_batch.values():
        b["mean_context"] = b.pop("context_sum", 0) / max(b["tokens"], 1)
        b["ms_per_step"] = 1e3 * b["wall_s"] / b["steps"]
        b["tok_s"] = b["tokens"] / b["wall_s"]
    order = sorted(by_batch, key=lambda name: int(name.split("-")[-1]))
    out["decode_by_batch"] = {name: by_batch[name] for name in order}
    out["untracked_s"] = total_s - sum(r["wall"] for r in steps)
    return out


def print_summary(s: dict, tokens: int) -> None:
    print(f"\n{tokens} output tokens in {s['total_s']:.2f} s ({tokens / s['total_s']:.0f} tok/s)")
    phases = " ".join(f"{p:>11}" for p in PHASES)
    print(f"{'kind':8} {'steps':>6} {'tokens':>8} {'wall s':>8} {phases}")
    for kind in KINDS:
        k = s[kind]
        if kind == "mixed" and not k["steps"]:
            continue
        cells = " ".join(f"{k[p + '_s']:>11.2f}" for p in PHASES)
        print(f"{kind:8} {k['steps']:>6} {k['tokens']:>8} {k['wall_s']:>8.2f} {cells}")
    if "gemm_tflops" in s["prefill"]:
        print(
            f"prefill forward: {s['prefill']['gemm_tflops']:.0f} TFLOP/s (GEMM FLOPs only) = "
            f"{s['prefill']['of_peak']:.0%} of the matmul peak"
        )
    print(f"outside steps (generate loop): {s['untracked_s']:.2f} s")
    print(f"preemptions: {s['preemptions']}; recomputed prefill tokens: {s['recomputed_tokens']}")
    header = ("decode batch", "steps", "ms/step", "ctx", "tok/s", "wall s")
    print("\n" + " ".join(f"{h:>{w}}" for h, w in zip(header, (12, 6, 8, 6, 8, 7))))
    for name, b in s["decode_by_batch"].items():
        print(
            f"{name:>12} {b['steps']:>6} {b['ms_per_step']:>8.2f} {b['mean_context']:>6.0f} "
            f"{b['tok_s']:>8.0f} {b['wall_s']:>7.2f}"
        )


def gemm_params(model: torch.nn.Module) -> int:
    """The weights a prefill token multiplies (this rank's shard): the decoder layers' matrices.
    The embedding is a lookup, and the LM head runs on the sampled rows only."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.dim() == 2 and "embed_tokens" not in name and "lm_head" not in name
    )


def profile_engine(args, path: str, device, prompts, params, peak_tflops: float) -> dict:
    """Build an engine, warm up as bench.py does, profile one timed run, close the engine."""
    options = bench.engine_options(args, args.pipeline)
    tp = args.tensor_parallel_size > 1
    records_dir = tempfile.TemporaryDirectory(prefix="profile_e2e_tp_") if tp else None
    real_worker_main = tp_workers._worker_main
    if tp:  # each worker installs its own timers (see benchmarks/tp_profile.py)
        tp_workers._worker_main = functools.partial(
            tp_profile.profiled_worker_main, records_dir.name
        )
    try:
        llm = build_engine(path, device, args.load_format == "dummy", **options)
    finally:
        tp_workers._worker_main = real_worker_main
    timers = tp_profile.RankTimers(0, llm.runtime.device) if tp else None
    if tp:  # before the warm-up: every rank's records then start at the same step
        timers.install(llm.model_runner.workers)
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)
    recorder = StepRecorder(llm, device)
    preempted_before = llm.scheduler.num_preemptions
    first = len(timers.records) if tp else 0
    try:
        with kernel_compiles() as compiled, gc_pauses() as gc_stats:
            seconds, tokens = timed_generate(llm, prompts, params, device)
    finally:
        recorder.restore()
        if tp:
            timers.restore()
    last = len(timers.records) if tp else 0
    summary = summarise(recorder.steps, seconds, gemm_params(llm.model_runner.model), peak_tflops)
    summary["preemptions"] = llm.scheduler.num_preemptions - preempted_before
    mixed = summary["mixed"]
    prefilled = summary["prefill"]["tokens"] + mixed["tokens"] - mixed.get("decode_rows", 0)
    summary["recomputed_tokens"] = prefilled - sum(map(len, prompts))
    summary["num_kvcache_blocks"] = llm.runtime.num_kvcache_blocks
    summary["prefill_admission_batch"] = llm.scheduler.admission_batch
    summary["compiles_in_timed_run"] = compiled
    summary["gc_pauses"] = gc_stats
    print_summary(summary, tokens)
    print(f"garbage collector: {format_gc_pauses(gc_stats)}")
    if compiled:
        print(f"compiled inside the timed run: {compiled}")
    block_size = llm.config.kvcache_block_size
    release_engine(llm)  # the workers write their records as they shut down
    if tp:
        try:
            workers = tp_profile.read_worker_records(records_dir.name, args.tensor_parallel_size)
        finally:
            records_dir.cleanup()
        ranks = [timers.records[first:last]]
        ranks += [workers[r][first:last] for r in range(1, args.tensor_parallel_size)]
        rows = tp_profile.merge_steps(recorder.steps, ranks)
        report = dict(
            world_size=args.tensor_parallel_size,
            # execute records each rank sent back, the warm-up included (first: the timed run's)
            records_per_rank=[len(timers.records)] + [len(w) for _, w in sorted(workers.items())],
            first_timed_record=first,
            num_kvcache_blocks=summary["num_kvcache_blocks"],
            block_size=block_size,
            groups=tp_profile.aggregate(rows, bucket),
            totals=tp_profile.totals(rows),
            notes=tp_profile.notes(rows, device),
            steps=rows,
        )
        tp_profile.print_report(report)
        summary["tensor_parallel"] = report
    free_memory()
    return dict(tokens=tokens, summary=summary)


def main(argv: list[str] | None = None) -> dict:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument(
        "--engines",
        type=int,
        default=1,
        help="profile this many engines one after another in this process (the first of a "
        "process may differ from the rest: what it does first, the others find done)",
    )
    own, rest = extra.parse_known_args(argv)
    if own.engines < 1:
        raise ValueError(f"--engines {own.engines}: profile at least 1 engine (--engines 1)")
    args = bench.parse_args(rest)
    if args.async_scheduling is None:  # its overlap would be timed away (see above)
        args.async_scheduling = 0
    # bench.py's options that this script cannot act on are refused, not ignored
    for flag, given in (
        ("--compare-pipeline", args.compare_pipeline),
        ("--hf-baseline", args.hf_baseline),
        ("--rounds", args.rounds != 1),
    ):
        if given:
            raise ValueError(f"{flag}: profile_e2e.py profiles single engines (use --engines N)")
    device = resolve_device(args.device)
    path = args.model or model_path(args.shape)
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path)
    prompts, params = bench.workload(args, hf_config.vocab_size)
    # The matmul peak of this card, measured before any engine holds memory: the prefill's
    # TFLOP/s are reported against it. (Off CUDA the small, quick measurement.)
    card = measure_card(
        device,
        torch.bfloat16 if device.type == "cuda" else torch.float32,
        args.quick or device.type != "cuda",
    )
    print(f"matmul peak: {card['peak_tflops']:.0f} TFLOP/s ({card['matmul_dtype']})")
    runs = []
    for i in range(own.engines):
        print(f"\n=== engine {i + 1} of {own.engines}")
        runs.append(profile_engine(args, path, device, prompts, params, card["peak_tflops"]))
    payload = {
        "script": "benchmarks/profile_e2e.py",
        "environment": environment(device),
        "args": {**vars(args), "engines": own.engines},
        "card": card,
        "tokens": runs[0]["tokens"],
        "summary": runs[0]["summary"],
    }
    if own.engines > 1:
        payload["engines"] = [r["summary"] for r in runs]
        print_engine_deltas(payload["engines"])
    write_json(args.json, payload)
    return payload


def print_engine_deltas(summaries: list[dict]) -> None:
    """Seconds per phase and step kind of each engine minus the last engine's."""
    last = summaries[-1]
    print("\nseconds against the last engine (+ = slower):")
    for i, s in enumerate(summaries[:-1]):
        cells = [f"total {s['total_s'] - last['total_s']:+.3f}"]
        for kind in KINDS:
            for phase in PHASES:
                d = s[kind][f"{phase}_s"] - last[kind][f"{phase}_s"]
                if abs(d) >= 0.005:
                    cells.append(f"{kind} {phase} {d:+.3f}")
        cells.append(f"outside steps {s['untracked_s'] - last['untracked_s']:+.3f}")
        print(f"  engine {i + 1}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
