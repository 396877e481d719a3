"""The tensor-parallel rank and world size that layers read while they are built, and joining
and leaving the process group.

Layers record their rank and world size at construction and decide at run time from those
values, never from ``torch.distributed``'s global state: a single-GPU engine built while a
tensor-parallel engine is alive in the same process must not shard itself or join its
collectives. ``ModelRunner`` builds the model inside ``tensor_parallel(rank, size)``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_rank, _size = 0, 1


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


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the tensor-parallel group, in place (callers check their own world size)."""
    dist.all_reduce(x)
    return x


def init_process_group(rank: int, world_size: int, store, device: torch.device) -> None:
    if device.type == "cuda":
        dist.init_process_group(
            "nccl", store=store, rank=rank, world_size=world_size, device_id=device
        )
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)


def leave_process_group(abort: bool = False) -> None:
    if not dist.is_initialized():
        return
    try:
        if abort and dist.get_backend() == "nccl":
            dist.distributed_c10d._abort_process_group()  # in-flight collectives may never end
        else:
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - leaving must not mask the error being handled
        logger.exception("leaving the tensor-parallel process group failed")
    if dist.is_initialized():  # forget it anyway, so that a new engine can start
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            logger.exception("destroying the tensor-parallel process group failed")


def cpu_threads_per_rank(world_size: int) -> int:
    """On CPU the ranks share the cores: oversubscribed OpenMP threads spin against each other
    (several times slower on small machines)."""
    return max(1, (os.cpu_count() or 1) // world_size)
