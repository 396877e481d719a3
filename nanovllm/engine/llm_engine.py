"""The offline engine: validate requests, loop schedule -> run -> postprocess, return outputs."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig

from nanovllm.config import Config, RuntimeInfo, check_tensor_parallel, log_automatic_choices
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.mixed_scheduler import MixedScheduler
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.progress import StepRates
from nanovllm.engine.requests import (
    Limits,
    Prompt,
    as_params_list,
    as_prompt_list,
    check_fits,
    check_params,
    encode_prompt,
    make_output,
)
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.stop_strings import StopStringChecker
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.hf import (
    check_model_folder,
    check_supported_config,
    eos_token_ids,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, model: str | None = None, **kwargs):
        if model is None:
            from nanovllm.utils.default_model import default_model_path

            model = default_model_path()
        unknown = set(kwargs) - Config.field_names()
        if unknown:
            raise ValueError(
                f"unknown LLM option(s) {sorted(unknown)}: valid options are "
                f"{sorted(Config.field_names() - {'model'})}"
            )
        self.config = config = Config(model, **kwargs)
        log_automatic_choices(config, given=kwargs)
        check_model_folder(model)
        hf_config = AutoConfig.from_pretrained(model)
        check_supported_config(hf_config)
        device = resolve_device(config.device)
        max_model_len = min(config.max_model_len, hf_config.max_position_embeddings)
        self.runtime = RuntimeInfo(
            device=device,
            dtype=resolve_dtype(config.dtype, hf_config, device),
            hf_config=hf_config,
            max_model_len=max_model_len,
            eos_token_ids=eos_token_ids(model, hf_config),
        )
        check_tensor_parallel(config, hf_config, device)
        torch.manual_seed(config.seed)
        self.tokenizer = load_tokenizer(model, config.skip_tokenizer_init)
        self.model_runner = self._start_model_runner()
        self.limits = self._kv_cache_limits(max_model_len)
        max_model_len = self.runtime.max_model_len
        self._stop_checker = StopStringChecker(self.tokenizer)
        scheduler = MixedScheduler if config.enable_mixed_steps else Scheduler
        self.scheduler = scheduler(
            BlockManager(
                self.runtime.num_kvcache_blocks,
                config.kvcache_block_size,
                config.enable_prefix_caching,
            ),
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=max_model_len,
            eos_token_ids=self.runtime.eos_token_ids,
            stop_checker=self._stop_checker if self.tokenizer is not None else None,
            admission_batch=config.resolved_prefill_admission_batch(),
        )
        self._closed = False
        self._in_flight = None  # async scheduling: the decode step issued, tokens not yet read
        self.num_steps = 0  # model steps whose tokens were read
        # Runs once: on exit(), when the engine is garbage-collected, or at interpreter exit.
        self._finalizer = weakref.finalize(self, self.model_runner.close)

    def _start_model_runner(self) -> ModelRunner:
        """One process, or (``tensor_parallel_size > 1``) this process as rank 0 of a group
        whose other ranks are worker processes (see ``nanovllm.engine.tp_workers``)."""
        if self.config.tensor_parallel_size == 1:
            return ModelRunner(self.config, self.runtime)
        from nanovllm.engine.tp_workers import WorkerGroup

        if self.runtime.device.type == "cuda":
            self.runtime.device = torch.device("cuda", 0)  # rank r runs on cuda:r
        workers = WorkerGroup(self.config, self.runtime)  # returns with every rank in the group
        try:
            return ModelRunner(self.config, self.runtime, workers)
        except BaseException as e:
            raise workers.failure_for(e)  # noqa: B904 - it chains ``e`` itself

    def _kv_cache_limits(self, max_model_len: int) -> Limits:
        """A KV cache smaller than one max_model_len sequence lowers the effective
        max_model_len (with a warning); requests that can never fit are refused when added."""
        bs, blocks = self.config.kvcache_block_size, self.runtime.num_kvcache_blocks
        capacity = bs * blocks
        if capacity < max_model_len:
            logger.warning(
                "the KV cache (%d blocks of %d = %d tokens) cannot hold one max_model_len=%d "
                "sequence: max_model_len is lowered to %d, and requests whose prompt + max_tokens "
                "exceed it are refused; raise num_kvcache_blocks or gpu_memory_utilization, or "
                "lower max_model_len, to silence this",
                blocks,
                bs,
                capacity,
                max_model_len,
                capacity,
            )
            self.runtime.max_model_len = capacity
        return Limits(
            vocab_size=self.runtime.hf_config.vocab_size,
            max_model_len=self.runtime.max_model_len,
            requested_max_model_len=max_model_len,
            kv_cache_tokens=capacity,
            num_kv_blocks=blocks,
            block_size=bs,
        )

    def exit(self) -> None:
        """Free the GPU memory and green contexts now; stop tensor-parallel workers. The engine
        cannot generate afterwards: create a new LLM."""
        self._closed = True
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()

    def _check_open(self) -> None:
        if getattr(self, "_closed", False):
            raise RuntimeError(
                "this LLM was shut down by exit() (its model and KV cache are freed): create a "
                "new LLM to generate again"
            )

    def get_tokenizer(self) -> PreTrainedTokenizerBase | None:
        """The checkpoint's Hugging Face tokenizer (None with ``skip_tokenizer_init=True``)."""
        return self.tokenizer

    # ----------------------------------------------------------------- requests
    def _make_sequences(self, prompts: list, params: list[SamplingParams]) -> list[Sequence]:
        """Every request checked before any is queued, so a bad one leaves nothing behind."""
        self._check_open()
        tok, limits = self.tokenizer, self.limits
        encoded = []
        for i, (prompt, sp) in enumerate(zip(prompts, params)):
            check_params(i, sp, tok, limits.vocab_size)
            encoded.append(encode_prompt(i, prompt, tok, limits))
            check_fits(i, len(encoded[-1]), sp, limits)
        bs = self.config.kvcache_block_size
        return [Sequence(ids, sp, bs) for ids, sp in zip(encoded, params)]

    def add_request(self, prompt: Prompt, params: SamplingParams) -> Sequence:
        (seq,) = self._make_sequences([prompt], [params])
        self.scheduler.add(seq)
        return seq

    def step(self) -> tuple[list[Sequence], int]:
        """One engine step; returns the sequences that finished and the tokens processed
        (positive for prefill, negative for decode, as nano-vllm reports them; a mixed step
        counts its prefill tokens).

        With ``async_scheduling`` a decode step is issued, then the next decode step is
        scheduled and issued while it runs (its input tokens read on the device), and only
        then are the first step's tokens read and post-processed: the host's scheduling,
        input building and sampling set-up leave the GPU's critical path. A sequence that the
        first step ends on a sampled EOS or stop string computes one row in the next step that
        is discarded; stop conditions and greedy or seeded outputs are those of the
        synchronous engine. Prefill steps, steps with logprobs, admissions and preemptions
        run synchronously."""
        finished: list[Sequence] = []
        if self._in_flight is None:
            batch = self.scheduler.schedule()
            finished = self.scheduler.take_finished()  # ended while scheduling (KV cache full)
            if not batch.seqs:
                return finished, 0
            if not self._may_run_ahead(batch):
                return finished + self._postprocess(batch, self.model_runner.run(batch)), (
                    batch.num_tokens - batch.num_decode_rows
                    if batch.is_prefill
                    else -len(batch.seqs)
                )
            self._in_flight = self.model_runner.launch(batch)
        launched = self._in_flight
        self._in_flight = None
        ahead = self.scheduler.schedule_ahead(launched.batch)
        if ahead is not None:
            self._in_flight = self.model_runner.launch(ahead)
        live = sum(1 for s in launched.batch.seqs if not s.is_finished)
        tokens = self.model_runner.collect(launched)
        return finished + self._postprocess(launched.batch, tokens), -live

    def _progress_marker(self) -> tuple:
        s = self.scheduler
        return len(s.waiting), len(s.running), self.num_steps

    def _may_run_ahead(self, batch) -> bool:
        return (
            self.config.async_scheduling
            and not batch.is_prefill
            and all(s.params.logprobs is None for s in batch.seqs)
        )

    def _postprocess(self, batch, tokens: list[int | None]) -> list[Sequence]:
        """Apply ``tokens``; the sequences of ``batch`` that this ended."""
        self.num_steps += 1
        return self.scheduler.postprocess(batch, tokens)

    def is_finished(self) -> bool:
        return self.scheduler.is_finished() and self._in_flight is None

    # ----------------------------------------------------------------- generate
    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[dict]:
        """One output per prompt, in input order: {"text", "token_ids", "finish_reason"}
        ("stop" or "length"), plus "stop_reason" (the stop string that ended it) and "logprobs"
        (with SamplingParams.logprobs). A bad prompt or SamplingParams raises a ValueError
        naming it before anything is queued."""
        self._check_open()
        prompts = as_prompt_list(prompts)
        sampling_params = as_params_list(sampling_params, len(prompts))
        seqs = self._make_sequences(prompts, sampling_params)
        for seq in seqs:
            self.scheduler.add(seq)
        bar = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        rates = StepRates()
        try:
            while not self.is_finished():
                t = time.perf_counter()
                before = self._progress_marker()
                finished, n = self.step()
                if n == 0 and before == self._progress_marker():
                    # Cannot happen by construction (requests that can never fit are refused
                    # when added); never spin if it ever does.
                    raise RuntimeError(
                        "the scheduler made no progress with requests still queued: please "
                        "report this with your LLM options"
                    )
                rates.add(n, time.perf_counter() - t)
                bar.set_postfix(rates.postfix())
                bar.update(len(finished))
        except BaseException:
            self._abort()
            raise
        finally:
            bar.close()
        return [make_output(seq, self.tokenizer, self._stop_checker) for seq in seqs]

    def _abort(self) -> None:
        """Drop every queued or running request (after an exception), freeing their blocks."""
        if self._in_flight is not None:  # its tokens are dropped with the requests
            self.model_runner.discard(self._in_flight)
            self._in_flight = None
        s = self.scheduler
        for seq in list(s.running):
            s.finish(seq, "abort")
        s.waiting.clear()
