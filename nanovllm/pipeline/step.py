"""The body of one pipelined decode step, and the static buffers and events it runs over.

Per layer and micro-batch: the FFN stage (every GEMM: the previous layer's o_proj and FFN, this
layer's input norm, QKV and rotary) on the FFN partition's stream, then the attention stage (KV
store and paged attention) on the attention partition's stream. ``A(l, i)`` waits for
``F(l, i)`` (it needs q, k, v) and ``F(l+1, i)`` for ``A(l, i)`` (the attention output): one
event per edge, the host never waits. Tensors that cross streams live in static rows per
micro-batch: left to the caching allocator, memory freed on one stream could be handed to the
other while it is still being read. The residual never leaves the FFN stream.
"""

from __future__ import annotations

import torch

from nanovllm.models.staged import StagedDecoder
from nanovllm.pipeline.kernels import StageKernels, bounded_gemms
from nanovllm.pipeline.microbatch import event, microbatch_bounds, wait
from nanovllm.pipeline.stats import StageTimers


class PipelinedStep:
    """``rows``: the most rows a step carries (max_num_seqs); ``num_microbatches``: the most
    micro-batches (the events cover that many; a smaller count may be set later)."""

    def __init__(self, model: StagedDecoder, rows: int, num_microbatches: int, dtype, device):
        self.model, self.num_microbatches = model, num_microbatches
        shape = model.attention_shape()
        kw = dict(dtype=dtype, device=device)
        # Cross-stream buffers, rows of every micro-batch: [rows, heads, head_dim] etc.
        self.q = torch.zeros(rows, shape.num_heads, shape.head_dim, **kw)
        self.k = torch.zeros(rows, shape.num_kv_heads, shape.head_dim, **kw)
        self.v = torch.zeros(rows, shape.num_kv_heads, shape.head_dim, **kw)
        self.o = torch.zeros(rows, shape.num_heads * shape.head_dim, **kw)
        self.out = torch.zeros(rows, shape.hidden_size, **kw)
        L, m = model.num_layers, num_microbatches
        self.ffn_done = [[event(device) for _ in range(m)] for _ in range(L)]
        self.attn_done = [[event(device) for _ in range(m)] for _ in range(L)]
        self.ready, self.finished = event(device), event(device)
        self.timers: dict[int, StageTimers] = {}  # per step shape (rows), with profiling

    def __call__(
        self, input_ids, positions, meta, green, kernels: StageKernels, profiling: bool
    ) -> torch.Tensor:
        """input_ids/positions [bs] -> final hidden [bs, hidden], on ``green``'s two streams with
        ``kernels``; with ``profiling``, stage events into this bucket's timers."""
        bs = input_ids.shape[0]
        bounds = microbatch_bounds(bs, self.num_microbatches)
        model, num_layers = self.model, self.model.num_layers
        attention = kernels.attention
        attn_stream, ffn_stream = green.attention_stream, green.ffn_stream
        gemm_sms = green.ffn_sms if kernels.ffn_gemm == "triton" else None
        # Streams are None only when a test emulates the schedule serially on the CPU.
        main = torch.cuda.current_stream() if ffn_stream is not None else None
        timers = None
        if profiling:
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
