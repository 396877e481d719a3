"""A persistent GEMM whose grid is the SM budget: linear layers on a green partition.

On an SM partition cuBLAS runs the kernel it picks for the whole GPU (the same kernel with and
without the SM-count hint): sized for every SM, it runs a half-empty last wave on a partition.
This kernel launches one program per SM of the partition; each walks output tiles (grouped along
M so programs running together share weight tiles in L2) and moves both operands and the result
through TMA tensor descriptors, so it keeps more of its speed on a partition than cuBLAS (figures:
benchmarks/RESEARCH.md).

Where few output tiles meet a long K (the down projection) it splits K (``plan``): fp32 partial
sums, added in a fixed order by a second kernel, so results stay deterministic.

``out = x @ weight.T`` with x [M, K] and weight [N, K] (nn.Linear's layout), no bias. M is any
size (descriptor loads past the last row read zeros, stores are clipped); N and K must be tile
multiples. Needs an sm_90 GPU and Triton's host tensor descriptors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

BLOCK_K = 64
# The split-K choice models a program's time as k-iterations of one tile at about this many FLOP/s
# per SM, and the extra pass over the fp32 partial sums at about this many bytes/s (Hopper-class
# figures; only their ratio matters).
FLOPS_PER_SM = 5e12
SUM_BYTES_PER_S = 2e12
MAX_SPLIT_K = 4
SPLIT_MARGIN = 0.1  # split K only where the model predicts at least 10% less time


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _persistent_mm(
        x_desc, w_desc, out_desc, part_ptr, M, N, K,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
        SPLIT_K: tl.constexpr,
    ):  # fmt: skip
        num_m, num_n = tl.cdiv(M, BM), N // BN
        tiles = num_m * num_n
        k_steps = K // BK // SPLIT_K  # per work item
        per_group = GROUP_M * num_n
        # Work item = (split, output tile). flatten: the item loop and the K loop form one
        # software pipeline, so the next item's loads are in flight during this one's store.
        for item in tl.range(tl.program_id(0), tiles * SPLIT_K, tl.num_programs(0), flatten=True):
            tile, split = item % tiles, item // tiles
            first_m = (tile // per_group) * GROUP_M
            group_m = min(num_m - first_m, GROUP_M)
            pid_m = first_m + (tile % per_group) % group_m
            pid_n = (tile % per_group) // group_m
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for kk in range(k_steps):
                k0 = (split * k_steps + kk) * BK
                a = x_desc.load([pid_m * BM, k0])  # [BM, BK]
                b = w_desc.load([pid_n * BN, k0])  # [BN, BK]
                acc = tl.dot(a, b.T, acc)
            if SPLIT_K == 1:
                out_desc.store([pid_m * BM, pid_n * BN], acc.to(out_desc.dtype))
            else:
                # fp32 partial sums [SPLIT_K, M, N], summed in split order by _sum_splits. Plain
                # stores: a TMA store would stage the fp32 tile in shared memory, which the
                # operand pipeline already fills.
                rows = pid_m * BM + tl.arange(0, BM)
                cols = pid_n * BN + tl.arange(0, BN)
                ptrs = part_ptr + split * M * N + rows[:, None] * N + cols[None, :]
                tl.store(ptrs, acc, mask=rows[:, None] < M)

    @triton.jit
    def _sum_splits(part_ptr, out_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.load(part_ptr + offs, mask=mask)
        for split in tl.static_range(1, SPLIT_K):  # a fixed order: deterministic sums
            acc += tl.load(part_ptr + split * numel + offs, mask=mask)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    return _persistent_mm, _sum_splits


# Split-K stores fp32 partial tiles, which Triton stages through shared memory: a 128 x 256 fp32
# tile (128 KB) next to three operand stages would not fit in the 227 KB of an H100 SM.
SPLIT_TILE = (128, 128, 4, 4)


def tile_config(n: int) -> tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) without split-K: 128 x 256 tiles, 8 warps, 3 stages where
    N allows (chosen by sweeping the Qwen3-8B projections on large partitions), else 128 x 128,
    4 warps, 4 stages."""
    return (128, 256, 8, 3) if n % 256 == 0 else SPLIT_TILE


