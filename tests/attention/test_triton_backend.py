"""TritonAttentionBackend against the torch reference, without a model.

CPU tests run the kernels through the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py)
on tiny float32 shapes; ``gpu`` tests cover the real shapes, bf16/fp16 and CUDA-graph capture.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from nanovllm.attention.metadata import AttentionMetadata  # noqa: E402
from nanovllm.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from nanovllm.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from nanovllm.kernels.triton_attention import (  # noqa: E402
    MAX_SPLITS,
    DecodeConfig,
    choose_num_splits,
    paged_decode_attention,
)

TORCH = TorchAttentionBackend()
TRITON = TritonAttentionBackend()
GPU = torch.device("cuda")
CPU = torch.device("cpu")


# The *_cpu tests run the kernels on CPU tensors in Triton's interpreter (CI); on a GPU machine
# the interpreter is off and the gpu-marked tests below cover the same kernels on the device.
interpreter = pytest.mark.skipif(
    torch.cuda.is_available(), reason="interpreter test: the gpu-marked tests cover this on a GPU"
)


def split_qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, gen):
    """q/k/v as strided views of one fused projection output, as the model produces them."""
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, generator=gen).to(device=device, dtype=dtype)
    q, k, v = qkv.split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1
    )
    return (
        q.view(num_tokens, num_heads, head_dim),
        k.view(num_tokens, num_kv_heads, head_dim),
        v.view(num_tokens, num_kv_heads, head_dim),
    )


def random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device, gen):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    return k, v


def shuffled_tables(num_keys, block_size, num_blocks, gen, extra_cols=1):
    """[num_seqs, max_blocks] int32 tables over a random permutation of the physical blocks,
    -1 padded (plus ``extra_cols`` all -1 columns, like a table sized for max_model_len)."""
    need = [math.ceil(n / block_size) for n in num_keys]
    assert sum(need) <= num_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(need) + extra_cols
    tables = torch.full((len(num_keys), width), -1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used : used + n].to(torch.int32)
        used += n
    return tables


def assert_close(out, ref, atol, rtol=None):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(
        out.float(), ref.float(), atol=atol, rtol=atol if rtol is None else rtol
    )


def decode_case(lens, num_kv_heads, group, head_dim, block_size, dtype, device, seed=0):
    """Decode inputs; q is a strided view of a fused qkv output."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(math.ceil(n / block_size) for n in lens) + 3
    k_cache, v_cache = random_cache(
        num_blocks, block_size, num_kv_heads, head_dim, dtype, device, gen
    )
    q, _, _ = split_qkv(len(lens), num_kv_heads * group, num_kv_heads, head_dim, dtype, device, gen)
    return q, k_cache, v_cache, decode_meta(lens, block_size, num_blocks, device, gen)


def decode_meta(lens, block_size, num_blocks, device, gen, width=None):
    tables = shuffled_tables(lens, block_size, num_blocks, gen)
    if width is not None:
        tables = torch.cat(
            [tables, torch.full((len(lens), width - tables.shape[1]), -1, dtype=torch.int32)], 1
        )
    return AttentionMetadata(
        is_prefill=False,
        slot_mapping=torch.full((len(lens),), -1, dtype=torch.int32, device=device),
        context_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
    )


