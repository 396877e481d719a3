"""The decode pipeline with profiling: statistics, and pipelined vs sequential side by side.

    python example_with_pipeline.py                       # built-in tiny random model
    python example_with_pipeline.py --model ./Qwen3-8B --attention-sms 40 --ffn-sms 92

Both engines run the same greedy requests one after the other in this process; the script prints
their decode throughput, whether the tokens agree, and the pipeline's statistics table
(per-bucket choice, SM split, stage times with profiling).
"""

import argparse
import logging
import random
import time

from nanovllm import LLM, SamplingParams


def run(llm: LLM, prompts, params) -> tuple[list[list[int]], float]:
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = [o["token_ids"] for o in outs]
    return tokens, sum(map(len, tokens)) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="Hugging Face Qwen3 folder")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--attention-sms", type=int, default=None)
    parser.add_argument("--ffn-sms", type=int, default=None)
    parser.add_argument("--microbatches", type=int, default=2)
    parser.add_argument(
        "--always", action="store_true", help="pipeline every batch size (pipeline_policy=always)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    rng = random.Random(0)
    prompts = [
        [rng.randrange(1, 400) for _ in range(rng.randint(16, 256))]
        for _ in range(args.num_prompts)
    ]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)

    sequential = LLM(args.model, gpu_memory_utilization=0.4)
    seq_tokens, seq_tps = run(sequential, prompts, params)
    sequential.exit()

    piped = LLM(
        args.model,
        gpu_memory_utilization=0.4,
        enable_pipeline=True,
        pipeline_attention_sm_count=args.attention_sms,
        pipeline_ffn_sm_count=args.ffn_sms,
        pipeline_num_microbatches=args.microbatches,
        pipeline_enable_profiling=True,
        pipeline_policy="always" if args.always else "auto",
    )
    pipe_tokens, pipe_tps = run(piped, prompts, params)

    same = sum(a == b for a, b in zip(seq_tokens, pipe_tokens))
    stats = piped.model_runner.get_pipeline_statistics()
    print(f"\nsequential: {seq_tps:,.0f} tok/s   pipeline on: {pipe_tps:,.0f} tok/s")
    if stats["steps"]:
        print(
            f"ratio {pipe_tps / seq_tps:.3f} over {stats['steps']} pipelined decode steps   "
            f"identical outputs: {same}/{len(prompts)}\n"
        )
    else:
        print(
            f"no pipelined decode step ran ({stats['reason']}): both engines decoded "
            f"sequentially, so there is no ratio to report   identical outputs: "
            f"{same}/{len(prompts)}\n"
        )
    piped.model_runner.print_pipeline_statistics()
    piped.exit()


if __name__ == "__main__":
    main()
