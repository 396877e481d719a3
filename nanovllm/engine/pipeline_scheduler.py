"""The Attention/FFN decode pipeline on one GPU.

The decode batch is split into micro-batches (row ranges). Each layer is cut in two stages:

- attention stage ``A(l, i)`` on the attention partition: KV store and paged attention, the
  memory-bound part;
- FFN stage ``F(l, i)`` on the FFN partition: every GEMM around it, i.e. layer l-1's o_proj and
  FFN followed by layer l's input norm, QKV projection and rotary (the embedding at l = 0, the
  final norm at l = num_layers).

With two micro-batches the partitions work on different micro-batches at the same time:

    FFN stream      : F(0,0) F(0,1) F(1,0) F(1,1) F(2,0) F(2,1) ...
    attention stream:   .    A(0,0) A(0,1) A(1,0) A(1,1) A(2,0) ...

``A(l, i)`` waits for ``F(l, i)`` (it needs q, k, v) and ``F(l+1, i)`` waits for ``A(l, i)`` (it
needs the attention output): one CUDA event per edge, the host never waits. Tensors that cross
streams (q, k, v one way, the attention output the other) live in static per-micro-batch rows:
left to the caching allocator, memory freed by one stream could be handed to the other while
still being read. The residual never leaves the FFN stream. The whole step is captured as one
CUDA graph per batch bucket; kernels keep their green partition on replay.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace

import torch

from nanovllm.engine import pipeline_policy as policy_lib
from nanovllm.engine.bucket_splits import BucketSplits
from nanovllm.engine.cuda_graph import DecodeGraphRunner
from nanovllm.engine.microbatch import event, microbatch_bounds, wait
from nanovllm.engine.model_inputs import ModelInputs
from nanovllm.engine.pipeline_stats import PipelineStats, StageTimers, describe, format_table
from nanovllm.layers.linear import BOUNDED_MIN_ROWS, bounded_gemms

logger = logging.getLogger(__name__)


class PipelineScheduler:
    def __init__(self, runner, mode: str, reason: str, green=None):
        self.runner, self.model = runner, runner.model
        cfg = runner.config
        self.num_microbatches = cfg.pipeline_num_microbatches
        self.ffn_gemm = cfg.pipeline_ffn_gemm
        self.mode, self.reason, self.green = mode, reason, green
        self.active = mode == "green"
        self.stats = PipelineStats(cfg.pipeline_enable_profiling and self.active)
        self.graph_runner: DecodeGraphRunner | None = None
        self.bucket_splits = BucketSplits(self)
        self.policy_mode = cfg.pipeline_policy
        self.policy: policy_lib.PipelinePolicy | None = None
        # Automatic counts: the first calibration also chooses the split (never after a
        # user's adjust_sm_allocation, which is honoured as given).
        self._search_split = (
            cfg.pipeline_attention_sm_count is None and cfg.pipeline_ffn_sm_count is None
        )
        if not self.active:
            return
        hf, rows = runner.runtime.hf_config, cfg.max_num_seqs
        attn = next(layer.self_attn for layer in self.model.model.layers)
        kw = dict(dtype=runner.dtype, device=runner.device)
        # Cross-stream buffers, rows of every micro-batch: [rows, heads, head_dim] etc.
        self.q = torch.zeros(rows, attn.num_heads, attn.head_dim, **kw)
        self.k = torch.zeros(rows, attn.num_kv_heads, attn.head_dim, **kw)
        self.v = torch.zeros(rows, attn.num_kv_heads, attn.head_dim, **kw)
        self.o = torch.zeros(rows, attn.num_heads * attn.head_dim, **kw)
        self.out = torch.zeros(rows, hf.hidden_size, **kw)
        L, m = self.model.num_layers, self.num_microbatches
        dev = runner.device
        self.ffn_done = [[event(dev) for _ in range(m)] for _ in range(L)]
        self.attn_done = [[event(dev) for _ in range(m)] for _ in range(L)]
        self.ready, self.finished = event(dev), event(dev)
        self.timers: dict[int, StageTimers] = {}
        self.logged_kernel_choice: set[int] = set()
        self.attention_tma = policy_lib.use_tma_attention(self)
        if self.ffn_gemm == "triton":
            logger.info(
                "decode pipeline: FFN-stage GEMMs of %d rows or more on a persistent Triton GEMM "
                "with one program per FFN-partition SM where it supports them, cuBLAS elsewhere",
                BOUNDED_MIN_ROWS,
            )
        self._graph_generation = green.generation
        green.on_repartition(self._on_repartition)
        if runner.graph_runner is not None:
            self.graph_runner = DecodeGraphRunner(
                self.step, runner.decode_buffers, cfg.max_num_seqs, "pipelined"
            )
            self.graph_runner.capture()
        self.policy = self._calibrate()

    @classmethod
    def create(cls, runner) -> PipelineScheduler:
        cfg = runner.config
        if not cfg.enable_pipeline:
            return cls(runner, "disabled", "enable_pipeline=False")
        why = ""
        if cfg.tensor_parallel_size > 1:
            why = (
                f"tensor_parallel_size={cfg.tensor_parallel_size}: the pipeline runs on "
                "single-GPU engines only (its stages would have to own the all-reduces); every "
                "rank decodes sequentially"
            )
        elif runner.device.type != "cuda":
            why = f"Green Contexts need a CUDA GPU; running on {runner.device.type}"
        if not why:
            from nanovllm.engine.green_manager import GreenContextManager

            green = GreenContextManager(
                runner.device, cfg.pipeline_attention_sm_count, cfg.pipeline_ffn_sm_count
            )
            if green.available:
                logger.info(
                    "decode pipeline: %d micro-batches, attention on %d SMs, FFN on %d SMs",
                    cfg.pipeline_num_microbatches,
                    green.attention_sms,
                    green.ffn_sms,
                )
                return cls(runner, "green", "", green)
            why = green.reason
            green.close()
        logger.warning("decode pipeline unavailable, decoding sequentially: %s", why)
        return cls(runner, "sequential", why)

    # ------------------------------------------------------------------ the step
    def step(
        self, input_ids, positions, meta, green=None, attention_tma: bool | None = None
    ) -> torch.Tensor:
        """One pipelined decode step: input_ids/positions [bs] -> final hidden [bs, hidden].
        ``green``: the split to run on (default: the current one) and ``attention_tma`` the
        attention kernel chosen for its partition."""
        bs = input_ids.shape[0]
        bounds = microbatch_bounds(bs, self.num_microbatches)
        model, num_layers = self.model, self.model.num_layers
        if green is None:
            green, attention_tma = self.green, self.attention_tma
        attn_stream, ffn_stream = green.attention_stream, green.ffn_stream
        # Streams are None only when a test emulates the schedule serially on the CPU.
        main = torch.cuda.current_stream() if ffn_stream is not None else None
        timers = None
        if self.stats.profiling:
            timers = self.timers.setdefault(bs, StageTimers(num_layers, len(bounds)))
            timers.step[0].record(main)
        # Both partitions start after the inputs were written on the launching stream.
        self.ready.record(main)
        wait(attn_stream, self.ready)
        wait(ffn_stream, self.ready)
        # The attention stage's kernel is the one chosen for its partition.
        metas = [replace(meta.decode_slice(lo, hi), decode_tma=attention_tma) for lo, hi in bounds]
        residual: list[torch.Tensor | None] = [None] * len(bounds)
        for layer in range(num_layers + 1):
            for i, (lo, hi) in enumerate(bounds):
                with torch.cuda.stream(ffn_stream), self._ffn_gemms(green):
                    if layer > 0:
                        wait(ffn_stream, self.attn_done[layer - 1][i])
                    if timers:
                        timers.ffn[layer][i][0].record(ffn_stream)
                    if layer == 0:
                        h, r = model.embed(input_ids[lo:hi]), None
                    else:
                        h, r = model.forward_post_attention(layer - 1, self.o[lo:hi], residual[i])
                    if layer == num_layers:
                        self.out[lo:hi] = model.final_norm(h, r)
                    else:
                        q, k, v, residual[i] = model.forward_qkv(layer, positions[lo:hi], h, r)
                        self.q[lo:hi], self.k[lo:hi], self.v[lo:hi] = q, k, v
                    if timers:
                        timers.ffn[layer][i][1].record(ffn_stream)
                    if layer < num_layers:
                        self.ffn_done[layer][i].record(ffn_stream)
                if layer == num_layers:
                    continue
                with torch.cuda.stream(attn_stream):
                    wait(attn_stream, self.ffn_done[layer][i])
                    if timers:
                        timers.attention[layer][i][0].record(attn_stream)
                    self.o[lo:hi] = model.forward_attention_core(
                        layer, self.q[lo:hi], self.k[lo:hi], self.v[lo:hi], metas[i]
                    )
                    if timers:
                        timers.attention[layer][i][1].record(attn_stream)
                    self.attn_done[layer][i].record(attn_stream)
        # Join: the FFN stream's last stage already waited for every attention stage.
        self.finished.record(ffn_stream)
        wait(main, self.finished)
        if timers:
            timers.step[1].record(main)
        return self.out[:bs]

    def run(self, inputs: ModelInputs) -> torch.Tensor:
        n = inputs.input_ids.shape[0]
        if self._graph_generation != self.green.generation:  # re-partitioned since capture
            if self.graph_runner is not None:
                self.graph_runner.capture()
            self._graph_generation = self.green.generation
            self.policy = self._calibrate()
        bucket = self.graph_runner.bucket(n) if self.graph_runner is not None else n
        if n < 2 or self.bucket_mode(bucket) == "sequential":
            self.stats.sequential_steps += 1
            return self._sequential(inputs)
        split = self.policy.split(bucket) if self.policy is not None else None
        if self.bucket_splits.has(split):
            hidden = self.bucket_splits.run(split, inputs)
        else:
            hidden = self._pipelined(inputs)
        self.stats.record(n, self.timers.get(bucket))
        return hidden

    def bucket_mode(self, bucket: int) -> str:
        if self.policy_mode == "always" or self.policy is None:
            return "pipelined"
        return self.policy.mode(bucket)

    def _pipelined(self, inputs: ModelInputs) -> torch.Tensor:
        if self.graph_runner is not None:
            return self.graph_runner.run(inputs)
        return self.step(inputs.input_ids, inputs.positions, inputs.meta)

    @contextlib.contextmanager
    def _ffn_gemms(self, green):
        """The FFN stage's GEMM budget on ``green``'s FFN partition: cuBLAS told its SM count and,
        with ``pipeline_ffn_gemm="triton"``, large GEMMs on one program per SM."""
        bound = green.ffn_sms if self.ffn_gemm == "triton" else None
        with green.cublas_sm_budget("ffn"), bounded_gemms(bound):
            yield

    def _sequential(self, inputs: ModelInputs) -> torch.Tensor:
        return self.runner.run_sequential_decode(inputs)

    def _calibrate(self) -> policy_lib.PipelinePolicy | None:
        if self.policy_mode != "auto" or self.runner.device.type != "cuda":
            return None  # "always", or a serial emulation without CUDA timing
        profiling, self.stats.profiling = self.stats.profiling, False  # no stage timers
        search, self._search_split = self._search_split, False
        try:
            if not search:
                return policy_lib.calibrate(self)
            policy = policy_lib.search_split(self)
            self.bucket_splits.open(policy)
            return policy
        finally:
            self.stats.profiling = profiling

    def repartition(self, attention_sm_count: int, ffn_sm_count: int) -> None:
        """Re-partition and re-capture the pipelined graphs now (the split search)."""
        self.green.adjust_sm_allocation(attention_sm_count, ffn_sm_count)
        if self.graph_runner is not None:
            self.graph_runner.capture()
        self._graph_generation = self.green.generation

    # ------------------------------------------------------------------ control
    def adjust_sm_allocation(self, attention_sm_count: int, ffn_sm_count: int) -> tuple[int, int]:
        """Re-partition the SMs; the pipelined graphs are re-captured at the next step."""
        if not self.active:
            raise RuntimeError(f"the decode pipeline is not active: {self.reason}")
        return self.green.adjust_sm_allocation(attention_sm_count, ffn_sm_count)

    def rebalance(self, step_sms: int = 8) -> tuple[int, int]:
        """Move ``step_sms`` SMs towards the stage that took longer on average (profiling must be
        on); the graphs and the policy are redone at the next step. Returns the new split."""
        stats = self.stats.as_dict()
        if not self.active or "step_ms" not in stats:
            raise RuntimeError("rebalance needs an active pipeline with pipeline_enable_profiling")
        a, f = stats["attention_stage_ms"]["mean"], stats["ffn_stage_ms"]["mean"]
        attn, ffn = self.green.attention_sms, self.green.ffn_sms
        if a > 1.1 * f and ffn - step_sms >= 8:
            return self.adjust_sm_allocation(attn + step_sms, ffn - step_sms)
        if f > 1.1 * a and attn - step_sms >= 8:
            return self.adjust_sm_allocation(attn - step_sms, ffn + step_sms)
        return attn, ffn

    def _on_repartition(self, green) -> None:
        self.bucket_splits.close()
        if self.graph_runner is not None:
            torch.cuda.synchronize()
            self.graph_runner.reset()  # graphs hold nodes of the old partitions' streams
        self.timers.clear()
        self.attention_tma = policy_lib.use_tma_attention(self)

    def statistics(self) -> dict:
        return describe(self)

    def print_statistics(self) -> None:
        print(format_table(self.statistics()))

    def close(self) -> None:
        self.bucket_splits.close()
        if self.graph_runner is not None:
            torch.cuda.synchronize()
            self.graph_runner.reset()
            self.graph_runner = None
        if self.green is not None:
            self.green.close()
            self.green = None
        self.active = False