def prefill_case(len_q, prefix, num_kv_heads, group, head_dim, block_size, dtype, device, paged):
    """Sequences of ``len_q`` new tokens after ``prefix`` cached ones; the new tokens' K/V are
    stored into the cache with the Triton backend first, as the model layer does."""
    gen = torch.Generator().manual_seed(1)
    len_k = [p + n for p, n in zip(prefix, len_q, strict=True)]
    num_tokens = sum(len_q)
    q, k, v = split_qkv(
        num_tokens, num_kv_heads * group, num_kv_heads, head_dim, dtype, device, gen
    )
    cu_q = torch.tensor([0, *torch.tensor(len_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(len_k).cumsum(0).tolist()], dtype=torch.int32)
    num_blocks = sum(math.ceil(n / block_size) for n in len_k) + 2
    k_cache, v_cache = random_cache(
        num_blocks, block_size, num_kv_heads, head_dim, dtype, device, gen
    )
    tables = shuffled_tables(len_k, block_size, num_blocks, gen)
    slots = []
    for i in range(len(len_q)):
        for pos in range(prefix[i], len_k[i]):
            slots.append(int(tables[i, pos // block_size]) * block_size + pos % block_size)
    slot_mapping = torch.tensor(slots, dtype=torch.int32, device=device)
    TRITON.store_kvcache(k, v, k_cache, v_cache, slot_mapping)
    meta = AttentionMetadata(
        is_prefill=True,
        slot_mapping=slot_mapping,
        cu_seqlens_q=cu_q.to(device),
        cu_seqlens_k=(cu_k if paged else cu_q).to(device),
        max_seqlen_q=max(len_q),
        max_seqlen_k=max(len_k),
        block_tables=tables.to(device) if paged else None,
    )
    return q, k, v, k_cache, v_cache, meta


# ------------------------------------------------------------------------------------------
# CPU (Triton interpreter), float32, tiny shapes
# ------------------------------------------------------------------------------------------


@interpreter
def test_store_kvcache_cpu():
    gen = torch.Generator().manual_seed(0)
    num_tokens, num_heads, num_kv_heads, head_dim, block_size = 7, 4, 2, 16, 16
    _, k, v = split_qkv(num_tokens, num_heads, num_kv_heads, head_dim, torch.float32, CPU, gen)
    assert not k.is_contiguous()
    caches = random_cache(4, block_size, num_kv_heads, head_dim, torch.float32, CPU, gen)
    slots = torch.tensor([5, -1, 17, 63, -1, 0, 40], dtype=torch.int32)
    ref_k, ref_v = caches[0].clone(), caches[1].clone()
    out_k, out_v = caches[0].clone(), caches[1].clone()
    TORCH.store_kvcache(k, v, ref_k, ref_v, slots)
    TRITON.store_kvcache(k, v, out_k, out_v, slots)
    assert torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v)


@interpreter
def test_store_kvcache_empty_cache_is_noop_cpu():
    k = torch.randn(3, 2, 16)
    TRITON.store_kvcache(
        k, k, torch.tensor([]), torch.tensor([]), torch.zeros(3, dtype=torch.int32)
    )


@interpreter
@pytest.mark.parametrize(
    "block_size,group,num_splits,block_n,prefetch,tile_in_block",
    [
        (16, 1, None, 16, True, True),  # shape-chosen splits (1 here)
        (16, 4, 4, 32, True, True),  # tiles span two cache blocks (per-token block ids)
        (16, 4, 4, 32, False, True),  # block ids loaded in the tile's own iteration
        (32, 4, 2, 16, True, True),  # several tiles per block, one block id per tile
        (32, 4, 2, 16, True, False),  # ... the same through per-token block ids
        (32, 1, 3, 16, False, True),  # split count not a power of two
        (32, 2, 16, 16, True, True),  # more splits than tiles: empty splits
    ],
)
def test_decode_cpu(block_size, group, num_splits, block_n, prefetch, tile_in_block):
    lens = [37, 0, 64, 5]  # not block multiples, a padding row, an exact multiple
    q, k_cache, v_cache, meta = decode_case(lens, 2, group, 16, block_size, torch.float32, CPU)
    ref = TORCH.decode(q, k_cache, v_cache, meta, 0.25)
    out = paged_decode_attention(
        q,
        k_cache,
        v_cache,
        meta.block_tables,
        meta.context_lens,
        0.25,
        num_splits=num_splits,
        config=DecodeConfig(
            block_n=block_n, num_stages=1, prefetch_table=prefetch, tile_in_block=tile_in_block
        ),
    )
    assert_close(out, ref, atol=1e-5)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@interpreter
def test_decode_backend_and_micro_batch_slice_cpu():
    lens = [3, 50, 17, 0, 33]
    q, k_cache, v_cache, meta = decode_case(lens, 1, 2, 32, 16, torch.float32, CPU, seed=3)
    ref = TORCH.decode(q, k_cache, v_cache, meta, 0.2)
    assert_close(TRITON.decode(q, k_cache, v_cache, meta, 0.2), ref, atol=1e-5)
    sub = meta.decode_slice(1, 4)  # a micro-batch's rows: row-offset views of the tables
    assert_close(TRITON.decode(q[1:4], k_cache, v_cache, sub, 0.2), ref[1:4], atol=1e-5)


@interpreter
def test_decode_default_splits_cpu():
    """A table wide enough (like max_model_len) for the shape-based choice to pick 2 splits."""
    lens = [300, 0, 45]
    gen = torch.Generator().manual_seed(4)
    k_cache, v_cache = random_cache(16, 32, 2, 32, torch.float32, CPU, gen)
    q = torch.randn(3, 4, 32, generator=gen)
    meta = decode_meta(lens, 32, 16, CPU, gen, width=16)
    assert choose_num_splits(3, 2, 16 * 32, num_sms=4) == 2
    ref = TORCH.decode(q, k_cache, v_cache, meta, 0.1)
    assert_close(TRITON.decode(q, k_cache, v_cache, meta, 0.1), ref, atol=1e-5)


def test_choose_num_splits():
    # Few sequences on many SMs: split, but never below 256 keys of table width.
    assert choose_num_splits(1, 8, 8192, num_sms=132) == 32
    assert choose_num_splits(1, 8, 1 << 20, num_sms=132) == MAX_SPLITS
    assert choose_num_splits(1, 8, 512, num_sms=132) == 2
    assert choose_num_splits(1, 8, 100, num_sms=132) == 1
    # Enough (sequence, KV head) programs already: no split, no merge kernel.
    assert choose_num_splits(256, 8, 8192, num_sms=132) == 1
    for batch in range(1, 300, 7):
        n = choose_num_splits(batch, 8, 4096, num_sms=132)
        assert 1 <= n <= MAX_SPLITS and n & (n - 1) == 0


@interpreter
@pytest.mark.parametrize(
    "paged,group,len_q,prefix",
    [
        (False, 2, [5, 17, 1], [0, 0, 0]),
        (True, 1, [7, 3, 18], [20, 33, 0]),  # prefix hits (cached prefix not block aligned)
        (True, 4, [16, 1], [16, 40]),  # chunked prefill, a single-token chunk
    ],
)
def test_prefill_cpu(paged, group, len_q, prefix):
    args = prefill_case(len_q, prefix, 2, group, 16, 16, torch.float32, CPU, paged)
    ref = TORCH.prefill(*args, scale=0.25)
    out = TRITON.prefill(*args, scale=0.25)
    assert_close(out, ref, atol=1e-5)


# ------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------

DTYPES = [torch.bfloat16, torch.float16]
ATOL = 2e-2


def gpu_lens(batch, max_ctx, block_size, seed):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_ctx + 1, (batch,), generator=gen).tolist()
    special = [0, 1, block_size, block_size + 1, max_ctx]  # padding row, edges, longest
    for i, n in enumerate(special[: max(0, batch - 1)]):
        lens[i + 1] = n
    return lens


# Every (block size, GQA ratio) pair, batch sizes cycling through 1 / 13 / 64.
DECODE_SHAPES = [
    (block_size, group, *[(1, 4096), (13, 1000), (64, 2048)][i % 3])
    for i, (block_size, group) in enumerate((bs, g) for bs in (16, 32, 256) for g in (1, 2, 4, 8))
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,group,batch,max_ctx", DECODE_SHAPES)
def test_decode_gpu(dtype, block_size, group, batch, max_ctx):
    lens = gpu_lens(batch, max_ctx, block_size, seed=batch + group)
    q, k_cache, v_cache, meta = decode_case(lens, 2, group, 128, block_size, dtype, GPU)
    ref = TORCH.decode(q, k_cache, v_cache, meta, 128**-0.5)
    out = TRITON.decode(q, k_cache, v_cache, meta, 128**-0.5)
    assert_close(out, ref, atol=ATOL)
    if batch > 1:
        assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,num_kv_heads,group", [(64, 4, 4), (64, 8, 2), (128, 8, 4)])
@pytest.mark.parametrize("num_splits", [None, 1, 7, 64])
def test_decode_splits_gpu(dtype, head_dim, num_kv_heads, group, num_splits):
    lens = gpu_lens(9, 3000, 16, seed=5)
    q, k_cache, v_cache, meta = decode_case(lens, num_kv_heads, group, head_dim, 16, dtype, GPU)
    scale = head_dim**-0.5
    ref = TORCH.decode(q, k_cache, v_cache, meta, scale)
    out = paged_decode_attention(
        q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale, num_splits=num_splits
    )
    assert_close(out, ref, atol=ATOL)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config",
    [
        DecodeConfig(block_n=32, num_stages=2),
        DecodeConfig(block_n=64, num_stages=4, prefetch_table=False),
        DecodeConfig(block_n=128, num_warps=8, num_stages=2),
        DecodeConfig(block_n=64, num_warps=8, num_stages=5),
        DecodeConfig(block_n=64, num_warps=4, num_stages=3, tile_in_block=False),
        DecodeConfig(block_n=32, num_warps=4, num_stages=1),
    ],
)
@pytest.mark.parametrize("block_size", [16, 256])
def test_decode_configs_gpu(config, block_size):
    """Tuning configs the benchmark sweeps must stay correct."""
    lens = gpu_lens(6, 2500, block_size, seed=11)
    q, k_cache, v_cache, meta = decode_case(lens, 8, 4, 128, block_size, torch.bfloat16, GPU)
    ref = TORCH.decode(q, k_cache, v_cache, meta, 0.08)
    for num_splits in (1, 8):
        tables, lens = meta.block_tables, meta.context_lens
        out = paged_decode_attention(
            q, k_cache, v_cache, tables, lens, 0.08, num_splits=num_splits, config=config
        )
        assert_close(out, ref, atol=ATOL)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kvcache_gpu(dtype):
    gen = torch.Generator().manual_seed(0)
    num_tokens, num_kv_heads, head_dim, block_size = 300, 8, 128, 16
    _, k, v = split_qkv(num_tokens, 32, num_kv_heads, head_dim, dtype, CPU, gen)
    k, v = k.to(GPU), v.to(GPU)
    caches = random_cache(40, block_size, num_kv_heads, head_dim, dtype, GPU, gen)
    slots = torch.randperm(40 * block_size, generator=gen)[:num_tokens].to(torch.int32)
    slots[::7] = -1
    slots = slots.to(GPU)
    ref_k, ref_v = caches[0].clone(), caches[1].clone()
    out_k, out_v = caches[0].clone(), caches[1].clone()
    TORCH.store_kvcache(k, v, ref_k, ref_v, slots)
    TRITON.store_kvcache(k, v, out_k, out_v, slots)
    assert torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [128, 64])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("paged,block_size", [(False, 16), (True, 16), (True, 256)])
def test_prefill_gpu(dtype, head_dim, group, paged, block_size):
    len_q = [1, 77, 512, 1030, 64]
    prefix = [0, 0, 0, 0, 0] if not paged else [300, 0, 256, 17, 2000]
    args = prefill_case(len_q, prefix, 2, group, head_dim, block_size, dtype, GPU, paged)
    scale = head_dim**-0.5
    ref = TORCH.prefill(*args, scale=scale)
    out = TRITON.prefill(*args, scale=scale)
    assert_close(out, ref, atol=ATOL)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [4, 48])
