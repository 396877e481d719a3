"""Tests for nanovllm/pipeline/green.py and nanovllm/pipeline/sm_budget.py.

CPU tests: validation messages, the unavailable path, the cuBLAS budget helper, and the
partition policy / repartitioning against the fake driver from tests/test_green_ctx.py.
GPU tests: real partitions checked with the %smid kernel, eagerly and inside one CUDA graph
forked/joined across the two streams and replayed from the default stream.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from green_ctx import GreenContextError
from nanovllm.pipeline import green as green_manager
from nanovllm.pipeline.green import GreenContextManager
from nanovllm.pipeline.sm_budget import (
    candidate_attention_sm_counts,
    default_attention_sm_count,
    set_cublas_sm_budget,
    validate_sm_counts,
)
from tests.helpers import load_test_module

# Reuse the fake driver and the %smid kernel instead of keeping two copies.
helpers = load_test_module("test_green_ctx.py")
FakeDriver, FakeResult = helpers.FakeDriver, helpers.FakeResult


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(green_manager, "_logged_reasons", set())
    return helpers.use_fake_driver(monkeypatch, FakeDriver())


# ----------------------------------------------------------------------------------------------
# Validation (pure; takes total_sms so it runs on CPU).


def test_validate_accepts_good_counts():
    assert validate_sm_counts(16, 16, 132, 8) == (16, 16)
    assert validate_sm_counts(None, None, 132, 8) == (None, None)
    assert validate_sm_counts(np.int64(40), None, 132, 8) == (40, None)
    assert validate_sm_counts(66, 66, 132, 8) == (66, 66)


@pytest.mark.parametrize(
    "attention, ffn, field, text",
    [
        (0, 16, "pipeline_attention_sm_count=0", "must be positive"),
        (16, -3, "pipeline_ffn_sm_count=-3", "must be positive"),
        (2.5, None, "pipeline_attention_sm_count=2.5", "not an integer"),
        (None, True, "pipeline_ffn_sm_count=True", "not an integer"),
        (None, "16", "pipeline_ffn_sm_count='16'", "not an integer"),
    ],
)
def test_validate_rejects_bad_values(attention, ffn, field, text):
    with pytest.raises(ValueError) as info:
        validate_sm_counts(attention, ffn, 132, 8)
    message = str(info.value)
    assert field in message and text in message
    assert "None to choose automatically" in message  # the fix


def test_validate_rejects_sum_over_device():
    with pytest.raises(ValueError) as info:
        validate_sm_counts(100, 64, 132, 8)
    message = str(info.value)
    assert "pipeline_attention_sm_count=100" in message and "pipeline_ffn_sm_count=64" in message
    assert "164 exceeds the 132 SMs" in message and "at most 132" in message


def test_validate_rejects_count_leaving_too_little():
    with pytest.raises(ValueError, match=r"pipeline_attention_sm_count=130 .* at most 124"):
        validate_sm_counts(130, None, 132, 8)
    with pytest.raises(ValueError, match=r"pipeline_ffn_sm_count=128 .*attention partition"):
        validate_sm_counts(None, 128, 132, 8)


def test_validate_without_total_checks_only_values():
    assert validate_sm_counts(500, 500) == (500, 500)
    with pytest.raises(ValueError, match="pipeline_ffn_sm_count=0"):
        validate_sm_counts(8, 0)


def test_default_attention_share():
    assert default_attention_sm_count(132, 8, 8) == 40
    assert default_attention_sm_count(108, 4, 2) == 36
    assert default_attention_sm_count(16, 8, 8) == 8


def test_split_search_candidates():
    assert candidate_attention_sm_counts(132, 8, 8) == [24, 40, 64]  # H100
    assert candidate_attention_sm_counts(108, 4, 2) == [20, 32, 52]  # A100
    # a small GPU: every share rounds to the minimum partition; the FFN keeps its minimum too
    assert candidate_attention_sm_counts(16, 8, 8) == [8]
    assert candidate_attention_sm_counts(8, 8, 8) == []


# ----------------------------------------------------------------------------------------------
# Unavailable: never raises, says why once, exposes no streams.


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_manager_on_cpu_is_unavailable(monkeypatch, caplog):
    monkeypatch.setattr(green_manager, "_logged_reasons", set())
    with caplog.at_level(logging.WARNING, logger="nanovllm.green"):
        manager = GreenContextManager(0, 16, 16)
        GreenContextManager(0, None, None)  # the same reason is not logged twice
    assert manager.available is False
    assert "CUDA" in manager.reason
    assert manager.attention_stream is None and manager.ffn_stream is None
    assert (manager.attention_sms, manager.ffn_sms, manager.total_sms) == (0, 0, 0)
    assert manager.adjust_sm_allocation(8, 8) == (0, 0) and manager.generation == 0
    assert manager.stats()["available"] is False
    assert len([r for r in caplog.records if "disabled" in r.getMessage()]) == 1
    with manager:
        pass
    manager.close()


def test_manager_on_cpu_device_is_unavailable(monkeypatch):
    monkeypatch.setattr(green_manager, "_logged_reasons", set())
    manager = GreenContextManager(torch.device("cpu"), 16, 16)
    assert not manager.available and "not a CUDA device" in manager.reason


def test_manager_without_cuda_python(monkeypatch):
    monkeypatch.setattr(green_manager, "_logged_reasons", set())
    helpers.hide_cuda_python(monkeypatch)
    manager = GreenContextManager(0, 16, 16)
    assert not manager.available
    assert "pip install cuda-python" in manager.reason
    assert manager.ffn_stream is None


def test_manager_rejects_bad_counts_even_without_gpu():
    with pytest.raises(ValueError, match="pipeline_attention_sm_count=-1"):
        GreenContextManager(0, -1, 16)
    with pytest.raises(ValueError, match="'attention' or 'ffn'"):
        GreenContextManager(0, 16, 16, group="both")


def test_manager_too_few_sms_is_unavailable(monkeypatch):
    monkeypatch.setattr(green_manager, "_logged_reasons", set())
    helpers.use_fake_driver(monkeypatch, FakeDriver(total=12))
    manager = GreenContextManager(0)
    assert not manager.available and "too few" in manager.reason
    assert manager.total_sms == 12


def test_manager_driver_failure_is_unavailable_not_raised(fake, caplog):
    fake.fail["cuGreenCtxCreate"] = FakeResult.CUDA_ERROR_NOT_SUPPORTED
    with caplog.at_level(logging.WARNING, logger="nanovllm.green"):
        manager = GreenContextManager(0, 40, None)
    assert not manager.available
    assert "cuGreenCtxCreate" in manager.reason and "CUDA_ERROR_NOT_SUPPORTED" in manager.reason
    assert manager.attention_stream is None
    assert any("CUDA_ERROR_NOT_SUPPORTED" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------------
# Partition policy and repartitioning (fake driver).


@pytest.mark.parametrize(
    "attention, ffn, group, expected",
    [
        (None, None, "attention", (40, 92)),  # automatic: attention ~1/3, rounded down
        (16, 16, "attention", (16, 116)),  # leftovers go to the FFN partition
        (10, 120, "attention", (16, 116)),  # attention rounded up, FFN gets the rest
        (None, 64, "attention", (64, 68)),
        (64, None, "attention", (64, 68)),
        (None, None, "ffn", (44, 88)),
        (16, 16, "ffn", (116, 16)),  # with group="ffn" the leftovers go to attention
    ],
)
def test_manager_partition_policy(fake, attention, ffn, group, expected):
    with GreenContextManager(0, attention, ffn, group=group) as manager:
        assert manager.available and manager.reason == ""
        assert (manager.attention_sms, manager.ffn_sms) == expected
        assert manager.total_sms == 132
        assert manager.attention_stream is not None and manager.ffn_stream is not None
        assert manager.attention_stream is not manager.ffn_stream
    assert fake.names("cuDevSmResourceSplit") == ["cuDevSmResourceSplitByCount"]


def test_manager_logs_requested_and_actual(fake, caplog):
    with caplog.at_level(logging.INFO, logger="nanovllm.green"):
        GreenContextManager(0, 10, 120).close()
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "attention 16 SMs (requested 10)" in text and "ffn 116 SMs (requested 120)" in text
    assert "fewer than the 120 requested" in text


def test_manager_validates_against_device(fake):
    with pytest.raises(ValueError, match="exceeds the 132 SMs"):
        GreenContextManager(0, 100, 64)
    with pytest.raises(ValueError, match="at most 124"):
        GreenContextManager(0, None, 130)
    assert not fake.live_ctx


def test_adjust_repartitions_and_bumps_generation(fake):
    manager = GreenContextManager(0, 40, None)
    old_streams = {manager.attention_stream.handle, manager.ffn_stream.handle}

    assert manager.adjust_sm_allocation(64, None) == (64, 68)
    assert manager.generation == 1
    assert (manager.attention_sms, manager.ffn_sms) == (64, 68)
    assert not old_streams & fake.live_streams  # old streams destroyed
    assert len(fake.live_ctx) == 2 and len(fake.live_streams) == 2
    assert manager.stats()["requested_attention_sms"] == 64
    assert fake.names("cuDevSmResourceSplit") == ["cuDevSmResourceSplitByCount"] * 2

    manager.adjust_sm_allocation(None, None)
    assert manager.generation == 2 and (manager.attention_sms, manager.ffn_sms) == (40, 92)
    with pytest.raises(ValueError, match="pipeline_ffn_sm_count=0"):
        manager.adjust_sm_allocation(16, 0)
    assert manager.generation == 2

    manager.close()
    manager.close()
    assert not fake.live_ctx and not fake.live_streams
    assert not manager.available and manager.attention_stream is None
    with pytest.raises(RuntimeError, match="closed"):
        manager.adjust_sm_allocation(16, 16)


def test_adjust_failure_keeps_old_partitions(fake):
    manager = GreenContextManager(0, 40, None)
    stream = manager.attention_stream
    fake.fail["cuGreenCtxCreate"] = FakeResult.CUDA_ERROR_NOT_SUPPORTED
    with pytest.raises(GreenContextError, match="cuGreenCtxCreate"):
        manager.adjust_sm_allocation(64, None)
    assert manager.generation == 0 and manager.attention_stream is stream
    assert manager.available and (manager.attention_sms, manager.ffn_sms) == (40, 92)
    assert len(fake.live_ctx) == 2  # nothing leaked from the failed attempt
    manager.close()


# ----------------------------------------------------------------------------------------------
# cuBLAS SM budget.


def test_cublas_budget_sets_and_restores_carveout():
    get = torch._C._get_sm_carveout_experimental
    before = get()
    with set_cublas_sm_budget(40, total_sms=132):
        assert get() == 92
        with set_cublas_sm_budget(132, total_sms=132):
            assert get() is None  # the whole device: no carve-out
        assert get() == 92
    assert get() == before
    with set_cublas_sm_budget(None, total_sms=132):
        assert get() == before


def test_cublas_budget_is_a_noop_without_torch_support(monkeypatch):
    monkeypatch.delattr(torch._C, "_set_sm_carveout_experimental")
    with set_cublas_sm_budget(40, total_sms=132):
        pass


def test_manager_cublas_budget(fake):
    with GreenContextManager(0, 40, None) as manager:
        with manager.cublas_sm_budget("ffn"):
            assert torch._C._get_sm_carveout_experimental() == 40  # 132 - 92
        with pytest.raises(ValueError):
            manager.cublas_sm_budget("moe")


# ----------------------------------------------------------------------------------------------
# GPU tests.


def _check_partitions(manager: GreenContextManager) -> tuple[set[int], set[int]]:
    a = helpers.sm_ids(manager.attention_stream)
    f = helpers.sm_ids(manager.ffn_stream)
    assert len(a) == manager.attention_sms
    assert len(f) == manager.ffn_sms
    assert a.isdisjoint(f)
    assert manager.attention_sms + manager.ffn_sms == manager.total_sms
    return a, f


@pytest.mark.gpu
def test_gpu_manager_partitions_eager_and_in_one_graph():
    with GreenContextManager(0, None, None) as manager:
        assert manager.available, manager.reason
        ids_a, ids_f = _check_partitions(manager)

        sa, sf = manager.attention_stream, manager.ffn_stream
        out_a = torch.full((helpers.SMID_BLOCKS,), -1, dtype=torch.int32, device="cuda")
        out_f = torch.full_like(out_a, -1)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        # Capture on the attention stream; fork to the FFN stream and join back with events.
        with torch.cuda.graph(graph, stream=sa):
            fork = torch.cuda.Event()
            fork.record(sa)
            sf.wait_event(fork)
            helpers.launch_smid(sa, out_a)
            helpers.launch_smid(sf, out_f)
            join = torch.cuda.Event()
            join.record(sf)
            sa.wait_event(join)
        for _ in range(2):  # replayed from the default stream
            out_a.fill_(-1)
            out_f.fill_(-1)
            graph.replay()
            torch.cuda.synchronize()
            got_a, got_f = set(out_a.tolist()), set(out_f.tolist())
            assert -1 not in got_a and -1 not in got_f
            assert got_a == ids_a and got_f == ids_f
        del graph


@pytest.mark.gpu
def test_gpu_adjust_changes_partitions_and_generation():
    with GreenContextManager(0, 40, None) as manager:
        before = (manager.attention_sms, manager.ffn_sms)
        after = manager.adjust_sm_allocation(64, None)
        assert after != before and after == (manager.attention_sms, manager.ffn_sms)
        assert manager.attention_sms == 64 and manager.generation == 1
        _check_partitions(manager)


@pytest.mark.gpu
def test_gpu_gemm_runs_on_both_partitions():
    # cuBLAS must work on the group and on the remainder (which has weaker co-scheduling
    # guarantees), with and without an SM budget.
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16)
    ref = x @ w.t()
    torch.cuda.synchronize()
    with GreenContextManager(0, None, None) as manager:
        for stage, stream in (("attention", manager.attention_stream), ("ffn", manager.ffn_stream)):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), manager.cublas_sm_budget(stage):
                y = x @ w.t()
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            torch.testing.assert_close(y, ref)


@pytest.mark.gpu
def test_gpu_close_then_create_again():
    manager = GreenContextManager(0, 16, None)
    assert manager.available, manager.reason
    manager.close()
    manager.close()
    assert manager.attention_stream is None and not manager.available
    with GreenContextManager(0, 24, None) as again:
        assert again.attention_sms >= 24 and again.available
        _check_partitions(again)
