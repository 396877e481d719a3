"""The TMA decode-attention kernel (nanovllm/kernels/tma_decode.py) against the torch reference.

GPU tests need an sm_90 GPU and cuda-python; each asserts that the call qualifies for the TMA
kernel, so a silent fallback to the Triton kernel cannot pass for it.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from nanovllm.kernels import tma_decode  # noqa: E402
from nanovllm.kernels.triton_attention import DecodeConfig, paged_decode_attention  # noqa: E402
from tests.helpers import load_test_module  # noqa: E402

# The decode cases and the torch reference of the attention-backend tests.
H = load_test_module("attention/test_triton_backend.py")
TMA = DecodeConfig(tma=True)


def test_supported_names_the_reason_on_cpu():
    q = torch.zeros(2, 8, 128)
    cache = torch.zeros(4, 64, 2, 128)
    assert "CUDA GPU" in tma_decode.supported(q, cache, cache)


def test_supported_reasons_without_a_gpu(monkeypatch):
    """The qualification rules, on CPU: the device check is faked to an sm_90 GPU."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    tma_decode._why_not.cache_clear()
    gpu, bf16 = torch.device("cuda", 0), torch.bfloat16
    nhd = (64 * 8 * 128, 8 * 128, 128, 1)
    hnd = (64 * 8 * 128, 128, 64 * 128, 1)

    def why(q_shape=(32, 128), dtype=bf16, kv_shape=(10, 64, 8, 128), k=nhd, v=nhd, q_d=1):
        return tma_decode._why_not(gpu, dtype, q_shape, q_d, dtype, kv_shape, k, v)

    assert why() is None and why(k=hnd, v=hnd) is None
    assert "bf16/fp16" in why(dtype=torch.float32)
    assert "head_dim 64" in why(q_shape=(32, 64), kv_shape=(10, 64, 8, 64))
    assert "GQA group 16" in why(q_shape=(128, 128))
    assert "block size 32" in why(kv_shape=(10, 32, 8, 128), k=(32 * 1024, 1024, 128, 1))
    assert "NHD" in why(k=hnd)  # K and V in different layouts
    assert "NHD" in why(k=(2 * 64 * 8 * 128, 8 * 128, 128, 1))  # every other block
    assert "contiguous head_dim" in why(q_d=2)
    tma_decode._why_not.cache_clear()


def test_cuda_source_ships_with_the_package():
    source = tma_decode._SOURCE_PATH.read_text()
    assert 'extern "C" __global__' in source and "decode_tma(" in source


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


needs_sm90 = pytest.mark.skipif(not _sm90(), reason="needs an sm_90+ GPU (TMA)")


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("dtype", H.DTYPES)
@pytest.mark.parametrize(
    "block_size,group,num_kv_heads,batch,max_ctx",
    [(256, 4, 8, 13, 1000), (64, 2, 8, 64, 2048), (256, 8, 2, 7, 4096), (64, 1, 4, 5, 300)],
)
def test_tma_decode_matches_reference_gpu(dtype, block_size, group, num_kv_heads, batch, max_ctx):
    lens = H.gpu_lens(batch, max_ctx, block_size, seed=batch)
    q, k_cache, v_cache, meta = H.decode_case(
        lens, num_kv_heads, group, 128, block_size, dtype, H.GPU, seed=batch
    )
    assert tma_decode.supported(q, k_cache, v_cache) is None
    ref = H.TORCH.decode(q, k_cache, v_cache, meta, 0.08)
    for num_splits in (1, 3, 8, None):
        out = paged_decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.context_lens, 0.08,
            num_splits=num_splits, config=TMA,
        )  # fmt: skip
        H.assert_close(out, ref, atol=H.ATOL)
        assert torch.equal(out[lens.index(0)], torch.zeros_like(out[0]))


@pytest.mark.gpu
@needs_sm90
def test_tma_decode_in_cuda_graph_gpu():
    lens = H.gpu_lens(32, 1500, 256, seed=5)
    q, k_cache, v_cache, meta = H.decode_case(lens, 8, 4, 128, 256, torch.bfloat16, H.GPU, seed=5)

    def call():
        return paged_decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.context_lens, 0.08, config=TMA
        )

    call()  # compile and create the tensor maps outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    q.normal_()  # new queries: the replay must read them
    ref = H.TORCH.decode(q, k_cache, v_cache, meta, 0.08)
    graph.replay()
    torch.cuda.synchronize()
    H.assert_close(out, ref, atol=H.ATOL)


@pytest.mark.gpu
@needs_sm90
def test_unsupported_shape_falls_back_to_triton_gpu():
    lens = [40, 0, 300]
    q, k_cache, v_cache, meta = H.decode_case(lens, 4, 4, 64, 64, torch.bfloat16, H.GPU)
    assert "head_dim 64" in tma_decode.supported(q, k_cache, v_cache)
    ref = H.TORCH.decode(q, k_cache, v_cache, meta, 0.1)
    out = paged_decode_attention(
        q, k_cache, v_cache, meta.block_tables, meta.context_lens, 0.1, config=TMA
    )
    H.assert_close(out, ref, atol=H.ATOL)


@pytest.mark.gpu
@needs_sm90
def test_tma_decode_head_major_cache_gpu():
    """A cache stored [blocks, kv_heads, block_size, head_dim] (HND), passed as the logical view."""
    lens = H.gpu_lens(9, 1300, 64, seed=7)
    q, k_cache, v_cache, meta = H.decode_case(lens, 4, 4, 128, 64, torch.bfloat16, H.GPU, seed=7)
    k_hnd = k_cache.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    v_hnd = v_cache.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    assert tma_decode.supported(q, k_hnd, v_hnd) is None
    ref = H.TORCH.decode(q, k_cache, v_cache, meta, 0.08)
    for num_splits in (1, 4):
        out = paged_decode_attention(
            q, k_hnd, v_hnd, meta.block_tables, meta.context_lens, 0.08,
            num_splits=num_splits, config=TMA,
        )  # fmt: skip
        H.assert_close(out, ref, atol=H.ATOL)


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("stages", [2, 4])
def test_tma_decode_stage_counts_gpu(stages):
    lens = H.gpu_lens(11, 2100, 256, seed=stages)
    q, k_cache, v_cache, meta = H.decode_case(lens, 8, 4, 128, 256, torch.bfloat16, H.GPU)
    ref = H.TORCH.decode(q, k_cache, v_cache, meta, 0.08)
    for num_splits in (1, 5):
        out = paged_decode_attention(
            q, k_cache, v_cache, meta.block_tables, meta.context_lens, 0.08,
            num_splits=num_splits, config=DecodeConfig(num_stages=stages, tma=True),
        )  # fmt: skip
        H.assert_close(out, ref, atol=H.ATOL)
