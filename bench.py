"""Offline throughput, nano-vllm's bench.py workload.

``--num-seqs`` requests (256; 1024 for ``--shape 8b``) of random token ids, input and output
lengths uniform in [100, 1024], seed 0 (the same draws as nano-vllm's bench.py: 133,966 output
tokens for 256 requests, 583,802 for 1024), temperature 0.6, ``ignore_eos``. The model is a
random-weight Qwen3 at the real shape (``load_format="dummy"``) or ``--model PATH``. After a
warm-up ``generate``, the whole ``generate`` is timed; throughput counts output tokens.

    python bench.py                                  # Qwen3-0.6B shape, 256 requests
    python bench.py --shape 8b --compare-pipeline    # sequential, then pipelined, and the ratio
    python bench.py --compare-pipeline --rounds 2    # seq, pipe, pipe, seq: medians per variant
    python bench.py --hf-baseline 32 --json benchmarks/results/bench_0.6b_h100.json
    python bench.py --quick --device cpu --hf-baseline 2    # control-flow smoke test
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from random import randint, seed

import torch

from benchmarks.common import (
    SHAPES,
    add_common_args,
    build_engine,
    environment,
    format_gc_pauses,
    free_memory,
    gc_pauses,
    kernel_compiles,
    model_path,
    release_engine,
    resolve_device,
    timed_generate,
    write_json,
)
from nanovllm import SamplingParams
from nanovllm.config import TP_ALL_REDUCES
from nanovllm.utils.tensors import default_dtype


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", choices=SHAPES, help="random-weight model shape (default 0.6b)")
    p.add_argument("--model", help="a Qwen3 checkpoint folder instead of --shape")
    p.add_argument("--load-format", choices=("auto", "dummy"), help="default: dummy for --shape")
    p.add_argument("--num-seqs", type=int, help="requests (default 256; 1024 for --shape 8b)")
    p.add_argument("--min-input-len", type=int, default=100)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--min-output-len", type=int, default=100)
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--pipeline", action="store_true", help="enable_pipeline=True")
    p.add_argument("--compare-pipeline", action="store_true", help="sequential, then pipelined")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --compare-pipeline: rounds of both engines, the order alternating (seq, pipe, "
        "pipe, seq, ...) so that neither always runs on a warmer card; medians are compared",
    )
    p.add_argument("--attention-sms", type=int, help="pipeline_attention_sm_count")
    p.add_argument("--ffn-sms", type=int, help="pipeline_ffn_sm_count")
    p.add_argument("--microbatches", type=int, default=2, help="pipeline_num_microbatches")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs (one rank each)")
    p.add_argument(
        "--tensor-parallel-all-reduce",
        choices=TP_ALL_REDUCES,
        help="LLM(tensor_parallel_all_reduce=...); default: the engine's (auto)",
    )
    p.add_argument(
        "--kv-cache-dtype", choices=("auto", "fp8"), default="auto", help="LLM(kv_cache_dtype=...)"
    )
    p.add_argument("--max-num-seqs", type=int, help="LLM(max_num_seqs=...); default: the engine's")
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        help="LLM(max_num_batched_tokens=...); default: the engine's",
    )
    p.add_argument(
        "--async-scheduling",
        type=int,
        choices=(0, 1),
        help="LLM(async_scheduling=bool(...)); default: the engine's (on)",
    )
    p.add_argument(
        "--enable-mixed-steps",
        type=int,
        choices=(0, 1),
        help="LLM(enable_mixed_steps=bool(...)): decodes and prefill chunks in one step; "
        "default: the engine's (off)",
    )
    p.add_argument(
        "--prefill-admission-batch",
        type=int,
        help="LLM(prefill_admission_batch=...); default: the engine's (max_num_seqs // 8)",
    )
    p.add_argument(
        "--hf-baseline",
        type=int,
        default=0,
        metavar="N",
        help="also run transformers' generate on the first N requests (same weights, batched, "
        "left-padded, every request to the slice's longest output), and nanovllm on the same",
    )
    add_common_args(p)
    args = p.parse_args(argv)
    if args.hf_baseline and args.tensor_parallel_size > 1:
        p.error("--hf-baseline reads rank 0's weights: use it with --tensor-parallel-size 1")
    if args.quick:
        args.shape = args.shape or "tiny"
        args.num_seqs = args.num_seqs or 8
        args.min_input_len, args.max_input_len = 16, 64
        args.min_output_len, args.max_output_len = 8, 32
    args.shape = args.shape or "0.6b"
    args.num_seqs = args.num_seqs or (1024 if args.shape == "8b" and not args.model else 256)
    args.load_format = args.load_format or ("auto" if args.model else "dummy")
    return args


def workload(args, vocab: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """nano-vllm's draws, in its order: all prompts, then all output lengths."""
    seed(0)
    top = min(10000, vocab - 1)
    n, lo_in, hi_in = args.num_seqs, args.min_input_len, args.max_input_len
    prompts = [[randint(0, top) for _ in range(randint(lo_in, hi_in))] for _ in range(n)]
    lens = [randint(args.min_output_len, args.max_output_len) for _ in range(n)]
    return prompts, [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=t) for t in lens]


