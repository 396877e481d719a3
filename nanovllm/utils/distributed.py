"""The tensor-parallel rank and world size that layers read while they are built.

Layers record their rank and world size at construction and decide at run time from those
values, never from ``torch.distributed``'s global state: a single-GPU engine built while a
tensor-parallel engine is alive in the same process must not shard itself or join its
collectives. ``ModelRunner`` builds the model inside ``tensor_parallel(rank, size)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

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
