"""Tensor-parallel linear layers. Each parameter carries a ``weight_loader`` that copies its shard
out of a full Hugging Face tensor, so the loader stays model-agnostic.

Inside ``bounded_gemms(num_sms)`` (the decode pipeline's FFN stage on its partition) the matmuls
of at least ``BOUNDED_MIN_ROWS`` rows run on a persistent Triton GEMM of ``num_sms`` programs
where it supports the operands (``kernels/triton_gemm.py``), cuBLAS elsewhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.utils.distributed import all_reduce, tp_rank, tp_world_size


def _check_shape(param: nn.Parameter, loaded: torch.Tensor, name: str) -> None:
    if param.shape != loaded.shape:
        raise ValueError(
            f"checkpoint tensor {name!r} has shape {tuple(loaded.shape)}, the model expects "
            f"{tuple(param.shape)}: the checkpoint does not match its config.json"
        )


# Below a few hundred rows the GEMMs are bound by reading the weights, and the bounded kernel's
# programs, one per output tile at most (N / 256 of them up to 128 rows), would read them with too
# few SMs: cuBLAS there.
BOUNDED_MIN_ROWS = 256
_gemm_sms: ContextVar[int | None] = ContextVar("nanovllm_gemm_sms", default=None)


@contextlib.contextmanager
def bounded_gemms(num_sms: int | None) -> Iterator[None]:
    """Within the block, linear layers run at most ``num_sms`` GEMM programs (None: no bound).
    Applies to the kernels issued (or captured into a CUDA graph) inside it."""
    token = _gemm_sms.set(num_sms)
    try:
        yield
    finally:
        _gemm_sms.reset(token)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, or the bounded GEMM inside ``bounded_gemms`` where it applies."""
    num_sms = _gemm_sms.get()
    if num_sms is not None and bias is None and x.dim() == 2 and x.shape[0] >= BOUNDED_MIN_ROWS:
        from nanovllm.kernels import triton_gemm

        if triton_gemm.supported(x, weight) is None:
            return triton_gemm.linear(x, weight, num_sms)
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
