"""Runs the model for one scheduled batch: inputs, forward (eager, graph or pipelined), sampling."""

from __future__ import annotations

import contextlib
import logging

import torch

from nanovllm.attention import GRAPH_SAFE, select_attention_backend
from nanovllm.config import Config, RuntimeInfo
from nanovllm.engine.cuda_graph import DecodeBuffers, DecodeGraphRunner
from nanovllm.engine.kv_cache import allocate_kv_cache, num_blocks_for
from nanovllm.engine.model_inputs import (
    ModelInputs,
    prepare_decode,
    prepare_prefill,
    prepare_sampling,
)
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.layers.attention import Attention
from nanovllm.layers.sampler import Sampler
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.utils.loader import init_dummy_weights, load_model

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class ModelRunner:
    def __init__(self, config: Config, runtime: RuntimeInfo):
        self.config, self.runtime = config, runtime
        self.device, self.dtype = runtime.device, runtime.dtype
        self.block_size = config.kvcache_block_size
        hf = runtime.hf_config
        baseline_reserved = 0
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            baseline_reserved = torch.cuda.memory_reserved(self.device)  # earlier engines
            torch.cuda.reset_peak_memory_stats(self.device)
        with _default_dtype(self.dtype), self.device:
            self.model = Qwen3ForCausalLM(hf)
        if config.load_format == "dummy":
            init_dummy_weights(self.model, seed=config.seed)
        else:
            load_model(self.model, config.model)
        self.model.eval()
        self.backend = select_attention_backend(config.attention_backend, self.device)
        runtime.attention_backend = self.backend.name
        for module in self.model.modules():
            if isinstance(module, Attention):
                module.backend = self.backend
        self.sampler = Sampler()
        self.generator = torch.Generator(self.device).manual_seed(config.seed)

        if self.device.type == "cuda":
            self._warmup()
        runtime.num_kvcache_blocks = num_blocks_for(
            config, self.model, self.dtype, self.device, baseline_reserved
        )
        self.kv_cache = allocate_kv_cache(
            self.model, runtime.num_kvcache_blocks, self.block_size, self.dtype, self.device
        )
        self.graph_runner = None
        self.decode_buffers = None
        if self.device.type == "cuda":
            max_blocks = -(-runtime.max_model_len // self.block_size)
            self.decode_buffers = DecodeBuffers(
                config.max_num_seqs, max_blocks, hf.hidden_size, self.dtype, self.device
            )
        use_graphs = (
            self.device.type == "cuda"
            and not config.enforce_eager
            and self.backend.name in GRAPH_SAFE
        )
        if use_graphs:
            self.graph_runner = DecodeGraphRunner(
                self.model.forward, self.decode_buffers, config.max_num_seqs, "sequential"
            )
            self.graph_runner.capture()
        elif self.device.type == "cuda":
            why = "enforce_eager=True" if config.enforce_eager else f"{self.backend.name} backend"
            logger.info("decode runs eagerly (%s)", why)
        runtime.cuda_graphs = use_graphs
        self.pipeline = self._make_pipeline()

    def _make_pipeline(self):
        from nanovllm.engine.pipeline_scheduler import PipelineScheduler

        return PipelineScheduler.create(self)

    @torch.inference_mode()
    def _warmup(self) -> None:
        """One maximal prefill without a KV cache, so the allocator's peak counts activations."""
        cfg = self.config
        seq_len = min(cfg.max_num_batched_tokens, self.runtime.max_model_len)
        num_seqs = max(1, min(cfg.max_num_batched_tokens // seq_len, cfg.max_num_seqs))
        from nanovllm.attention.metadata import AttentionMetadata

        cu = torch.arange(0, (num_seqs + 1) * seq_len, seq_len, dtype=torch.int32)
        n = num_seqs * seq_len
        meta = AttentionMetadata(
            is_prefill=True,
            slot_mapping=torch.full((n,), -1, dtype=torch.int32, device=self.device),
            cu_seqlens_q=cu.to(self.device),
            cu_seqlens_k=cu.to(self.device),
            max_seqlen_q=seq_len,
            max_seqlen_k=seq_len,
        )
        ids = torch.zeros(n, dtype=torch.int64, device=self.device)
        pos = torch.arange(seq_len, device=self.device).repeat(num_seqs)
        hidden = self.model(ids, pos, meta)
        self.model.compute_logits(hidden[cu[1:].to(self.device).long() - 1])
        torch.cuda.synchronize()
        torch.cuda.empty_cache()

    def run_model(self, inputs: ModelInputs, is_prefill: bool) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden]."""
        if not is_prefill and self.pipeline.active:
            return self.pipeline.run(inputs)
        if not is_prefill and self.graph_runner is not None:
            return self.graph_runner.run(inputs)
        return self.model(inputs.input_ids, inputs.positions, inputs.meta)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[int | None]:
        """Sampled token per scheduled sequence (None where a chunked prefill continues)."""
        prepare = prepare_prefill if batch.is_prefill else prepare_decode
        inputs = prepare(batch, self.block_size, self.device)
        hidden = self.run_model(inputs, batch.is_prefill)
        tokens: list[int | None] = [None] * len(batch.seqs)
        if not inputs.sampling_rows:
            return tokens
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        params = prepare_sampling(batch, inputs.sampling_rows, self.device)
        sampled = self.sampler(logits, *params, generator=self.generator).tolist()
        for row, token in zip(inputs.sampling_rows, sampled):
            tokens[row] = token
        return tokens

    def get_pipeline_statistics(self) -> dict:
        return self.pipeline.statistics()

    def print_pipeline_statistics(self) -> None:
        self.pipeline.print_statistics()

    def close(self) -> None:
        """Release the partitions, graphs, KV cache and weights (the runner is unusable after)."""
        if self.pipeline is not None:
            self.pipeline.close()
        if self.graph_runner is not None:
            self.graph_runner.reset()
        self.graph_runner = self.decode_buffers = None
        for module in self.model.modules():
            if isinstance(module, Attention):
                module.k_cache = module.v_cache = torch.tensor([])
        self.kv_cache = None
        self.model = self.model.to("meta")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
