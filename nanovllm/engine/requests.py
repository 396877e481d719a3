"""Requests in, outputs out: every prompt and SamplingParams is checked before anything is
queued (a ValueError names prompts[i] or the field, the value and the fix), and every finished
sequence becomes one output dict."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

Prompt = str | list[int]


@dataclass
class Limits:
    """What a request must fit in."""

    vocab_size: int
    max_model_len: int  # effective: prompt + output tokens per sequence
    requested_max_model_len: int  # before the KV cache lowered it
    kv_cache_tokens: int  # blocks x block size
    num_kv_blocks: int
    block_size: int


def as_prompt_list(prompts: Prompt | Seq[Prompt]) -> list:
    if isinstance(prompts, str) or (
        isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
    ):
        return [prompts]
    if isinstance(prompts, (Mapping, bytes)) or not isinstance(prompts, Iterable):
        raise ValueError(
            f"prompts is a {type(prompts).__name__}: give a str, a list of int token ids, "
            "or a list of those"
        )
    return list(prompts)


def as_params_list(
    sampling_params: SamplingParams | Seq[SamplingParams] | None, num_prompts: int
) -> list[SamplingParams]:
    if sampling_params is None:
        sampling_params = SamplingParams()
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * num_prompts
    if isinstance(sampling_params, (Mapping, str, bytes)) or not isinstance(
        sampling_params, Iterable
    ):
        raise ValueError(
            f"sampling_params is a {type(sampling_params).__name__}: give one "
            "SamplingParams, or a list with one per prompt"
        )
    params = list(sampling_params)
    if len(params) != num_prompts:
        raise ValueError(
            f"sampling_params has {len(params)} entries for {num_prompts} prompts: "
            "give one SamplingParams, or one per prompt"
        )
    for i, sp in enumerate(params):
        if not isinstance(sp, SamplingParams):
            raise ValueError(
                f"sampling_params[{i}] is a {type(sp).__name__}: give a SamplingParams"
            )
    return params


def encode_prompt(index: int, prompt: Prompt, tokenizer, limits: Limits) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(
                f"prompts[{index}] is a str but this LLM has no tokenizer "
                "(skip_tokenizer_init=True): give token ids, or create the LLM without "
                "skip_tokenizer_init"
            )
        token_ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple)) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        token_ids = list(prompt)
    else:
        raise ValueError(
            f"prompts[{index}] is a {type(prompt).__name__}: give a str or a list of int token ids"
        )
    if not token_ids:
        raise ValueError(f"prompts[{index}] is empty: give at least one token")
    vocab = limits.vocab_size
    bad = [t for t in token_ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(
            f"prompts[{index}] has token id {bad[0]} outside the vocabulary [0, {vocab}): "
            "use ids from this model's tokenizer"
        )
    max_len = limits.max_model_len
    if len(token_ids) >= max_len:
        lowered = (
            f" (lowered from {limits.requested_max_model_len} to what the KV cache holds)"
            if max_len < limits.requested_max_model_len
            else ""
        )
        raise ValueError(
            f"prompts[{index}] has {len(token_ids)} tokens, which leaves no room to generate "
            f"within max_model_len={max_len}{lowered}: shorten the prompt or raise "
            "max_model_len (or the KV cache: num_kvcache_blocks, gpu_memory_utilization)"
        )
    return token_ids


def check_fits(index: int, num_prompt_tokens: int, sp: SamplingParams, limits: Limits) -> None:
    """A sequence may grow to min(prompt + max_tokens, max_model_len as asked) tokens; a
    request whose growth the KV cache can never hold is refused, never cut short as "length"."""
    grows_to = min(num_prompt_tokens + sp.max_tokens, limits.requested_max_model_len)
    if grows_to > limits.kv_cache_tokens:
        bs = limits.block_size
        raise ValueError(
            f"prompts[{index}] can never fit in the KV cache: {num_prompt_tokens} prompt tokens "
            f"+ max_tokens={sp.max_tokens} need {grows_to} tokens ({-(-grows_to // bs)} KV "
            f"blocks of {bs}), but the cache has only {limits.num_kv_blocks} blocks "
            f"({limits.kv_cache_tokens} tokens): lower max_tokens or shorten the prompt, or "
            "raise num_kvcache_blocks or gpu_memory_utilization"
        )


def check_params(index: int, sp: SamplingParams, tokenizer, vocab_size: int) -> None:
    if sp.stop and tokenizer is None:
        raise ValueError(
            f"sampling_params[{index}].stop={list(sp.stop)!r} needs a tokenizer, and this LLM "
            "has none (skip_tokenizer_init=True): use stop_token_ids, or create the LLM "
            "without skip_tokenizer_init"
        )
    if sp.logprobs is not None and sp.logprobs > vocab_size:
        raise ValueError(
            f"sampling_params[{index}].logprobs={sp.logprobs} is more than the vocabulary "
            f"({vocab_size} tokens): use at most {vocab_size}"
        )


def make_output(seq: Sequence, tokenizer, stop_checker) -> dict:
    """{"text", "token_ids", "finish_reason"} (+ "stop_reason", and "logprobs" when asked)."""
    token_ids = seq.completion_token_ids
    text = None
    if tokenizer is not None:
        text = tokenizer.decode(token_ids, skip_special_tokens=True)
        if seq.stop_reason is not None:
            text = stop_checker.truncate(seq, text)
    out = {"text": text, "token_ids": token_ids, "finish_reason": seq.finish_reason}
    if seq.stop_reason is not None:
        out["stop_reason"] = seq.stop_reason
    if seq.params.logprobs is not None:
        out["logprobs"] = seq.logprobs[: len(token_ids)]
    return out
