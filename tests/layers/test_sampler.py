"""Sampler: greedy rows, top-k / top-p filters, mixed batches, and the sampled distribution."""

import pytest
import torch

from nanovllm.layers.sampler import Sampler, SamplingTensors, ban_tokens, row_seed, top_logprobs

VOCAB = 50


def params(n, temperature=1.0, top_k=0, top_p=1.0) -> SamplingTensors:
    def full(v):
        return v.tolist() if torch.is_tensor(v) else [v] * n

    return SamplingTensors.build(full(temperature), full(top_k), full(top_p), torch.device("cpu"))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def logits():
    return torch.randn(64, VOCAB, generator=gen(123)) * 3


def test_temperature_zero_is_argmax(logits):
    out = Sampler()(logits, params(len(logits), temperature=0.0), generator=gen())
    assert torch.equal(out, logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_1_is_argmax_at_any_temperature(logits, temperature):
    sampler = Sampler()
    for seed in range(3):
        p = params(len(logits), temperature=temperature, top_k=1)
        out = sampler(logits, p, generator=gen(seed))
        assert torch.equal(out, logits.argmax(-1))


def test_tiny_top_p_keeps_only_the_top_token(logits):
    p = params(len(logits), temperature=2.0, top_p=1e-6)
    for seed in range(3):
        assert torch.equal(Sampler()(logits, p, generator=gen(seed)), logits.argmax(-1))


def test_mixed_greedy_and_sampled_rows():
    # Flat logits with a slight favourite: a sampled row rarely picks the argmax, a greedy
    # row always does.
    n = 8
    logits = torch.zeros(n, VOCAB)
    logits[:, 3] = 0.5
    temperatures = torch.tensor([0, 1, 0, 1, 0, 1, 0.7, 0], dtype=torch.float32)
    top_ks, top_ps = torch.zeros(n, dtype=torch.int64), torch.ones(n)
    greedy_rows = temperatures == 0
    sampled_seen = set()
    for seed in range(10):
        out = Sampler()(logits, params(n, temperatures, top_ks, top_ps), generator=gen(seed))
        assert out.shape == (n,) and out.dtype == torch.int64
        assert torch.all(out[greedy_rows] == 3)
        assert torch.all((out >= 0) & (out < VOCAB))
        sampled_seen.update(out[~greedy_rows].tolist())
    assert len(sampled_seen) > 5  # the sampled rows really sample


def test_per_row_parameters_are_independent():
    logits = torch.randn(3, VOCAB, generator=gen(5))
    temperatures = torch.tensor([1.0, 1.0, 1.0])
    top_ks = torch.tensor([1, 0, 0])
    top_ps = torch.tensor([1.0, 1e-6, 1.0])
    seen_row2 = set()
    for seed in range(20):
        out = Sampler()(logits, params(3, temperatures, top_ks, top_ps), generator=gen(seed))
        assert out[0] == logits[0].argmax() and out[1] == logits[1].argmax()
        seen_row2.add(int(out[2]))
    assert len(seen_row2) > 1


@pytest.mark.parametrize("k", [2, 5])
def test_sampled_tokens_stay_in_top_k(logits, k):
    topk = logits.topk(k, dim=-1).indices
    p = params(len(logits), temperature=3.0, top_k=k)  # hot: without the filter anything goes
    seen = torch.zeros(len(logits), VOCAB, dtype=torch.bool)
    for seed in range(30):
        out = Sampler()(logits, p, generator=gen(seed))
        assert torch.all((topk == out.unsqueeze(1)).any(dim=1))
        seen[torch.arange(len(logits)), out] = True
    assert (seen.sum(dim=1) > 1).any()  # more than the argmax is drawn


def draw(logits_row, n, seed=0, **kw):
    logits = logits_row.unsqueeze(0).expand(n, -1).contiguous()
    out = Sampler()(logits, params(n, **kw), generator=gen(seed))
    return torch.bincount(out, minlength=logits_row.numel()).float() / n


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_empirical_distribution_matches_softmax(temperature):
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits_row = probs.log()
    freq = draw(logits_row, 40_000, temperature=temperature)
    expected = torch.softmax(logits_row / temperature, dim=-1)
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)


def test_top_p_and_top_k_renormalise():
    logits_row = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # top-p 0.5 keeps the smallest prefix reaching 0.5: tokens 0 and 1, in ratio 4:3
    freq = draw(logits_row, 40_000, seed=1, top_p=0.5)
    assert torch.allclose(freq, torch.tensor([4 / 7, 3 / 7, 0, 0]), atol=0.015), freq
    # top-k 3 drops token 3 and renormalises the rest
    freq = draw(logits_row, 40_000, seed=2, top_k=3)
    assert torch.allclose(freq, torch.tensor([4 / 9, 3 / 9, 2 / 9, 0]), atol=0.015), freq


