"""Fusing the small element-wise ops (RMSNorm with residual, SiLU-and-mul, rotary) with
torch.compile on CUDA, where each unfused op would be its own latency-bound kernel.

Chosen once at start-up (``enable_fusion``); CPU tensors always take the plain torch path, so the
package runs anywhere without a compiler. ``NANOVLLM_COMPILE=0`` turns fusion off.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

_enabled = False


def enable_fusion(device: torch.device) -> bool:
    global _enabled
    want = device.type == "cuda" and os.environ.get("NANOVLLM_COMPILE", "1") != "0"
    if want != _enabled:
        why = "CUDA device" if want else "disabled by NANOVLLM_COMPILE=0 or not on CUDA"
        logger.info("small-op fusion with torch.compile: %s (%s)", "on" if want else "off", why)
    _enabled = want
    return _enabled


def fusable(fn: Callable) -> Callable:
    """``fn`` on CPU tensors or with fusion off; its compiled version on CUDA tensors."""
    compiled = None

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args):
        nonlocal compiled
        if not (_enabled and x.is_cuda):
            return fn(x, *args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(x, *args)

    return wrapper
