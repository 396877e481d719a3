"""FP8 KV cache against the model-dtype cache: logit error, greedy agreement, throughput.

One process builds the same random-weight model (``load_format="dummy"``, same seed, so the same
weights) twice, one engine after the other: ``kv_cache_dtype="auto"`` (bf16 on a GPU, float32 on
a CPU), then ``"fp8"``. Each engine runs:

- accuracy: ``--num-prompts`` prompts of ``--prompt-len`` random token ids, one at a time, greedy
  for ``--steps`` tokens, with the logits of every step recorded. Step 0 is the prefill's last
  prompt position, which reads the new K/V straight from the projections, not from the cache, so
  it must match exactly (a check); step 1 is the first decode step: the same input token in both
  runs, attending over the whole prompt from the cache, so its error is the cache's alone. Later
  steps are compared while both runs have produced the same tokens (after the first difference
  the inputs differ). Errors are max and mean absolute differences of the logits, also relative
  to the largest reference logit.
- greedy agreement: the share of the ``--steps`` generated positions where the tokens agree,
  and the prompts whose tokens all agree.
- throughput: ``--throughput-seqs`` requests of ``--prompt-len`` tokens, ``--output-len`` output
  tokens each (``ignore_eos``, greedy), one warm-up ``generate`` then a timed one (output tok/s).

The JSON (``--json``) carries the card, the exact argv, the git commit and every figure.

    python benchmarks/kv_fp8_accuracy.py --shape 8b --json benchmarks/results/kv_fp8_accuracy_8b_h200_YYYYMMDD.json
    python benchmarks/kv_fp8_accuracy.py --shape 0.6b
    python benchmarks/kv_fp8_accuracy.py --shape tiny --device cpu      # CPU smoke test
"""  # noqa: E501

from __future__ import annotations

import argparse
import logging
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (  # noqa: E402
    SHAPES,
    build_engine,
    environment,
    free_memory,
    model_path,
    release_engine,
    resolve_device,
    timed_generate,
    write_json,
)
from nanovllm import SamplingParams  # noqa: E402