@pytest.mark.parametrize("temperature", [1e-8, 1e-40, 1e-45])
def test_tiny_positive_temperature_is_near_greedy_not_nan(logits, temperature):
    # logits / 1e-40 overflows float32 to inf; the sampler must not return garbage
    out = Sampler()(logits, params(len(logits), temperature=temperature), generator=gen())
    assert torch.equal(out, logits.argmax(-1))


def test_host_flags_follow_the_rows():
    cpu = torch.device("cpu")
    assert SamplingTensors.build([0.0, 0.0], [5, 0], [0.5, 1.0], cpu).all_greedy
    # a filter on a greedy row does not send the sampled rows down the sorting path
    st = SamplingTensors.build([0.0, 0.7], [5, 0], [0.5, 1.0], cpu)
    assert not st.all_greedy and not st.any_filter
    assert SamplingTensors.build([0.0, 0.7], [0, 0], [1.0, 0.9], cpu).any_filter
    assert SamplingTensors.build([0.7], [3], [1.0], cpu).any_filter


def test_unfiltered_and_filtered_paths_draw_the_same_distribution():
    # top_p just below 1 takes the sorting path but keeps (almost) every token
    logits_row = torch.tensor([0.05, 0.15, 0.3, 0.5]).log()
    fast = draw(logits_row, 40_000, seed=3, temperature=0.8)
    sorted_path = draw(logits_row, 40_000, seed=4, temperature=0.8, top_p=0.999999)
    expected = torch.softmax(logits_row / 0.8, dim=-1)
    assert torch.allclose(fast, expected, atol=0.015), fast
    assert torch.allclose(sorted_path, expected, atol=0.015), sorted_path


def test_the_callers_logits_are_left_alone(logits):
    before = logits.clone()
    Sampler()(logits, params(len(logits), temperature=0.5), generator=gen())
    Sampler()(logits, params(len(logits), temperature=0.5, top_k=3), generator=gen())
    assert torch.equal(logits, before)


# The fused Triton path runs here through the interpreter (conftest sets TRITON_INTERPRET=1
# without a GPU); on a GPU machine the gpu-marked test below runs it on the device.
triton_interpreter = pytest.mark.skipif(
    torch.cuda.is_available(), reason="interpreter test: the gpu-marked test covers the device"
)


def fused_draw(logits_row, n, seed=0, temperature=1.0):
    pytest.importorskip("triton")
    logits = logits_row.unsqueeze(0).expand(n, -1).contiguous()
    out = Sampler(fused=True)(logits, params(n, temperature=temperature), generator=gen(seed))
    return torch.bincount(out, minlength=logits_row.numel()).float() / n


@triton_interpreter
def test_fused_distribution_matches_softmax():
    temperature = 0.5
    logits_row = torch.tensor([0.1, 0.2, 0.3, 0.4]).log()
    freq = fused_draw(logits_row, 1_200, temperature=temperature)
    expected = torch.softmax(logits_row / temperature, dim=-1)
    assert torch.allclose(freq, expected, atol=0.05), (freq, expected)  # > 3.5 sigma


@triton_interpreter
def test_fused_greedy_rows_and_blocks_beyond_the_first():
    pytest.importorskip("triton")
    from nanovllm.kernels.triton_sampling import BLOCK

    # a vocabulary of several kernel blocks, the favourite in the last (partial) one
    vocab = 2 * BLOCK + 37
    logits = torch.randn(6, vocab, generator=gen(9))
    logits[:, vocab - 5] += 50.0
    temperatures = [0.0, 0.0, 0.7, 1.0, 0.0, 1e-30]
    p = SamplingTensors.build(temperatures, [0] * 6, [1.0] * 6, torch.device("cpu"))
    out = Sampler(fused=True)(logits.to(torch.bfloat16), p, generator=gen(1))
    assert out.dtype == torch.int64 and out.tolist() == [vocab - 5] * 6
    flat = torch.zeros(4, vocab)  # no favourite: sampled rows spread, greedy rows take index 0
    p = SamplingTensors.build([0.0, 1.0, 1.0, 1.0], [0] * 4, [1.0] * 4, torch.device("cpu"))
    sampler = Sampler(fused=True)
    draws = torch.stack([sampler(flat, p, generator=gen(2)) for _ in range(3)])
    assert (draws[:, 0] == 0).all() and draws[:, 1:].unique().numel() > 3


@triton_interpreter
def test_fused_draws_repeat_for_the_same_seed_and_move_on_between_calls():
    pytest.importorskip("triton")
    logits = torch.zeros(8, 300)
    p = params(8, temperature=1.0)
    a, b = Sampler(fused=True), Sampler(fused=True)
    first = a(logits, p, generator=gen(5))
    assert torch.equal(first, b(logits, p, generator=gen(5)))
    assert not torch.equal(first, a(logits, p, generator=gen(5)))  # the next call draws anew


