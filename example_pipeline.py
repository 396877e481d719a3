"""Minimal: generate with the Attention/FFN decode pipeline switched on.

With no --model, a tiny random-weight Qwen3 is created on first use. Without a GPU (or without
Green Contexts) the engine decodes sequentially and the statistics say why.
"""

import argparse

from nanovllm import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="Hugging Face Qwen3 folder")
    args = parser.parse_args()

    llm = LLM(args.model, enable_pipeline=True)
    outs = llm.generate(["Hello, my name is", "The future of AI is"], SamplingParams(max_tokens=32))
    for out in outs:
        print(repr(out["text"]))
    stats = llm.model_runner.get_pipeline_statistics()
    print(f"pipeline enabled: {stats['enabled']} ({stats['reason'] or stats['mode']})")


if __name__ == "__main__":
    main()
