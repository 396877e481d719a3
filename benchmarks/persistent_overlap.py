"""Issue 18 step 1: GEMM tiles and decode attention in one persistent Triton launch, no deps.

``coresident.py`` showed that kernel boundaries cost most of the overlap between one micro-batch's
compute-bound GEMMs and another's memory-bound decode attention (best 1.19x on 24/108 green
partitions, 0.95x with per-layer launches on the same SMs). This script asks whether a single
persistent launch, whose programs take either kind of work from atomic counters and therefore keep
both kinds resident across layer boundaries, does better. Everything is dependency-free: the GEMM
outputs and the attention outputs never feed each other (issue 18 step 2 adds the dependencies).

Work, at the Qwen3-8B shape (hidden 4096, intermediate 12288, 32 heads / 8 KV heads, head_dim
128, bf16), ``--layers`` layers (default 6) with distinct weights and distinct KV blocks per layer:

- micro-batch A, GEMM tiles: per layer the four projections ``C = X @ W.T`` (qkv 4096->6144,
  o 4096->4096, gate_up 4096->24576, down 12288->4096) at ``--m`` rows; a work item is one
  BM x BN output tile over the full K (no split-K, so no second pass);
- micro-batch B, decode attention: ``--batch`` sequences of ``--ctx`` tokens in a paged cache
  (blocks of 256 tokens, NHD layout, the engine's), one work item per (layer, sequence, KV
  head): the 4 query heads of the GQA group against that head's keys, one-pass online softmax
  over every KV tile, so no split-merge pass.

Variants (``--variants``, all by default), each one launch of ``grid`` programs:

- ``a``  one program per SM; a fraction ``f`` (``--attn-fractions``) of the programs, spread
  evenly over the grid, starts on attention and the rest on GEMM tiles; a program whose queue
  is empty switches to the other queue: a boundary-free, dynamic SM split;
- ``b``  two programs per SM, one of each role: each program reads ``%smid`` and takes a slot
  from a per-SM atomic counter (slot 0: GEMM, slot 1: attention; program-id parity where %smid
  cannot be read); each role drains its own counter only;
- ``b+steal``  the same, but a program whose queue is empty then helps the other queue;
- ``c``  ``b`` and ``b+steal`` again with every other tile config of ``--configs`` (the first
  config is the one ``a`` and ``b`` use).

Baselines in the same process: cuBLAS (``torch.mm``, the 24 GEMMs back to back), this kernel with
GEMM work only (1 and 2 programs per SM), the repo's ``paged_decode_attention`` per layer on the
whole GPU (``--attention-configs``), and this kernel with attention work only. "serial" = the best
GEMM-alone time + the best attention-alone time; speedup = serial / variant time. Every time is a
median over ``--reps`` CUDA-event timings after warm-up; the counters are zeroed by a tiny
``zero_()`` before the start event (outside every timed region).

Gate (issue 18): best speedup >= 1.30 "go on"; 1.20-1.30 "go on only if step 2 keeps >= 1.15x";
below 1.20 "stop".

    python benchmarks/persistent_overlap.py --json OUT          # GPU, all shapes and variants
    python benchmarks/persistent_overlap.py --quick --json OUT  # GPU, M 512, ctx 256, fewer reps
    TRITON_INTERPRET=1 python benchmarks/persistent_overlap.py --check   # CPU, tiny shapes
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import LAYER_GEMMS_8B as SHAPES_8B  # noqa: E402
from benchmarks.common import environment, write_json  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, KV_BLOCK = 32, 8, 128, 256
META_COLS = 8  # int64 columns of the GEMM table: first tile, then x off, w off, c off, N, K
# divided by 16 (see _gemm_tile), then two unused
STAT_COLS = 8  # int64 per program: smid, start ns, last GEMM end ns, last attention end ns,
# GEMM items, attention items, first role, end ns
SM_SLOTS = 1024  # per-SM slot counters (more than any GPU's SM count)
GATE = ((1.30, "go on"), (1.20, "go on only if step 2 keeps >= 1.15x"), (0.0, "stop"))

# Tiny shapes of --check and the CPU test (interpreter: everything small, masks exercised).
CHECK_GEMMS = (("qkv", 96, 64), ("o", 64, 64), ("gate_up", 128, 64), ("down", 64, 128))
CHECK_ATTN = dict(heads=8, kv_heads=2, head_dim=32, block=32, lens=(1, 33, 70, 0, 64))


@dataclass(frozen=True)
class TileConfig:
    """BM x BN output tiles, BK-wide K steps, GEMM loop stages, num_warps (the whole kernel's)."""

    bm: int
    bn: int
    bk: int
    stages: int
    warps: int = 4

    @classmethod
    def parse(cls, text: str) -> TileConfig:
        parts = [int(v) for v in text.split(",")]
        if len(parts) not in (4, 5):
            raise argparse.ArgumentTypeError(f"tile config {text!r}: BM,BN,BK,stages[,warps]")
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.bm}x{self.bn}x{self.bk}s{self.stages}w{self.warps}"

    def smem_estimate(self, itemsize: int = 2) -> int:
        """Operand buffers of the GEMM loop: stages x (BM + BN) x BK elements."""
        return self.stages * (self.bm + self.bn) * self.bk * itemsize


# ----------------------------------------------------------------------------- the kernel
# The kernels live at module level (Triton resolves a kernel's callees through its module's
# globals), defined only where triton imports: this module imports without it (--help, tests).
try:
    import triton
    import triton.language as tl

    from nanovllm.kernels.triton_attention import _online_softmax_step
except ImportError:  # pragma: no cover - the CPU test skips without triton
    triton = None


def _kernel():
    if triton is None:
        raise RuntimeError("the persistent overlap kernel needs triton")
    return _overlap_kernel