@pytest.mark.gpu
def test_fused_sampler_on_gpu_matches_softmax_and_greedy():
    dev = torch.device("cuda")
    vocab = 151936
    row = torch.full((vocab,), -30.0)
    row[:4] = torch.tensor([0.1, 0.2, 0.3, 0.4]).log()
    n = 4096
    logits = row.to(dev, torch.bfloat16).unsqueeze(0).expand(n, -1).contiguous()
    st = SamplingTensors.build([1.0] * n, [0] * n, [1.0] * n, dev)
    g = torch.Generator(dev).manual_seed(0)
    out = Sampler()(logits, st, generator=g)
    freq = torch.bincount(out.cpu(), minlength=vocab)[:4].float() / n
    expected = torch.softmax(row[:4].to(torch.bfloat16).float(), dim=-1)
    assert torch.allclose(freq, expected, atol=0.03), (freq, expected)
    greedy = SamplingTensors.build([0.0] * 8, [0] * 8, [1.0] * 8, dev)
    rand = torch.randn(8, vocab, device=dev, dtype=torch.bfloat16)
    assert torch.equal(Sampler(fused=True)(rand, greedy, generator=g), rand.float().argmax(-1))
    mixed = SamplingTensors.build([0.0, 0.6] * 4, [0] * 8, [1.0] * 8, dev)
    out = Sampler(fused=True)(rand, mixed, generator=g)
    assert torch.equal(out[0::2], rand[0::2].float().argmax(-1))


# ---------------------------------------------------------------- per-request seeds, masks
def seeded(n, seeds, temperature=1.0, top_k=0, banned=None):
    return SamplingTensors.build(
        [temperature] * n, [top_k] * n, [1.0] * n, torch.device("cpu"), seeds, banned
    )


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("top_k", [0, 20])
def test_row_seed_draws_do_not_depend_on_the_batch(fused, top_k):
    if fused:
        if torch.cuda.is_available():
            pytest.skip("interpreter test")
        pytest.importorskip("triton")
        if top_k:
            pytest.skip("filters take the torch path")
    logits = torch.randn(5, 300, generator=gen(11))
    s = row_seed(1234, 3)
    # row 2 alone, and in a batch of five next to unseeded rows, engines seeded differently
    alone = Sampler(fused=fused)(logits[2:3], seeded(1, [s], top_k=top_k), generator=gen(0))
    batch = seeded(5, [-1, -1, s, -1, row_seed(99, 0)], top_k=top_k)
    for engine_seed in (1, 2):
        out = Sampler(fused=fused)(logits, batch, generator=gen(engine_seed))
        assert out[2] == alone[0]
    # the seed matters: other seeds draw other tokens from the same flat-ish row
    draws = {
        int(Sampler(fused=fused)(logits[2:3], seeded(1, [row_seed(k, 3)]), generator=gen(0))[0])
        for k in range(12)
    }
    assert len(draws) > 3


def test_row_seed_is_a_function_of_seed_and_step():
    assert row_seed(7, 0) == row_seed(7, 0)
    values = {row_seed(seed, step) for seed in range(20) for step in range(20)}
    assert len(values) == 400 and all(0 <= v < 2**31 for v in values)
    # no seeded row: the batch keeps the plain path
    assert SamplingTensors.build([1.0], [0], [1.0], torch.device("cpu"), [-1]).row_seeds is None


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_banned_tokens_are_never_sampled(temperature):
    logits = torch.zeros(3, VOCAB)
    logits[:, 4] = 20.0  # the favourite, banned in rows 0 and 2
    p = seeded(3, None, temperature=temperature, banned=[(0, [4, 5]), (2, [4])])
    before = logits.clone()
    for seed in range(5):
        out = Sampler()(logits, p, generator=gen(seed))
        assert out[0] not in (4, 5) and out[2] != 4 and out[1] == 4
    assert torch.equal(logits, before)  # masked on a copy
    assert ban_tokens(logits, []) is logits
    assert ban_tokens(logits, [(0, [VOCAB + 3])]) is logits  # ids beyond the vocabulary


def test_top_logprobs_are_the_raw_log_softmax():
    logits = torch.randn(4, VOCAB, generator=gen(3))
    sampled = torch.tensor([0, 1, 2, 3])
    out = top_logprobs(logits, sampled, [(1, 3), (3, 0)])
    ref = torch.log_softmax(logits, dim=-1)
    assert len(out) == 2 and len(out[0]) in (3, 4) and list(out[1]) == [3]
    top3 = ref[1].topk(3).indices.tolist()
    assert set(out[0]) == set(top3) | {1}
    for token, value in out[0].items():
        assert value == pytest.approx(ref[1, token].item(), abs=1e-6)
    assert out[1][3] == pytest.approx(ref[3, 3].item(), abs=1e-6)
    assert top_logprobs(logits, sampled, []) == []
