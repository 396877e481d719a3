"""FP8 (e4m3) KV cache: the torch reference against a float32 cache, and the Triton kernels (in
the interpreter on CPU, on the device in ``gpu`` tests) against the torch reference reading the
same fp8 cache.

Error bound of the torch reference (fp8 cache vs float32 cache): e4m3 rounds each K/V element
to 3 mantissa bits, a relative error of at most 2^-4 (6.25%). An output row is a softmax-weighted
mean of V rows: a query that sees one key reproduces that V row with its rounding error, up to
2^-4 * |v| (|v| < 4 for these randn values: 0.25), and rows over many keys average the errors out.
The tests allow 0.25 absolute and 0.02 in the mean (measured: decode 0.06 max, 0.006 mean;
paged prefill 0.11 max, where single-key rows occur).
"""

from __future__ import annotations

import math

import pytest
import torch

from nanovllm.attention.metadata import AttentionMetadata
from nanovllm.attention.torch_backend import TorchAttentionBackend, dequantize_kv, quantize_kv

FP8 = torch.float8_e4m3fn
TORCH = TorchAttentionBackend()
CPU, GPU = torch.device("cpu"), torch.device("cuda")


def assert_close(out, ref, atol):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=atol)


def stored_pair(k, v, num_blocks, block_size, slots, dtype, k_scale=1.0, v_scale=1.0):
    """K/V stored into fresh caches of ``dtype`` by the torch reference."""
    shape = (num_blocks, block_size, k.shape[1], k.shape[2])
    kc = torch.zeros(shape, dtype=dtype, device=k.device)
    vc = torch.zeros(shape, dtype=dtype, device=k.device)
    TORCH.store_kvcache(k, v, kc, vc, slots, k_scale=k_scale, v_scale=v_scale)
    return kc, vc


