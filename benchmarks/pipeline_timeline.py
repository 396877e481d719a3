"""The pipeline's stage timeline and regime map, as PNGs.

Two steps, so that drawing needs no GPU:

    # on the GPU: decode with the pipeline forced on and profiling, export the stage trace
    python benchmarks/pipeline_timeline.py collect --shape 0.6b --batch 64 --json trace.json
    # anywhere (matplotlib): the timeline of the last steps of a trace, and the regime map
    # (pipelined/sequential speedup per batch x context, one panel per SM split) of a
    # bench_pipeline.py result
    python benchmarks/pipeline_timeline.py plot --trace trace.json --sweep bench_pipeline.json \\
        --out-dir benchmarks/results/

``collect`` writes the Chrome/Perfetto trace of ``LLM.model_runner.export_pipeline_trace`` with
the environment (card, command, commit) beside it in the same JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def collect(args) -> dict:
    import torch

    from benchmarks.common import build_engine, environment, model_path, resolve_device
    from nanovllm import SamplingParams

    device = resolve_device(args.device)
    if device.type != "cuda":
        raise SystemExit("collect: the pipeline needs a CUDA GPU (green contexts)")
    options = dict(
        enable_pipeline=True,
        pipeline_policy="always",
        pipeline_enable_profiling=True,
        max_num_seqs=max(args.batch, 2),
        max_model_len=args.prompt_len + args.steps + 8,
        gpu_memory_utilization=0.5,
    )
    if args.split:
        options.update(
            pipeline_attention_sm_count=args.split[0], pipeline_ffn_sm_count=args.split[1]
        )
    llm = build_engine(model_path(args.shape), device, True, **options)
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(1, 1000, (args.prompt_len,), generator=gen).tolist()
        for _ in range(args.batch)
    ]
    params = SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    stats = llm.model_runner.get_pipeline_statistics()
    llm.model_runner.print_pipeline_statistics()
    path = args.json
    llm.model_runner.export_pipeline_trace(path)
    with open(path) as f:
        trace = json.load(f)
    trace["environment"] = environment(device)
    trace["statistics"] = stats
    trace["workload"] = dict(
        shape=args.shape, batch=args.batch, prompt_len=args.prompt_len, steps=args.steps
    )
    with open(path, "w") as f:
        json.dump(trace, f, default=str)
    print(f"wrote {path}")
    llm.exit()
    return trace


def timeline_figure(trace: dict, last_steps: int):
    """Bars per stream (attention, FFN) of the last ``last_steps`` steps of a trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    steps = sorted({e["args"]["step"] for e in events if "args" in e})[-last_steps:]
    keep = [e for e in events if e.get("args", {}).get("step") in steps]
    if not keep:
        raise SystemExit("the trace has no stage intervals")
    t0 = min(e["ts"] for e in keep)
    fig, ax = plt.subplots(figsize=(12, 2.8))
    colours = {0: "tab:blue", 1: "tab:orange", 2: "tab:green", 3: "tab:red"}
    for row, stage in enumerate(("ffn", "attention")):
        for e in keep:
            if not e["name"].startswith(stage):
                continue
            mb = e["args"]["microbatch"]
            start = (e["ts"] - t0) / 1e3
            ax.broken_barh([(start, e["dur"] / 1e3)], (row - 0.4, 0.8), color=colours[mb % 4])
    ax.set_yticks([0, 1], ["FFN stream", "attention stream"])
    ax.set_xlabel("ms (CUDA events within a step; steps placed at their host launch time)")
    stats = trace.get("statistics", {})
    env = trace.get("environment", {})
    ax.set_title(
        f"pipelined decode steps, {env.get('card', '?')}, split "
        f"{stats.get('attention_sms', '?')}/{stats.get('ffn_sms', '?')} SMs; colour = micro-batch"
    )
    fig.tight_layout()
    return fig


def regime_figure(sweep: dict):
    """Pipelined/sequential speedup per (batch, context), one panel per shape and split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for m in sweep["models"] for r in m["rows"] if "speedup" in r]
    if not rows:
        raise SystemExit("the sweep has no pipelined rows")
    panels = sorted({(r["shape"], r["attention_sms"], r["ffn_sms"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    fig.subplots_adjust(wspace=0.35)
    for ax, (shape, a, f) in zip(axes[0], panels):
        mine = [r for r in rows if (r["shape"], r["attention_sms"], r["ffn_sms"]) == (shape, a, f)]
        batches = sorted({r["batch"] for r in mine})
        ctxs = sorted({r["ctx"] for r in mine})
        grid = [[float("nan")] * len(batches) for _ in ctxs]
        for r in mine:
            grid[ctxs.index(r["ctx"])][batches.index(r["batch"])] = r["speedup"]
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0.6, vmax=1.4, origin="lower", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(batches)), batches)
        ax.set_yticks(range(len(ctxs)), ctxs)
        ax.set_xlabel("batch")
        ax.set_ylabel("context")
        ax.set_title(f"{shape}, {a}/{f} SMs")
    fig.colorbar(im, ax=axes[0].tolist(), label="sequential / pipelined step time")
    card = sweep.get("environment", {}).get("card", "?")
    fig.suptitle(f"decode-step speedup of the pipeline, {card}")
    return fig


def plot(args) -> list[str]:
    written = []
    os.makedirs(args.out_dir, exist_ok=True)
    if args.trace:
        with open(args.trace) as f:
            fig = timeline_figure(json.load(f), args.last_steps)
        out = os.path.join(args.out_dir, os.path.splitext(os.path.basename(args.trace))[0] + ".png")
        fig.savefig(out, dpi=120)
        written.append(out)
    if args.sweep:
        with open(args.sweep) as f:
            fig = regime_figure(json.load(f))
        out = os.path.join(
            args.out_dir, os.path.splitext(os.path.basename(args.sweep))[0] + "_regimes.png"
        )
        fig.savefig(out, dpi=120)
        written.append(out)
    if not written:
        raise SystemExit("plot: give --trace and/or --sweep")
    for out in written:
        print(f"wrote {out}")
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="GPU: decode with the pipeline and export its trace")
    c.add_argument("--shape", choices=("tiny", "0.6b", "8b"), default="0.6b")
    c.add_argument("--batch", type=int, default=64, help="sequences decoded together")
    c.add_argument("--prompt-len", type=int, default=256)
    c.add_argument("--steps", type=int, default=16, help="decode steps (tokens per sequence)")
    c.add_argument("--split", type=int, nargs=2, metavar=("ATTN", "FFN"), help="SM counts")
    c.add_argument("--device", choices=("auto", "cuda"), default="auto")
    c.add_argument("--json", required=True, help="the trace to write")
    d = sub.add_parser("plot", help="PNG timeline of a trace, regime map of a sweep")
    d.add_argument("--trace", help="a trace written by collect")
    d.add_argument("--sweep", help="a JSON written by bench_pipeline.py --json")
    d.add_argument("--last-steps", type=int, default=3)
    d.add_argument("--out-dir", default=".")
    args = p.parse_args(argv)
    if args.command == "collect" and args.batch < 2:
        p.error("--batch: the pipeline needs at least 2 sequences")
    return args


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    return collect(args) if args.command == "collect" else plot(args)


if __name__ == "__main__":
    main()
