"""The host's share of one decode step, no model and no GPU: the scheduler's decision, the plan,
the input tensors (CPU tensors here: the pinned copies of a CUDA run are not timed), the
sampling set-up and the post-processing, for ``--batch`` running sequences of ``--ctx`` tokens.
On a GPU these phases run while the device idles between steps, unless ``async_scheduling``
overlaps them; ``benchmarks/profile_e2e.py`` times them inside a real run.

    python benchmarks/host_step.py --batch 480 --ctx 880 --json OUT
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import environment, write_json  # noqa: E402
from nanovllm import SamplingParams  # noqa: E402
from nanovllm.attention import AttentionBackend  # noqa: E402
from nanovllm.engine.block_manager import BlockManager  # noqa: E402
from nanovllm.engine.model_inputs import plan_step, prepare_sampling, to_model_inputs  # noqa: E402
from nanovllm.engine.scheduler import Scheduler  # noqa: E402
from nanovllm.engine.sequence import Sequence  # noqa: E402

PHASES = ("schedule", "plan", "inputs", "sampling", "postprocess")


def running_scheduler(batch: int, ctx: int, block_size: int, seed: int = 0) -> Scheduler:
    """A scheduler with ``batch`` sequences of ``ctx`` tokens, prefilled, decoding next."""
    rng = random.Random(seed)
    blocks = BlockManager(batch * (-(-(ctx + 4096) // block_size)), block_size)
    sched = Scheduler(blocks, batch, 1 << 30, 1 << 20, {0}, admission_batch=1)
    params = SamplingParams(temperature=0.6, max_tokens=1 << 19, ignore_eos=True)
    for _ in range(batch):
        sched.add(Sequence([rng.randrange(1, 1000) for _ in range(ctx)], params, block_size))
    prefill = sched.schedule()
    sched.postprocess(prefill, [7] * len(prefill.seqs))
    return sched


def time_steps(sched: Scheduler, block_size: int, steps: int) -> dict[str, float]:
    """Median milliseconds per phase over ``steps`` decode steps (tokens are a constant)."""
    device, backend = torch.device("cpu"), AttentionBackend()
    times: dict[str, list[float]] = {k: [] for k in PHASES}
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = sched.schedule()
        t1 = time.perf_counter()
        plan = plan_step(batch, block_size)
        t2 = time.perf_counter()
        to_model_inputs(plan, device, backend)
        t3 = time.perf_counter()
        prepare_sampling(batch, plan.sampling_rows, device, {0})
        t4 = time.perf_counter()
        sched.postprocess(batch, [7] * len(batch.seqs))
        t5 = time.perf_counter()
        for k, (a, b) in zip(PHASES, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5))):
            times[k].append((b - a) * 1e3)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["total"] = sum(out.values())
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=480)
    p.add_argument("--ctx", type=int, default=880)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    for name in ("batch", "ctx", "block_size", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: use a value >= 1")
    sched = running_scheduler(args.batch, args.ctx, args.block_size)
    time_steps(sched, args.block_size, 10)  # warm-up
    result = time_steps(sched, args.block_size, args.steps)
    print(
        f"{cpu_model()}; batch {args.batch}, ctx {args.ctx}: "
        + ", ".join(f"{k} {v:.3f}" for k, v in result.items())
        + " ms (medians)"
    )
    payload = {"script": "benchmarks/host_step.py", "environment": environment(torch.device("cpu"))}
    payload.update(args=vars(args), cpu_model=cpu_model(), median_ms=result)
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