def plan(m: int, n: int, k: int, programs: int) -> tuple[tuple[int, int, int, int], int]:
    """The tile config and how many slices to cut K into so that ``programs`` programs finish
    soonest: a few output tiles of a long K (the down projection: 64 tiles of 192 k-steps at 512
    rows) would leave most of a partition idle, but every split adds a pass over fp32 partial
    sums and takes the smaller ``SPLIT_TILE``."""
    k_steps = k // BLOCK_K

    def seconds(s: int) -> float:
        bm, bn = (tile_config(n) if s == 1 else SPLIT_TILE)[:2]
        tiles = -(-m // bm) * (n // bn)
        compute = -(-tiles * s // programs) * (k_steps // s) * 2 * bm * bn * BLOCK_K / FLOPS_PER_SM
        return compute + (s > 1) * (s * m * n * 4 + m * n * 2) / SUM_BYTES_PER_S

    choices = [s for s in range(1, MAX_SPLIT_K + 1) if k_steps % s == 0 and n % SPLIT_TILE[1] == 0]
    best = min(choices or [1], key=seconds)
    if seconds(best) > (1 - SPLIT_MARGIN) * seconds(1):  # not worth a second kernel
        best = 1
    return (tile_config(n) if best == 1 else SPLIT_TILE), best


def supported(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """None when ``linear`` can run these operands, else why not."""
    if x.device.type != "cuda":
        return f"needs a CUDA GPU, not {x.device.type}"
    if torch.cuda.get_device_capability(x.device) < (9, 0):
        return "TMA tensor descriptors need an sm_90 GPU"
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype:
        return f"dtypes {x.dtype}/{weight.dtype} (bf16 or fp16, the same for both)"
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        return f"shapes {tuple(x.shape)} x {tuple(weight.shape)}"
    n, k = weight.shape
    if k % BLOCK_K or n % 128:
        return f"N={n}, K={k}: N must be a multiple of 128 and K of {BLOCK_K}"
    for name, t in (("x", x), ("weight", weight)):
        if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return f"{name} rows must be contiguous and 16-byte aligned"
    return None


def prepare(
    x: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor,
    num_sms: int,
    config: tuple[int, int, int, int] | None = None,
    splits: int | None = None,
) -> Callable[[], None]:
    """A launcher of ``out = x @ weight.T`` (``out`` contiguous) with at most ``num_sms``
    programs, its descriptors and partial-sum buffer made once. ``config``: (BM, BN, num_warps,
    num_stages) and ``splits`` (K slices): default ``plan(...)``'s."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = x.shape
    n = weight.shape[0]
    if splits is None:
        planned, splits = plan(m, n, k, num_sms)
    else:
        planned = tile_config(n) if splits == 1 else SPLIT_TILE
    bm, bn, warps, stages = config or planned
    if n % bn:
        raise ValueError(f"N={n} is not a multiple of the tile's {bn} columns")
    if (k // BLOCK_K) % splits:
        raise ValueError(f"K={k} does not cut into {splits} slices of {BLOCK_K}-column steps")
    # [splits, M, N] fp32 partial sums (one unused element when K is not split)
    part = torch.empty(splits * m * n if splits > 1 else 1, dtype=torch.float32, device=x.device)
    descs = (
        TensorDescriptor.from_tensor(x, [bm, BLOCK_K]),
        TensorDescriptor.from_tensor(weight, [bn, BLOCK_K]),
        TensorDescriptor.from_tensor(out, [bm, bn]),
        part,
    )
    grid = (max(1, min(num_sms, -(-m // bm) * (n // bn) * splits)),)
    mm, sum_splits = _kernels()
    block = 1024

    def launch() -> None:
        mm[grid](
            *descs, m, n, k, BM=bm, BN=bn, BK=BLOCK_K, GROUP_M=8, SPLIT_K=splits,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
        if splits > 1:
            sum_splits[(-(-m * n // block),)](part, out, m * n, SPLIT_K=splits, BLOCK=block)

    return launch


def linear(x: torch.Tensor, weight: torch.Tensor, num_sms: int) -> torch.Tensor:
    """``x @ weight.T`` [M, N] with at most ``num_sms`` programs (one per SM of the budget).
    Call ``supported`` first."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    if x.shape[0]:
        prepare(x, weight, out, num_sms)()
    return out
