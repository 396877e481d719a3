"""nanovllm: a small offline inference engine for Qwen3 with an Attention/FFN decode pipeline."""

from nanovllm.llm import LLM
from nanovllm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.2.0"
