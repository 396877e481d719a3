"""The tensor-parallel rank and world size that layers read while they are built, and joining
and leaving the process group (leaving is bounded in time: see ``leave_process_group``).

Layers record their rank and world size at construction and decide at run time from those
values, never from ``torch.distributed``'s global state: a single-GPU engine built while a
tensor-parallel engine is alive in the same process must not shard itself or join its
collectives. ``ModelRunner`` builds the model inside ``tensor_parallel(rank, size)``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

SYNC_TIMEOUT_S = 10.0  # an idle GPU synchronises at once; one that does not waits on a collective
LEAVE_TIMEOUT_S = 15.0  # destroying or aborting the process group (NCCL: about a second)
RELEASE_TIMEOUT_S = 10.0  # a step stopped in symmetric-memory barriers runs out in milliseconds

_rank, _size = 0, 1
# The process's symmetric-memory all-reduce (utils/symm_all_reduce.py), tied to its process
# group as torch.distributed's own state is; None: every all-reduce goes to NCCL (or gloo).
_symmetric = None


def tp_world_size() -> int:
    return _size


def tp_rank() -> int:
    return _rank


@contextlib.contextmanager
def tensor_parallel(rank: int, world_size: int) -> Iterator[None]:
    """Layers built inside shard themselves as ``rank`` of ``world_size``."""
    global _rank, _size
    saved = _rank, _size
    _rank, _size = rank, world_size
    try:
        yield
    finally:
        _rank, _size = saved


# (x) -> the sum of x over the group; set within ``all_reduce_through``.
AllReduceFn = Callable[[torch.Tensor], torch.Tensor]
_through: ContextVar[AllReduceFn | None] = ContextVar("nanovllm_all_reduce", default=None)


@contextlib.contextmanager
def all_reduce_through(fn: AllReduceFn | None) -> Iterator[None]:
    """Within the block (this thread's kernels, issued or captured), every all-reduce goes to
    ``fn``: a micro-batch on a stream of its own needs a communicator of its own, since one
    symmetric buffer or NCCL communicator serves one stream at a time. None: the default."""
    token = _through.set(fn)
    try:
        yield
    finally:
        _through.reset(token)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the tensor-parallel group (callers check their own world size). Use the
    returned tensor: the symmetric-memory path returns a new one, NCCL sums ``x`` in place."""
    fn = _through.get()
    if fn is not None:
        return fn(x)
    if _symmetric is not None and _symmetric.accepts(x):
        return _symmetric(x)
    dist.all_reduce(x)
    return x


def use_symmetric_all_reduce(symmetric) -> None:
    """Route the all-reduces it accepts to ``symmetric`` (None: all to the process group)."""
    global _symmetric
    if _symmetric is not None and _symmetric is not symmetric:
        _symmetric.close()
    _symmetric = symmetric


def init_process_group(rank: int, world_size: int, store, device: torch.device) -> None:
    if device.type == "cuda":
        dist.init_process_group(
            "nccl", store=store, rank=rank, world_size=world_size, device_id=device
        )
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)


def run_with_deadline(fn: Callable[[], object], timeout_s: float, what: str) -> bool:
    """Run ``fn()`` in a daemon thread and wait at most ``timeout_s``: True if it returned (an
    exception is logged, not raised). A blocking C call cannot be interrupted, so one that
    outlives the deadline is logged as forced and left running in the background."""
    done = threading.Event()

    def target() -> None:
        try:
            fn()
        except Exception:  # noqa: BLE001 - shut-down goes on; the error is in the log
            logger.exception("%s failed", what)
        finally:
            done.set()

    threading.Thread(target=target, name=f"nanovllm-{what}", daemon=True).start()
    if done.wait(timeout_s):
        return True
    logger.error(
        "tensor-parallel shut-down forced: %s did not finish within %.0f s; going on without it "
        "(it stays blocked in the background)",
        what,
        timeout_s,
    )
    return False


def synchronize_within(device: torch.device, timeout_s: float | None = None) -> bool:
    """``torch.cuda.synchronize(device)``, bounded: False if the GPU did not go idle in time (a
    stream waits on a collective whose peer left). Then do not free cached memory either: the
    allocator's ``cudaFree`` would wait for the same stream while holding its lock."""
    timeout_s = SYNC_TIMEOUT_S if timeout_s is None else timeout_s
    what = f"synchronizing {device}"
    return run_with_deadline(lambda: torch.cuda.synchronize(device), timeout_s, what)


def leave_process_group(abort: bool = False, timeout_s: float | None = None) -> bool:
    """Leave the default process group, within ``timeout_s``: True if it is gone.

    NCCL: ``destroy_process_group`` finalizes the communicator, which flushes its pending work
    and then waits, with no time limit, until every CUDA graph that captured one of its
    collectives is destroyed (``commDestroySync`` in NCCL's init.cc); ``abort`` waits for them as
    well. So the caller first drops its graphs and checks that the GPU is idle (else it aborts:
    the abort flag stops NCCL kernels that wait for a peer). Should a step still block, it is
    logged and left behind; the process group then stays registered (``dist.is_initialized()``)
    until that step ends, so no new group can start in this process before.

    With symmetric-memory all-reduces an abort also plays the stopped peers' part in their
    barriers, which nothing else ends (``SymmetricAllReduce.release_waiters``), until this GPU
    is idle."""
    symmetric, stop, releaser = _symmetric, threading.Event(), None
    if abort and symmetric is not None:

        def release() -> None:
            try:
                symmetric.release_waiters(stop, RELEASE_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - leaving goes on
                logger.exception("releasing the symmetric-memory barriers failed")

        releaser = threading.Thread(target=release, name="nanovllm-release-barriers", daemon=True)
        releaser.start()
    try:
        return _leave(abort, timeout_s)
    finally:
        if releaser is not None:
            device = symmetric.buffer.device
            if device.type == "cuda" and synchronize_within(device, RELEASE_TIMEOUT_S):
                logger.info("the stopped step ran out: %s is idle", device)
            stop.set()
            releaser.join(RELEASE_TIMEOUT_S)
        use_symmetric_all_reduce(None)  # its buffer belongs to this group


def _leave(abort: bool, timeout_s: float | None) -> bool:
    if not dist.is_initialized():
        return True
    timeout_s = LEAVE_TIMEOUT_S if timeout_s is None else timeout_s
    backend = dist.get_backend()

    def leave() -> None:
        try:
            if abort and backend == "nccl":
                dist.distributed_c10d._abort_process_group()  # in-flight collectives may never end
            else:
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - leaving must not mask the error being handled
            logger.exception("leaving the tensor-parallel process group failed")
        if dist.is_initialized():  # forget it anyway, so that a new engine can start
            dist.destroy_process_group()

    verb = "aborting" if abort and backend == "nccl" else "destroying"
    left = run_with_deadline(leave, timeout_s, f"{verb} the {backend} process group")
    return left and not dist.is_initialized()


def cpu_threads_per_rank(world_size: int) -> int:
    """On CPU the ranks share the cores: oversubscribed OpenMP threads spin against each other
    (several times slower on small machines)."""
    return max(1, (os.cpu_count() or 1) // world_size)
