"""CUDA Green Context helpers: split one GPU's SMs into two disjoint partitions.

A green context is a lightweight CUDA context that owns a subset of the GPU's SMs; work queued on
a stream of that context runs only on those SMs. This module wraps the CUDA driver API of
cuda-python (``cuda.bindings.driver``, or the older ``cuda.cuda``):

    cuDeviceGetDevResource(SM)            the whole device's SMs + partition granularity
    cuDevSmResourceSplitByCount(1, n)     ONE split: a group of >= n SMs + the remainder
    cuDevResourceGenerateDesc / cuGreenCtxCreate / cuGreenCtxStreamCreate   per partition
    cuStreamDestroy / cuGreenCtxDestroy   on close (idempotent)

Partition policy (see ``plan_sm_split``): the *first* partition is the split's group, rounded up
to the device granularity; the *second* is the remainder, so it always receives every SM the
first does not take -- no SM is left idle. Actual counts are read back from the driver.

Why one split: results of a split cannot be split again (re-splitting the remainder fails with
CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION on current drivers), and two independent splits of the
whole device (what ``torch.cuda.green_contexts.GreenContext.create`` does per call) can hand the
same SMs to both partitions.

Importing this module never needs a GPU or cuda-python; calling into the driver without them
raises ``GreenContextUnavailableError`` saying what is missing. Use ``is_available()`` to ask.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger("nanovllm.green")

INSTALL_HINT = "pip install cuda-python"
MIN_DRIVER_VERSION = 12040  # green contexts arrived in CUDA 12.4 (1000 * major + 10 * minor)
MIN_COMPUTE_CAPABILITY = (6, 0)  # the driver documents partition sizes from 6.x on

__all__ = [
    "GreenContextError",
    "GreenContextUnavailableError",
    "GreenPartition",
    "GreenSplit",
    "SmInfo",
    "check",
    "create_green_split",
    "default_granularity",
    "is_available",
    "load_driver",
    "plan_sm_split",
    "query_sm_info",
    "round_down_sm_count",
    "round_sm_count",
    "unmet_requirement",
]


# ----------------------------------------------------------------------------------------------
# Errors: every driver result goes through check(), the one place that turns codes into exceptions.


class GreenContextError(RuntimeError):
    """A CUDA driver call for green contexts failed (or green contexts cannot be used here)."""

    def __init__(self, func: str, result_name: str, code: int | None, hint: str = "") -> None:
        self.func = func
        self.result_name = result_name
        self.code = code
        self.hint = hint
        code_text = f" ({code})" if code is not None else ""
        msg = f"{func} failed: {result_name}{code_text}"
        super().__init__(f"{msg}. {hint}" if hint else msg)


class GreenContextUnavailableError(GreenContextError):
    """Something green contexts need is missing (CUDA torch, cuda-python, driver, GPU)."""

    def __init__(self, what: str, hint: str = "") -> None:
        RuntimeError.__init__(
            self, f"green contexts unavailable: {what}" + (f". {hint}" if hint else "")
        )
        self.func, self.result_name, self.code, self.hint = "green contexts", what, None, hint


# CUresult codes we explain; names are used when the bindings hand us a plain int.
_RESULT_NAMES = {
    1: "CUDA_ERROR_INVALID_VALUE",
    2: "CUDA_ERROR_OUT_OF_MEMORY",
    3: "CUDA_ERROR_NOT_INITIALIZED",
    4: "CUDA_ERROR_DEINITIALIZED",
    100: "CUDA_ERROR_NO_DEVICE",
    101: "CUDA_ERROR_INVALID_DEVICE",
    201: "CUDA_ERROR_INVALID_CONTEXT",
    400: "CUDA_ERROR_INVALID_HANDLE",
    500: "CUDA_ERROR_NOT_FOUND",
    709: "CUDA_ERROR_CONTEXT_IS_DESTROYED",
    801: "CUDA_ERROR_NOT_SUPPORTED",
    914: "CUDA_ERROR_INVALID_RESOURCE_TYPE",
    915: "CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION",
    917: "CUDA_ERROR_STREAM_DETACHED",
}

_HINTS = {
    "CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION": (
        "the SM split does not fit the device's partition granularity (see minSmPartitionSize / "
        "smCoscheduledAlignment), or a split result was split again; split the whole device once "
        "with a count that is a multiple of the granularity"
    ),
    "CUDA_ERROR_INVALID_RESOURCE_TYPE": "only CU_DEV_RESOURCE_TYPE_SM resources can be split",
    "CUDA_ERROR_NOT_SUPPORTED": (
        "this GPU or driver does not support green contexts (needs a CUDA >= 12.4 driver)"
    ),
    "CUDA_ERROR_NOT_FOUND": (
        "the driver lacks this entry point; update the NVIDIA driver (green context streams "
        "need a recent CUDA 12.x driver)"
    ),
    "CUDA_ERROR_NOT_INITIALIZED": "initialise CUDA first (torch.cuda.init() / cuInit(0))",
    "CUDA_ERROR_DEINITIALIZED": "the CUDA driver is shutting down (interpreter exit?)",
    "CUDA_ERROR_INVALID_DEVICE": "check the device index and CUDA_VISIBLE_DEVICES",
    "CUDA_ERROR_NO_DEVICE": "no CUDA device is visible (CUDA_VISIBLE_DEVICES?)",
    "CUDA_ERROR_STREAM_DETACHED": (
        "the stream's green context was destroyed (repartitioned or closed); use the new streams "
        "and re-capture CUDA graphs"
    ),
    "CUDA_ERROR_OUT_OF_MEMORY": "the device is out of memory",
}


def _result_name(err: Any) -> str:
    name = getattr(err, "name", None)  # CUresult is an int enum in every cuda-python version
    if isinstance(name, str):
        return name
    return _RESULT_NAMES.get(int(err), f"CUresult {int(err)}")


def check(result: Any, func: str) -> Any:
    """Unpack a cuda-python driver result, raising ``GreenContextError`` on failure.

    cuda-python returns ``(CUresult, *outputs)`` (or a bare ``CUresult`` for some calls). Returns
    None, the single output, or a tuple of outputs.
    """
    if isinstance(result, tuple):
        err, *values = result
    else:
        err, values = result, []
    code = int(err)
    if code != 0:
        name = _result_name(err)
        raise GreenContextError(func, name, code, _HINTS.get(name, ""))
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


# ----------------------------------------------------------------------------------------------
# Loading the driver bindings lazily, so that importing this module never fails.

_driver: Any = None


def load_driver() -> Any:
    """Return the cuda-python driver module, or raise ``GreenContextUnavailableError``."""
    global _driver
    if _driver is not None:
        return _driver
    errors = []
    for name in ("cuda.bindings.driver", "cuda.cuda"):  # new name first; cuda.cuda is <= 12.x
        try:
            module = __import__(name, fromlist=["_"])
        except Exception as e:  # ImportError, or a broken install raising something else
            errors.append(f"{name}: {e}")
            continue
        _driver = module
        return module
    raise GreenContextUnavailableError(
        "cuda-python is not installed",
        f"Install it with `{INSTALL_HINT}` (import errors: {'; '.join(errors)})",
    )


# ----------------------------------------------------------------------------------------------
# Pure partition arithmetic (no GPU needed; unit-tested on H100-like numbers).


def default_granularity(compute_capability: tuple[int, int]) -> tuple[int, int]:
    """(min partition size, alignment) from the CUDA driver docs' guideline per architecture.

    Used only when the bindings/driver do not report ``minSmPartitionSize`` and
    ``smCoscheduledAlignment`` themselves.
    """
    major = compute_capability[0]
    if major >= 9:
        return 8, 8
    if major == 8:
        return 4, 2
    if major == 7:
        return 2, 2
    return 1, 1


def round_sm_count(n: int, min_size: int, alignment: int) -> int:
    """Round a requested SM count up the way the driver does: >= min_size, multiple of alignment."""
    n = max(int(n), min_size)
    return -(-n // alignment) * alignment


def round_down_sm_count(n: int, alignment: int) -> int:
    """Largest multiple of alignment that is <= n."""
    return max(int(n), 0) // alignment * alignment


def plan_sm_split(
    total_sms: int,
    first: int | None,
    second: int | None,
    min_size: int,
    alignment: int,
) -> tuple[int, int]:
    """Predict ``(first, second)`` SM counts of one group+remainder split.

    The first partition is the split's group; the second is the remainder and gets every SM the
    first does not take (so leftovers when first + second < total go to the second):

    - ``first`` given: the group is ``first`` rounded up to the granularity.
    - only ``second`` given: the group is ``total - second`` rounded *down*, so the second
      partition gets at least what was asked.
    - the group is kept within [min_size, total - min_size] so both partitions are usable.

    Raises ValueError if neither is given or the device is too small for two partitions.
    """
    if first is None and second is None:
        raise ValueError("plan_sm_split needs at least one of first / second")
    min_group = round_sm_count(min_size, min_size, alignment)
    max_group = round_down_sm_count(total_sms - min_size, alignment)
    if max_group < min_group:
        raise ValueError(
            f"{total_sms} SMs cannot hold two partitions of at least {min_size} SMs "
            f"(multiples of {alignment})"
        )
    if first is not None:
        group = round_sm_count(first, min_size, alignment)
    else:
        group = round_down_sm_count(total_sms - second, alignment)
    group = min(max(group, min_group), max_group)
    return group, total_sms - group


# ----------------------------------------------------------------------------------------------
# Device queries.


@dataclass(frozen=True)
class SmInfo:
    """What the driver says about one device's SMs."""

    device_index: int
    total_sms: int
    min_partition_size: int
    alignment: int
    compute_capability: tuple[int, int]
    driver_version: int  # 1000 * major + 10 * minor

    def describe(self) -> str:
        major, minor = divmod(self.driver_version // 10, 100)
        return (
            f"{self.total_sms} SMs (cc {self.compute_capability[0]}.{self.compute_capability[1]}), "
            f"partitions of >= {self.min_partition_size} SMs in multiples of {self.alignment}, "
            f"CUDA driver {major}.{minor}"
        )


def _device_index(device: torch.device | int | str | None) -> int:
    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"green contexts need a CUDA device, got {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


def _require_basics() -> Any:
    """Return the driver module, or raise naming everything that is missing at once."""
    missing, fixes = [], []
    if not torch.cuda.is_available():
        build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU"
        missing.append(f"{build} (torch {torch.__version__})")
        fixes.append("an NVIDIA GPU and a CUDA build of torch")
    try:
        drv = load_driver()
    except GreenContextUnavailableError:
        missing.append("cuda-python is not installed")
        fixes.append(f"cuda-python (`{INSTALL_HINT}`)")
    if missing:
        raise GreenContextUnavailableError("; ".join(missing), "Needs " + " and ".join(fixes))
    if not hasattr(drv, "cuGreenCtxCreate") or not hasattr(drv, "cuDevSmResourceSplitByCount"):
        raise GreenContextUnavailableError(
            "these cuda-python bindings have no green-context API",
            f"Upgrade them: `{INSTALL_HINT} -U` (CUDA >= 12.4 bindings)",
        )
    return drv


def _sm_resource(drv: Any, dev: Any) -> Any:
    sm_type = drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
    return check(drv.cuDeviceGetDevResource(dev, sm_type), "cuDeviceGetDevResource")


def query_sm_info(device: torch.device | int | str | None = None) -> SmInfo:
    """Read the device's SM resource and granularity through the driver.

    Raises ``GreenContextUnavailableError`` when torch CUDA, cuda-python or the green-context
    entry points are missing, ``GreenContextError`` when a driver call fails.
    """
    drv = _require_basics()
    index = _device_index(device)
    check(drv.cuInit(0), "cuInit")  # torch already did it in-process; harmless and idempotent
    dev = check(drv.cuDeviceGet(index), "cuDeviceGet")
    version = int(check(drv.cuDriverGetVersion(), "cuDriverGetVersion"))
    attr = drv.CUdevice_attribute
    major = int(
        check(
            drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
            "cuDeviceGetAttribute",
        )
    )
    minor = int(
        check(
            drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev),
            "cuDeviceGetAttribute",
        )
    )
    sm = _sm_resource(drv, dev).sm
    # CUDA 13 bindings report the granularity; 12.x bindings have only smCount (or report 0):
    # fall back to the documented per-architecture guideline.
    default_min, default_align = default_granularity((major, minor))
    min_size = int(getattr(sm, "minSmPartitionSize", 0) or default_min)
    alignment = int(getattr(sm, "smCoscheduledAlignment", 0) or default_align)
    return SmInfo(index, int(sm.smCount), min_size, alignment, (major, minor), version)


