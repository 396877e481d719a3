"""GreenContextManager: the attention and FFN SM partitions of one GPU, and their streams.

Partition policy
----------------
One driver split makes a *group* and a *remainder* (see ``green_ctx.plan_sm_split``). By default
the attention partition is the group and the FFN partition the remainder (``group="ffn"`` swaps
them). Hence:

- ``attention_sm_count=a`` is rounded up to the device granularity (multiples of 8 on H100).
- The FFN partition receives every SM the attention partition does not take. If ``a + f`` is
  less than the device's SMs, the leftover SMs go to the FFN partition (the compute-bound
  stage, which benefits most); none is left idle. If rounding ``a`` up leaves fewer than ``f``
  SMs, the FFN partition gets fewer than asked and a warning says so.
- Only ``ffn_sm_count=f`` given: attention gets ``total - f`` rounded down, FFN the rest (>= f).
- Neither given (automatic): attention gets about a third of the SMs, rounded down to the
  granularity (40 of 132 on H100), FFN the rest (92): decode attention is memory-bound and needs
  fewer SMs than the FFN GEMMs.

The actual counts are always those reported by the driver (``attention_sms`` / ``ffn_sms``).

Without green contexts (no GPU, no cuda-python, old driver, too few SMs) the manager does not
raise: ``available`` is False, ``reason`` says why (logged once), and the streams are None.
Invalid explicit counts are a configuration error and do raise ``ValueError``.
"""

from __future__ import annotations

import contextlib
import logging

import torch

import green_ctx
from green_ctx import GreenContextError, GreenSplit
from nanovllm.pipeline.sm_budget import (
    candidate_attention_sm_counts,
    default_attention_sm_count,
    set_cublas_sm_budget,
    validate_sm_counts,
)

logger = logging.getLogger("nanovllm.green")

_logged_reasons: set[str] = set()  # unavailability is logged once per process per reason


def _log_once(level: int, message: str) -> None:
    if message not in _logged_reasons:
        _logged_reasons.add(message)
        logger.log(level, message)


