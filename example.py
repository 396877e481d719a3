"""Generate with nanovllm. With no --model, a tiny random-weight Qwen3 is created on first use."""

import argparse
import logging

from nanovllm import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="Hugging Face Qwen3 folder")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--enforce-eager", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    llm = LLM(args.model, enforce_eager=args.enforce_eager)
    prompts = ["Hello, my name is", "The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        print(f"\nPrompt: {prompt!r}\nCompletion: {out['text']!r} ({out['finish_reason']})")


if __name__ == "__main__":
    main()