KV_DTYPES = ("auto", "fp8")
# Defaults per shape: (num_prompts, prompt_len, steps, throughput_seqs, output_len).
DEFAULTS = {
    "tiny": (4, 48, 8, 8, 16),
    "0.6b": (16, 512, 32, 256, 256),
    "8b": (16, 512, 32, 256, 256),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", choices=SHAPES, help="random-weight model shape (default 0.6b)")
    p.add_argument("--model", help="a Qwen3 checkpoint folder (weights loaded) instead of --shape")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--num-prompts", type=int, help="accuracy prompts (tiny 4, else 16)")
    p.add_argument("--prompt-len", type=int, help="tokens per prompt (tiny 48, else 512)")
    p.add_argument("--steps", type=int, help="greedy tokens per accuracy prompt (tiny 8, else 32)")
    p.add_argument("--throughput-seqs", type=int, help="requests timed (tiny 8, else 256)")
    p.add_argument("--output-len", type=int, help="output tokens per timed request (16 / 256)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--seed", type=int, default=0, help="weights and prompts")
    p.add_argument("--json", metavar="OUT", help="write the results (and the command) here")
    p.add_argument("--verbose", action="store_true", help="engine INFO logs")
    args = p.parse_args(argv)
    if args.model and args.shape:
        p.error("--model and --shape are exclusive: the model is either a checkpoint or a shape")
    if not args.model:
        args.shape = args.shape or "0.6b"
    n, plen, steps, tseqs, olen = DEFAULTS[args.shape or "0.6b"]
    args.num_prompts = args.num_prompts or n
    args.prompt_len = args.prompt_len or plen
    args.steps = args.steps or steps
    args.throughput_seqs = args.throughput_seqs or tseqs
    args.output_len = args.output_len or olen
    for name in ("num_prompts", "prompt_len", "steps", "throughput_seqs", "output_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.steps < 2:
        p.error("--steps must be >= 2 (step 1 is the first decode step, the one compared)")
    if args.prompt_len + max(args.steps, args.output_len) > args.max_model_len:
        p.error("--prompt-len plus --steps / --output-len exceed --max-model-len")
    return args


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    top = min(10000, vocab - 1)
    return [[rng.randint(1, top) for _ in range(length)] for _ in range(n)]


def greedy_with_logits(llm, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens of one prompt and the logits of each step ([vocab] float32 on the CPU;
    step 0 is the prefill's last position). The engine's ``compute_logits`` is wrapped for the
    call; with a single sequence it runs once per step."""
    model = llm.model_runner.model
    recorded: list[torch.Tensor] = []
    original = model.compute_logits

    def record(hidden: torch.Tensor) -> torch.Tensor:
        logits = original(hidden)  # [rows, vocab]
        recorded.append(logits[-1].float().cpu())
        return logits

    model.compute_logits = record
    try:
        params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
        out = llm.generate([prompt], params, use_tqdm=False)[0]
    finally:
        del model.compute_logits  # back to the class method
    assert len(recorded) == steps, f"{len(recorded)} logits calls for {steps} steps"
    return out["token_ids"], recorded


def compare(reference: list[tuple], candidate: list[tuple]) -> dict:
    """Logit errors and token agreement of ``candidate`` runs against ``reference`` runs (one
    (tokens, per-step logits) pair per prompt)."""
    first, agreeing, prefill = [], [], []
    same_positions = total_positions = same_prompts = 0
    divergence = []
    for (ref_tok, ref_logits), (tok, logits) in zip(reference, candidate, strict=True):
        prefill.append((logits[0] - ref_logits[0]).abs().max().item())
        first.append((logits[1] - ref_logits[1], ref_logits[1].abs().max().item()))
        # step s's logits have equal inputs while tokens 0..s-1 agree
        s = 1
        while s < len(ref_logits) and tok[s - 1] == ref_tok[s - 1]:
            agreeing.append((logits[s] - ref_logits[s], ref_logits[s].abs().max().item()))
            s += 1
        same = sum(a == b for a, b in zip(tok, ref_tok))
        same_positions += same
        total_positions += len(ref_tok)
        same_prompts += tok == ref_tok
        diff = [i for i, (a, b) in enumerate(zip(tok, ref_tok)) if a != b]
        divergence.append(diff[0] if diff else len(ref_tok))

    def errors(pairs: list[tuple[torch.Tensor, float]]) -> dict:
        return {
            "steps": len(pairs),
            "max_abs": max(d.abs().max().item() for d, _ in pairs),
            "mean_abs": sum(d.abs().mean().item() for d, _ in pairs) / len(pairs),
            "max_abs_over_max_logit": max(d.abs().max().item() / m for d, m in pairs),
        }

    return {
        "prefill_last_position_max_abs": max(prefill),
        "first_decode_step": errors(first),
        "agreeing_steps": errors(agreeing),
        "token_agreement": same_positions / total_positions,
        "prompts_identical": same_prompts,
        "prompts": len(reference),
        "first_divergence_step": divergence,
    }


def timed_throughput(llm, prompts: list[list[int]], output_len: int, device) -> dict:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[: min(2, len(prompts))], params, use_tqdm=False)  # warm-up
    seconds, tokens = timed_generate(llm, prompts, params, device)
    return {"tokens": tokens, "seconds": seconds, "throughput_tok_s": tokens / seconds}


def run_variant(args, path: str, device, kv: str, prompts, timed_prompts) -> tuple[dict, list]:
    llm = build_engine(
        path,
        device,
        args.model is None,
        kv_cache_dtype=kv,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        seed=args.seed,
    )
    try:
        runs = [greedy_with_logits(llm, p, args.steps) for p in prompts]
        result = {
            "kv_cache_dtype": kv,
            "kv_cache_torch_dtype": str(llm.runtime.kv_cache_dtype),
            "num_kvcache_blocks": llm.runtime.num_kvcache_blocks,
            "attention_backend": llm.runtime.attention_backend,
            "cuda_graphs": llm.runtime.cuda_graphs,
            "preemptions_before_timing": llm.scheduler.num_preemptions,
        }
        result.update(timed_throughput(llm, timed_prompts, args.output_len, device))
        result["preemptions"] = llm.scheduler.num_preemptions - result.pop(
            "preemptions_before_timing"
        )
    finally:
        release_engine(llm)
        del llm
        free_memory()
    print(
        f"[{kv}] {result['kv_cache_torch_dtype']}, {result['num_kvcache_blocks']} KV blocks, "
        f"{result['attention_backend']}: {result['throughput_tok_s']:.1f} tok/s "
        f"({result['tokens']} tokens in {result['seconds']:.2f} s)"
    )
    return result, runs


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    device = resolve_device(args.device)
    env = environment(device)
    path = args.model or model_path(args.shape)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).vocab_size
    prompts = make_prompts(args.num_prompts, args.prompt_len, vocab, args.seed)
    timed_prompts = make_prompts(args.throughput_seqs, args.prompt_len, vocab, args.seed + 1)
    print(
        f"card: {env['card']}; model: {args.model or args.shape}; {len(prompts)} prompts of "
        f"{args.prompt_len} tokens x {args.steps} greedy steps; throughput: "
        f"{len(timed_prompts)} requests x {args.output_len} tokens"
    )
    results, runs = {}, {}
    for kv in KV_DTYPES:
        results[kv], runs[kv] = run_variant(args, path, device, kv, prompts, timed_prompts)
    accuracy = compare(runs["auto"], runs["fp8"])
    first, agree = accuracy["first_decode_step"], accuracy["agreeing_steps"]
    print(
        f"fp8 vs auto: first decode step logits max |d| {first['max_abs']:.4g} "
        f"(mean {first['mean_abs']:.3g}, {first['max_abs_over_max_logit']:.3g} of the largest "
        f"logit); over {agree['steps']} agreeing steps max |d| {agree['max_abs']:.4g} "
        f"(mean {agree['mean_abs']:.3g}); greedy tokens agree {accuracy['token_agreement']:.1%}, "
        f"{accuracy['prompts_identical']}/{accuracy['prompts']} prompts identical; "
        f"prefill last position max |d| {accuracy['prefill_last_position_max_abs']:.3g}"
    )
    ratio = results["fp8"]["throughput_tok_s"] / results["auto"]["throughput_tok_s"]
    blocks = results["fp8"]["num_kvcache_blocks"] / results["auto"]["num_kvcache_blocks"]
    print(f"fp8 / auto: throughput {ratio:.3f}, KV blocks {blocks:.2f}")
    payload = {
        "script": "benchmarks/kv_fp8_accuracy.py",
        "card": env["card"],
        "argv": argv,
        "git_commit": env["git_commit"],
        "environment": env,
        "args": vars(args),
        "results": results,
        "accuracy": accuracy,
        "fp8_over_auto_throughput": ratio,
        "fp8_over_auto_kv_blocks": blocks,
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