class GreenContextManager:
    """Owns the attention and FFN green-context partitions of one device.

    Attributes: ``available``, ``reason`` ("" when available), ``total_sms``, ``attention_sms``,
    ``ffn_sms`` (actual counts, 0 when unavailable), ``attention_stream`` / ``ffn_stream``
    (torch streams, None when unavailable or closed) and ``generation``, the number of
    re-partitions so far. CUDA graphs captured on a partition's streams must be dropped before
    ``adjust_sm_allocation`` destroys them: the owner of the graphs does that first
    (``PipelineScheduler.repartition``).
    """

    def __init__(
        self,
        device: torch.device | int = 0,
        attention_sm_count: int | None = None,
        ffn_sm_count: int | None = None,
        *,
        group: str = "attention",
    ) -> None:
        if group not in ("attention", "ffn"):
            raise ValueError(f"group={group!r} must be 'attention' or 'ffn'")
        self.group = group
        self.generation = 0
        self.available = False
        self.reason = ""
        self.total_sms = 0
        self._split: GreenSplit | None = None
        self._closed = False
        self._min_partition = 1
        self._alignment = 1
        self.requested_attention_sm_count, self.requested_ffn_sm_count = validate_sm_counts(
            attention_sm_count, ffn_sm_count
        )

        self.device_index = self._probe(device)
        validate_sm_counts(
            attention_sm_count, ffn_sm_count, self.total_sms or None, self._min_partition
        )
        if self.reason:
            return
        try:
            self._split = self._create(
                self.requested_attention_sm_count, self.requested_ffn_sm_count
            )
        except GreenContextError as e:
            self._unavailable(str(e))
            return
        self.available = True
        self._log_split()

    # -- setup ---------------------------------------------------------------------------------

    def _unavailable(self, reason: str) -> None:
        self.available = False
        self.reason = reason
        _log_once(
            logging.WARNING,
            f"pipeline SM partitioning disabled: {reason}",
        )

    def _probe(self, device: torch.device | int) -> int | None:
        """Fill total_sms and the granularity; record why green contexts cannot be used, if so."""
        if isinstance(device, int):
            index = device
        else:
            device = torch.device(device)
            if device.type != "cuda":
                self._unavailable(f"device {device} is not a CUDA device")
                return None
            index = device.index
        info = None
        try:
            info = green_ctx.query_sm_info(index)
            problem = green_ctx.unmet_requirement(info)
        except GreenContextError as e:
            problem = str(e)
        except Exception as e:  # e.g. cuda-python installed but libcuda missing
            problem = f"{type(e).__name__}: {e}"
        if info is not None:
            self.total_sms = info.total_sms
            self._min_partition, self._alignment = info.min_partition_size, info.alignment
            index = info.device_index
        elif torch.cuda.is_available():
            # No driver bindings, but torch sees the GPU: learn its SM count anyway, so that
            # impossible counts are still reported as configuration errors.
            index = torch.cuda.current_device() if index is None else index
            props = torch.cuda.get_device_properties(index)
            self.total_sms = props.multi_processor_count
            self._min_partition, self._alignment = green_ctx.default_granularity(
                (props.major, props.minor)
            )
        if problem:
            self._unavailable(problem)
        return index

    def _create(self, attention: int | None, ffn: int | None) -> GreenSplit:
        if attention is None and ffn is None:
            attention = default_attention_sm_count(
                self.total_sms, self._min_partition, self._alignment
            )
        first, second = (attention, ffn) if self.group == "attention" else (ffn, attention)
        return green_ctx.create_green_split(self.device_index, first, second)

    def _log_split(self) -> None:
        def req(n: int | None) -> str:
            return "auto" if n is None else str(n)

        ra, rf = self.requested_attention_sm_count, self.requested_ffn_sm_count
        logger.info(
            "green contexts on cuda:%s (generation %d): attention %d SMs (requested %s), "
            "ffn %d SMs (requested %s), of %d",
            self.device_index,
            self.generation,
            self.attention_sms,
            req(ra),
            self.ffn_sms,
            req(rf),
            self.total_sms,
        )
        for name, got, wanted in (("attention", self.attention_sms, ra), ("ffn", self.ffn_sms, rf)):
            if wanted is not None and got < wanted:
                logger.warning(
                    "%s partition got %d SMs, fewer than the %d requested: partitions come in "
                    "multiples of %d SMs (at least %d) and the other partition was rounded up",
                    name,
                    got,
                    wanted,
                    self._alignment,
                    self._min_partition,
                )

    # -- partitions ----------------------------------------------------------------------------

    def _partition(self, name: str) -> green_ctx.GreenPartition | None:
        if self._split is None:
            return None
        return self._split.first if name == self.group else self._split.second

    @property
    def attention_stream(self) -> torch.cuda.Stream | None:
        p = self._partition("attention")
        return p.stream if p else None

    @property
    def ffn_stream(self) -> torch.cuda.Stream | None:
        p = self._partition("ffn")
        return p.stream if p else None

    @property
    def attention_sms(self) -> int:
        p = self._partition("attention")
        return p.sm_count if p else 0

    @property
    def ffn_sms(self) -> int:
        p = self._partition("ffn")
        return p.sm_count if p else 0

    def adjust_sm_allocation(
        self, attention_sm_count: int | None, ffn_sm_count: int | None
    ) -> tuple[int, int]:
        """Re-partition the SMs; returns the actual (attention_sms, ffn_sms).

        The new partitions are created before the old ones are destroyed, so a driver failure
        (raised as ``GreenContextError``) leaves the current partitions in place. On success
        ``generation`` is bumped, then the old streams are drained and destroyed. Without green
        contexts it only validates and records the request. Memory the caching allocator keeps
        for the old streams is freed by
        ``torch.cuda.empty_cache()``.
        """
        if self._closed:
            raise RuntimeError("GreenContextManager is closed; create a new one")
        a, f = validate_sm_counts(
            attention_sm_count, ffn_sm_count, self.total_sms or None, self._min_partition
        )
        if not self.available:
            self.requested_attention_sm_count, self.requested_ffn_sm_count = a, f
            logger.debug("adjust_sm_allocation ignored: %s", self.reason)
            return 0, 0
        new = self._create(a, f)
        old, self._split = self._split, new
        self.requested_attention_sm_count, self.requested_ffn_sm_count = a, f
        self.generation += 1
        self._log_split()
        if old is not None:
            old.close()
        return self.attention_sms, self.ffn_sms

    def split_candidates(self) -> list[tuple[int, int]]:
        """(attention, ffn) SM counts for a split search, the FFN partition taking the rest."""
        return [
            (a, self.total_sms - a)
            for a in candidate_attention_sm_counts(
                self.total_sms, self._min_partition, self._alignment
            )
        ]

    def cublas_sm_budget(self, stage: str) -> contextlib.AbstractContextManager[None]:
        """``set_cublas_sm_budget`` for the partition of ``stage`` ("attention" or "ffn")."""
        if stage not in ("attention", "ffn"):
            raise ValueError(f"stage={stage!r} must be 'attention' or 'ffn'")
        n = self.attention_sms if stage == "attention" else self.ffn_sms
        return set_cublas_sm_budget(n or None, self.total_sms or None)

    def stats(self) -> dict:
        """A plain dict for pipeline statistics."""
        return {
            "available": self.available,
            "reason": self.reason,
            "device": self.device_index,
            "total_sms": self.total_sms,
            "attention_sms": self.attention_sms,
            "ffn_sms": self.ffn_sms,
            "requested_attention_sms": self.requested_attention_sm_count,
            "requested_ffn_sms": self.requested_ffn_sm_count,
            "group": self.group,
            "generation": self.generation,
        }

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Drain and destroy the streams and green contexts. Idempotent.

        Drop CUDA graphs captured on these streams first: their nodes belong to the contexts
        destroyed here. (Interpreter exit also cleans up, through ``GreenSplit``'s finalizer.)
        """
        self._closed = True
        split, self._split = self._split, None
        if split is not None:
            split.close()
            self.available = False
            self.reason = "closed"

    def __enter__(self) -> GreenContextManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if not self.available:
            return f"GreenContextManager(available=False, reason={self.reason!r})"
        return (
            f"GreenContextManager(cuda:{self.device_index}, attention={self.attention_sms}, "
            f"ffn={self.ffn_sms}, total={self.total_sms}, generation={self.generation})"
        )