def unmet_requirement(info: SmInfo) -> str | None:
    """Why ``info``'s device cannot hold two green partitions, or None if it can."""
    if info.driver_version < MIN_DRIVER_VERSION:
        major, minor = divmod(info.driver_version // 10, 100)
        return f"the CUDA driver supports CUDA {major}.{minor}; green contexts need >= 12.4"
    if info.compute_capability < MIN_COMPUTE_CAPABILITY:
        cc = ".".join(map(str, info.compute_capability))
        return f"compute capability {cc} is below {MIN_COMPUTE_CAPABILITY[0]}.0"
    if info.total_sms < 2 * info.min_partition_size:
        return (
            f"{info.total_sms} SMs are too few for two partitions of at least "
            f"{info.min_partition_size} SMs"
        )
    return None


def is_available(device: torch.device | int | str | None = None) -> tuple[bool, str]:
    """(ok, reason): can this process split ``device`` into two green-context partitions?

    Checks, in order: torch CUDA, cuda-python, green-context bindings, driver >= 12.4, compute
    capability, enough SMs for two partitions. Never raises.
    """
    try:
        info = query_sm_info(device)
    except GreenContextError as e:
        return False, str(e)
    except Exception as e:  # e.g. cuda-python present but libcuda missing
        return False, f"green contexts unavailable: {type(e).__name__}: {e}"
    problem = unmet_requirement(info)
    if problem:
        return False, problem
    return True, f"green contexts available on device {info.device_index}: {info.describe()}"


# ----------------------------------------------------------------------------------------------
# Creating and destroying partitions.


@dataclass(eq=False)
class GreenPartition:
    """One SM partition: its actual SM count and a torch stream bound to its green context.

    ``stream`` is None once the owning ``GreenSplit`` is closed.
    """

    sm_count: int
    stream: torch.cuda.Stream | None
    stream_handle: int
    resource: Any = field(repr=False, default=None)  # the CUdevResource, for diagnostics


def _ensure_primary_context(device_index: int) -> None:
    # cuGreenCtxCreate retains the device's primary context; if none is active it would create and
    # later tear one down (slow), so make sure torch's (the runtime's) primary context exists.
    torch.cuda.synchronize(device_index)


def _wrap_stream(handle: int, device_index: int) -> torch.cuda.Stream:
    return torch.cuda.ExternalStream(handle, device=torch.device("cuda", device_index))


def _destroy(drv: Any, handles: list[tuple[str, Any]]) -> None:
    """Destroy (kind, handle) pairs newest first, emptying the list; logs failures, never raises.

    Newest first puts each stream before its green context: cuGreenCtxDestroy does not destroy
    streams, and after it only cuStreamDestroy is still valid on them. Each stream is drained
    first so that no kernel is still running on a partition that is being torn down.
    """
    while handles:
        kind, handle = handles.pop()
        try:
            if kind == "stream":
                try:
                    check(drv.cuStreamSynchronize(handle), "cuStreamSynchronize")
                finally:
                    check(drv.cuStreamDestroy(handle), "cuStreamDestroy")
            else:
                check(drv.cuGreenCtxDestroy(handle), "cuGreenCtxDestroy")
        except GreenContextError as e:
            # At interpreter exit the driver may already be gone: expected, not worth a warning.
            quiet = e.result_name == "CUDA_ERROR_DEINITIALIZED"
            logger.log(logging.DEBUG if quiet else logging.WARNING, "green context cleanup: %s", e)
        except Exception as e:  # never let cleanup crash (e.g. bindings torn down at exit)
            logger.debug("green context cleanup: %r", e)


class GreenSplit:
    """Two disjoint green-context partitions of one device, made by one driver split.

    ``first`` is the split's group, ``second`` the remainder. ``close()`` (also ``with`` and
    garbage collection / interpreter exit) destroys streams and contexts exactly once. After
    close, drop CUDA graphs captured on these streams: their nodes belong to the destroyed
    contexts.
    """

    def __init__(
        self,
        info: SmInfo,
        first: GreenPartition,
        second: GreenPartition,
        drv: Any,
        handles: list[tuple[str, Any]],
    ) -> None:
        self.info = info
        self.first = first
        self.second = second
        # weakref.finalize runs at most once: on close(), on garbage collection, or at exit.
        self._finalizer = weakref.finalize(self, _destroy, drv, handles)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        if self.closed:
            return
        self.first.stream = None
        self.second.stream = None
        self._finalizer()

    def __enter__(self) -> GreenSplit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"GreenSplit(device={self.info.device_index}, first={self.first.sm_count}, "
            f"second={self.second.sm_count}, total={self.info.total_sms}, {state})"
        )