if triton is not None:

    @triton.jit
    def _now(pid, USE_ASM: tl.constexpr):
        """%globaltimer in ns (0 where inline PTX cannot run: the interpreter)."""
        if USE_ASM:
            t = tl.inline_asm_elementwise(
                "mov.u64 $0, %globaltimer;", "=l,r", [pid], dtype=tl.int64, is_pure=False, pack=1
            )
        else:
            t = pid.to(tl.int64) * 0
        return t

    @triton.jit
    def _gemm_tile(
        tile, x_ptr, w_ptr, c_ptr, meta_ptr, num_gemms, M,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, META_BLOCK: tl.constexpr,
        GEMM_STAGES: tl.constexpr,
    ):  # fmt: skip
        # Which GEMM: the table's rows are sorted by first tile; count the rows starting at or
        # before this tile (one vector load, no search loop).
        rows_g = tl.arange(0, META_BLOCK)
        firsts = tl.load(meta_ptr + rows_g * 8, mask=rows_g < num_gemms, other=2**62)
        g = tl.sum((firsts <= tile).to(tl.int32), 0) - 1
        meta = meta_ptr + g * 8
        first = tl.load(meta + 0)
        # Offsets and sizes are stored divided by 16: multiplied back here, the compiler knows
        # them to be multiples of 16, so rows are 32-byte aligned and the loads become 16-byte
        # async copies that the K loop can pipeline (a plain loaded K would not be).
        x_off, w_off = tl.load(meta + 1) * 16, tl.load(meta + 2) * 16
        c_off = tl.load(meta + 3) * 16
        n = tl.load(meta + 4).to(tl.int32) * 16
        k = tl.load(meta + 5).to(tl.int32) * 16
        # Tiles of one GEMM run M-fastest: the M // BM programs that take consecutive tiles read
        # the same [BN, K] weight panel at about the same time, so it comes from HBM once.
        local = (tile - first).to(tl.int32)
        num_m = M // BM
        pid_m = local % num_m
        pid_n = local // num_m
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        # X [M, K] and W [N, K] row-major (nn.Linear's layout); offsets within one GEMM fit in
        # int32 (at most 24576 x 4096), the per-GEMM bases are int64 (6 layers: 1.2 G weights).
        a_ptrs = x_ptr + x_off + rows[:, None] * k + offs_k[None, :]  # [BM, BK]
        b_ptrs = w_ptr + w_off + cols[:, None] * k + offs_k[None, :]  # [BN, BK]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        # Full K in one program (no split-K); M, N, K are tile multiples (checked on the host),
        # so no masks: the loads pipeline as plain async copies, GEMM_STAGES deep.
        for _ in tl.range(0, k, BK, num_stages=GEMM_STAGES):
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
            acc = tl.dot(a, tl.trans(b), acc)
            a_ptrs += BK
            b_ptrs += BK
        c_ptrs = c_ptr + c_off + rows[:, None] * n + cols[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty))

    @triton.jit
    def _attention_item(
        item, q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, o_ptr, num_seqs, scale_log2e,
        stride_ql, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, stride_tl, stride_ts, stride_ol, stride_os, stride_oh,
        NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
        HEAD_DIM: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        ATTN_STAGES: tl.constexpr,
    ):  # fmt: skip
        # Item = (layer, sequence, KV head), KV head fastest. The GROUP query heads of the KV
        # head are the rows of a [BLOCK_H, HEAD_DIM] tile (BLOCK_H >= 16 for tl.dot, padded
        # rows masked), so each K/V byte is read once; the whole context in one pass (no split).
        per_layer = num_seqs * NUM_KV_HEADS
        layer = item // per_layer
        seq = (item % per_layer) // NUM_KV_HEADS
        kvh = item % NUM_KV_HEADS
        ctx = tl.load(lens_ptr + seq)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_t = tl.arange(0, BLOCK_N)
        head = kvh * GROUP + offs_h
        h_mask = offs_h < GROUP
        q = tl.load(
            q_ptr + layer.to(tl.int64) * stride_ql + seq.to(tl.int64) * stride_qs
            + head[:, None] * stride_qh + offs_d[None, :],
            mask=h_mask[:, None], other=0.0,
        )  # fmt: skip
        table = tables_ptr + layer.to(tl.int64) * stride_tl + seq.to(tl.int64) * stride_ts
        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
        # BLOCK_N divides the cache block size: a tile lies in one cache block, so one block id
        # per tile and loop-invariant [BLOCK_N, HEAD_DIM] offsets (as the repo's decode kernel).
        k_tile = k_ptr + kvh * stride_kh + offs_t[:, None] * stride_ks + offs_d[None, :]
        v_tile = v_ptr + kvh * stride_vh + offs_t[:, None] * stride_vs + offs_d[None, :]
        full_end = ctx // BLOCK_N * BLOCK_N
        # The block id comes one tile ahead (loop-carried), so a tile's K/V loads depend on no
        # load of their own iteration and get every stage of prefetch.
        blk_next = tl.load(table, mask=ctx > 0, other=0)
        for n0 in tl.range(0, full_end, BLOCK_N, num_stages=ATTN_STAGES):
            blk = blk_next.to(tl.int64)
            nxt = n0 + BLOCK_N
            blk_next = tl.load(table + nxt // KV_BLOCK_SIZE, mask=nxt < ctx, other=0)
            pos = n0 % KV_BLOCK_SIZE
            k = tl.load(k_tile + (blk * stride_kb + pos * stride_ks))  # [BLOCK_N, HEAD_DIM]
            v = tl.load(v_tile + (blk * stride_vb + pos * stride_vs))
            m_i, l_i, acc = _online_softmax_step(
                q, k, v, offs_t, BLOCK_N, m_i, l_i, acc, scale_log2e
            )
        if full_end < ctx:  # the partial last tile
            blk = blk_next.to(tl.int64)
            pos = full_end % KV_BLOCK_SIZE
            n_mask = (full_end + offs_t < ctx)[:, None]
            k = tl.load(k_tile + (blk * stride_kb + pos * stride_ks), mask=n_mask, other=0.0)
            v = tl.load(v_tile + (blk * stride_vb + pos * stride_vs), mask=n_mask, other=0.0)
            m_i, l_i, acc = _online_softmax_step(
                q, k, v, offs_t, ctx - full_end, m_i, l_i, acc, scale_log2e
            )
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # ctx 0: zeros
        o = (
            o_ptr + layer.to(tl.int64) * stride_ol + seq.to(tl.int64) * stride_os
            + head[:, None] * stride_oh + offs_d[None, :]
        )  # fmt: skip
        tl.store(o, out.to(o_ptr.dtype.element_ty), mask=h_mask[:, None])

    @triton.jit
    def _overlap_kernel(
        # micro-batch A: GEMM tiles
        x_ptr, w_ptr, c_ptr, meta_ptr, num_gemms, num_tiles, M,
        # micro-batch B: decode attention items
        q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, o_ptr, num_items, num_seqs, scale_log2e,
        stride_ql, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, stride_tl, stride_ts, stride_ol, stride_os, stride_oh,
        # scheduling: counters [2] (next GEMM tile, next attention item), per-SM slots,
        # first role per program (0 GEMM, 1 attention), stats [grid, STAT_COLS]
        counters_ptr, sm_slots_ptr, first_role_ptr, stats_ptr, role_by_sm, steal,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, META_BLOCK: tl.constexpr,
        GEMM_STAGES: tl.constexpr,
        NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
        HEAD_DIM: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
        ATTN_STAGES: tl.constexpr, USE_ASM: tl.constexpr,
    ):  # fmt: skip
        pid = tl.program_id(0)
        t_start = _now(pid, USE_ASM)
        role = tl.load(first_role_ptr + pid)
        smid = pid * 0 - 1
        if USE_ASM:
            smid = tl.inline_asm_elementwise(
                "mov.u32 $0, %smid;", "=r,r", [pid], dtype=tl.int32, is_pure=False, pack=1
            )
            if role_by_sm != 0:
                # POD-style: the k-th program to start on this SM takes role k % 2, so two
                # co-resident programs are one of each, whatever the block scheduler does.
                role = tl.atomic_add(sm_slots_ptr + smid, 1, sem="relaxed") % 2
        first_role = role
        # Relaxed atomics: the work is independent, claims need no ordering. A scalar atomic
        # whose value is used goes through shared memory and a barrier, so its latency is paid
        # per claim (small next to a tile: ~128-512 KB of loads or 0.1-0.4 GFLOP).
        cur = tl.atomic_add(counters_ptr + role, 1, sem="relaxed")
        switched = pid * 0
        n_gemm = pid * 0
        n_attn = pid * 0
        t_gemm = t_start * 0
        t_attn = t_start * 0
        # role -1: done. Every iteration does one item, or switches queue once, or stops: no
        # program ever waits on another, so no schedule can hang.
        while role >= 0:
            total = tl.where(role == 0, num_tiles, num_items)
            if cur < total:
                if role == 0:
                    _gemm_tile(
                        cur, x_ptr, w_ptr, c_ptr, meta_ptr, num_gemms, M,
                        BM, BN, BK, META_BLOCK, GEMM_STAGES,
                    )  # fmt: skip
                    n_gemm += 1
                    t_gemm = _now(pid, USE_ASM)
                else:
                    _attention_item(
                        cur, q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, o_ptr, num_seqs,
                        scale_log2e, stride_ql, stride_qs, stride_qh, stride_kb, stride_ks,
                        stride_kh, stride_vb, stride_vs, stride_vh, stride_tl, stride_ts,
                        stride_ol, stride_os, stride_oh,
                        NUM_KV_HEADS, GROUP, BLOCK_H, HEAD_DIM, KV_BLOCK_SIZE, BLOCK_N,
                        ATTN_STAGES,
                    )  # fmt: skip
                    n_attn += 1
                    t_attn = _now(pid, USE_ASM)
                cur = tl.atomic_add(counters_ptr + role, 1, sem="relaxed")
            elif (steal != 0) & (switched == 0):
                role = 1 - role  # own queue drained: help the other one
                switched = pid * 0 + 1
                cur = tl.atomic_add(counters_ptr + role, 1, sem="relaxed")
            else:
                role = pid * 0 - 1
        stats = stats_ptr + pid.to(tl.int64) * 8
        tl.store(stats + 0, smid.to(tl.int64))
        tl.store(stats + 1, t_start)
        tl.store(stats + 2, t_gemm)
        tl.store(stats + 3, t_attn)
        tl.store(stats + 4, n_gemm.to(tl.int64))
        tl.store(stats + 5, n_attn.to(tl.int64))
        tl.store(stats + 6, first_role.to(tl.int64))
        tl.store(stats + 7, _now(pid, USE_ASM))


# ----------------------------------------------------------------------------- the work
class GemmWork:
    """Micro-batch A: ``layers`` x ``shapes`` GEMMs in flat buffers (weights, outputs; one input
    X per K), and the int64 table the kernel reads: one row per GEMM, sorted by first tile."""

    def __init__(self, device, dtype, m: int, shapes, layers: int, tile: TileConfig, like=None):
        """``like``: another GemmWork of the same shapes whose buffers this one shares (only the
        tile table differs between tile configs)."""
        gen = torch.Generator(device=device).manual_seed(0)
        ks = sorted({k for _, _, k in shapes})
        self.m, self.shapes, self.layers, self.tile = m, shapes, layers, tile
        for name, n, k in shapes:
            if m % tile.bm or n % tile.bn or k % tile.bk:
                raise ValueError(f"{name}: M={m}, N={n}, K={k} are not multiples of {tile}")
        x_offs, off = {}, 0
        for k in ks:
            x_offs[k], off = off, off + m * k
        rows, w_off, c_off, first = [], 0, 0, 0
        self.views = []  # (x [M, K], w [N, K], c [M, N]) per GEMM, for torch and the check
        w_total = layers * sum(n * k for _, n, k in shapes)
        c_total = layers * sum(m * n for _, n, _ in shapes)
        if like is not None:
            self.x, self.w, self.c, self.c_torch = like.x, like.w, like.c, like.c_torch
        else:
            self.x = torch.empty(off, device=device, dtype=dtype).normal_(generator=gen)
            self.w = torch.empty(w_total, device=device, dtype=dtype)
            self.w.normal_(0.0, 1.0 / math.sqrt(max(k for *_, k in shapes)), generator=gen)
            self.c = torch.empty(c_total, device=device, dtype=dtype)
            self.c_torch = torch.empty_like(self.c)  # cuBLAS writes here, not over the kernel's
        for _ in range(layers):
            for _, n, k in shapes:
                row = [x_offs[k], w_off, c_off, n, k]
                if any(v % 16 for v in row):
                    raise ValueError(f"offsets and sizes {row} must be multiples of 16")
                rows.append([first, *(v // 16 for v in row), 0, 0])
                self.views.append(
                    (
                        self.x[x_offs[k] : x_offs[k] + m * k].view(m, k),
                        self.w[w_off : w_off + n * k].view(n, k),
                        self.c[c_off : c_off + m * n].view(m, n),
                    )
                )
                first += (m // tile.bm) * (n // tile.bn)
                w_off += n * k
                c_off += m * n
        self.num_tiles = first
        self.meta = torch.tensor(rows, dtype=torch.int64, device=device)
        self.flops = 2 * m * layers * sum(n * k for _, n, k in shapes)
        self.weight_bytes = w_total * self.w.element_size()
        self.out_bytes = c_total * self.c.element_size()

    def torch_mm(self) -> None:
        """cuBLAS: the GEMMs back to back (one launch each)."""
        off = 0
        for x, w, c in self.views:
            torch.mm(x, w.t(), out=self.c_torch[off : off + c.numel()].view_as(c))
            off += c.numel()

    def check(self, atol: float, rtol: float) -> float:
        """Largest |kernel - torch| over every GEMM (float32 reference); raises past tolerance."""
        worst = 0.0
        for i, (x, w, c) in enumerate(self.views):
            ref = x.float() @ w.float().t()
            err = (c.float() - ref).abs()
            bad = err > atol + rtol * ref.abs()
            if bool(bad.any()):
                raise AssertionError(f"GEMM {i}: {int(bad.sum())} elements off, max {err.max()}")
            worst = max(worst, float(err.max()))
        return worst


class AttentionWork:
    """Micro-batch B: ``layers`` x ``lens`` decode-attention items over one paged KV cache
    [blocks, block, kv_heads, head_dim] (NHD), each layer's sequences on their own randomly
    placed blocks (tables [layers, seqs, blocks per seq]); one query per sequence shared by
    the layers (q [seqs, heads, head_dim], layer stride 0); outputs [layers, seqs, heads, dim]."""

    def __init__(self, device, dtype, lens, layers, heads, kv_heads, head_dim, block, seed=1):
        gen = torch.Generator(device=device).manual_seed(seed)
        self.layers, self.heads, self.kv_heads, self.head_dim = layers, heads, kv_heads, head_dim
        self.block = block
        self.lens = torch.tensor(lens, dtype=torch.int32, device=device)
        seqs = len(lens)
        width = max(1, max(-(-n // block) for n in lens))
        num_blocks = layers * seqs * width
        shape = (num_blocks, block, kv_heads, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype).normal_(generator=gen)
        self.v = torch.empty(shape, device=device, dtype=dtype).normal_(generator=gen)
        perm = torch.randperm(num_blocks, generator=gen, device=device)
        self.tables = perm.to(torch.int32).view(layers, seqs, width)
        self.q = torch.randn(seqs, heads, head_dim, generator=gen, device=device).to(dtype)
        self.o = torch.empty(layers, seqs, heads, head_dim, device=device, dtype=dtype)
        self.scale = head_dim**-0.5
        self.num_items = layers * seqs * kv_heads
        tokens = int(self.lens.sum())
        self.kv_bytes = 2 * layers * tokens * kv_heads * head_dim * self.k.element_size()

    def repo_kernel(self, config=None) -> None:
        """The repo's split-KV ``paged_decode_attention``, one call per layer, whole GPU."""
        from nanovllm.kernels.triton_attention import paged_decode_attention

        for layer in range(self.layers):
            paged_decode_attention(
                self.q, self.k, self.v, self.tables[layer], self.lens, self.scale, config=config
            )

    def reference(self, layer: int, seqs: int | None = None) -> torch.Tensor:
        """[seqs, heads, head_dim] float32 for the first ``seqs`` sequences (default all):
        plain softmax over the gathered keys."""
        from nanovllm.attention.torch_backend import gather_paged

        group = self.heads // self.kv_heads
        lens = self.lens.tolist()[:seqs]
        out = torch.zeros(len(lens), *self.o.shape[2:], dtype=torch.float32, device=self.q.device)
        for s, n in enumerate(lens):
            if n == 0:
                continue
            k = gather_paged(self.k, self.tables[layer, s], n).float()  # [n, kvh, d]
            v = gather_paged(self.v, self.tables[layer, s], n).float()
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [n, H, d]
            scores = torch.einsum("hd,nhd->hn", self.q[s].float(), k) * self.scale
            out[s] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
        return out

    def check(self, atol: float, rtol: float, layers=None, seqs: int | None = None) -> float:
        """Largest |kernel - reference| over ``layers`` (default all) and the first ``seqs``
        sequences; raises past tolerance."""
        worst = 0.0
        for layer in layers if layers is not None else range(self.layers):
            ref = self.reference(layer, seqs)
            err = (self.o[layer, : ref.shape[0]].float() - ref).abs()
            bad = err > atol + rtol * ref.abs()
            if bool(bad.any()):
                raise AssertionError(
                    f"attention layer {layer}: {int(bad.sum())} off, max {err.max()}"
                )
            worst = max(worst, float(err.max()))
        return worst


class Launcher:
    """Persistent launches of the dual-role kernel over ``gemm`` (micro-batch A) and ``attn``
    (micro-batch B) work."""

    def __init__(self, gemm, attn, tile: TileConfig, block_n: int, attn_stages: int, device):
        self.gemm, self.attn, self.tile = gemm, attn, tile
        self.block_n, self.attn_stages = block_n, attn_stages
        self.use_asm = device.type == "cuda"
        self.sched = torch.zeros(2 + SM_SLOTS, dtype=torch.int32, device=device)
        self.compiled = None
        if attn is not None and attn.block % block_n:
            raise ValueError(f"attention block_n {block_n} must divide the KV block {attn.block}")

    def prepare(self, grid: int, roles, role_by_sm=False, steal=False, gemm_only=False,
                attn_only=False):  # fmt: skip
        """A (zero, launch) pair: ``zero`` resets the counters (run it outside the timed region),
        ``launch`` runs the kernel. ``roles``: first role per program (0 GEMM, 1 attention);
        ``gemm_only`` / ``attn_only``: the other queue is empty."""
        g, a, t, dev = self.gemm, self.attn, self.tile, self.sched.device
        first_role = torch.tensor(roles, dtype=torch.int32, device=dev)
        assert first_role.numel() == grid
        stats = torch.zeros(grid, STAT_COLS, dtype=torch.int64, device=dev)
        group = a.heads // a.kv_heads
        args = (
            g.x, g.w, g.c, g.meta, g.meta.shape[0], 0 if attn_only else g.num_tiles, g.m,
            a.q, a.k, a.v, a.tables, a.lens, a.o, 0 if gemm_only else a.num_items,
            a.lens.numel(), a.scale * 1.4426950408889634,  # softmax in base 2
            0, a.q.stride(0), a.q.stride(1),  # q is shared by the layers
            *a.k.stride()[:3], *a.v.stride()[:3], a.tables.stride(0), a.tables.stride(1),
            *a.o.stride()[:3],
            self.sched[:2], self.sched[2:], first_role, stats, int(role_by_sm), int(steal),
        )  # fmt: skip
        consts = dict(
            BM=t.bm, BN=t.bn, BK=t.bk, META_BLOCK=max(2, 1 << (g.meta.shape[0] - 1).bit_length()),
            GEMM_STAGES=t.stages, NUM_KV_HEADS=a.kv_heads, GROUP=group,
            BLOCK_H=max(16, 1 << (group - 1).bit_length()), HEAD_DIM=a.head_dim,
            KV_BLOCK_SIZE=a.block, BLOCK_N=self.block_n, ATTN_STAGES=self.attn_stages,
            USE_ASM=self.use_asm, num_warps=t.warps, num_stages=max(t.stages, self.attn_stages),
        )  # fmt: skip
        kernel = _kernel()

        def launch():
            k = kernel[(grid,)](*args, **consts)
            if self.compiled is None:
                self.compiled = k

        launch.stats = stats
        return self.sched.zero_, launch


def spread_roles(grid: int, fraction: float) -> list[int]:
    """First role per program: ``fraction`` of them attention (1), spread evenly over the grid."""
    return [int(math.floor((p + 1) * fraction) > math.floor(p * fraction)) for p in range(grid)]


def parity_roles(grid: int) -> list[int]:
    return [p % 2 for p in range(grid)]


def summarize_stats(stats: torch.Tensor, gemm_items: int, attn_items: int) -> dict:
    """Per-role figures of the last run from the programs' side buffer: items done (checked
    against the queues: every item exactly once), programs that did each role, SMs used, and the
    span from the earliest program start to each role's last item (ns, %globaltimer)."""
    s = stats.cpu()
    n_g, n_a = int(s[:, 4].sum()), int(s[:, 5].sum())
    out = dict(
        gemm_items=n_g, attention_items=n_a,
        programs_gemm=int((s[:, 4] > 0).sum()), programs_attention=int((s[:, 5] > 0).sum()),
        programs_first_attention=int((s[:, 6] == 1).sum()),
        sms_seen=int(torch.unique(s[:, 0]).numel()),
        items_ok=n_g == gemm_items and n_a == attn_items,
    )  # fmt: skip
    start = int(s[:, 1].min())
    if start > 0:  # timers were read (GPU)
        g, a = s[:, 2][s[:, 4] > 0], s[:, 3][s[:, 5] > 0]
        out["gemm_span_ms"] = (int(g.max()) - start) / 1e6 if g.numel() else None
        out["attention_span_ms"] = (int(a.max()) - start) / 1e6 if a.numel() else None
        out["kernel_span_ms"] = (int(s[:, 7].max()) - start) / 1e6
    return out


def kernel_footprint(compiled, sms_smem: int = 228 * 1024, regs_per_sm: int = 65536) -> dict:
    """Registers, spills, shared memory, warps of a compiled kernel, and how many programs fit
    on one SM (Hopper: 64 K registers, 228 KB shared memory with 1 KB reserved per program,
    64 warps); best effort (Triton internals)."""
    try:
        regs, spills = compiled.n_regs, compiled.n_spills
        shared, warps = compiled.metadata.shared, compiled.metadata.num_warps
    except Exception as e:  # noqa: BLE001 - a diagnostic only
        return dict(error=repr(e))
    by_regs = regs_per_sm // max(1, -(-regs // 8) * 8 * 32 * warps)
    by_smem = sms_smem // (shared + 1024)
    return dict(
        regs=regs, spills=spills, shared=shared, warps=warps,
        programs_per_sm=min(by_regs, by_smem, 64 // warps, 32),
    )  # fmt: skip


# ----------------------------------------------------------------------------- timing
def time_ms(fns: dict, reps: int, warmup: int) -> dict:
    """Median CUDA-event ms per entry ``name: (pre, fn)``; ``pre`` (the counter reset) runs
    before the start event. Entries are interleaved rep by rep (same clocks for all)."""
    cuda = torch.cuda.is_available()
    for pre, fn in fns.values():
        for _ in range(warmup):
            pre()
            fn()
    sync()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, (pre, fn) in fns.items():
            pre()
            if not cuda:  # the CPU test of this flow (interpreter): wall time
                t = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) * 1e3)
                continue
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times[name].append(start.elapsed_time(stop))
    return {name: statistics.median(ts) for name, ts in times.items()}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gate(speedup: float) -> str:
    return next(verdict for bound, verdict in GATE if speedup >= bound)


def noop() -> None:
    pass


# ----------------------------------------------------------------------------- check mode
def run_check(args, device) -> dict:
    """Tiny shapes through every scheduling mode: each GEMM equals torch, each attention item
    equals a softmax reference, every item is done exactly once (the interpreter on CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16
    tile = TileConfig(32, 32, 32, 1) if device.type != "cuda" else args.configs[0]
    shapes = CHECK_GEMMS if device.type != "cuda" else SHAPES_8B
    m = 64 if device.type != "cuda" else tile.bm * 2
    c = CHECK_ATTN
    gemm = GemmWork(device, dtype, m, shapes, 2, tile)
    attn = AttentionWork(device, dtype, list(c["lens"]), 2, c["heads"], c["kv_heads"],
                         c["head_dim"], c["block"])  # fmt: skip
    block_n = 16 if device.type != "cuda" else min(args.attn_block_n, c["block"])
    run = Launcher(gemm, attn, tile, block_n, 1 if device.type != "cuda" else args.attn_stages,
                   device)  # fmt: skip
    modes = {
        "a: 1 program, attention first, steal": (1, [1], False, True),
        "a: 3 programs, fraction 1/3, steal": (3, spread_roles(3, 1 / 3), False, True),
        "b: parity roles, no steal": (4, parity_roles(4), device.type == "cuda", False),
    }
    results = {}
    for name, (grid, roles, by_sm, steal) in modes.items():
        gemm.c.fill_(float("nan"))
        attn.o.fill_(float("nan"))
        zero, launch = run.prepare(grid, roles, role_by_sm=by_sm, steal=steal)
        zero()
        launch()
        if device.type == "cuda":
            torch.cuda.synchronize()
        stats = summarize_stats(launch.stats, gemm.num_tiles, attn.num_items)
        assert stats["items_ok"], f"{name}: items done {stats} vs {gemm.num_tiles}/{attn.num_items}"
        tol = dict(atol=2e-2, rtol=2e-2)
        results[name] = dict(
            gemm_max_err=gemm.check(**tol), attention_max_err=attn.check(**tol), **stats
        )
        print(f"check {name}: ok {results[name]}")
    return results


# ----------------------------------------------------------------------------- benchmark
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", help="GEMM rows (default 512 1024; quick: 512)")
    p.add_argument(
        "--ctx", type=int, nargs="+", help="attention context (default 256 512; quick 256)"
    )
    p.add_argument("--batch", type=int, default=512, help="attention sequences (micro-batch B)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument(
        "--configs", type=TileConfig.parse, nargs="+",
        help="GEMM tiles BM,BN,BK,stages[,warps]; the first is variants a/b's, the rest are c's "
        "(default 128,128,64,3 128,128,64,2 64,256,64,2 128,256,64,2,8; quick: the first two)",
    )  # fmt: skip
    p.add_argument("--attn-block-n", type=int, default=64, help="keys per attention tile")
    p.add_argument("--attn-stages", type=int, default=3, help="attention loop stages")
    p.add_argument(
        "--attn-fractions", type=float, nargs="+", default=[0.125, 0.25, 0.5],
        help="variant a: share of programs that start on attention",
    )  # fmt: skip
    p.add_argument(
        "--variants", nargs="+", choices=("a", "b", "c"), default=["a", "b", "c"],
        help="a: 1 program/SM, dynamic roles; b: 2/SM, one role each (and b+steal); c: b with "
        "the other --configs",
    )  # fmt: skip
    p.add_argument(
        "--attention-configs", nargs="+", default=["default", "64,4,2", "32,4,2"],
        help="the repo kernel's baselines: 'default' or block_n,warps,stages",
    )  # fmt: skip
    p.add_argument("--reps", type=int, help="timed runs per figure, median (default 20; quick 7)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="M 512, ctx 256, two configs, 7 reps")
    p.add_argument("--check", action="store_true",
                   help="correctness on tiny shapes only (CPU: TRITON_INTERPRET=1)")  # fmt: skip
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    args.m = args.m or ([512] if args.quick else [512, 1024])
    args.ctx = args.ctx or ([256] if args.quick else [256, 512])
    default_cfgs = ["128,128,64,3", "128,128,64,2", "64,256,64,2", "128,256,64,2,8"]
    args.configs = args.configs or [
        TileConfig.parse(c) for c in default_cfgs[: 2 if args.quick else None]
    ]
    args.reps = args.reps or (7 if args.quick else 20)
    for name in ("reps", "batch", "layers", "attn_block_n", "attn_stages"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(not 0.0 <= f <= 1.0 for f in args.attn_fractions):
        p.error("--attn-fractions must lie in [0, 1]")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def repo_attention_fn(attn: AttentionWork, spec: str):
    from nanovllm.kernels.triton_attention import DecodeConfig

    cfg = None if spec == "default" else DecodeConfig(*(int(v) for v in spec.split(",")))
    return lambda: attn.repo_kernel(cfg)


@dataclass(frozen=True)
class Shapes:
    """What one benchmark point runs: the GEMMs of a layer and the attention geometry."""

    gemms: tuple = SHAPES_8B
    heads: int = HEADS
    kv_heads: int = KV_HEADS
    head_dim: int = HEAD_DIM
    block: int = KV_BLOCK
    dtype: torch.dtype = torch.bfloat16


def bench_point(args, device, sms: int, m: int, ctx: int, shapes: Shapes = Shapes()) -> dict:
    """Baselines, then per tile config: a correctness run, this kernel with one role only, and
    the overlap variants; the serial pair and every variant's speedup over it."""
    print(f"\n=== M {m} (GEMM rows), attention {args.batch} x ctx {ctx}, {args.layers} layers ===")
    t0 = time.time()
    attn = AttentionWork(device, shapes.dtype, [ctx] * args.batch, args.layers, shapes.heads,
                         shapes.kv_heads, shapes.head_dim, shapes.block)  # fmt: skip
    gemms, like = {}, None
    for tile in args.configs:
        try:
            gemms[tile] = like = GemmWork(device, shapes.dtype, m, shapes.gemms, args.layers,
                                          tile, like=like)  # fmt: skip
        except ValueError as e:
            print(f"config {tile}: skipped ({e})")
    if not gemms:
        raise ValueError(f"no tile config fits M={m}")
    sync()
    print(f"buffers ready in {time.time() - t0:.1f} s: weights {like.weight_bytes / 2**30:.2f} "
          f"GiB, KV {attn.kv_bytes / 2**30:.2f} GiB")  # fmt: skip
    flops, wbytes, kvbytes = like.flops, like.weight_bytes, attn.kv_bytes

    # baselines: cuBLAS and the repo's attention kernel
    base = {"cublas": (noop, like.torch_mm)}
    for spec in args.attention_configs:
        base[f"repo_attention {spec}"] = (noop, repo_attention_fn(attn, spec))
    base_ms = time_ms(base, args.reps, args.warmup)
    for name, ms in base_ms.items():
        print(f"  {name:>28}: {ms:.3f} ms")
    row = dict(m=m, ctx=ctx, batch=args.batch, layers=args.layers, flops=flops,
               weight_bytes=wbytes, kv_bytes=kvbytes, gemm_out_bytes=like.out_bytes,
               baselines=base_ms, configs={})  # fmt: skip

    for idx, (tile, gemm) in enumerate(gemms.items()):
        if idx > 0 and "c" not in args.variants:
            break
        key = str(tile)
        entry = row["configs"][key] = dict(tile=vars(tile))
        run = Launcher(gemm, attn, tile, args.attn_block_n, args.attn_stages, device)
        try:  # the first launch compiles; its outputs are checked against torch
            t1 = time.time()
            gemm.c.fill_(float("nan"))
            attn.o.fill_(float("nan"))
            zero, launch = run.prepare(2 * sms, parity_roles(2 * sms), role_by_sm=True)
            zero()
            launch()
            sync()
            entry["footprint"] = kernel_footprint(run.compiled)
            entry["compile_and_first_run_s"] = time.time() - t1
            entry["check"] = dict(
                stats=summarize_stats(launch.stats, gemm.num_tiles, attn.num_items),
                gemm_max_err=gemm.check(atol=6e-2, rtol=2e-2),
                attention_max_err=attn.check(2e-2, 2e-2, [0, args.layers - 1], seqs=64),
            )  # fmt: skip
            assert entry["check"]["stats"]["items_ok"], f"items: {entry['check']['stats']}"
            print(f"  config {key}: compiled, ran and checked in {time.time() - t1:.1f} s; "
                  f"footprint {entry['footprint']}")  # fmt: skip
        except Exception as e:  # noqa: BLE001 - one config failing must not end the run
            entry["error"] = repr(e)[:2000]
            print(f"  config {key}: FAILED {entry['error'][:500]}")
            continue
        fns = {}

        def add(name, grid, roles, **kw):
            fns[name] = run.prepare(grid, roles, **kw)  # noqa: B023 - used at once

        for per_sm in (1, 2):
            grid = per_sm * sms
            add(f"gemm_only {per_sm}/SM", grid, [0] * grid, gemm_only=True)
            add(f"attention_only {per_sm}/SM", grid, [1] * grid, attn_only=True)
        overlap = []
        prefix = "" if idx == 0 else "c:"  # variant c: a/b with the other tile configs
        if "a" in args.variants:
            for f in args.attn_fractions:
                add(f"{prefix}a f={f:g}", sms, spread_roles(sms, f), steal=True)
                overlap.append(f"{prefix}a f={f:g}")
        if "b" in args.variants or idx > 0:
            add(f"{prefix}b", 2 * sms, parity_roles(2 * sms), role_by_sm=True)
            add(f"{prefix}b+steal", 2 * sms, parity_roles(2 * sms), role_by_sm=True, steal=True)
            overlap += [f"{prefix}b", f"{prefix}b+steal"]
        try:
            ms = time_ms(fns, args.reps, args.warmup)
        except Exception as e:  # noqa: BLE001
            entry["error"] = repr(e)[:2000]
            print(f"  config {key}: timing FAILED {entry['error'][:500]}")
            continue
        entry["ms"], entry["overlap"] = ms, overlap
        entry["stats"] = {
            name: summarize_stats(
                launch.stats,
                0 if name.startswith("attention_only") else gemm.num_tiles,
                0 if name.startswith("gemm_only") else attn.num_items,
            )
            for name, (_, launch) in fns.items()
        }
        for name in fns:
            print(f"  {key} {name:>22}: {ms[name]:.3f} ms  {entry['stats'][name]}")

    # the serial pair: the best GEMM alone + the best attention alone, whichever kernels
    gemm_alone = {"cublas": base_ms["cublas"]}
    attn_alone = {k: v for k, v in base_ms.items() if k.startswith("repo_attention")}
    for key, entry in row["configs"].items():
        for name, ms in entry.get("ms", {}).items():
            ok = entry["stats"][name]["items_ok"]
            if name.startswith("gemm_only") and ok:
                gemm_alone[f"persistent {key} {name}"] = ms
            if name.startswith("attention_only") and ok:
                attn_alone[f"persistent {key} {name}"] = ms
    best_g = min(gemm_alone, key=gemm_alone.get)
    best_a = min(attn_alone, key=attn_alone.get)
    serial = gemm_alone[best_g] + attn_alone[best_a]
    row.update(gemm_alone_ms=gemm_alone, attention_alone_ms=attn_alone, best_gemm=best_g,
               best_gemm_ms=gemm_alone[best_g], best_attention=best_a,
               best_attention_ms=attn_alone[best_a], serial_ms=serial)  # fmt: skip
    print(f"  best GEMM alone: {best_g} {gemm_alone[best_g]:.3f} ms "
          f"({flops / gemm_alone[best_g] / 1e9:.0f} TFLOP/s); best attention alone: {best_a} "
          f"{attn_alone[best_a]:.3f} ms ({kvbytes / attn_alone[best_a] / 1e6:.0f} GB/s); "
          f"serial {serial:.3f} ms")  # fmt: skip
    variants = []
    for key, entry in row["configs"].items():
        for name in entry.get("overlap", []):
            ms, st = entry["ms"][name], entry["stats"][name]
            v = dict(
                variant=name, config=key, ms=ms, serial_ms=serial, speedup=serial / ms,
                hbm_gbs=(wbytes + kvbytes) / ms / 1e6, tflops=flops / ms / 1e9,
                gemm_span_ms=st.get("gemm_span_ms"), attention_span_ms=st.get("attention_span_ms"),
                items_ok=st["items_ok"],
            )  # fmt: skip
            variants.append(v)
            print(f"  {name:>14} [{key}]: {ms:.3f} ms, {v['speedup']:.3f}x of serial, "
                  f"{v['hbm_gbs']:.0f} GB/s (weights+KV), {v['tflops']:.0f} TFLOP/s; spans "
                  f"gemm {v['gemm_span_ms']} / attention {v['attention_span_ms']} ms; "
                  f"items ok {v['items_ok']}")  # fmt: skip
    row["variants"] = variants
    del attn, gemms, like
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.check:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--check on CPU needs TRITON_INTERPRET=1 (set before starting)")
        env = environment(device)
        check = run_check(args, device)
        payload = dict(
            script="benchmarks/persistent_overlap.py", mode="check", environment=env,
            argv=list(sys.argv), check=check,
        )  # fmt: skip
        print("check passed")
        write_json(args.json, payload)
        return payload
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs a CUDA GPU (use --check with TRITON_INTERPRET=1)")
    device = torch.device("cuda")
    env = environment(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    print(f"{torch.cuda.get_device_name(device)}, {sms} SMs, torch {torch.__version__}, "
          f"triton {env['triton']}, commit {env['git_commit']}")  # fmt: skip
    print("configs:", [str(c) for c in args.configs], "variants:", args.variants)
    t0 = time.time()
    points = []
    for m in args.m:
        for ctx in args.ctx:
            try:
                points.append(bench_point(args, device, sms, m, ctx))
            except Exception as e:  # noqa: BLE001 - keep the other points
                print(f"point M {m} ctx {ctx} FAILED: {e!r}")
                points.append(dict(m=m, ctx=ctx, error=repr(e)[:2000]))
            print(f"[{time.time() - t0:.0f} s elapsed]")
    rows = [v for p in points for v in p.get("variants", []) if v["items_ok"]]
    best = max(rows, key=lambda v: v["speedup"], default=None)
    summary = dict(
        best=best and {**best, "m": next(p["m"] for p in points if best in p.get("variants", [])),
                       "ctx": next(p["ctx"] for p in points if best in p.get("variants", []))},
        best_speedup=best and best["speedup"],
        gate=gate(best["speedup"]) if best else "no result",
        gate_rule="best speedup >= 1.30: go on; 1.20-1.30: go on only if step 2 keeps >= 1.15x; "
        "< 1.20: stop",
    )  # fmt: skip
    print("\n=== summary ===")
    for p in points:
        for v in p.get("variants", []):
            print(
                f"M {p['m']:>5} ctx {p['ctx']:>4} {v['variant']:>14} [{v['config']}]: "
                f"{v['ms']:.3f} ms vs serial {v['serial_ms']:.3f} -> {v['speedup']:.3f}x"
            )
    if best:
        print(
            f"best speedup {best['speedup']:.3f}x ({best['variant']}, {best['config']}, "
            f"M {summary['best']['m']}, ctx {summary['best']['ctx']}) -> gate: {summary['gate']}"
        )
    else:
        print("no overlap variant produced a result -> gate: no result")
    payload = dict(
        script="benchmarks/persistent_overlap.py", card=torch.cuda.get_device_name(device),
        torch=torch.__version__, triton=env["triton"], argv=list(sys.argv),
        git_commit=env["git_commit"], environment=env, args={
            k: ([str(c) for c in v] if k == "configs" else v) for k, v in vars(args).items()
        }, points=points, summary=summary, wall_s=time.time() - t0,
    )  # fmt: skip
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
