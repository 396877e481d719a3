"""The kernels each pipeline stage runs on its SM partition.

- FFN stage: with ``pipeline_ffn_gemm="triton"``, GEMMs of at least ``BOUNDED_MIN_ROWS`` rows run
  on a persistent Triton GEMM with one program per partition SM (``kernels/triton_gemm.py``),
  where it supports the operands; the rest on cuBLAS, told the partition's SM count. Persistent
  full-GPU GEMMs launch one block per SM and would run in two waves on a partition.
- Attention stage: with ``pipeline_attention_kernel="tma"`` and the Triton backend, the
  copy-engine decode kernel where the GPU and the model's shapes allow it; else the engine's own
  backend.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from nanovllm.attention import AttentionBackend
from nanovllm.layers.linear import gemm_override

logger = logging.getLogger(__name__)

# Below a few hundred rows the GEMMs are bound by reading the weights, and the bounded kernel's
# programs, one per output tile at most, would read them with too few SMs: cuBLAS there.
BOUNDED_MIN_ROWS = 256


def _bounded_gemm(num_sms: int, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor | None:
    if bias is not None or x.dim() != 2 or x.shape[0] < BOUNDED_MIN_ROWS:
        return None
    from nanovllm.kernels import triton_gemm

    if triton_gemm.supported(x, weight) is not None:
        return None
    return triton_gemm.linear(x, weight, num_sms)


@contextlib.contextmanager
def bounded_gemms(num_sms: int | None) -> Iterator[None]:
    """Within the block, large linear-layer GEMMs run at most ``num_sms`` programs (None: no
    bound)."""
    fn = functools.partial(_bounded_gemm, num_sms) if num_sms is not None else None
    with gemm_override(fn):
        yield


@dataclass(frozen=True)
class StageKernels:
    """What one split's stages run: the attention backend (and its kernel's name) and whether
    the FFN stage's large GEMMs are bounded to its partition."""

    attention: AttentionBackend
    attention_kernel: str  # "triton", "tma", or the engine backend's name
    ffn_gemm: str  # "triton" (bounded persistent GEMM) or "cublas"

    def describe(self) -> dict:
        return {"attention_stage": self.attention_kernel, "ffn_stage_gemm": self.ffn_gemm}


def choose_stage_kernels(
    backend: AttentionBackend,
    attention_kernel: str,
    ffn_gemm: str,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> tuple[StageKernels, str]:
    """The kernels for a split's stages and, when the asked-for attention kernel cannot run,
    why. ``q`` is a [rows, num_heads, head_dim] buffer the attention stage reads; ``k_cache``
    and ``v_cache`` one layer's cache."""
    why = ""
    kernel = backend.name
    attention = backend
    if attention_kernel == "tma":
        if backend.name != "triton":
            why = f"the {backend.name} attention backend"
        else:
            from nanovllm.kernels import tma_decode

            why = tma_decode.supported(q, k_cache, v_cache) or ""
        if not why:
            from nanovllm.attention.triton_backend import TritonAttentionBackend

            attention, kernel = TritonAttentionBackend(decode_kernel="tma"), "tma"
    return StageKernels(attention, kernel, ffn_gemm), why


def log_stage_kernels(kernels: StageKernels, why: str, attention_sms: int, asked: str) -> None:
    if asked == "tma" and why:
        logger.info(
            "decode pipeline: %s attention on %d SMs: not TMA, %s",
            kernels.attention_kernel,
            attention_sms,
            why,
        )
    else:
        logger.info(
            "decode pipeline: %s attention on %d SMs; FFN-stage GEMMs on %s",
            kernels.attention_kernel,
            attention_sms,
            "a persistent Triton GEMM bounded to the partition (cuBLAS below "
            f"{BOUNDED_MIN_ROWS} rows)"
            if kernels.ffn_gemm == "triton"
            else "cuBLAS told the partition's SM count",
        )