def report(label: str, tokens: int, seconds: float) -> float:
    tps = tokens / seconds
    print(f"[{label}] Total: {tokens}tok, Time: {seconds:.2f}s, Throughput: {tps:.2f}tok/s")
    return tps


def engine_options(args, pipelined: bool) -> dict:
    """The LLM options ``args`` ask for (engine defaults where an option was not given)."""
    options = dict(
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        tensor_parallel_size=args.tensor_parallel_size,
        kv_cache_dtype=args.kv_cache_dtype,
        prefill_admission_batch=args.prefill_admission_batch,
        enable_pipeline=pipelined,
    )
    for name in ("max_num_seqs", "max_num_batched_tokens", "tensor_parallel_all_reduce"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    for flag in ("async_scheduling", "enable_mixed_steps"):
        if getattr(args, flag) is not None:  # 0 or 1: the engine checks for a bool
            options[flag] = bool(getattr(args, flag))
    if pipelined:
        options.update(
            pipeline_attention_sm_count=args.attention_sms,
            pipeline_ffn_sm_count=args.ffn_sms,
            pipeline_num_microbatches=args.microbatches,
        )
    return options


def run_variant(args, path: str, device, pipelined: bool, prompts, params):
    """Build an engine, warm up, time the workload; returns (result, engine)."""
    label = "pipelined" if pipelined else "sequential"
    t0 = time.perf_counter()
    options = engine_options(args, pipelined)
    llm = build_engine(path, device, args.load_format == "dummy", **options)
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)
    startup = time.perf_counter() - t0
    preempted = llm.scheduler.num_preemptions
    with kernel_compiles() as compiled, gc_pauses() as gc_stats:
        seconds, tokens = timed_generate(llm, prompts, params, device)
    print(f"[{label}] garbage collector: {format_gc_pauses(gc_stats)}")
    if llm.config.tensor_parallel_size > 1:  # "auto" takes NCCL after the process's first
        print(f"[{label}] all-reduce: {llm.runtime.tensor_parallel_all_reduce}")
    if compiled:
        print(f"[{label}] compiled inside the timed run: {compiled}")
    expected = sum(sp.max_tokens for sp in params)
    if tokens != expected:
        print(f"warning: {tokens} output tokens, {expected} requested")
    result = dict(variant=label, tokens=tokens, seconds=seconds, startup_s=startup)
    result["compiles_in_timed_run"] = compiled
    result["gc_pauses"] = gc_stats
    result["throughput_tok_s"] = report(label, tokens, seconds)
    result["num_kvcache_blocks"] = llm.runtime.num_kvcache_blocks
    result["preemptions"] = llm.scheduler.num_preemptions - preempted
    result["prefill_admission_batch"] = llm.scheduler.admission_batch
    result["max_num_seqs"] = llm.config.max_num_seqs
    result["max_num_batched_tokens"] = llm.config.max_num_batched_tokens
    result["async_scheduling"] = llm.config.async_scheduling
    result["enable_mixed_steps"] = llm.config.enable_mixed_steps
    result["tensor_parallel_size"] = llm.config.tensor_parallel_size
    result["tensor_parallel_all_reduce"] = llm.config.tensor_parallel_all_reduce
    result["all_reduce_used"] = llm.runtime.tensor_parallel_all_reduce  # what "auto" chose
    result["attention_backend"] = llm.runtime.attention_backend
    result["cuda_graphs"] = llm.runtime.cuda_graphs
    if pipelined:
        result["pipeline"] = llm.model_runner.get_pipeline_statistics()
        llm.model_runner.print_pipeline_statistics()
    return result, llm


def compare_line(results: list[dict], rounds: int) -> float | None:
    """Print the pipelined/sequential throughput ratio, only if pipelined steps ran; else say
    plainly that both engines decoded sequentially. Returns the ratio or None."""
    piped = [r["pipeline"] for r in results if r["variant"] == "pipelined"]
    steps = sum(p["steps"] for p in piped)
    if steps == 0:
        reasons = sorted({p["reason"] for p in piped if p["reason"]})
        print(
            "no pipelined decode step ran (mode "
            f"{', '.join(sorted({p['mode'] for p in piped}))}: {'; '.join(reasons) or 'n/a'}): "
            "both engines decoded sequentially, so there is no pipeline ratio to report"
        )
        return None
    ratio = median_throughput(results, "pipelined") / median_throughput(results, "sequential")
    print(
        f"pipelined / sequential throughput (medians over {rounds} rounds): {ratio:.3f} "
        f"({steps} pipelined decode steps)"
    )
    return ratio


