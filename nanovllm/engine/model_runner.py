"""Runs the model for one scheduled batch: inputs, forward (eager, graph or pipelined), sampling."""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist

from nanovllm.attention import GRAPH_SAFE, select_attention_backend
from nanovllm.attention.metadata import AttentionMetadata
from nanovllm.config import Config, RuntimeInfo, kv_cache_torch_dtype
from nanovllm.engine.cuda_graph import DecodeBuffers, DecodeGraphRunner
from nanovllm.engine.kv_cache import allocate_kv_cache, num_blocks_for
from nanovllm.engine.model_inputs import (
    ModelInputs,
    StepPlan,
    plan_step,
    prepare_sampling,
    to_model_inputs,
)
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.layers.attention import Attention
from nanovllm.layers.sampler import Sampler
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.utils.compile import enable_fusion
from nanovllm.utils.distributed import synchronize_within, tensor_parallel
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
    """One rank's model. With ``tensor_parallel_size > 1`` the process group is already joined;
    rank 0 gets ``workers`` (the other ranks, which run the same steps) and samples."""

    def __init__(self, config: Config, runtime: RuntimeInfo, workers=None):
        self.config, self.runtime = config, runtime
        self.device, self.dtype = runtime.device, runtime.dtype
        self.block_size = config.kvcache_block_size
        self.world_size = config.tensor_parallel_size
        self.rank = dist.get_rank() if self.world_size > 1 else 0
        self.workers = workers
        self.graph_runner = self.pipeline = None
        if workers is not None:
            # Also when the build fails midway: a graph captured so far holds its all-reduces.
            workers.before_leave = self.release_graphs
        hf = runtime.hf_config
        baseline_reserved = 0
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            baseline_reserved = torch.cuda.memory_reserved(self.device)  # earlier engines
            torch.cuda.reset_peak_memory_stats(self.device)
        with _default_dtype(self.dtype), self.device, tensor_parallel(self.rank, self.world_size):
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
        enable_fusion(self.device)
        self.sampler = Sampler()
        self.generator = torch.Generator(self.device).manual_seed(config.seed)

        if self.device.type == "cuda":
            self._warmup()
        kv_dtype = runtime.kv_cache_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, self.dtype)
        num_blocks = num_blocks_for(config, self.model, kv_dtype, self.device, baseline_reserved)
        if self.world_size > 1:
            num_blocks = self._agree_on_num_blocks(num_blocks)
        runtime.num_kvcache_blocks = num_blocks
        self.kv_cache = allocate_kv_cache(
            self.model, runtime.num_kvcache_blocks, self.block_size, kv_dtype, self.device
        )
        if self.device.type == "cuda":
            self._warmup_paged_prefill()
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
        if self.workers is not None:
            self.workers.end_step()  # an NCCL abort after a worker failure lets a build "finish"

    def _agree_on_num_blocks(self, num_blocks: int) -> int:
        """Every rank's scheduler decisions are rank 0's, so every rank must hold at least the
        blocks rank 0 hands out: take the minimum over ranks (each sized its own memory)."""
        t = torch.tensor([num_blocks], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        agreed = int(t.item())
        if agreed < num_blocks:
            logger.info("KV cache: %d blocks, the minimum over ranks", agreed)
        return agreed

    def _make_pipeline(self):
        from nanovllm.engine.pipeline_scheduler import PipelineScheduler

        return PipelineScheduler.create(self)

    @torch.inference_mode()
    def _warmup(self) -> None:
        """One maximal prefill without a KV cache, so the allocator's peak counts activations."""
        cfg = self.config
        seq_len = min(cfg.max_num_batched_tokens, self.runtime.max_model_len)
        num_seqs = max(1, min(cfg.max_num_batched_tokens // seq_len, cfg.max_num_seqs))
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

    @torch.inference_mode()
    def _warmup_paged_prefill(self) -> None:
        """A one-token prefill after a one-token cached prefix, the path of chunked prefill and
        prefix-cache hits: its kernels compile now, not inside the first request that takes it
        (a second or more per Triton kernel on an H100). Writes nothing (slot -1)."""
        i32 = dict(dtype=torch.int32, device=self.device)
        meta = AttentionMetadata(
            is_prefill=True,
            slot_mapping=torch.full((1,), -1, **i32),
            cu_seqlens_q=torch.tensor([0, 1], **i32),
            cu_seqlens_k=torch.tensor([0, 2], **i32),
            max_seqlen_q=1,
            max_seqlen_k=2,
            block_tables=torch.zeros(1, 1, **i32),
        )
        ids = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.model(ids, torch.ones_like(ids), meta)
        torch.cuda.synchronize()

    def run_model(self, inputs: ModelInputs, is_prefill: bool) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden]."""
        if is_prefill:
            return self.model(inputs.input_ids, inputs.positions, inputs.meta)
        if self.pipeline.active:
            return self.pipeline.run(inputs)
        return self.run_sequential_decode(inputs)

    def run_sequential_decode(self, inputs: ModelInputs) -> torch.Tensor:
        """The whole-GPU decode step: graph replay where captured, else eager."""
        if self.graph_runner is not None:
            return self.graph_runner.run(inputs)
        return self.model(inputs.input_ids, inputs.positions, inputs.meta)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """The forward of one step, on every rank alike; the sampling rows' logits, or None."""
        inputs = to_model_inputs(plan, self.device)
        hidden = self.run_model(inputs, plan.is_prefill)
        if not plan.sampling_rows:
            return None
        return self.model.compute_logits(hidden[inputs.logits_indices])

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[int | None]:
        """Sampled token per scheduled sequence (None where a chunked prefill continues)."""
        plan = plan_step(batch, self.block_size)
        if self.workers is None:
            return self._sample(batch, plan, self.execute(plan))
        try:
            self.workers.send(plan)  # first: the workers' forward overlaps rank 0's
            tokens = self._sample(batch, plan, self.execute(plan))
            self.workers.end_step()  # after _sample's host sync: the step really completed
            return tokens
        except BaseException as e:
            raise self.workers.failure_for(e)  # noqa: B904 - it chains ``e`` itself

    def _sample(self, batch: ScheduledBatch, plan: StepPlan, logits) -> list[int | None]:
        tokens: list[int | None] = [None] * len(batch.seqs)
        if logits is None:
            return tokens
        params = prepare_sampling(batch, plan.sampling_rows, self.device)
        sampled = self.sampler(logits, params, generator=self.generator).tolist()
        for row, token in zip(plan.sampling_rows, sampled):
            tokens[row] = token
        return tokens

    def get_pipeline_statistics(self) -> dict:
        return self.pipeline.statistics()

    def print_pipeline_statistics(self) -> None:
        self.pipeline.print_statistics()

    def release_graphs(self) -> None:
        """Destroy the CUDA graphs (and the pipeline's). With tensor parallelism they contain NCCL
        all-reduces, and NCCL's finalize or abort of the communicator waits, without a time
        limit, until every such graph is gone: every rank calls this before leaving the group."""
        if self.pipeline is not None:
            self.pipeline.close()
        if self.graph_runner is not None:
            self.graph_runner.reset()
        self.graph_runner = None

    def close(self) -> bool:
        """Release the partitions, graphs, KV cache and weights (the runner is unusable after).
        Rank 0 stops the other ranks first (``WorkerGroup.close`` calls ``release_graphs``
        before it leaves the group): a rank stopped mid-step may leave this GPU's stream waiting
        on a collective, which the synchronisation below would wait for. Returns False if this
        GPU did not go idle (tensor-parallel only: the wait is bounded there)."""
        if self.workers is not None:
            self.workers.close()
        self.release_graphs()
        self.decode_buffers = None
        for module in self.model.modules():
            if isinstance(module, Attention):
                module.k_cache = module.v_cache = torch.tensor([])
        self.kv_cache = None
        self.model = self.model.to("meta")
        if self.device.type != "cuda":
            return True
        if self.world_size == 1:
            torch.cuda.synchronize(self.device)
        elif not synchronize_within(self.device):
            return False  # no empty_cache: its cudaFree would wait for that stream too
        torch.cuda.empty_cache()
        return True
