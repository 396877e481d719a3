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

import logging
from dataclasses import dataclass
from functools import partial

import torch

from nanovllm.engine.cuda_graph import DecodeGraphRunner, graph_buckets
from nanovllm.engine.model_inputs import ModelInputs
from nanovllm.pipeline import calibration
from nanovllm.pipeline import policy as policy_lib
from nanovllm.pipeline.cache import cache_key, load_cached, store_cached
from nanovllm.pipeline.kernels import (
    StageKernels,
    bounded_gemms,
    choose_stage_kernels,
    log_stage_kernels,
)
from nanovllm.pipeline.microbatch import event, microbatch_bounds, wait
from nanovllm.pipeline.report import format_table, policy_report
from nanovllm.pipeline.splits import BucketSplits, SplitRunner
from nanovllm.pipeline.stats import PipelineStats, StageTimers
from nanovllm.pipeline.strategy import DecodeSetup, SequentialDecode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineOptions:
    num_microbatches: int = 2
    policy: str = "auto"  # "auto": calibrate per bucket; "always": pipeline every bucket
    attention_kernel: str = "triton"
    ffn_gemm: str = "triton"
    profiling: bool = False
    search_split: bool = True  # automatic SM counts: the first calibration chooses the split
    identity: tuple[str, ...] = ()  # what changes the timings (calibration cache key)

    @classmethod
    def from_config(cls, config, identity: list[str]) -> PipelineOptions:
        return cls(
            num_microbatches=config.pipeline_num_microbatches,
            policy=config.pipeline_policy,
            attention_kernel=config.pipeline_attention_kernel,
            ffn_gemm=config.pipeline_ffn_gemm,
            profiling=config.pipeline_enable_profiling,
            search_split=config.pipeline_attention_sm_count is None,
            identity=tuple(identity),
        )


def _green_contexts(device, attention_sms: int, ffn_sms: int):
    from nanovllm.pipeline.green import GreenContextManager

    return GreenContextManager(device, attention_sms, ffn_sms)


