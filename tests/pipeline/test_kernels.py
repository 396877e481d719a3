"""The FFN stage's GEMMs: linear layers inside and outside ``bounded_gemms`` (which GEMM runs,
and that the bound ends with its block); the attention stage's kernel choice."""

import torch
import torch.nn.functional as F

from nanovllm.kernels import triton_gemm
from nanovllm.layers.linear import ReplicatedLinear, RowParallelLinear
from nanovllm.pipeline import kernels as linear_mod
from nanovllm.pipeline.kernels import BOUNDED_MIN_ROWS


def layers():
    torch.manual_seed(0)
    rep, row = ReplicatedLinear(64, 128), RowParallelLinear(64, 128)
    for layer in (rep, row):
        layer.weight.data.normal_()
    return rep, row


def test_without_a_gpu_the_bound_keeps_torchs_gemm():
    rep, row = layers()
    x = torch.randn(BOUNDED_MIN_ROWS, 64)
    with linear_mod.bounded_gemms(16):
        inside = rep(x), row(x)
    assert torch.equal(inside[0], F.linear(x, rep.weight))
    assert torch.equal(inside[1], F.linear(x, row.weight))


def test_bounded_gemms_route_large_matmuls_to_the_persistent_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(triton_gemm, "supported", lambda x, w: None)
    monkeypatch.setattr(
        triton_gemm, "linear", lambda x, w, num_sms: calls.append((x.shape[0], num_sms)) or x @ w.T
    )
    rep, row = layers()
    big, small = torch.randn(BOUNDED_MIN_ROWS, 64), torch.randn(BOUNDED_MIN_ROWS - 1, 64)
    with linear_mod.bounded_gemms(108):
        rep(big), row(big), rep(small)
        with linear_mod.bounded_gemms(None):  # an inner block lifts the bound
            rep(big)
        rep(big)
    assert calls == [(BOUNDED_MIN_ROWS, 108)] * 3  # small and unbounded calls: torch
    rep(big)  # the bound ended with its block
    assert len(calls) == 3
    biased = ReplicatedLinear(64, 128, bias=True)
    biased.weight.data.normal_(), biased.bias.data.normal_()
    with linear_mod.bounded_gemms(108):
        out = biased(big)
    assert len(calls) == 3 and torch.equal(out, F.linear(big, biased.weight, biased.bias))


def test_unsupported_operands_fall_back(monkeypatch):
    monkeypatch.setattr(triton_gemm, "supported", lambda x, w: "N=100: not a tile multiple")
    monkeypatch.setattr(triton_gemm, "linear", lambda *a: (_ for _ in ()).throw(AssertionError))
    rep, _ = layers()
    x = torch.randn(BOUNDED_MIN_ROWS, 64)
    with linear_mod.bounded_gemms(108):
        assert torch.equal(rep(x), F.linear(x, rep.weight))
