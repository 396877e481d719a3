"""A mixed step's attention (decode rows first, then prefill chunks) through each backend's
``attend``, against the same rows planned as a decode step and a prefill step of their own and
run through the torch reference. The metadata is built from the engine's own plan."""

from __future__ import annotations

import pytest
import torch

from nanovllm.attention.torch_backend import TorchAttentionBackend
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.model_inputs import plan_decode, plan_prefill, plan_step
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

TORCH = TorchAttentionBackend()
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def mixed_batch(block_size: int, decodes: list[int], prefills: list[tuple[int, int, int]]):
    """Sequences with their blocks allocated: decode rows of the given lengths (the new token
    included), then prefill rows (prompt length, tokens computed before, chunk length)."""
    manager = BlockManager(256, block_size, enable_prefix_caching=False)
    batch = ScheduledBatch(is_prefill=True, num_decode_rows=len(decodes))
    params = SamplingParams(temperature=0, max_tokens=8)
    for n in decodes:
        seq = Sequence(list(range(1, n + 1)), params, block_size)
        manager.allocate(seq)
        seq.num_computed_tokens = n - 1
        batch.seqs.append(seq)
        batch.num_new_tokens.append(1)
    for n, done, chunk in prefills:
        seq = Sequence(list(range(1, n + 1)), params, block_size)
        manager.allocate(seq)
        seq.num_computed_tokens = done
        batch.seqs.append(seq)
        batch.num_new_tokens.append(chunk)
    return batch


def part(batch: ScheduledBatch, start: int, end: int, is_prefill: bool) -> ScheduledBatch:
    return ScheduledBatch(is_prefill, batch.seqs[start:end], batch.num_new_tokens[start:end])


def run_attention(backend, plan, q, k, v, k_cache, v_cache, device):
    meta = backend.build_metadata(plan, device)
    backend.store_kvcache(k, v, k_cache, v_cache, meta.slot_mapping)
    return backend.attend(q, k, v, k_cache, v_cache, meta, HEAD_DIM**-0.5)


# Prefill rows with a computed prefix (keys read from the cache) and without (the new tokens').
PREFILLS = {"prefix": [(40, 0, 40), (90, 33, 20), (25, 0, 9)], "fresh": [(40, 0, 40), (25, 0, 9)]}


def check_mixed_step(backend, device, dtype, block_size, atol):
    for prefills in PREFILLS.values():
        check_one(backend, device, dtype, block_size, atol, prefills)


def check_one(backend, device, dtype, block_size, atol, prefills):
    batch = mixed_batch(block_size, [37, 1, 70, 16], prefills)
    plan = plan_step(batch, block_size)
    assert (plan.block_tables is not None and len(plan.block_tables) > 4) == (
        prefills is PREFILLS["prefix"]
    )
    d = batch.num_decode_rows
    assert plan.is_prefill and plan.num_decode_rows == d
    num_tokens = len(plan.input_ids)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(num_tokens, h, HEAD_DIM, generator=gen).to(device, dtype)
        for h in (HEADS, KV_HEADS, KV_HEADS)
    )
    shape = (256, block_size, KV_HEADS, HEAD_DIM)
    cache = [torch.randn(shape, generator=gen).to(device, dtype) for _ in range(2)]
    # The chunk with a computed prefix reads those keys from the cache: they are there already.
    ref_cache = [c.clone() for c in cache]
    out = run_attention(backend, plan, q, k, v, *cache, device)

    dec = plan_decode(part(batch, 0, d, False), block_size)
    pre = plan_prefill(part(batch, d, len(batch.seqs), True), block_size)
    ref_dec = run_attention(TORCH, dec, q[:d], k[:d], v[:d], *ref_cache, device)
    ref_pre = run_attention(TORCH, pre, q[d:], k[d:], v[d:], *ref_cache, device)
    ref = torch.cat([ref_dec, ref_pre])
    assert out.shape == (num_tokens, HEADS, HEAD_DIM) and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=atol)
    for c, r in zip(cache, ref_cache):  # every new token stored where the split steps store it
        assert torch.equal(c, r)


@pytest.mark.parametrize("block_size", [16, 32])
def test_mixed_step_torch_backend(block_size):
    check_mixed_step(TORCH, torch.device("cpu"), torch.float32, block_size, 1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter test: the gpu test covers it")
@pytest.mark.parametrize("block_size", [16, 32])
def test_mixed_step_triton_backend_cpu(block_size):
    pytest.importorskip("triton")
    from nanovllm.attention.triton_backend import TritonAttentionBackend

    check_mixed_step(TritonAttentionBackend(), torch.device("cpu"), torch.float32, block_size, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 256])
def test_mixed_step_gpu_backends(block_size):
    from nanovllm.attention import backend_names, select_attention_backend

    for name in backend_names():
        try:
            backend = select_attention_backend(name, torch.device("cuda"))
        except (ImportError, ValueError):
            continue  # not installed here (flash-attn)
        check_mixed_step(backend, torch.device("cuda"), torch.bfloat16, block_size, 2e-2)


def test_plan_of_a_mixed_step():
    bs = 16
    batch = mixed_batch(bs, [5, 20], [(12, 0, 12), (40, 16, 10)])
    plan = plan_step(batch, bs)
    d = 2
    assert plan.num_decode_rows == d and plan.context_lens == [5, 20]
    # decode tokens first (their last token), then the chunks
    assert plan.input_ids[:d] == [5, 20] and plan.positions[:d] == [4, 19]
    assert plan.input_ids[d:] == list(range(1, 13)) + list(range(17, 27))
    assert plan.cu_seqlens_q == [0, 12, 22] and plan.cu_seqlens_k == [0, 12, 38]
    # every decode row samples; of the chunks only the one that reaches its prompt's end
    assert plan.sampling_rows == [0, 1, 2] and plan.logits_indices == [0, 1, d + 11]
    # one table per decode row, then one per prefill row (a chunk continues a prefix)
    assert len(plan.block_tables) == 4 and len({len(r) for r in plan.block_tables}) == 1
    assert plan.block_tables[3][:3] == batch.seqs[3].block_table


def test_mixed_step_metadata_gives_each_part_its_own_block_tables():
    # The prefill rows' tables must not be a view into the decode rows' (4 * d * width bytes in):
    # Triton specialises on 16-byte pointer alignment and would compile the prefill kernel again
    # in the middle of a run.
    bs = 16
    batch = mixed_batch(bs, [5], [(40, 16, 10)])  # one decode row: an odd offset
    meta = TORCH.build_metadata(plan_step(batch, bs), torch.device("cpu"))
    decode_tables, prefill_tables = meta.decode.block_tables, meta.block_tables
    assert prefill_tables._base is None and decode_tables._base is None
    assert prefill_tables.data_ptr() % 16 == 0
    assert prefill_tables.tolist()[0][:3] == batch.seqs[1].block_table
    assert decode_tables.tolist()[0][:1] == batch.seqs[0].block_table
