"""Qwen3ForCausalLM on CPU with the torch backend and a real paged KV cache: the per-layer
stages composed over row micro-batches equal forward() bit for bit, and prefill hidden states
match transformers."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from nanovllm.attention.torch_backend import TorchAttentionBackend
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.kv_cache import allocate_kv_cache
from nanovllm.engine.model_inputs import prepare_decode, prepare_prefill
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import Attention
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.loader import load_model

BS, NUM_BLOCKS = 16, 32
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tiny_model):
    config = AutoConfig.from_pretrained(tiny_model)
    with CPU:
        m = Qwen3ForCausalLM(config).float()
    load_model(m, tiny_model)
    backend = TorchAttentionBackend()
    for module in m.modules():
        if isinstance(module, Attention):
            module.backend = backend
    return m.eval()


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def fresh_cache(model):
    return allocate_kv_cache(model, NUM_BLOCKS, BS, torch.float32, CPU)


def prompts(lengths, seed=0, vocab=400):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def make_seqs(bm, token_lists):
    seqs = []
    for ids in token_lists:
        seq = Sequence(ids, SamplingParams(temperature=0), BS)
        bm.allocate(seq)
        seqs.append(seq)
    return seqs


@torch.inference_mode()
def prefill(model, seqs, chunk=None):
    """Prefill ``seqs`` (``chunk`` new tokens each, default all); returns hidden states."""
    n = [chunk or len(s) - s.num_computed_tokens for s in seqs]
    batch = ScheduledBatch(is_prefill=True, seqs=seqs, num_new_tokens=n)
    inputs = prepare_prefill(batch, BS, CPU)
    hidden = model(inputs.input_ids, inputs.positions, inputs.meta)
    for s, k in zip(seqs, n):
        s.num_computed_tokens += k
    return hidden, inputs


@torch.inference_mode()
def staged_decode(model, inputs, splits):
    """Layer by layer over row micro-batches, interleaved the way the pipeline runs them."""
    meta = inputs.meta
    mbs = []
    for start, end in splits:
        mbs.append(
            {
                "rows": slice(start, end),
                "meta": meta.decode_slice(start, end),
                "h": model.embed(inputs.input_ids[start:end]),
                "r": None,
            }
        )
    for layer in range(model.num_layers):
        for mb in mbs:
            pos = inputs.positions[mb["rows"]]
            mb["h"], mb["r"] = model.forward_attention(layer, pos, mb["h"], mb["r"], mb["meta"])
        for mb in mbs:
            mb["h"], mb["r"] = model.forward_ffn(layer, mb["h"], mb["r"])
    return torch.cat([model.final_norm(mb["h"], mb["r"]) for mb in mbs])


def decode_setup(model):
    """Four sequences prefilled into a fresh paged cache, each with one new token to decode."""
    bm = BlockManager(NUM_BLOCKS, BS)
    seqs = make_seqs(bm, prompts([5, 20, 33, 16], seed=1))
    cache = fresh_cache(model)
    prefill(model, seqs)
    for s, t in zip(seqs, [11, 12, 13, 14]):  # one sampled token each: a decode step
        s.token_ids.append(t)
        bm.append(s)
    batch = ScheduledBatch(is_prefill=False, seqs=seqs, num_new_tokens=[1] * len(seqs))
    return cache, prepare_decode(batch, BS, CPU)


def test_staged_whole_batch_equals_forward_exactly(model):
    cache, inputs = decode_setup(model)
    before = cache.clone()
    with torch.inference_mode():
        full = model(inputs.input_ids, inputs.positions, inputs.meta)
    after_full = cache.clone()
    cache.copy_(before)
    staged = staged_decode(model, inputs, [(0, 4)])
    assert staged.shape == full.shape == (4, model.config.hidden_size)
    assert torch.equal(staged, full)
    assert torch.equal(cache, after_full)  # the same K/V landed in the same slots
    assert not torch.equal(before, after_full)  # ... and the decode step did write K/V


@pytest.mark.parametrize("splits", [[(0, 2), (2, 4)], [(0, 3), (3, 4)], [(0, 1), (1, 4)]])
def test_staged_microbatches_equal_forward_per_microbatch_exactly(model, splits):
    """Two micro-batches of rows, metadata from decode_slice, stages interleaved per layer:
    bit for bit what forward() gives on the same rows. Against forward() on the whole batch
    they agree to float32 rounding only: CPU GEMMs are not batch-size invariant
    (F.linear(x[:2], w) != F.linear(x, w)[:2] in the last bits)."""
    cache, inputs = decode_setup(model)
    before = cache.clone()
    with torch.inference_mode():
        full = model(inputs.input_ids, inputs.positions, inputs.meta)
        cache.copy_(before)
        per_mb = torch.cat(
            [
                model(
                    inputs.input_ids[s:e],
                    inputs.positions[s:e],
                    inputs.meta.decode_slice(s, e),
                )
                for s, e in splits
            ]
        )
    after_per_mb = cache.clone()
    cache.copy_(before)
    staged = staged_decode(model, inputs, splits)
    assert torch.equal(staged, per_mb)
    assert torch.equal(cache, after_per_mb)
    torch.testing.assert_close(staged, full, atol=1e-5, rtol=1e-5)
    # decode_slice is a view of the same metadata rows, not a copy
    meta = inputs.meta.decode_slice(*splits[1])
    assert meta.block_tables.data_ptr() == inputs.meta.block_tables[splits[1][0]].data_ptr()
    assert torch.equal(meta.context_lens, inputs.meta.context_lens[splits[1][0] : splits[1][1]])


@torch.inference_mode()
def hf_last_hidden(hf_model, ids):
    return hf_model.model(torch.tensor([ids])).last_hidden_state[0]


def test_prefill_hidden_states_match_transformers(model, hf_model):
    bm = BlockManager(NUM_BLOCKS, BS)
    token_lists = prompts([7, 40, 1], seed=2)
    seqs = make_seqs(bm, token_lists)
    fresh_cache(model)
    hidden, inputs = prefill(model, seqs)
    assert inputs.meta.block_tables is None  # keys come straight from this pass
    cu = inputs.meta.cu_seqlens_q.tolist()
    for i, ids in enumerate(token_lists):
        ours = hidden[cu[i] : cu[i + 1]]
        ref = hf_last_hidden(hf_model, ids)
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_chunked_and_decode_hidden_states_match_transformers(model, hf_model):
    """Keys read back from the paged cache (second chunk, then a decode) match too."""
    bm = BlockManager(NUM_BLOCKS, BS)
    (ids,) = prompts([37], seed=3)
    (seq,) = make_seqs(bm, [ids])
    fresh_cache(model)
    ref = hf_last_hidden(hf_model, ids + [9])
    first, _ = prefill(model, [seq], chunk=20)
    second, inputs = prefill(model, [seq], chunk=17)
    assert inputs.meta.block_tables is not None  # the cached prefix is read from the cache
    torch.testing.assert_close(torch.cat([first, second]), ref[:37], atol=1e-4, rtol=1e-4)
    seq.token_ids.append(9)
    bm.append(seq)
    batch = ScheduledBatch(is_prefill=False, seqs=[seq], num_new_tokens=[1])
    inputs = prepare_decode(batch, BS, CPU)
    with torch.inference_mode():
        last = model(inputs.input_ids, inputs.positions, inputs.meta)
    torch.testing.assert_close(last[0], ref[37], atol=1e-4, rtol=1e-4)