def test_decode_cuda_graph_gpu(batch):
    """Capture decode once, change q / context lens / block tables in place, replay."""
    dtype, block_size, max_ctx, num_kv_heads, group, head_dim = torch.bfloat16, 16, 2048, 8, 4, 128
    gen = torch.Generator().manual_seed(7)
    num_blocks = batch * max_ctx // block_size + 3
    k_cache, v_cache = random_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, GPU, gen)
    q = torch.randn(batch, num_kv_heads * group, head_dim, generator=gen).to(GPU, dtype)
    # Static table as wide as the longest possible context (like max_model_len).
    width = max_ctx // block_size + 4
    lens = gpu_lens(batch, max_ctx // 2, block_size, seed=7)
    meta = decode_meta(lens, block_size, num_blocks, GPU, gen, width=width)
    scale = head_dim**-0.5

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        TRITON.decode(q, k_cache, v_cache, meta, scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = TRITON.decode(q, k_cache, v_cache, meta, scale)
    graph.replay()
    assert_close(out, TORCH.decode(q, k_cache, v_cache, meta, scale), atol=ATOL)

    new_meta = decode_meta(
        gpu_lens(batch, max_ctx, block_size, 8), block_size, num_blocks, GPU, gen
    )
    q.copy_(torch.randn(q.shape, generator=gen).to(GPU, dtype))
    meta.context_lens.copy_(new_meta.context_lens)
    meta.block_tables.fill_(-1)
    meta.block_tables[:, : new_meta.block_tables.shape[1]] = new_meta.block_tables
    graph.replay()
    eager = TRITON.decode(q, k_cache, v_cache, meta, scale)
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    assert_close(out, TORCH.decode(q, k_cache, v_cache, meta, scale), atol=ATOL)