def hf_state_dict(model, hf_config) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face names: packed q/k/v and gate/up split back (views)."""
    heads, kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    state = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        p = p.detach()
        if ".qkv_proj." in name:
            for part, t in zip(("q_proj", "k_proj", "v_proj"), p.split(sizes)):
                state[name.replace("qkv_proj", part)] = t
        elif ".gate_up_proj." in name:
            for part, t in zip(("gate_proj", "up_proj"), p.chunk(2)):
                state[name.replace("gate_up_proj", part)] = t
        else:
            state[name] = p
    return state


def build_hf_model(hf_config, state: dict, dtype: torch.dtype, device):
    from transformers import Qwen3ForCausalLM as HFQwen3

    with default_dtype(dtype), torch.device(device):
        model = HFQwen3(hf_config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"HF weight mapping: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.to(dtype).eval()


def nanovllm_slice(llm, args, prompts, params, device) -> dict:
    """nanovllm on the first N requests, every one to the slice's longest output (as HF runs)."""
    n = min(args.hf_baseline, len(prompts))
    max_new = max(sp.max_tokens for sp in params[:n])
    same = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=max_new)
    seconds, tokens = timed_generate(llm, prompts[:n], [same] * n, device)
    tps = report(f"nanovllm, first {n} requests, {max_new} tokens each", tokens, seconds)
    return dict(
        num_requests=n,
        max_new_tokens=max_new,
        dtype=str(llm.runtime.dtype),
        nanovllm_seconds=seconds,
        nanovllm_throughput_tok_s=tps,
    )


@torch.inference_mode()
def hf_baseline(hf_config, state: dict, prompts, slice_info: dict, device) -> dict:
    """transformers' ``generate`` on the same requests: one batch, left-padded, sampling at
    temperature 0.6, exactly ``max_new_tokens`` each. Consumes (clears) ``state``."""
    from transformers import GenerationConfig

    dtype = getattr(torch, slice_info["dtype"].removeprefix("torch."))
    model = build_hf_model(hf_config, state, dtype, device)
    state.clear()  # drop our engine's weights
    free_memory()
    n, max_new = slice_info["num_requests"], slice_info["max_new_tokens"]
    pad = getattr(hf_config, "pad_token_id", None) or getattr(hf_config, "eos_token_id", 0)
    pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    width = max(len(p) for p in prompts[:n])
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts[:n]):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    gen = dict(do_sample=True, temperature=0.6, top_k=0, top_p=1.0, pad_token_id=pad)
    warm = GenerationConfig(max_new_tokens=4, min_new_tokens=4, **gen)
    model.generate(input_ids=ids[:1], attention_mask=mask[:1], generation_config=warm)
    full = GenerationConfig(max_new_tokens=max_new, min_new_tokens=max_new, **gen)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=full)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    tokens = (out.shape[1] - width) * n
    tps = report(f"transformers generate, first {n} requests, batched", tokens, seconds)
    del model, out
    free_memory()
    return dict(
        tokens=tokens,
        seconds=seconds,
        throughput_tok_s=tps,
        nanovllm_over_hf_same_slice=slice_info["nanovllm_throughput_tok_s"] / tps,
    )


def variant_order(args) -> list[bool]:
    """Engines to run, True = pipelined: with --compare-pipeline, rounds of both with the order
    alternating (seq, pipe, pipe, seq, ...), so that neither always runs on the warmer card."""
    if args.rounds < 1:
        raise ValueError(f"rounds={args.rounds}: run at least 1 round (--rounds 1)")
    if not args.compare_pipeline:
        return [args.pipeline]
    return [v for r in range(args.rounds) for v in ((False, True), (True, False))[r % 2]]


def median_throughput(results: list[dict], variant: str) -> float:
    return statistics.median(r["throughput_tok_s"] for r in results if r["variant"] == variant)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    device = resolve_device(args.device)
    env = environment(device)
    path = args.model or model_path(args.shape)
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path)
    prompts, params = workload(args, hf_config.vocab_size)
    print(
        f"card: {env['card']}; model: {args.model or args.shape} ({args.load_format}); "
        f"{len(prompts)} requests, {sum(map(len, prompts))} input tokens, "
        f"{sum(sp.max_tokens for sp in params)} output tokens"
    )
    variants = variant_order(args)
    results, llm = [], None
    for pipelined in variants:
        if llm is not None:
            release_engine(llm)
            llm = None
            free_memory()
        result, llm = run_variant(args, path, device, pipelined, prompts, params)
        results.append(result)
    payload = {"script": "bench.py", "environment": env, "args": vars(args), "results": results}
    if args.compare_pipeline:
        payload["pipelined_over_sequential"] = compare_line(results, args.rounds)
    state: dict[str, torch.Tensor] = {}
    if args.hf_baseline:
        payload["hf_baseline"] = nanovllm_slice(llm, args, prompts, params, device)
        state = hf_state_dict(llm.model_runner.model, hf_config)
    release_engine(llm)
    llm = None
    free_memory()
    if args.hf_baseline:
        payload["hf_baseline"].update(
            hf_baseline(hf_config, state, prompts, payload["hf_baseline"], device)
        )
        full = results[-1]["throughput_tok_s"] / payload["hf_baseline"]["throughput_tok_s"]
        payload["hf_baseline"]["nanovllm_full_workload_over_hf"] = full
        same = payload["hf_baseline"]["nanovllm_over_hf_same_slice"]
        print(
            f"nanovllm / transformers: {same:.2f}x on the same requests; {full:.2f}x for the "
            "full workload's throughput"
        )
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