def decode_inputs(lens, num_kv_heads, group, head_dim, block_size, device, seed=0):
    """q [num_seqs, heads, d], K/V of every context token, their slots and decode metadata."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(math.ceil(n / block_size) for n in lens) + 2
    tables = free_tables(lens, block_size, num_blocks, gen)
    slots = [
        int(tables[i, p // block_size]) * block_size + p % block_size
        for i, n in enumerate(lens)
        for p in range(n)
    ]
    n = len(slots)
    k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(device)
    v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(device)
    q = torch.randn(len(lens), num_kv_heads * group, head_dim, generator=gen).to(device)
    meta = AttentionMetadata(
        is_prefill=False,
        slot_mapping=torch.full((len(lens),), -1, dtype=torch.int32, device=device),
        context_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
    )
    slots = torch.tensor(slots, dtype=torch.int32, device=device)
    return q, k, v, slots, num_blocks, meta


def new_rows(x, prefix, len_k):
    """The rows of the new (not cached) tokens of each sequence: [sum(len_q), kvh, d]."""
    starts = torch.tensor([0, *len_k]).cumsum(0).tolist()
    return torch.cat([x[s + p : s + n] for s, p, n in zip(starts, prefix, len_k)])


def free_tables(lens, block_size, num_blocks, gen):
    """[num_seqs, max_blocks + 1] int32 tables over shuffled physical blocks, -1 padded."""
    need = [math.ceil(n / block_size) for n in lens]
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(lens), max(need) + 1), -1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used : used + n].to(torch.int32)
        used += n
    return tables


# ------------------------------------------------------------------------------------------
# Torch reference (CPU)
# ------------------------------------------------------------------------------------------


def test_quantize_scales_rounds_and_saturates():
    x = torch.tensor([1.0, -3.3, 0.05, 1000.0, -1000.0, 0.0])
    q = quantize_kv(x, FP8, 2.0)
    assert q.dtype == FP8
    back = dequantize_kv(q, 2.0)
    assert back[3] == 896.0 and back[4] == -896.0  # clamped to 448 * scale, not NaN
    assert torch.isfinite(back).all()
    rel = ((back[:3] - x[:3]) / x[:3]).abs()
    assert (rel <= 2**-4).all()  # e4m3: 3 mantissa bits (0.05 / 2 > 2^-6 is still normal)
    assert back[5] == 0.0
    # a cache in the model dtype: a plain cast, scales ignored
    assert torch.equal(quantize_kv(x, torch.float32, 2.0), x)
    assert dequantize_kv(x, 2.0) is x


def test_torch_store_writes_scaled_fp8_and_skips_minus_one():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(5, 2, 16, generator=gen) * 4
    v = torch.randn(5, 2, 16, generator=gen)
    slots = torch.tensor([3, -1, 0, 17, 30], dtype=torch.int32)
    kc, vc = stored_pair(k, v, 2, 16, slots, FP8, k_scale=0.5, v_scale=0.25)
    flat_k, flat_v = kc.view(-1, 2, 16), vc.view(-1, 2, 16)
    for t, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        assert torch.equal(flat_k[s], (k[t] / 0.5).to(FP8))
        assert torch.equal(flat_v[s], (v[t] / 0.25).to(FP8))
    written = {3, 0, 17, 30}
    untouched = [i for i in range(32) if i not in written]
    assert not flat_k[untouched].float().any()


@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.5, 2.0), (0.37, 1.3)])
def test_torch_fp8_decode_close_to_fp32_cache(scales):
    k_scale, v_scale = scales
    lens = [37, 0, 300, 5]
    q, k, v, slots, nb, meta = decode_inputs(lens, 2, 4, 32, 16, CPU)
    kc32, vc32 = stored_pair(k, v, nb, 16, slots, torch.float32)
    kc8, vc8 = stored_pair(k, v, nb, 16, slots, FP8, k_scale, v_scale)
    ref = TORCH.decode(q, kc32, vc32, meta, 32**-0.5)
    out = TORCH.decode(q, kc8, vc8, meta, 32**-0.5, k_scale=k_scale, v_scale=v_scale)
    assert out.dtype == ref.dtype and torch.isfinite(out).all()
    err = (out - ref).abs()
    assert err.max() < 0.25 and err.mean() < 0.02, (err.max(), err.mean())
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # padding row
    # exactly the reference over the dequantized values: the scales are applied once
    deq = TORCH.decode(q, dequantize_kv(kc8, k_scale), dequantize_kv(vc8, v_scale), meta, 32**-0.5)
    torch.testing.assert_close(out, deq, atol=1e-6, rtol=1e-6)


def test_torch_fp8_paged_prefill_close_to_fp32_cache():
    """Chunked prefill / prefix hits: the queries attend over keys read from the fp8 cache."""
    len_q, prefix, block_size = [7, 3, 18], [20, 33, 0], 16
    len_k = [p + n for p, n in zip(prefix, len_q)]
    _, k, v, slots, nb, meta = decode_inputs(len_k, 2, 2, 32, block_size, CPU, seed=3)
    k_new, v_new = new_rows(k, prefix, len_k), new_rows(v, prefix, len_k)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(sum(len_q), 4, 32, generator=gen)
    cu = lambda xs: torch.tensor([0, *torch.tensor(xs).cumsum(0).tolist()], dtype=torch.int32)
    pmeta = AttentionMetadata(
        is_prefill=True,
        slot_mapping=slots,  # unused by prefill itself
        cu_seqlens_q=cu(len_q),
        cu_seqlens_k=cu(len_k),
        max_seqlen_q=max(len_q),
        max_seqlen_k=max(len_k),
        block_tables=meta.block_tables,
    )
    kc32, vc32 = stored_pair(k, v, nb, block_size, slots, torch.float32)
    kc8, vc8 = stored_pair(k, v, nb, block_size, slots, FP8, 0.5, 0.5)
    ref = TORCH.prefill(q, k_new, v_new, kc32, vc32, pmeta, 0.2)
    out = TORCH.prefill(q, k_new, v_new, kc8, vc8, pmeta, 0.2, k_scale=0.5, v_scale=0.5)
    err = (out - ref).abs()
    assert torch.isfinite(out).all() and err.max() < 0.25 and err.mean() < 0.02, (
        err.max(),
        err.mean(),
    )


def test_tma_kernel_refuses_fp8_with_a_reason():
    from nanovllm.kernels import tma_decode

    q = torch.zeros(2, 8, 128, dtype=torch.bfloat16)
    cache = torch.zeros(4, 64, 2, 128, dtype=FP8)
    why = tma_decode.supported(q, cache, cache)
    assert why is not None and "fp8" in why


# ------------------------------------------------------------------------------------------
# Triton kernels against the torch reference, on the same fp8 cache
# ------------------------------------------------------------------------------------------

interpreter = pytest.mark.skipif(
    torch.cuda.is_available(), reason="interpreter test: the gpu-marked tests cover this on a GPU"
)
# Powers of two make x / s and x * (1 / s) the same number, so the stores agree bit for bit.
SCALES = [(1.0, 1.0), (0.5, 2.0)]


def triton_store_matches_torch(device, dtype, k_scale, v_scale, exact=True):
    """``exact``: K/V values that e4m3 represents (times the scale), so the cast does not round.
    The Triton interpreter's float-to-fp8 cast (``_convert_float``) truncates a rounding carry
    (1.97 becomes 1.0, not 2.0) and flushes subnormals, so on CPU the test checks the kernel's
    scaling, clamping and slots bit for bit on values it need not round; on a GPU the hardware
    cast rounds (round to nearest even, saturating) and random values are compared."""
    pytest.importorskip("triton")
    from nanovllm.kernels.triton_attention import store_kvcache

    gen = torch.Generator().manual_seed(0)
    k = torch.randn(40, 2, 32, generator=gen) * 3
    v = torch.randn(40, 2, 32, generator=gen)
    if exact:
        k = dequantize_kv(quantize_kv(k, FP8, k_scale), k_scale)
        v = dequantize_kv(quantize_kv(v, FP8, v_scale), v_scale)
        k[k.abs() < 2**-6 * k_scale] = 0.0  # no subnormals
        v[v.abs() < 2**-6 * v_scale] = 0.0
        k[0, 0, :3] = torch.tensor([1000.0, -1000.0, 0.0])  # saturation (448 * scale), zero
    else:
        k[0, 0, :4] = torch.tensor([1000.0, -1000.0, 1e-3, 0.0])  # saturation, subnormal, zero
    k, v = k.to(device, dtype), v.to(device, dtype)
    slots = torch.randperm(64, generator=gen)[:40].to(torch.int32)
    slots[::7] = -1
    slots = slots.to(device)
    ref_k, ref_v = stored_pair(k, v, 4, 16, slots, FP8, k_scale, v_scale)
    out_k = torch.zeros_like(ref_k)
    out_v = torch.zeros_like(ref_v)
    store_kvcache(k, v, out_k, out_v, slots, k_scale, v_scale)
    if exact:
        assert torch.equal(out_k.view(torch.uint8), ref_k.view(torch.uint8))
        assert torch.equal(out_v.view(torch.uint8), ref_v.view(torch.uint8))
    else:  # the device's conversion may round a tie differently: one e4m3 step at most
        for out, ref in ((out_k, ref_k), (out_v, ref_v)):
            same = (out.view(torch.uint8) == ref.view(torch.uint8)).float().mean()
            assert same > 0.99
            torch.testing.assert_close(out.float(), ref.float(), rtol=2**-3, atol=2**-9)


def triton_decode_matches_torch(device, dtype, k_scale, v_scale, head_dim, block_size, **kw):
    pytest.importorskip("triton")
    from nanovllm.kernels.triton_attention import DecodeConfig, paged_decode_attention

    lens = [37, 0, 64, 5] if device.type == "cpu" else [1, 0, 700, 2049, 256, 3000]
    q, k, v, slots, nb, meta = decode_inputs(lens, 2, 4, head_dim, block_size, device)
    q = q.to(dtype)
    kc, vc = stored_pair(k.to(dtype), v.to(dtype), nb, block_size, slots, FP8, k_scale, v_scale)
    scale = head_dim**-0.5
    ref = TORCH.decode(q, kc, vc, meta, scale, k_scale=k_scale, v_scale=v_scale)
    cfg = DecodeConfig(**kw) if kw else None
    for num_splits in (1, 2, None):
        out = paged_decode_attention(
            q, kc, vc, meta.block_tables, meta.context_lens, scale,
            num_splits=num_splits, config=cfg, k_scale=k_scale, v_scale=v_scale,
        )  # fmt: skip
        atol = 1e-5 if dtype == torch.float32 else 2e-2
        assert_close(out, ref, atol=atol)
        assert torch.equal(out[1], torch.zeros_like(out[1]))


def triton_prefill_matches_torch(device, dtype, k_scale, v_scale, head_dim, block_size):
    pytest.importorskip("triton")
    from nanovllm.attention.triton_backend import TritonAttentionBackend

    triton = TritonAttentionBackend()
    len_q, prefix = ([7, 3, 18], [20, 33, 0]) if device.type == "cpu" else (
        [1, 77, 512, 64], [300, 0, 256, 2000]
    )  # fmt: skip
    len_k = [p + n for p, n in zip(prefix, len_q)]
    _, k, v, slots, nb, meta = decode_inputs(len_k, 2, 2, head_dim, block_size, device, seed=3)
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(sum(len_q), 4, head_dim, generator=gen).to(device, dtype)
    cu = lambda xs: torch.tensor([0, *torch.tensor(xs).cumsum(0).tolist()], dtype=torch.int32)
    pmeta = AttentionMetadata(
        is_prefill=True,
        slot_mapping=slots,
        cu_seqlens_q=cu(len_q).to(device),
        cu_seqlens_k=cu(len_k).to(device),
        max_seqlen_q=max(len_q),
        max_seqlen_k=max(len_k),
        block_tables=meta.block_tables,
    )
    kc, vc = stored_pair(k.to(dtype), v.to(dtype), nb, block_size, slots, FP8, k_scale, v_scale)
    scales = dict(k_scale=k_scale, v_scale=v_scale)
    k_new, v_new = new_rows(k.to(dtype), prefix, len_k), new_rows(v.to(dtype), prefix, len_k)
    ref = TORCH.prefill(q, k_new, v_new, kc, vc, pmeta, head_dim**-0.5, **scales)
    out = triton.prefill(q, k_new, v_new, kc, vc, pmeta, head_dim**-0.5, **scales)
    assert_close(out, ref, atol=1e-5 if dtype == torch.float32 else 2e-2)


@interpreter
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
def test_triton_fp8_store_cpu(k_scale, v_scale):
    triton_store_matches_torch(CPU, torch.float32, k_scale, v_scale)


@interpreter
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
@pytest.mark.parametrize("block_size,tile_in_block", [(16, True), (32, True), (32, False)])
def test_triton_fp8_decode_cpu(k_scale, v_scale, block_size, tile_in_block):
    triton_decode_matches_torch(
        CPU, torch.float32, k_scale, v_scale, 16, block_size,
        block_n=16, num_stages=1, tile_in_block=tile_in_block,
    )  # fmt: skip


@interpreter
def test_triton_fp8_decode_under_bf16_queries_cpu():
    # The kernel's fp16 dots (bf16 queries on an fp8 cache) against the reference.
    triton_decode_matches_torch(CPU, torch.bfloat16, 0.5, 2.0, 16, 16, block_n=16, num_stages=1)


@interpreter
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
def test_triton_fp8_paged_prefill_cpu(k_scale, v_scale):
    triton_prefill_matches_torch(CPU, torch.float32, k_scale, v_scale, 16, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
def test_triton_fp8_store_gpu(dtype, k_scale, v_scale):
    triton_store_matches_torch(GPU, dtype, k_scale, v_scale, exact=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
@pytest.mark.parametrize("head_dim,block_size", [(128, 16), (128, 256), (64, 32)])
def test_triton_fp8_decode_gpu(dtype, k_scale, v_scale, head_dim, block_size):
    triton_decode_matches_torch(GPU, dtype, k_scale, v_scale, head_dim, block_size)


@pytest.mark.gpu
def test_triton_fp8_decode_tma_config_falls_back_gpu():
    """DecodeConfig(tma=True) on an fp8 cache runs the Triton kernel (the copy-engine one
    refuses fp8), with the same result."""
    triton_decode_matches_torch(GPU, torch.bfloat16, 1.0, 1.0, 128, 256, tma=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k_scale,v_scale", SCALES)
@pytest.mark.parametrize("head_dim,block_size", [(128, 16), (128, 256), (64, 16)])
def test_triton_fp8_paged_prefill_gpu(dtype, k_scale, v_scale, head_dim, block_size):
    triton_prefill_matches_torch(GPU, dtype, k_scale, v_scale, head_dim, block_size)