class PipelineScheduler:
    """The pipelined decoder over ``green``'s two partitions. ``sequential`` runs the buckets
    the policy keeps sequential (and is the calibration's reference); ``make_green(device,
    attention, ffn)`` creates the green contexts of extra per-bucket splits."""

    enabled = True

    def __init__(
        self,
        setup: DecodeSetup,
        options: PipelineOptions,
        green,
        sequential: SequentialDecode,
        make_green=_green_contexts,
        calibrate: bool = True,
    ):
        self.setup, self.options, self.model = setup, options, setup.model
        self.green, self.sequential, self.make_green = green, sequential, make_green
        self.num_microbatches = options.num_microbatches
        self.stats = PipelineStats(options.profiling)
        self.policy: policy_lib.PipelinePolicy | None = None
        self.splits = BucketSplits()
        shape, rows = self.model.attention_shape(), setup.max_num_seqs
        kw = dict(dtype=setup.dtype, device=setup.device)
        # Cross-stream buffers, rows of every micro-batch: [rows, heads, head_dim] etc.
        self.q = torch.zeros(rows, shape.num_heads, shape.head_dim, **kw)
        self.k = torch.zeros(rows, shape.num_kv_heads, shape.head_dim, **kw)
        self.v = torch.zeros(rows, shape.num_kv_heads, shape.head_dim, **kw)
        self.o = torch.zeros(rows, shape.num_heads * shape.head_dim, **kw)
        self.out = torch.zeros(rows, shape.hidden_size, **kw)
        L, m, dev = self.model.num_layers, self.num_microbatches, setup.device
        self.ffn_done = [[event(dev) for _ in range(m)] for _ in range(L)]
        self.attn_done = [[event(dev) for _ in range(m)] for _ in range(L)]
        self.ready, self.finished = event(dev), event(dev)
        self.timers: dict[int, StageTimers] = {}
        self.kernels = self._stage_kernels(green)
        self.graph_runner: DecodeGraphRunner | None = None
        if setup.graphs is not None:
            self.graph_runner = DecodeGraphRunner(self.step, setup.buffers, rows, "pipelined")
            self.graph_runner.capture()
        logger.info(
            "decode pipeline: %d micro-batches, attention on %d SMs, FFN on %d SMs",
            m,
            green.attention_sms,
            green.ffn_sms,
        )
        if calibrate:
            self.policy = self._calibrate(search=options.search_split)

    # ------------------------------------------------------------------ the step
    def step(self, input_ids, positions, meta, green=None, kernels=None) -> torch.Tensor:
        """One pipelined decode step: input_ids/positions [bs] -> final hidden [bs, hidden].
        ``green`` and ``kernels``: the split to run on and its stage kernels (default: the
        current split's)."""
        bs = input_ids.shape[0]
        bounds = microbatch_bounds(bs, self.num_microbatches)
        model, num_layers = self.model, self.model.num_layers
        if green is None:
            green, kernels = self.green, self.kernels
        attention = kernels.attention
        attn_stream, ffn_stream = green.attention_stream, green.ffn_stream
        gemm_sms = green.ffn_sms if kernels.ffn_gemm == "triton" else None
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
        metas = [meta.decode_slice(lo, hi) for lo, hi in bounds]
        residual: list[torch.Tensor | None] = [None] * len(bounds)
        for layer in range(num_layers + 1):
            for i, (lo, hi) in enumerate(bounds):
                with (
                    torch.cuda.stream(ffn_stream),
                    green.cublas_sm_budget("ffn"),
                    bounded_gemms(gemm_sms),
                ):
                    if layer > 0:
                        wait(ffn_stream, self.attn_done[layer - 1][i])
                    if timers:
                        timers.ffn[layer][i][0].record(ffn_stream)
                    if layer == 0:
                        h, r = model.embed(input_ids[lo:hi]), None
                    else:
                        h, r = model.post_attention(layer - 1, self.o[lo:hi], residual[i])
                    if layer == num_layers:
                        self.out[lo:hi] = model.final_norm(h, r)
                    else:
                        q, k, v, residual[i] = model.qkv(layer, positions[lo:hi], h, r)
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
                    self.o[lo:hi] = model.attend(
                        layer, self.q[lo:hi], self.k[lo:hi], self.v[lo:hi], metas[i], attention
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

    def bucket(self, num_rows: int) -> int:
        return self.graph_runner.bucket(num_rows) if self.graph_runner is not None else num_rows

    def bucket_mode(self, bucket: int) -> str:
        if self.options.policy == "always" or self.policy is None:
            return "pipelined"
        return self.policy.mode(bucket)

    def run(self, inputs: ModelInputs) -> torch.Tensor:
        n = inputs.input_ids.shape[0]
        bucket = self.bucket(n)
        if n < 2 or self.bucket_mode(bucket) == "sequential":
            self.stats.record_sequential(bucket, n)
            return self.sequential.step(inputs)
        split = self.policy.split(bucket) if self.policy is not None else None
        other = self.splits.get(split)
        hidden = other.run(inputs) if other is not None else self._pipelined(inputs)
        self.stats.record_pipelined(bucket, n, self.timers.get(bucket))
        return hidden

    def _pipelined(self, inputs: ModelInputs) -> torch.Tensor:
        if self.graph_runner is not None:
            return self.graph_runner.run(inputs)
        return self.step(inputs.input_ids, inputs.positions, inputs.meta)

    # ------------------------------------------------------------------ partitions
    def _stage_kernels(self, green) -> StageKernels:
        opts, setup = self.options, self.setup
        kernels, why = choose_stage_kernels(
            setup.backend,
            opts.attention_kernel,
            opts.ffn_gemm,
            self.q,
            setup.k_cache,
            setup.v_cache,
        )
        log_stage_kernels(kernels, why, green.attention_sms, opts.attention_kernel)
        return kernels

    def _drop_graphs(self) -> None:
        self.splits.close()
        if self.graph_runner is not None:
            torch.cuda.synchronize()
            self.graph_runner.reset()  # graphs hold nodes of the old partitions' streams
        self.timers.clear()

    def repartition(self, attention_sm_count: int, ffn_sm_count: int) -> tuple[int, int]:
        """The one re-partition path: drop the graphs captured on the old streams, re-split,
        choose the stage kernels for the new partitions, re-capture. The policy is the
        caller's to redo. A driver failure leaves the old partitions, re-captured."""
        self._drop_graphs()
        try:
            self.green.adjust_sm_allocation(attention_sm_count, ffn_sm_count)
        finally:
            self.kernels = self._stage_kernels(self.green)
            if self.graph_runner is not None:
                self.graph_runner.capture()
        return self.green.attention_sms, self.green.ffn_sms

    def adjust_sm_allocation(self, attention_sm_count: int, ffn_sm_count: int) -> tuple[int, int]:
        """Re-partition the SMs now, then re-calibrate on the new split (never searching: a
        user's split is honoured as given). Returns the actual counts."""
        counts = self.repartition(attention_sm_count, ffn_sm_count)
        self.policy = self._calibrate(search=False)
        return counts

    def rebalance(self, step_sms: int = 8) -> tuple[int, int]:
        """Move ``step_sms`` SMs towards the stage that took longer on average (profiling must be
        on). Returns the new split."""
        stats = self.stats.as_dict()
        if "step_ms" not in stats:
            raise RuntimeError("rebalance needs an active pipeline with pipeline_enable_profiling")
        a, f = stats["attention_stage_ms"]["mean"], stats["ffn_stage_ms"]["mean"]
        attn, ffn = self.green.attention_sms, self.green.ffn_sms
        if a > 1.1 * f and ffn - step_sms >= 8:
            return self.adjust_sm_allocation(attn + step_sms, ffn - step_sms)
        if f > 1.1 * a and attn - step_sms >= 8:
            return self.adjust_sm_allocation(attn - step_sms, ffn + step_sms)
        return attn, ffn

    # ------------------------------------------------------------------ calibration
    def _current(self) -> tuple[int, int]:
        return self.green.attention_sms, self.green.ffn_sms

    def _context(self) -> int:
        return calibration.calibration_context(self.setup.max_model_len)

    def _key(self, split: tuple[int, int]):
        opts = self.options
        return cache_key(list(opts.identity), split, opts.num_microbatches, self._context())

    def _measure_current(self) -> dict[int, dict]:
        """The current split's per-bucket timings, measured now and stored in the cache."""
        s = self.setup
        buckets = policy_lib.calibration_buckets(graph_buckets(s.max_num_seqs))
        inputs = {
            b: calibration.synthetic_decode(
                b, self._context(), s.block_size, s.num_kvcache_blocks, s.device
            )
            for b in buckets
        }
        measured = calibration.calibrate(self.sequential.step, self._pipelined, inputs)
        store_cached(*self._key(self._current()), measured)
        return measured

    def _measure_on(self, split: tuple[int, int]):
        if split != self._current():
            self.repartition(*split)
        return self._current(), self._measure_current()  # the counts the driver granted

    def _calibrate(self, search: bool) -> policy_lib.PipelinePolicy | None:
        if self.options.policy != "auto" or self.setup.device.type != "cuda":
            return None  # "always", or a serial emulation without CUDA timing
        profiling, self.stats.profiling = self.stats.profiling, False  # no stage timers
        try:
            if search:
                policy, best = calibration.search_split(
                    self._current(),
                    self.green.split_candidates(),
                    lambda split: load_cached(self._key(split)[0]),
                    self._measure_on,
                )
                if best != self._current():
                    self.repartition(*best)
                self.open_splits(policy)
            else:
                current = self._current()
                measured = load_cached(self._key(current)[0]) or self._measure_current()
                policy = policy_lib.PipelinePolicy(policy_lib.with_split(measured, current))
        finally:
            self.stats.profiling = profiling
        self._log_policy(policy)
        return policy

    def open_splits(self, policy: policy_lib.PipelinePolicy) -> None:
        """Open the extra splits ``policy`` assigns buckets to."""
        buckets = graph_buckets(self.setup.max_num_seqs)
        self.splits.open(policy, self._current(), buckets, self._open_split)

    def _open_split(self, split: tuple[int, int], buckets: list[int]) -> SplitRunner | str:
        green = self.make_green(self.setup.device, *split)
        if not green.available:
            green.close()
            return green.reason
        kernels = self._stage_kernels(green)
        step = partial(self.step, green=green, kernels=kernels)
        graphs = None
        if self.graph_runner is not None:
            name = f"pipelined {policy_lib.split_name(split)}"
            graphs = DecodeGraphRunner(
                step,
                self.setup.buffers,
                self.setup.max_num_seqs,
                name,
                buckets=buckets,
                pool=self.graph_runner.pool,
            )
            graphs.capture()
        return SplitRunner(green, kernels, graphs, lambda i: step(i.input_ids, i.positions, i.meta))

    def _log_policy(self, policy: policy_lib.PipelinePolicy) -> None:
        piped = [b for b, v in policy.measured.items() if v["mode"] == "pipelined"]
        logger.info(
            "pipeline policy (context %d, split %s): pipelined buckets %s, sequential elsewhere "
            "(sequential/pipelined/spread ms per bucket: %s)",
            self._context(),
            policy_lib.split_name(self._current()),
            piped or "none",
            {
                b: tuple(
                    round(v.get(k, 0.0), 3) for k in ("sequential_ms", "pipelined_ms", "spread_ms")
                )
                for b, v in policy.measured.items()
            },
        )

    # ------------------------------------------------------------------ reports
    def reason(self) -> str:
        """Why recent decode steps ran sequentially ("" when none did)."""
        mode = self.stats.mode()
        if mode in ("pipelined", "none"):
            return ""
        if self.policy is None:
            return "batches of one row run sequentially"
        piped = self.policy.pipelined_buckets()
        if not piped:
            return "calibration: the pipelined step won at no batch bucket (see calibration_ms)"
        return f"calibration pipelines only batch buckets {piped} (see calibration_ms)"

    def statistics(self) -> dict:
        g = self.green
        stats = {
            "enabled": True,
            "reason": self.reason(),
            "attention_sms": g.attention_sms,
            "ffn_sms": g.ffn_sms,
            "total_sms": g.total_sms,
            "num_microbatches": self.num_microbatches,
            "cuda_graphs": self.graph_runner is not None,
            "policy": self.options.policy,
            "kernels": self.kernels.describe(),
        }
        if self.policy is not None:
            stats.update(policy_report(self.policy))
        stats.update(self.stats.as_dict())
        return stats

    def print_statistics(self) -> None:
        print(format_table(self.statistics()))

    def export_trace(self, path: str) -> None:
        from nanovllm.pipeline.trace import export_chrome_trace

        if not self.stats.profiling:
            raise RuntimeError(
                "export_pipeline_trace needs stage timings: create the LLM with "
                "pipeline_enable_profiling=True"
            )
        self.stats.collect()
        export_chrome_trace(list(self.stats.recent_steps), path)

    def close(self) -> None:
        self._drop_graphs()
        self.graph_runner = None
        self.sequential.close()
        if self.green is not None:
            self.green.close()
            self.green = None
