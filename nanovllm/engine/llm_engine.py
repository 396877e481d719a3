"""The offline engine: validate requests, loop schedule -> run -> postprocess, return outputs."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterable, Mapping
from collections.abc import Sequence as Seq

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from nanovllm.config import Config, RuntimeInfo, check_tensor_parallel
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.hf import eos_token_ids, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

Prompt = str | list[int]


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
        hf_config = AutoConfig.from_pretrained(model)
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
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model_runner = self._start_model_runner()
        self.scheduler = Scheduler(
            BlockManager(
                self.runtime.num_kvcache_blocks,
                config.kvcache_block_size,
                config.enable_prefix_caching,
            ),
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=max_model_len,
            eos_token_ids=self.runtime.eos_token_ids,
        )
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

    def exit(self) -> None:
        """Free the GPU memory and green contexts now; stop tensor-parallel workers."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()

    # ----------------------------------------------------------------- requests
    def _encode(self, index: int, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            token_ids = list(prompt)
        else:
            raise ValueError(
                f"prompts[{index}] is a {type(prompt).__name__}: give a str or a list of int "
                "token ids"
            )
        if not token_ids:
            raise ValueError(f"prompts[{index}] is empty: give at least one token")
        vocab = self.runtime.hf_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"prompts[{index}] has token id {bad[0]} outside the vocabulary [0, {vocab}): "
                "use ids from this model's tokenizer"
            )
        max_len = self.runtime.max_model_len
        if len(token_ids) >= max_len:
            raise ValueError(
                f"prompts[{index}] has {len(token_ids)} tokens, which leaves no room to generate "
                f"within max_model_len={max_len}: shorten the prompt or raise max_model_len"
            )
        bs = self.config.kvcache_block_size
        needed = (len(token_ids) + 1 + bs - 1) // bs
        if needed > self.runtime.num_kvcache_blocks:
            raise ValueError(
                f"prompts[{index}] needs {needed} KV blocks but the cache has only "
                f"{self.runtime.num_kvcache_blocks}: raise num_kvcache_blocks or "
                "gpu_memory_utilization, or shorten the prompt"
            )
        return token_ids

    def add_request(self, prompt: Prompt, params: SamplingParams, index: int = 0) -> Sequence:
        seq = Sequence(self._encode(index, prompt), params, self.config.kvcache_block_size)
        self.scheduler.add(seq)
        return seq

    def step(self) -> tuple[list[Sequence], int]:
        """One engine step; returns the sequences that finished and the tokens processed
        (positive for prefill, negative for decode, as nano-vllm reports them)."""
        batch = self.scheduler.schedule()
        finished = self.scheduler.take_finished()  # ended while scheduling (KV cache full)
        if not batch.seqs:
            return finished, 0
        tokens = self.model_runner.run(batch)
        self.scheduler.postprocess(batch, tokens)
        finished += [s for s in batch.seqs if s.is_finished]
        n = batch.num_tokens if batch.is_prefill else -len(batch.seqs)
        return finished, n

    def is_finished(self) -> bool:
        return self.scheduler.is_finished()

    # ----------------------------------------------------------------- generate
    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[dict]:
        """Outputs in input order: {"text", "token_ids", "finish_reason"} per prompt."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        elif isinstance(prompts, (Mapping, bytes)) or not isinstance(prompts, Iterable):
            raise ValueError(
                f"prompts is a {type(prompts).__name__}: give a str, a list of int token ids, "
                "or a list of those"
            )
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        elif isinstance(sampling_params, (Mapping, str, bytes)) or not isinstance(
            sampling_params, Iterable
        ):
            raise ValueError(
                f"sampling_params is a {type(sampling_params).__name__}: give one "
                "SamplingParams, or a list with one per prompt"
            )
        sampling_params = list(sampling_params)
        if len(sampling_params) != len(prompts):
            raise ValueError(
                f"sampling_params has {len(sampling_params)} entries for {len(prompts)} prompts: "
                "give one SamplingParams, or one per prompt"
            )
        for i, sp in enumerate(sampling_params):
            if not isinstance(sp, SamplingParams):
                raise ValueError(
                    f"sampling_params[{i}] is a {type(sp).__name__}: give a SamplingParams"
                )
        # Validate every prompt before queueing any, so a bad one leaves nothing half-queued.
        encoded = [self._encode(i, p) for i, p in enumerate(prompts)]
        bs = self.config.kvcache_block_size
        seqs = [Sequence(ids, sp, bs) for ids, sp in zip(encoded, sampling_params)]
        for seq in seqs:
            self.scheduler.add(seq)
        bar = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
        try:
            while not self.is_finished():
                t = time.perf_counter()
                before = (len(self.scheduler.waiting), len(self.scheduler.running))
                finished, n = self.step()
                if n == 0 and before == (len(self.scheduler.waiting), len(self.scheduler.running)):
                    # Cannot happen by construction (requests that can never fit are refused
                    # when added); never spin if it ever does.
                    raise RuntimeError(
                        "the scheduler made no progress with requests still queued: please "
                        "report this with your LLM options"
                    )
                dt = max(time.perf_counter() - t, 1e-9)
                if n > 0:
                    prefill_tps = n / dt
                elif n < 0:
                    decode_tps = -n / dt
                bar.set_postfix(prefill=f"{prefill_tps:.0f}tok/s", decode=f"{decode_tps:.0f}tok/s")
                bar.update(len(finished))
        except BaseException:
            self._abort()
            raise
        finally:
            bar.close()
        return [self._output(seq) for seq in seqs]

    def _abort(self) -> None:
        """Drop every queued or running request (after an exception), freeing their blocks."""
        s = self.scheduler
        for seq in list(s.running):
            s.finish(seq, "abort")
        s.waiting.clear()

    def _output(self, seq: Sequence) -> dict:
        token_ids = seq.completion_token_ids
        return {
            "text": self.tokenizer.decode(token_ids, skip_special_tokens=True),
            "token_ids": token_ids,
            "finish_reason": seq.finish_reason,
        }
