"""The user-facing engine: ``LLM(model, **options)``, ``generate`` and ``chat``."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence as Seq

from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.sampling_params import SamplingParams

Message = Mapping[str, str]


class LLM(LLMEngine):
    """``LLM(model=None, **options)``: an offline engine over a Hugging Face Qwen3 folder
    (``model=None``: a tiny built-in random-weight Qwen3, made on first use; its text is noise).

    ``generate(prompts, sampling_params=None, use_tqdm=True)`` and
    ``chat(messages, sampling_params=None, use_tqdm=True)`` return one dict per prompt:
    ``{"text", "token_ids", "finish_reason"}`` (+ ``"stop_reason"``, ``"logprobs"``).
    ``get_tokenizer()`` is the checkpoint's tokenizer; ``exit()`` frees the engine. The decode
    pipeline's reports: ``model_runner.get_pipeline_statistics()``,
    ``print_pipeline_statistics()``, ``export_pipeline_trace(path)``; ``adjust_sm_allocation``.

    Options (``nanovllm.config.Config``; a bad value is a ValueError naming it and the fix):

    - ``max_num_batched_tokens=16384``: tokens per prefill step (long prompts are chunked).
    - ``max_num_seqs=None``: sequences per step; None = 512 per GPU (512 x
      ``tensor_parallel_size``), twice that with ``kv_cache_dtype="fp8"``.
    - ``prefill_admission_batch=None``: while decodes run, new requests are admitted only once
      this many (or every waiting one) find a free slot, so prefill comes in fewer, larger
      steps; None = ``max_num_seqs // 8``, 1 = as soon as a slot frees.
    - ``max_model_len=4096``: prompt + output tokens per sequence (capped by the checkpoint and
      by what the KV cache holds).
    - ``gpu_memory_utilization=0.9``: share of the GPU this engine may use.
    - ``tensor_parallel_size=1``: ranks (GPUs, or CPU processes) per engine.
    - ``tensor_parallel_all_reduce="auto"``: ``"symm_mem"`` sums decode-sized messages over
      NVLink through torch's symmetric memory (one such engine per process), ``"auto"`` where
      every rank can and no earlier engine of the process did, else NCCL; ``"nccl"``: NCCL
      always.
    - ``enforce_eager=False``: True disables CUDA graphs.
    - ``async_scheduling=True``: schedule and issue each decode step before the previous
      step's tokens reach the host, so host work overlaps the GPU (greedy and seeded outputs
      unchanged; unseeded sampling draws differently, as discarded rows advance the
      generator). False: every step synchronous.
    - ``enable_mixed_steps=False``: True makes a step carry the running decodes first, then
      prefill chunks up to ``max_num_batched_tokens``, so no decode waits behind a prefill
      step (mixed steps run eagerly; their attention in two launches).
    - ``kvcache_block_size=256``: tokens per KV block (a multiple of 16).
    - ``num_kvcache_blocks=None``: the KV block count (None: sized from free memory).
    - ``enable_prefix_caching=True``: reuse the KV blocks of identical prefixes.
    - ``kv_cache_dtype="auto"``: the model dtype; ``"fp8"`` (``"fp8_e4m3"``) stores K/V as
      float8 e4m3 with a per-layer scale: twice the tokens of a bf16 cache.
    - ``device="auto"``: ``"cuda"``, ``"cpu"`` or automatic.
    - ``dtype="auto"``: the checkpoint's dtype on GPU, float32 on CPU; or ``"float32"``,
      ``"float16"``, ``"bfloat16"``.
    - ``attention_backend="auto"``: ``"flash_attn"``, ``"triton"`` or ``"torch"``.
    - ``load_format="auto"``: ``"dummy"`` uses random weights (benchmarks).
    - ``seed=0``: the engine's generator (requests without ``SamplingParams.seed``).
    - ``skip_tokenizer_init=False``: True loads no tokenizer: token-id prompts only, and
      outputs' ``"text"`` is None.
    - ``enable_pipeline=False``: the Attention/FFN decode pipeline (PIPELINE_README.md), with
      ``pipeline_attention_sm_count=None``, ``pipeline_ffn_sm_count=None`` (both or neither),
      ``pipeline_enable_profiling=False``, ``pipeline_num_microbatches=2``,
      ``pipeline_policy="auto"``, ``pipeline_attention_kernel="triton"``,
      ``pipeline_ffn_gemm="triton"``.
    """

    def chat(
        self,
        messages: Seq[Message] | Seq[Seq[Message]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[dict]:
        """One conversation (a list of ``{"role", "content"}`` dicts) or a list of them, through
        the tokenizer's chat template with ``add_generation_prompt=True``; the same outputs as
        ``generate`` on the templated prompts."""
        self._check_open()
        tok = self.tokenizer
        if tok is None:
            raise ValueError(
                "chat() needs a tokenizer and this LLM has none (skip_tokenizer_init=True): "
                "create the LLM without skip_tokenizer_init"
            )
        if not getattr(tok, "chat_template", None):
            raise ValueError(
                f"the tokenizer of {self.config.model!r} has no chat template "
                "(tokenizer_config.json has no chat_template): use generate() with a prompt you "
                "format yourself, or add a chat_template to the tokenizer"
            )
        conversations = _as_conversations(messages)
        prompts = [
            tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


def _as_conversations(messages) -> list[list[Message]]:
    def is_message(m) -> bool:
        return isinstance(m, Mapping)

    if isinstance(messages, (list, tuple)) and messages and all(map(is_message, messages)):
        conversations = [list(messages)]
    elif isinstance(messages, (list, tuple)):
        conversations = [list(c) if isinstance(c, (list, tuple)) else c for c in messages]
    else:
        conversations = [messages]
    for i, conv in enumerate(conversations):
        ok = isinstance(conv, list) and conv and all(map(is_message, conv))
        bad = [m for m in conv if not {"role", "content"} <= set(m)] if ok else []
        if not ok or bad:
            raise ValueError(
                f"messages[{i}] is {conv!r:.80}: give a conversation as a non-empty list of "
                '{"role": ..., "content": ...} dicts, or a list of such conversations'
            )
    return conversations
