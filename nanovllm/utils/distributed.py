"""Tensor-parallel rank and world size; 1 and 0 when torch.distributed is not initialised."""

import torch.distributed as dist


def tp_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def tp_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce(x):
    if tp_world_size() > 1:
        dist.all_reduce(x)
    return x
