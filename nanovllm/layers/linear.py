"""Tensor-parallel linear layers. Each parameter carries a ``weight_loader`` that copies its shard
out of a full Hugging Face tensor, so the loader stays model-agnostic.

Every layer's matmul goes through ``linear()``. Inside ``gemm_override(fn)`` it first offers the
call to ``fn`` (for example the decode pipeline's GEMM bounded to its SM partition), which
returns a result or None to leave the call to ``F.linear``. The override applies to the kernels
issued (or captured into a CUDA graph) inside the block, on this thread only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.distributed import all_reduce, tp_rank, tp_world_size

# (x, weight, bias) -> output, or None to use F.linear
GemmOverride = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor | None]


def _check_shape(param: nn.Parameter, loaded: torch.Tensor, name: str) -> None:
    if param.shape != loaded.shape:
        raise ValueError(
            f"checkpoint tensor {name!r} has shape {tuple(loaded.shape)}, the model expects "
            f"{tuple(param.shape)}: the checkpoint does not match its config.json"
        )


_override: ContextVar[GemmOverride | None] = ContextVar("nanovllm_gemm_override", default=None)


@contextlib.contextmanager
def gemm_override(fn: GemmOverride | None) -> Iterator[None]:
    """Within the block, linear layers offer their matmul to ``fn`` first (None: no override)."""
    token = _override.set(fn)
    try:
        yield
    finally:
        _override.reset(token)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, unless an override inside ``gemm_override`` takes the call."""
    fn = _override.get()
    if fn is not None:
        out = fn(x, weight, bias)
        if out is not None:
            return out
    return F.linear(x, weight, bias)


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int | None):
        super().__init__()
        self.tp_dim = tp_dim
        self.tp_rank, self.tp_size = tp_rank(), tp_world_size()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param, loaded, name, shard_id=None):
        if self.tp_dim is not None and param.dim() > self.tp_dim and self.tp_size > 1:
            size = param.shape[self.tp_dim]
            loaded = loaded.narrow(self.tp_dim, self.tp_rank * size, size)
        _check_shape(param, loaded, name)
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, output_size, bias, tp_dim=None)


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size, output_size // tp_world_size(), bias, tp_dim=0)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs packed in one weight (gate_proj + up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param, loaded, name, shard_id=None):
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        part = param.data.narrow(0, offset, size)
        loaded = loaded.narrow(0, self.tp_rank * size, size) if self.tp_size > 1 else loaded
        _check_shape(part, loaded, name)
        part.copy_(loaded)


class QKVParallelLinear(ColumnParallelLinear):
    """q_proj, k_proj and v_proj packed in one weight; each rank holds its heads of each."""

    def __init__(self, hidden_size, head_dim, num_heads, num_kv_heads, bias: bool = False):
        tp = tp_world_size()
        self.head_dim = head_dim
        self.num_heads, self.num_kv_heads = num_heads // tp, num_kv_heads // tp
        total = (num_heads + 2 * num_kv_heads) * head_dim
        super().__init__(hidden_size, total, bias)

    def weight_loader(self, param, loaded, name, shard_id=None):
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}[
            shard_id
        ]
        part = param.data.narrow(0, offset, size)
        loaded = loaded.narrow(0, self.tp_rank * size, size) if self.tp_size > 1 else loaded
        _check_shape(part, loaded, name)
        part.copy_(loaded)


class RowParallelLinear(LinearBase):
    """Input split across ranks; partial products summed by an all-reduce. The bias is added
    once, after the reduction."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__(input_size // tp_world_size(), output_size, bias, tp_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        if self.tp_size > 1:
            y = all_reduce(y)
        return y + self.bias if self.bias is not None else y