def _create_partition(
    drv: Any, dev: Any, device_index: int, resource: Any, handles: list[tuple[str, Any]]
) -> GreenPartition:
    desc = check(drv.cuDevResourceGenerateDesc([resource], 1), "cuDevResourceGenerateDesc")
    flags = drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM  # required by 12.4 drivers
    ctx = check(drv.cuGreenCtxCreate(desc, dev, flags), "cuGreenCtxCreate")
    handles.append(("ctx", ctx))  # registered at once, so that a later failure destroys it
    non_blocking = drv.CUstream_flags.CU_STREAM_NON_BLOCKING  # the only flag the API accepts
    stream = check(drv.cuGreenCtxStreamCreate(ctx, non_blocking, 0), "cuGreenCtxStreamCreate")
    handles.append(("stream", stream))
    handle = int(stream)
    return GreenPartition(
        sm_count=int(resource.sm.smCount),
        stream=_wrap_stream(handle, device_index),
        stream_handle=handle,
        resource=resource,
    )


def create_green_split(
    device: torch.device | int | str | None,
    first_sm_count: int | None,
    second_sm_count: int | None = None,
) -> GreenSplit:
    """Split ``device`` once into ``first`` (group) and ``second`` (remainder) partitions.

    Counts follow ``plan_sm_split``: the first is rounded up to the granularity, the second gets
    all remaining SMs (at least ``second_sm_count`` when only that is given). The actual counts
    are ``split.first.sm_count`` / ``split.second.sm_count``.

    Raises ``GreenContextUnavailableError`` if green contexts cannot be used here, ValueError if
    the device is too small for the request, ``GreenContextError`` if the driver refuses.
    """
    info = query_sm_info(device)
    problem = unmet_requirement(info)
    if problem:
        raise GreenContextUnavailableError(problem)
    group, expected_rest = plan_sm_split(
        info.total_sms, first_sm_count, second_sm_count, info.min_partition_size, info.alignment
    )
    drv = load_driver()
    dev = check(drv.cuDeviceGet(info.device_index), "cuDeviceGet")
    _ensure_primary_context(info.device_index)
    whole = _sm_resource(drv, dev)
    # One split call: one group of `group` SMs + the remainder. Both come from the same split
    # instance, which is what guarantees that they are disjoint.
    groups, n_groups, remainder = check(
        drv.cuDevSmResourceSplitByCount(1, whole, 0, group), "cuDevSmResourceSplitByCount"
    )
    if int(n_groups) != 1:
        raise GreenContextError(
            "cuDevSmResourceSplitByCount",
            f"returned {int(n_groups)} groups instead of 1",
            None,
            f"cannot carve {group} of {info.total_sms} SMs",
        )
    handles: list[tuple[str, Any]] = []
    try:
        first = _create_partition(drv, dev, info.device_index, groups[0], handles)
        second = _create_partition(drv, dev, info.device_index, remainder, handles)
    except BaseException:
        _destroy(drv, handles)
        raise
    if (first.sm_count, second.sm_count) != (group, expected_rest):
        logger.info(
            "driver split %d SMs as %d + %d (predicted %d + %d)",
            info.total_sms,
            first.sm_count,
            second.sm_count,
            group,
            expected_rest,
        )
    return GreenSplit(info, first, second, drv, handles)
