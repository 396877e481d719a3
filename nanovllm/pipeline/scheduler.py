"""The Attention/FFN decode pipeline on one GPU: ``PipelineScheduler``.

It runs a decode step as two stages per layer on two green partitions, overlapped across
micro-batches (the step body: ``step.py``), captured as one CUDA graph per batch bucket (kernels
keep their green partition on replay); decides per bucket, from a start-up calibration, whether
to pipeline or to run the whole-GPU step (``calibration.py``, ``policy.py``), and on which SM split
(``splits.py``); owns the one re-partition path; and reports what ran (``stats.py``,
``report.py``, ``trace.py``).
"""

from __future__ import annotations

import logging
from functools import partial

import torch

from nanovllm.engine.cuda_graph import DecodeGraphRunner, graph_buckets
from nanovllm.engine.model_inputs import ModelInputs
from nanovllm.pipeline import calibration
from nanovllm.pipeline import policy as policy_lib
from nanovllm.pipeline.cache import cache_key, load_cached, store_cached
from nanovllm.pipeline.kernels import StageKernels, choose_stage_kernels, log_stage_kernels
from nanovllm.pipeline.report import format_table, policy_report
from nanovllm.pipeline.sequential import SequentialDecode
from nanovllm.pipeline.setup import DecodeSetup, PipelineOptions
from nanovllm.pipeline.splits import BucketSplits, SplitRunner
from nanovllm.pipeline.stats import PipelineStats
from nanovllm.pipeline.step import PipelinedStep

logger = logging.getLogger(__name__)


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
        self.stats = PipelineStats(options.profiling)
        self.policy: policy_lib.PipelinePolicy | None = None
        self.splits = BucketSplits()
        rows, m = setup.max_num_seqs, options.num_microbatches
        self.stepper = PipelinedStep(self.model, rows, m, setup.dtype, setup.device)
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
        if green is None:
            green, kernels = self.green, self.kernels
        return self.stepper(input_ids, positions, meta, green, kernels, self.stats.profiling)

    @property
    def num_microbatches(self) -> int:
        return self.stepper.num_microbatches

    @num_microbatches.setter
    def num_microbatches(self, m: int) -> None:
        """At most the count the engine was built with (its events cover that many)."""
        built = len(self.stepper.ffn_done[0]) if self.stepper.ffn_done else m
        if not 2 <= m <= built:
            raise ValueError(
                f"num_microbatches={m}: use 2 to {built}, the pipeline_num_microbatches this "
                "engine was built with (its events cover that many)"
            )
        self.stepper.num_microbatches = m

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
        self.stats.record_pipelined(bucket, n, self.stepper.timers.get(bucket))
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
            self.stepper.q,
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
        self.stepper.timers.clear()

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
