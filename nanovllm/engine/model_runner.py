"""Runs the model for one scheduled batch: inputs, forward, sampling.

Prefill runs the model's forward eagerly; a pure-decode step goes to the decode strategy the
runner is handed at start-up (``pipeline.strategy``): the sequential graph step, or the
pipeline."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from nanovllm.attention import select_attention_backend
from nanovllm.config import Config, RuntimeInfo, kv_cache_torch_dtype
from nanovllm.engine.cuda_graph import DecodeBuffers, DecodeGraphRunner
from nanovllm.engine.kv_cache import allocate_kv_cache, num_blocks_for
from nanovllm.engine.launched import LaunchedStep, TokenCopies
from nanovllm.engine.model_inputs import (
    ModelInputs,
    StepPlan,
    plan_step,
    prepare_sampling,
    to_model_inputs,
)
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.warmup import warmup_max_prefill, warmup_paged_prefill
from nanovllm.layers.attention import Attention
from nanovllm.layers.sampler import Sampler, top_logprobs
from nanovllm.models import model_class
from nanovllm.pipeline.setup import DecodeSetup
from nanovllm.pipeline.strategy import make_decode_strategy
from nanovllm.utils.compile import enable_fusion
from nanovllm.utils.distributed import (
    synchronize_within,
    tensor_parallel,
    use_symmetric_all_reduce,
)
from nanovllm.utils.loader import init_dummy_weights, load_model
from nanovllm.utils.symm_all_reduce import build_symmetric_all_reduce
from nanovllm.utils.tensors import default_dtype, to_device

logger = logging.getLogger(__name__)


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
        self.decode = None
        if workers is not None:
            # Also when the build fails midway: a graph captured so far holds its all-reduces.
            workers.before_leave = self.release_graphs
        hf = runtime.hf_config
        baseline_reserved = 0
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            baseline_reserved = torch.cuda.memory_reserved(self.device)  # earlier engines
            torch.cuda.reset_peak_memory_stats(self.device)
        with default_dtype(self.dtype), self.device, tensor_parallel(self.rank, self.world_size):
            self.model = model_class(hf)(hf)
        if self.world_size > 1 and config.tensor_parallel_all_reduce != "nccl":
            # The largest decode step's message: [max_num_seqs, hidden_size].
            max_bytes = config.max_num_seqs * hf.hidden_size * self.dtype.itemsize
            required = config.tensor_parallel_all_reduce == "symm_mem"
            symmetric = build_symmetric_all_reduce(self.device, self.dtype, max_bytes, required)
            use_symmetric_all_reduce(symmetric)
            runtime.tensor_parallel_all_reduce = "symm_mem" if symmetric else "nccl"
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
            warmup_max_prefill(
                self.model,
                config.max_num_batched_tokens,
                config.max_num_seqs,
                runtime.max_model_len,
                self.device,
            )
        kv_dtype = runtime.kv_cache_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, self.dtype)
        num_blocks = num_blocks_for(config, self.model, kv_dtype, self.device, baseline_reserved)
        if self.world_size > 1:
            num_blocks = self._agree_on_num_blocks(num_blocks)
        runtime.num_kvcache_blocks = num_blocks
        self.kv_cache = allocate_kv_cache(
            self.model, runtime.num_kvcache_blocks, self.block_size, kv_dtype, self.device
        )
        if self.device.type == "cuda":
            warmup_paged_prefill(self.model, self.device)
        self._token_copies = TokenCopies(config.max_num_seqs, self.device)
        self._last_sampled: torch.Tensor | None = None  # rank 0: the latest step's samples
        self._in_flight = 0  # steps launched and not yet collected (rank 0)
        self.decode = make_decode_strategy(config, self._decode_setup())
        runtime.cuda_graphs = self.graph_runner is not None
        if self.workers is not None:
            self.workers.end_build()  # an NCCL abort after a worker failure lets a build "finish"

    def _agree_on_num_blocks(self, num_blocks: int) -> int:
        """Every rank's scheduler decisions are rank 0's, so every rank must hold at least the
        blocks rank 0 hands out: take the minimum over ranks (each sized its own memory)."""
        t = torch.tensor([num_blocks], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        agreed = int(t.item())
        if agreed < num_blocks:
            logger.info("KV cache: %d blocks, the minimum over ranks", agreed)
        return agreed

    def _decode_setup(self) -> DecodeSetup:
        """Capture the sequential decode graphs (where the backend allows) and package what a
        decode strategy runs on."""
        cfg, hf = self.config, self.runtime.hf_config
        graphs = buffers = None
        if self.device.type == "cuda":
            max_blocks = -(-self.runtime.max_model_len // self.block_size)
            attention = self.backend.decode_buffers(cfg.max_num_seqs, max_blocks, self.device)
            buffers = DecodeBuffers(
                cfg.max_num_seqs, hf.hidden_size, self.dtype, self.device, attention
            )
            if cfg.enforce_eager or not self.backend.graph_safe:
                why = "enforce_eager=True" if cfg.enforce_eager else f"{self.backend.name} backend"
                logger.info("decode runs eagerly (%s)", why)
            else:
                graphs = DecodeGraphRunner(
                    self.model.forward, buffers, cfg.max_num_seqs, "sequential"
                )
                graphs.capture()
        return DecodeSetup(
            model=self.model,
            backend=self.backend,
            device=self.device,
            dtype=self.dtype,
            max_num_seqs=cfg.max_num_seqs,
            block_size=self.block_size,
            num_kvcache_blocks=self.runtime.num_kvcache_blocks,
            max_model_len=self.runtime.max_model_len,
            k_cache=self.kv_cache[0, 0],
            v_cache=self.kv_cache[1, 0],
            graphs=graphs,
            buffers=buffers,
        )

    def run_model(self, inputs: ModelInputs, is_prefill: bool) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden]."""
        if is_prefill:
            return self.model(inputs.input_ids, inputs.positions, inputs.meta)
        return self.decode.run(inputs)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """The forward of one step, on every rank alike; the sampling rows' logits, or None."""
        inputs = to_model_inputs(plan, self.device, self.backend)
        if plan.prev_rows is not None:
            prev = self._previous_samples(plan.prev_num_rows)
            inputs.input_ids = prev[to_device(plan.prev_rows, torch.int64, self.device)]
        hidden = self.run_model(inputs, plan.is_prefill)
        if not plan.sampling_rows:
            return None
        return self.model.compute_logits(hidden[inputs.logits_indices])

    def _previous_samples(self, num_rows: int) -> torch.Tensor:
        """The token ids rank 0 sampled in the step before [num_rows], on every rank: a step
        scheduled ahead reads its inputs from them on the device. Rank 0 broadcasts (on its
        stream, after that step's sampling); the workers receive."""
        if self.world_size == 1:
            return self._last_sampled
        if self.rank == 0:
            buf = self._last_sampled
        else:
            buf = torch.empty(num_rows, dtype=torch.int64, device=self.device)
        dist.broadcast(buf, src=0)
        return buf

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[int | None]:
        """Sampled token per scheduled sequence (None where a chunked prefill continues)."""
        return self.collect(self.launch(batch, overlap=False))

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, overlap: bool = True) -> LaunchedStep:
        """Issue ``batch``'s forward and sampling; the host does not wait for the tokens
        (``collect`` does). A batch scheduled ahead (``batch.prev_rows``) reads its input
        tokens from the step launched just before it, which must not be collected yet.
        ``overlap=False``: the tokens will be read at once, so they skip the pinned copy (not
        with tensor parallelism: rank 0 waits for a step's event, watching for worker failures)."""
        prev_rows = self._last_sampled.shape[0] if batch.prev_rows is not None else 0
        plan = plan_step(batch, self.block_size, prev_rows)
        try:
            if self.workers is not None:
                self.workers.send(plan)  # first: the workers' forward overlaps rank 0's
            self._in_flight += 1
            logits = self.execute(plan)
            if logits is None:
                return LaunchedStep(batch, plan, None, None, None)
            sampled = self._sample(batch, plan, logits)
            self._last_sampled = sampled
            if not overlap and self.workers is None:
                return LaunchedStep(batch, plan, sampled, None, None)
            host, event = self._token_copies.start(sampled)
            return LaunchedStep(batch, plan, sampled, host, event)
        except BaseException as e:
            if self.workers is None:
                raise
            raise self.workers.failure_for(e)  # noqa: B904 - it chains ``e`` itself

    def collect(self, step: LaunchedStep) -> list[int | None]:
        """``step``'s sampled token per scheduled sequence, once its copy to the host is done."""
        try:
            if self.workers is not None:
                self.workers.wait(step.event)
            tokens = step.tokens()
            self._in_flight -= 1
            if self.workers is not None and not self._in_flight:
                self.workers.end_step()  # every launched step completed
            return tokens
        except BaseException as e:
            if self.workers is None:
                raise
            raise self.workers.failure_for(e)  # noqa: B904 - it chains ``e`` itself

    def discard(self, step: LaunchedStep) -> None:
        """Forget a launched step without reading its tokens (its requests were aborted)."""
        self._in_flight = max(0, self._in_flight - 1)

    def _sample(self, batch: ScheduledBatch, plan: StepPlan, logits) -> torch.Tensor:
        """Sampled ids [len(plan.sampling_rows)] int64 on the device; the rows that asked for
        logprobs get them now (a host sync: such steps are never scheduled ahead)."""
        rows = plan.sampling_rows
        params = prepare_sampling(batch, rows, self.device, self.runtime.eos_token_ids)
        sampled_t = self.sampler(logits, params, generator=self.generator).long()
        wanted = [(j, batch.seqs[r].params.logprobs) for j, r in enumerate(rows)]
        wanted = [(j, n) for j, n in wanted if n is not None]
        if wanted and self.workers is not None and self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
            self.workers.wait(ready)  # top_logprobs reads the logits on the host
        for (j, _), entry in zip(wanted, top_logprobs(logits, sampled_t, wanted)):
            batch.seqs[rows[j]].logprobs.append(entry)  # the token's own entry
        return sampled_t

    @property
    def graph_runner(self):
        """The sequential decode graphs (None: eager decode)."""
        return self.decode.sequential.graphs if self.decode is not None else None

    # -- the decode pipeline's user API (every strategy answers it) -------------------------
    def get_pipeline_statistics(self) -> dict:
        return self.decode.statistics()

    def print_pipeline_statistics(self) -> None:
        self.decode.print_statistics()

    def export_pipeline_trace(self, path: str) -> None:
        """Write the stage intervals of recent pipelined steps as a Chrome/Perfetto trace
        (needs ``pipeline_enable_profiling=True``)."""
        self.decode.export_trace(path)

    def adjust_sm_allocation(self, attention_sm_count: int, ffn_sm_count: int) -> tuple[int, int]:
        """Re-partition the pipeline's SMs; returns the counts the driver granted."""
        return self.decode.adjust_sm_allocation(attention_sm_count, ffn_sm_count)

    def release_graphs(self) -> None:
        """Destroy the CUDA graphs (sequential and pipelined). With tensor parallelism they
        contain NCCL all-reduces, and NCCL's finalize or abort of the communicator waits,
        without a time limit, until every such graph is gone: every rank calls this before
        leaving the group."""
        if self.decode is not None:
            self.decode.close()

    def close(self) -> bool:
        """Release the partitions, graphs, KV cache and weights (the runner is unusable after).
        Rank 0 stops the other ranks first (``WorkerGroup.close`` calls ``release_graphs``
        before it leaves the group): a rank stopped mid-step may leave this GPU's stream waiting
        on a collective, which the synchronisation below would wait for. Returns False if this
        GPU did not go idle (tensor-parallel only: the wait is bounded there)."""
        if self.workers is not None:
            self.workers.close()
        self.release_graphs()
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
