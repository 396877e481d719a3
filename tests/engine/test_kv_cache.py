"""KV-cache sizing and allocation: an fp8 cache counts 1-byte elements, so the same memory holds
twice the tokens of a bf16 cache (four times a float32 one); backends that cannot read fp8 are
refused at allocation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nanovllm.attention.torch_backend import TorchAttentionBackend
from nanovllm.engine import kv_cache
from nanovllm.layers.attention import Attention

FP8 = torch.float8_e4m3fn


def tiny_model(num_layers=3, num_kv_heads=2, head_dim=32, backend=None) -> nn.Module:
    model = nn.ModuleList(
        [Attention(4, head_dim, head_dim**-0.5, num_kv_heads) for _ in range(num_layers)]
    )
    for layer in model:
        layer.backend = backend or TorchAttentionBackend()
    return model


def config(**kw):
    base = dict(
        kvcache_block_size=16,
        num_kvcache_blocks=None,
        max_num_seqs=512,
        max_model_len=1 << 20,  # the CPU default's "needed" cap does not bind
        gpu_memory_utilization=0.9,
    )
    return SimpleNamespace(**{**base, **kw})


def test_block_bytes_counts_the_element_size():
    model = tiny_model()
    per_token_elems = 3 * 2 * 2 * 32  # layers * (K, V) * kv_heads * head_dim
    assert kv_cache.block_bytes(model, 16, torch.bfloat16) == per_token_elems * 16 * 2
    assert kv_cache.block_bytes(model, 16, FP8) == per_token_elems * 16


def test_cpu_default_holds_twice_the_bf16_blocks_in_fp8():
    model, cpu = tiny_model(num_layers=4), torch.device("cpu")  # blocks divide the 256 MiB
    n = {d: kv_cache.num_blocks_for(config(), model, d, cpu, 0) for d in (torch.bfloat16, FP8)}
    n32 = kv_cache.num_blocks_for(config(), model, torch.float32, cpu, 0)
    assert n[FP8] == 2 * n[torch.bfloat16] == 4 * n32


def test_gpu_budget_holds_twice_the_bf16_blocks_in_fp8(monkeypatch):
    """The GPU path, with the memory budget faked (no GPU needed): same bytes, twice the blocks."""
    monkeypatch.setattr(kv_cache, "gpu_kv_budget", lambda *a: 10 << 30)
    model, gpu = tiny_model(num_layers=32, num_kv_heads=8, head_dim=128), torch.device("cuda")
    bf16 = kv_cache.num_blocks_for(config(kvcache_block_size=256), model, torch.bfloat16, gpu, 0)
    fp8 = kv_cache.num_blocks_for(config(kvcache_block_size=256), model, FP8, gpu, 0)
    assert bf16 == (10 << 30) // (32 * 2 * 8 * 128 * 256 * 2) == 320
    assert fp8 == 2 * bf16


def test_num_kvcache_blocks_override_is_kept_for_fp8():
    n = kv_cache.num_blocks_for(
        config(num_kvcache_blocks=7), tiny_model(), FP8, torch.device("cpu"), 0
    )
    assert n == 7


def test_allocate_fp8_cache_binds_views_to_each_layer():
    model = tiny_model()
    cache = kv_cache.allocate_kv_cache(model, 5, 16, FP8, torch.device("cpu"))
    assert cache.dtype == FP8 and cache.shape == (2, 3, 5, 16, 2, 32)
    assert cache.element_size() == 1
    for i, layer in enumerate(model):
        assert layer.k_cache.dtype == FP8 and layer.k_cache.shape == (5, 16, 2, 32)
        assert layer.k_cache.data_ptr() == cache[0, i].data_ptr()
        assert layer.v_cache.data_ptr() == cache[1, i].data_ptr()
        assert (layer.k_scale, layer.v_scale) == (1.0, 1.0)
    assert not cache.float().any()  # zeros: masked-out slots hold no NaN


def test_fp8_cache_refused_for_a_backend_that_cannot_read_it():
    flash_like = SimpleNamespace(name="flash_attn", fp8_kv_cache=False)
    model = tiny_model(backend=flash_like)
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8'.*flash_attn.*'triton'"):
        kv_cache.allocate_kv_cache(model, 2, 16, FP8, torch.device("cpu"))
    kv_cache.allocate_kv_cache(model, 2, 16, torch.bfloat16, torch.device("cpu"))  # fine


def test_fp8_triton_cache_refused_before_sm89(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    triton_like = SimpleNamespace(name="triton", fp8_kv_cache=True)
    layers = list(tiny_model(backend=triton_like))
    with pytest.raises(ValueError, match="compute capability 8.9"):
        kv_cache.check_kv_cache_support(layers, FP8, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    kv_cache.check_kv_cache_support(layers, FP8, torch.device("cuda"))


def test_real_backends_declare_fp8_support():
    from nanovllm.attention.flash_attn_backend import FlashAttnBackend
    from nanovllm.attention.triton_backend import TritonAttentionBackend

    assert TorchAttentionBackend.fp8_kv_cache and TritonAttentionBackend.fp8_kv_cache
    assert FlashAttnBackend.fp8_kv_cache is False
