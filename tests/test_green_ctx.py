"""Tests for green_ctx.py.

CPU tests run everywhere (CI has neither a GPU nor cuda-python): the pure partition arithmetic,
error translation, the missing-dependency errors, and the whole create/close path against a
fake driver that records its calls. GPU tests (``@pytest.mark.gpu``) check on the device, with a
Triton kernel that reads ``%smid``, that the partitions are disjoint and as large as reported.

``FakeDriver``, ``use_fake_driver`` and ``sm_ids`` are reused by tests/engine/test_green_manager.py.
"""

from __future__ import annotations

import enum
import gc
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import green_ctx
from green_ctx import GreenContextError, GreenContextUnavailableError

REPO_ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------
# A fake cuda-python driver module.


class FakeResult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_DEINITIALIZED = 4
    CUDA_ERROR_INVALID_HANDLE = 400
    CUDA_ERROR_NOT_SUPPORTED = 801
    CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION = 915


OK = FakeResult.CUDA_SUCCESS


class FakeResource:
    def __init__(self, sm_count: int, min_size: int, align: int, from_split: bool = False):
        self.sm = SimpleNamespace(
            smCount=sm_count, minSmPartitionSize=min_size, smCoscheduledAlignment=align
        )
        self.from_split = from_split


class FakeDriver:
    """Records every call; hands out integer handles; fails where ``fail`` says so."""

    CUresult = FakeResult
    CUdevResourceType = SimpleNamespace(CU_DEV_RESOURCE_TYPE_SM=1)
    CUdevice_attribute = SimpleNamespace(
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR=75,
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR=76,
    )
    CUgreenCtxCreate_flags = SimpleNamespace(CU_GREEN_CTX_DEFAULT_STREAM=1)
    CUstream_flags = SimpleNamespace(CU_STREAM_NON_BLOCKING=1)

    def __init__(self, total=132, min_size=8, align=8, cc=(9, 0), version=13000):
        self.total, self.min_size, self.align = total, min_size, align
        self.cc, self.version = cc, version
        self.calls: list[tuple[str, tuple]] = []
        self.live_ctx: set[int] = set()
        self.live_streams: set[int] = set()
        self.fail: dict[str, FakeResult] = {}  # function name -> result to return instead
        self._next = 1000

    def _call(self, name, *args):
        self.calls.append((name, args))
        return self.fail.get(name)

    def _handle(self):
        self._next += 1
        return self._next

    def names(self, prefix="cu"):
        return [name for name, _ in self.calls if name.startswith(prefix)]

    def cuInit(self, flags):
        return self._call("cuInit", flags) or OK

    def cuDeviceGet(self, ordinal):
        return (self._call("cuDeviceGet", ordinal) or OK, ordinal)

    def cuDriverGetVersion(self):
        return (self._call("cuDriverGetVersion") or OK, self.version)

    def cuDeviceGetAttribute(self, attr, dev):
        value = self.cc[0] if attr == 75 else self.cc[1]
        return (self._call("cuDeviceGetAttribute", attr, dev) or OK, value)

    def cuDeviceGetDevResource(self, dev, kind):
        err = self._call("cuDeviceGetDevResource", dev, kind)
        return (err or OK, FakeResource(self.total, self.min_size, self.align))

    def cuDevSmResourceSplitByCount(self, n, res, flags, min_count):
        err = self._call("cuDevSmResourceSplitByCount", n, res, flags, min_count)
        if err or res.from_split:  # like the real driver: split results cannot be re-split
            return (err or FakeResult.CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION, [], 0, None)
        group = green_ctx.round_sm_count(min_count, self.min_size, self.align)
        g = FakeResource(group, self.min_size, self.align, True)
        rest = FakeResource(res.sm.smCount - group, self.min_size, self.align, True)
        return (OK, [g], 1, rest)

    def cuDevResourceGenerateDesc(self, resources, n):
        return (self._call("cuDevResourceGenerateDesc", n) or OK, ("desc", resources[0]))

    def cuGreenCtxCreate(self, desc, dev, flags):
        err = self._call("cuGreenCtxCreate", desc[1].sm.smCount, flags)
        if err:
            return (err, None)
        h = self._handle()
        self.live_ctx.add(h)
        return (OK, h)

    def cuGreenCtxStreamCreate(self, ctx, flags, priority):
        err = self._call("cuGreenCtxStreamCreate", ctx, flags, priority)
        if err:
            return (err, None)
        h = self._handle()
        self.live_streams.add(h)
        return (OK, h)

    def cuStreamSynchronize(self, stream):
        return self._call("cuStreamSynchronize", stream) or OK

    def _destroy(self, func, handle, live: set):
        """A destroy call: an injected error, or an unknown handle, or the handle released."""
        err = self._call(func, handle)
        if err:
            return err
        if handle not in live:
            return FakeResult.CUDA_ERROR_INVALID_HANDLE
        live.remove(handle)
        return OK

    def cuStreamDestroy(self, stream):
        return self._destroy("cuStreamDestroy", stream, self.live_streams)

    def cuGreenCtxDestroy(self, ctx):
        return self._destroy("cuGreenCtxDestroy", ctx, self.live_ctx)


