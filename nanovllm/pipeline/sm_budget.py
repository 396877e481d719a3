"""SM counts of the pipeline's partitions: validation, the automatic shares, the split search's
candidates, and the cuBLAS SM budget of the matmuls issued for one partition.

Pure functions of the device's SM count and granularity (no driver calls), so the policy is
tested on any machine; ``GreenContextManager`` applies them to real partitions.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from collections.abc import Iterator

import torch

import green_ctx

logger = logging.getLogger("nanovllm.green")

ATTENTION_FIELD = "pipeline_attention_sm_count"
FFN_FIELD = "pipeline_ffn_sm_count"
AUTO_ATTENTION_FRACTION = 1 / 3


def _as_count(field: str, value: object) -> int | None:
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        count = operator.index(value)
    except TypeError:
        raise ValueError(
            f"{field}={value!r} is not an integer: pass a positive number of SMs "
            f"(e.g. {field}=16), or None to choose automatically"
        ) from None
    if count <= 0:
        raise ValueError(
            f"{field}={count} must be positive: pass a positive number of SMs "
            f"(e.g. {field}=16), or None to choose automatically"
        )
    return count


def validate_sm_counts(
    attention_sm_count: int | None,
    ffn_sm_count: int | None,
    total_sms: int | None = None,
    min_partition: int = 1,
) -> tuple[int | None, int | None]:
    """Check explicit SM counts; return them as ints. Raises ValueError naming the field.

    Counts must be positive integers (or None); with ``total_sms`` known, together at most the
    device's SMs, and each must leave ``min_partition`` SMs for the other partition.
    """
    a = _as_count(ATTENTION_FIELD, attention_sm_count)
    f = _as_count(FFN_FIELD, ffn_sm_count)
    if not total_sms:
        return a, f
    if a is not None and f is not None and a + f > total_sms:
        raise ValueError(
            f"{ATTENTION_FIELD}={a} + {FFN_FIELD}={f} = {a + f} exceeds the {total_sms} SMs of "
            f"this GPU: lower them so that they sum to at most {total_sms}, or set one to None "
            f"to give that partition the rest"
        )
    for field, value, other in ((ATTENTION_FIELD, a, "FFN"), (FFN_FIELD, f, "attention")):
        if value is not None and value > total_sms - min_partition:
            raise ValueError(
                f"{field}={value} leaves {total_sms - value} of this GPU's {total_sms} SMs for "
                f"the {other} partition, which needs at least {min_partition}: use at most "
                f"{total_sms - min_partition}"
            )
    return a, f


def default_attention_sm_count(total_sms: int, min_size: int, alignment: int) -> int:
    """The automatic attention share: about a third of the SMs, rounded down to the granularity."""
    target = green_ctx.round_down_sm_count(int(total_sms * AUTO_ATTENTION_FRACTION), alignment)
    return max(target, green_ctx.round_sm_count(min_size, min_size, alignment))


# The attention shares the automatic policy's split search tries (of 132 SMs: 24, 40, 64).
SEARCH_ATTENTION_FRACTIONS = (0.18, 0.30, 0.48)


def candidate_attention_sm_counts(total_sms: int, min_size: int, alignment: int) -> list[int]:
    """About a fifth, a third and a half of the SMs, each rounded to the granularity, leaving
    the FFN partition at least ``min_size``; duplicates dropped."""
    out: list[int] = []
    for fraction in SEARCH_ATTENTION_FRACTIONS:
        n = max(min_size, alignment * round(total_sms * fraction / alignment))
        if n not in out and total_sms - n >= min_size:
            out.append(n)
    return out


@contextlib.contextmanager
def set_cublas_sm_budget(n_sms: int | None, total_sms: int | None = None) -> Iterator[None]:
    """Within the block, let cuBLAS(Lt) pick kernels for ``n_sms`` SMs instead of the whole GPU.

    Uses ``torch._C._set_sm_carveout_experimental`` (SM_COUNT_TARGET = SMs - carveout) and
    restores the previous value on exit; a no-op (debug log) when torch lacks it, ``n_sms`` is
    None, or the SM count is unknown. The setting is process-wide, not per stream: wrap exactly
    the matmuls meant for one partition. During CUDA-graph capture the carveout in force when a
    matmul is captured is baked into the captured kernel choice. torch reads it on its cuBLASLt
    paths (and some CUTLASS kernels); a plain bf16 matmul may take the classic cuBLAS path
    unless ``torch.backends.cuda.preferred_blas_library("cublaslt")`` is set.
    """
    setter = getattr(torch._C, "_set_sm_carveout_experimental", None)
    getter = getattr(torch._C, "_get_sm_carveout_experimental", None)
    if n_sms is None or setter is None or getter is None:
        logger.debug(
            "cuBLAS SM budget not applied (n_sms=%s, torch support=%s)", n_sms, bool(setter)
        )
        yield
        return
    if total_sms is None:
        if not torch.cuda.is_available():
            logger.debug("cuBLAS SM budget not applied: no CUDA device to count SMs on")
            yield
            return
        total_sms = torch.cuda.get_device_properties(
            torch.cuda.current_device()
        ).multi_processor_count
    carveout = total_sms - n_sms
    previous = getter()
    setter(carveout if carveout > 0 else None)
    try:
        yield
    finally:
        setter(previous)
