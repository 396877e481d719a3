"""The Attention/FFN decode pipeline on one GPU.

The decode batch is split into micro-batches (row ranges). Per layer l, the attention stage of
micro-batch i runs on the attention partition's stream while the FFN stage of micro-batch i-1
runs on the FFN partition's stream (two micro-batches):

    attention stream: a(0,0) a(0,1) . a(1,0) a(1,1) . a(2,0) ...
    FFN stream      :   .   f(0,0) f(0,1) f(1,0) f(1,1) f(2,0) ...

``a(l+1, i)`` waits for ``f(l, i)`` and ``f(l, i)`` waits for ``a(l, i)``: one CUDA event per
edge, the host never waits. Tensors that cross streams live in static buffers (``hidden`` and
``residual`` rows of each micro-batch): if they were left to the caching allocator, memory freed
by one stream could be handed to the other while still being read. The whole step is captured as
one CUDA graph per batch bucket; kernels keep their green partition on replay.
"""

from __future__ import annotations

import logging

import torch

from nanovllm.engine.cuda_graph import DecodeGraphRunner
from nanovllm.engine.model_inputs import ModelInputs
from nanovllm.engine.pipeline_stats import PipelineStats, StageTimers, format_table

logger = logging.getLogger(__name__)


def microbatch_bounds(num_rows: int, num_microbatches: int) -> list[tuple[int, int]]:
    """Row ranges of the micro-batches: near-equal, multiples of 8 rows when there are enough
    (GEMM tiles), never empty."""
    m = max(1, min(num_microbatches, num_rows))
    unit = 8 if num_rows >= 8 * m else 1
    units = -(-num_rows // unit)
    bounds, lo = [], 0
    for i in range(m):
        hi = min(num_rows, lo + unit * (units // m + (i < units % m)))
        bounds.append((lo, hi))
        lo = hi
    return bounds


class PipelineScheduler:
    def __init__(self, runner, mode: str, reason: str, green=None):
        self.runner, self.model = runner, runner.model
        cfg = runner.config
        self.num_microbatches = cfg.pipeline_num_microbatches
        self.enabled_by_user = cfg.enable_pipeline
        self.mode, self.reason, self.green = mode, reason, green
        self.active = mode == "green"
        self.stats = PipelineStats(cfg.pipeline_enable_profiling and self.active)
        self.graph_runner: DecodeGraphRunner | None = None
        if not self.active:
            return
        rows, hidden = cfg.max_num_seqs, runner.runtime.hf_config.hidden_size
        kw = dict(dtype=runner.dtype, device=runner.device)
        self.hidden = torch.zeros(rows, hidden, **kw)  # per micro-batch rows: stage outputs
        self.residual = torch.zeros(rows, hidden, **kw)
        self.out = torch.zeros(rows, hidden, **kw)
        L, m = self.model.num_layers, self.num_microbatches
        self.attn_done = [[torch.cuda.Event() for _ in range(m)] for _ in range(L)]
        self.ffn_done = [[torch.cuda.Event() for _ in range(m)] for _ in range(L)]
        self.ready = torch.cuda.Event()
        self.timers: dict[int, StageTimers] = {}
        self._graph_generation = green.generation
        green.on_repartition(self._on_repartition)
        if runner.graph_runner is not None:
            self.graph_runner = DecodeGraphRunner(
                self.step, runner.decode_buffers, cfg.max_num_seqs, "pipelined"
            )
            self.graph_runner.capture()

    @classmethod
    def create(cls, runner) -> PipelineScheduler:
        cfg = runner.config
        if not cfg.enable_pipeline:
            return cls(runner, "disabled", "enable_pipeline=False")
        why = ""
        if runner.device.type != "cuda":
            why = f"Green Contexts need a CUDA GPU; running on {runner.device.type}"
        elif cfg.tensor_parallel_size > 1:
            why = "tensor_parallel_size > 1: the pipeline runs on single-GPU engines only"
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
    def step(self, input_ids, positions, meta) -> torch.Tensor:
        """One pipelined decode step: input_ids/positions [bs] -> final hidden [bs, hidden]."""
        bs = input_ids.shape[0]
        bounds = microbatch_bounds(bs, self.num_microbatches)
        model, h, r = self.model, self.hidden, self.residual
        main = torch.cuda.current_stream()
        attn_stream, ffn_stream = self.green.attention_stream, self.green.ffn_stream
        timers = None
        if self.stats.profiling:
            timers = self.timers.setdefault(bs, StageTimers(model.num_layers, len(bounds)))
            timers.step[0].record(main)
        h[:bs] = model.embed(input_ids)
        self.ready.record(main)  # both partitions start after the embedding is written
        attn_stream.wait_event(self.ready)
        ffn_stream.wait_event(self.ready)
        metas = [meta.decode_slice(lo, hi) for lo, hi in bounds]
        last = model.num_layers - 1
        for layer in range(model.num_layers):
            for i, (lo, hi) in enumerate(bounds):
                with torch.cuda.stream(attn_stream), self.green.cublas_sm_budget("attention"):
                    if layer > 0:
                        attn_stream.wait_event(self.ffn_done[layer - 1][i])
                    if timers:
                        timers.attention[layer][i][0].record(attn_stream)
                    res_in = r[lo:hi] if layer > 0 else None
                    ho, ro = model.forward_attention(
                        layer, positions[lo:hi], h[lo:hi], res_in, metas[i]
                    )
                    r[lo:hi] = ro  # first: at layer 0 ``ro`` aliases h[lo:hi]
                    h[lo:hi] = ho
                    if timers:
                        timers.attention[layer][i][1].record(attn_stream)
                    self.attn_done[layer][i].record(attn_stream)
                with torch.cuda.stream(ffn_stream), self.green.cublas_sm_budget("ffn"):
                    ffn_stream.wait_event(self.attn_done[layer][i])
                    if timers:
                        timers.ffn[layer][i][0].record(ffn_stream)
                    ho, ro = model.forward_ffn(layer, h[lo:hi], r[lo:hi])
                    if layer == last:
                        self.out[lo:hi] = model.final_norm(ho, ro)
                    else:
                        h[lo:hi], r[lo:hi] = ho, ro
                    if timers:
                        timers.ffn[layer][i][1].record(ffn_stream)
                    self.ffn_done[layer][i].record(ffn_stream)
        for i in range(len(bounds)):  # join: the FFN chain follows every attention stage
            main.wait_event(self.ffn_done[last][i])
        if timers:
            timers.step[1].record(main)
        return self.out[:bs]

    def run(self, inputs: ModelInputs) -> torch.Tensor:
        n = inputs.input_ids.shape[0]
        if n < 2:  # nothing to overlap
            self.stats.sequential_steps += 1
            return self._sequential(inputs)
        if self.graph_runner is not None:
            if self._graph_generation != self.green.generation:
                self.graph_runner.capture()
                self._graph_generation = self.green.generation
            hidden = self.graph_runner.run(inputs)
            bs = self.graph_runner.bucket(n)
        else:
            hidden = self.step(inputs.input_ids, inputs.positions, inputs.meta)
            bs = n
        self.stats.record(n, self.timers.get(bs))
        return hidden

    def _sequential(self, inputs: ModelInputs) -> torch.Tensor:
        runner = self.runner
        if runner.graph_runner is not None:
            return runner.graph_runner.run(inputs)
        return self.model(inputs.input_ids, inputs.positions, inputs.meta)

    # ------------------------------------------------------------------ control
    def adjust_sm_allocation(self, attention_sm_count: int, ffn_sm_count: int) -> tuple[int, int]:
        """Re-partition the SMs; the pipelined graphs are re-captured at the next step."""
        if not self.active:
            raise RuntimeError(f"the decode pipeline is not active: {self.reason}")
        return self.green.adjust_sm_allocation(attention_sm_count, ffn_sm_count)

    def _on_repartition(self, green) -> None:
        if self.graph_runner is not None:
            torch.cuda.synchronize()
            self.graph_runner.reset()  # graphs hold nodes of the old partitions' streams
        self.timers.clear()

    def statistics(self) -> dict:
        g = self.green
        stats = {
            "enabled": self.active,
            "mode": "pipelined" if self.active else self.mode,
            "reason": self.reason,
            "attention_sms": g.attention_sms if self.active else 0,
            "ffn_sms": g.ffn_sms if self.active else 0,
            "total_sms": g.total_sms if self.active else 0,
            "num_microbatches": self.num_microbatches,
            "cuda_graphs": self.graph_runner is not None,
        }
        stats.update(self.stats.as_dict())
        return stats

    def print_statistics(self) -> None:
        print(format_table(self.statistics()))

    def close(self) -> None:
        if self.graph_runner is not None:
            torch.cuda.synchronize()
            self.graph_runner.reset()
            self.graph_runner = None
        if self.green is not None:
            self.green.close()
            self.green = None
        self.active = False