def use_fake_driver(monkeypatch, driver: FakeDriver) -> FakeDriver:
    """Make green_ctx believe a GPU and cuda-python are present, backed by ``driver``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(green_ctx, "load_driver", lambda: driver)
    monkeypatch.setattr(green_ctx, "_ensure_primary_context", lambda index: None)
    monkeypatch.setattr(
        green_ctx, "_wrap_stream", lambda handle, index: SimpleNamespace(handle=handle)
    )
    return driver


def hide_cuda_python(monkeypatch) -> None:
    """Make cuda-python unimportable in this process (CI lacks it anyway)."""
    for name in ("cuda", "cuda.bindings", "cuda.bindings.driver", "cuda.cuda"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(green_ctx, "_driver", None)


# ----------------------------------------------------------------------------------------------
# Import and availability without a GPU / cuda-python.


def test_import_needs_neither_gpu_nor_cuda_python():
    code = (
        "import sys; sys.modules['cuda'] = None\n"
        "import green_ctx\n"
        "ok, reason = green_ctx.is_available()\n"
        "assert ok is False and 'cuda-python' in reason, reason\n"
        "print(reason)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "pip install cuda-python" in out.stdout


def test_is_available_without_cuda_python_says_why(monkeypatch):
    hide_cuda_python(monkeypatch)
    ok, reason = green_ctx.is_available()
    assert ok is False
    assert "cuda-python is not installed" in reason
    assert "pip install cuda-python" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_is_available_on_cpu_names_torch_cuda():
    ok, reason = green_ctx.is_available()
    assert ok is False
    assert "CUDA" in reason and torch.__version__ in reason


def test_split_without_cuda_python_raises_clear_error(monkeypatch):
    hide_cuda_python(monkeypatch)
    with pytest.raises(GreenContextUnavailableError) as info:
        green_ctx.create_green_split(0, 16)
    assert "cuda-python is not installed" in str(info.value)
    assert "pip install cuda-python" in str(info.value)
    assert isinstance(info.value, GreenContextError) and isinstance(info.value, RuntimeError)
    with pytest.raises(GreenContextUnavailableError, match="pip install cuda-python"):
        green_ctx.load_driver()


def test_is_available_never_raises(monkeypatch):
    drv = use_fake_driver(monkeypatch, FakeDriver())

    def broken(flags):
        raise OSError("libcuda.so not found")

    drv.cuInit = broken
    ok, reason = green_ctx.is_available(0)
    assert ok is False and "libcuda.so not found" in reason


@pytest.mark.parametrize(
    "driver, expected",
    [
        (FakeDriver(version=12030), "need >= 12.4"),
        (FakeDriver(cc=(5, 2)), "compute capability 5.2"),
        (FakeDriver(total=12), "too few"),
    ],
)
def test_is_available_checks_driver_capability_and_sms(monkeypatch, driver, expected):
    use_fake_driver(monkeypatch, driver)
    ok, reason = green_ctx.is_available(0)
    assert ok is False and expected in reason
    with pytest.raises(GreenContextUnavailableError, match=expected):
        green_ctx.create_green_split(0, 8)


def test_is_available_with_fake_h100(monkeypatch):
    use_fake_driver(monkeypatch, FakeDriver())
    ok, reason = green_ctx.is_available(0)
    assert ok is True
    assert "132 SMs" in reason and "multiples of 8" in reason and "13.0" in reason


# ----------------------------------------------------------------------------------------------
# Pure arithmetic.


@pytest.mark.parametrize(
    "n, expected", [(1, 8), (7, 8), (8, 8), (9, 16), (10, 16), (17, 24), (64, 64), (130, 136)]
)
def test_round_sm_count_h100(n, expected):
    assert green_ctx.round_sm_count(n, 8, 8) == expected


def test_round_sm_count_other_granularities():
    assert green_ctx.round_sm_count(1, 4, 2) == 4  # sm_8x: >= 4, multiples of 2
    assert green_ctx.round_sm_count(5, 4, 2) == 6
    assert green_ctx.round_sm_count(3, 1, 1) == 3
    assert green_ctx.round_down_sm_count(92, 8) == 88
    assert green_ctx.round_down_sm_count(7, 8) == 0


def test_default_granularity():
    assert green_ctx.default_granularity((9, 0)) == (8, 8)
    assert green_ctx.default_granularity((10, 0)) == (8, 8)
    assert green_ctx.default_granularity((8, 6)) == (4, 2)
    assert green_ctx.default_granularity((7, 0)) == (2, 2)
    assert green_ctx.default_granularity((6, 1)) == (1, 1)


@pytest.mark.parametrize(
    "first, second, expected",
    [
        (40, None, (40, 92)),  # the group, the remainder takes the rest
        (16, 16, (16, 116)),  # leftovers go to the remainder
        (64, 68, (64, 68)),
        (10, 120, (16, 116)),  # rounding the group up shrinks the remainder
        (None, 64, (64, 68)),  # only the remainder given: it gets at least that
        (None, 60, (72, 60)),
        (1, None, (8, 124)),
        (124, None, (120, 12)),  # the remainder keeps at least the minimum partition
        (None, 130, (8, 124)),
    ],
)
def test_plan_sm_split_h100(first, second, expected):
    assert green_ctx.plan_sm_split(132, first, second, 8, 8) == expected


def test_plan_sm_split_errors():
    with pytest.raises(ValueError, match="cannot hold two partitions"):
        green_ctx.plan_sm_split(12, 8, None, 8, 8)
    with pytest.raises(ValueError, match="at least one"):
        green_ctx.plan_sm_split(132, None, None, 8, 8)
    assert green_ctx.plan_sm_split(16, 8, None, 8, 8) == (8, 8)
    assert green_ctx.plan_sm_split(108, 33, None, 4, 2) == (34, 74)  # A100-like


# ----------------------------------------------------------------------------------------------
# Error translation.


def test_check_unpacks_results():
    assert green_ctx.check(OK, "cuInit") is None
    assert green_ctx.check((OK,), "cuInit") is None
    assert green_ctx.check((OK, 7), "cuDeviceGet") == 7
    assert green_ctx.check((OK, [1], 1, 2), "split") == ([1], 1, 2)
    assert green_ctx.check((0, "x"), "plain int") == "x"


def test_check_translates_enum_result():
    err = FakeResult.CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION
    with pytest.raises(GreenContextError) as info:
        green_ctx.check((err, [], 0, None), "cuDevSmResourceSplitByCount")
    e = info.value
    assert e.func == "cuDevSmResourceSplitByCount"
    assert e.result_name == "CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION" and e.code == 915
    assert "granularity" in e.hint
    assert str(e).startswith("cuDevSmResourceSplitByCount failed: CUDA_ERROR_INVALID_RESOURCE")
    assert isinstance(e, RuntimeError)


def test_check_translates_plain_int_and_unknown_codes():
    with pytest.raises(GreenContextError, match="CUDA_ERROR_STREAM_DETACHED") as info:
        green_ctx.check(917, "cuStreamQuery")
    assert "re-capture" in info.value.hint
    with pytest.raises(GreenContextError, match="CUresult 12345") as info:
        green_ctx.check((12345, None), "cuSomething")
    assert info.value.code == 12345 and info.value.hint == ""


# ----------------------------------------------------------------------------------------------
# The create / close path against the fake driver.


def test_split_makes_one_split_call_and_two_partitions(monkeypatch):
    drv = use_fake_driver(monkeypatch, FakeDriver())
    split = green_ctx.create_green_split(0, 40)
    splits = [args for name, args in drv.calls if name == "cuDevSmResourceSplitByCount"]
    assert len(splits) == 1
    n_groups, _, flags, min_count = splits[0]
    assert (n_groups, flags, min_count) == (1, 0, 40)
    assert (split.first.sm_count, split.second.sm_count) == (40, 92)
    assert split.first.stream.handle == split.first.stream_handle
    assert split.first.stream_handle != split.second.stream_handle
    assert len(drv.live_ctx) == 2 and len(drv.live_streams) == 2
    creates = [args for name, args in drv.calls if name == "cuGreenCtxStreamCreate"]
    assert all(flags == 1 and prio == 0 for _, flags, prio in creates)  # non-blocking
    split.close()


def test_split_rounds_requests(monkeypatch):
    drv = use_fake_driver(monkeypatch, FakeDriver())
    with green_ctx.create_green_split(0, 10, 120) as split:
        assert (split.first.sm_count, split.second.sm_count) == (16, 116)
    with green_ctx.create_green_split(0, None, 64) as split:
        assert (split.first.sm_count, split.second.sm_count) == (64, 68)
    mins = [args[3] for name, args in drv.calls if name == "cuDevSmResourceSplitByCount"]
    assert mins == [16, 64]


def test_close_destroys_everything_once_streams_first(monkeypatch):
    drv = use_fake_driver(monkeypatch, FakeDriver())
    split = green_ctx.create_green_split(0, 40)
    first_stream = split.first.stream_handle
    drv.calls.clear()
    split.close()
    assert split.closed and split.first.stream is None and split.second.stream is None
    assert not drv.live_ctx and not drv.live_streams
    destroys = [(n, a[0]) for n, a in drv.calls if n in ("cuStreamDestroy", "cuGreenCtxDestroy")]
    assert len(destroys) == 4
    # Each partition's stream goes before its context.
    kinds = [n for n, _ in destroys]
    assert kinds == ["cuStreamDestroy", "cuGreenCtxDestroy"] * 2
    assert ("cuStreamSynchronize", (first_stream,)) in drv.calls
    drv.calls.clear()
    split.close()
    with split:
        pass
    assert drv.calls == []


def test_garbage_collection_destroys(monkeypatch):
    drv = use_fake_driver(monkeypatch, FakeDriver())
    split = green_ctx.create_green_split(0, 40)
    assert drv.live_ctx
    del split
    gc.collect()
    assert not drv.live_ctx and not drv.live_streams


def test_failure_midway_destroys_what_was_created(monkeypatch):
    drv = use_fake_driver(monkeypatch, FakeDriver())
    real = drv.cuGreenCtxStreamCreate
    count = {"n": 0}

    def second_fails(ctx, flags, priority):
        count["n"] += 1
        if count["n"] == 2:
            return (FakeResult.CUDA_ERROR_NOT_SUPPORTED, None)
        return real(ctx, flags, priority)

    drv.cuGreenCtxStreamCreate = second_fails
    with pytest.raises(GreenContextError, match="cuGreenCtxStreamCreate failed") as info:
        green_ctx.create_green_split(0, 40)
    assert "does not support green contexts" in str(info.value)
    assert not drv.live_ctx and not drv.live_streams


def test_driver_refusal_is_translated(monkeypatch):
    drv = use_fake_driver(monkeypatch, FakeDriver())
    drv.fail["cuDevSmResourceSplitByCount"] = FakeResult.CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION
    with pytest.raises(GreenContextError) as info:
        green_ctx.create_green_split(0, 40)
    assert info.value.func == "cuDevSmResourceSplitByCount"
    assert not drv.live_ctx


def test_cleanup_errors_are_logged_not_raised(monkeypatch, caplog):
    drv = use_fake_driver(monkeypatch, FakeDriver())
    split = green_ctx.create_green_split(0, 40)
    drv.fail["cuGreenCtxDestroy"] = FakeResult.CUDA_ERROR_DEINITIALIZED
    drv.fail["cuStreamSynchronize"] = FakeResult.CUDA_ERROR_INVALID_HANDLE
    with caplog.at_level("DEBUG", logger="nanovllm.green"):
        split.close()  # must not raise
    assert split.closed and not drv.live_streams  # streams still destroyed
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert all("DEINITIALIZED" not in r.getMessage() for r in warnings)


def test_granularity_falls_back_to_documented_values(monkeypatch):
    use_fake_driver(monkeypatch, FakeDriver(total=108, min_size=0, align=0, cc=(8, 0)))
    info = green_ctx.query_sm_info(0)
    assert (info.min_partition_size, info.alignment, info.total_sms) == (4, 2, 108)
    assert info.compute_capability == (8, 0)


# ----------------------------------------------------------------------------------------------
# GPU tests: real partitions, checked with %smid.

SMID_BLOCKS = 2048
SMID_ITERS = 20000


def launch_smid(stream: torch.cuda.Stream, out: torch.Tensor) -> None:
    """Queue the %smid kernel on ``stream``, one block per element of ``out``."""
    from tests.smid import smid_probe

    with torch.cuda.stream(stream):
        smid_probe(out, SMID_ITERS)


def sm_ids(stream: torch.cuda.Stream) -> set[int]:
    """The set of SM ids that ran a many-block kernel launched eagerly on ``stream``."""
    out = torch.full((SMID_BLOCKS,), -1, dtype=torch.int32, device="cuda")
    stream.wait_stream(torch.cuda.current_stream())  # the fill above runs on the default stream
    launch_smid(stream, out)
    torch.cuda.synchronize()
    ids = set(out.tolist())
    assert -1 not in ids, "some blocks did not run"
    return ids


@pytest.mark.gpu
def test_gpu_is_available():
    ok, reason = green_ctx.is_available(0)
    assert ok, reason
    info = green_ctx.query_sm_info(0)
    assert info.total_sms == torch.cuda.get_device_properties(0).multi_processor_count


@pytest.mark.gpu
def test_gpu_partitions_are_disjoint_and_sized_as_reported():
    info = green_ctx.query_sm_info(0)
    expected = green_ctx.plan_sm_split(
        info.total_sms, 40, None, info.min_partition_size, info.alignment
    )
    with green_ctx.create_green_split(0, 40) as split:
        assert (split.first.sm_count, split.second.sm_count) == expected
        a, b = sm_ids(split.first.stream), sm_ids(split.second.stream)
        assert len(a) == split.first.sm_count
        assert len(b) == split.second.sm_count
        assert a.isdisjoint(b)
        assert len(a | b) == info.total_sms


@pytest.mark.gpu
def test_gpu_remainder_cannot_be_split_again():
    # Documents the driver quirk behind the single-split design (driver 580).
    drv = green_ctx.load_driver()
    with green_ctx.create_green_split(0, 64) as split:
        with pytest.raises(GreenContextError) as info:
            green_ctx.check(
                drv.cuDevSmResourceSplitByCount(1, split.second.resource, 0, 8),
                "cuDevSmResourceSplitByCount",
            )
        assert info.value.result_name == "CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION"


@pytest.mark.gpu
def test_gpu_close_is_idempotent_and_split_again_works():
    split = green_ctx.create_green_split(0, 16)
    split.close()
    split.close()
    assert split.first.stream is None
    with green_ctx.create_green_split(0, 24) as again:
        assert len(sm_ids(again.first.stream)) == again.first.sm_count
